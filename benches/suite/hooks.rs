//! Issue 13's hook figure: `claude-peers hook prompt` as an agent runs it at every prompt,
//! a new process each time, asking its session's live `serve` for mail, with a broker up.
//! Timed from spawn to exit, as the agent waits for it.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::Home;
use crate::common::serve::Serve;
use crate::util::{self, Measured, Row, Target, percentile};

/// One hook run; returns its wall time and what it printed.
fn hook(home: &Home) -> (Duration, Vec<u8>) {
    let t = Instant::now();
    let mut child = home
        .cmd()
        .args(["hook", "prompt"])
        // Not the pid of a Claude Code that may run the benchmarks.
        .env_remove("CLAUDE_PID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let event = br#"{"hook_event_name":"UserPromptSubmit","session_id":"bench"}"#;
    child.stdin.take().unwrap().write_all(event).unwrap();
    let out = child.wait_with_output().unwrap();
    (t.elapsed(), out.stdout)
}

pub async fn run(rows: &mut Vec<Row>) {
    let home = Home::new();
    let _broker = util::broker(&home);
    // A session polled for its mail (as Codex or Gemini CLI is), the bench its host.
    let s = Serve::start(crate::serve::command(&home, "hooked"), false).await;
    s.whoami_when_ready().await;
    let sender = util::peer(&home.paths, "sender", true).await;

    let mut empty = Vec::new();
    for i in 0..55 {
        let (t, out) = hook(&home);
        assert!(out.is_empty(), "no mail, no output");
        if i >= 5 {
            empty.push(t);
        }
    }
    let mut with_mail = Vec::new();
    for i in 0..55 {
        sender
            .call(crate::broker::send("hooked", format!("note {i}")))
            .await
            .unwrap();
        // Until serve holds it: the figure is the hook's, not the delivery's.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (t, out) = hook(&home);
        assert!(
            String::from_utf8_lossy(&out).contains(&format!("note {i}")),
            "the hook shows the mail"
        );
        if i >= 5 {
            with_mail.push(t);
        }
    }
    s.close().await;
    for (what, times) in [("no mail", &mut empty), ("one message", &mut with_mail)] {
        let p50 = util::p50(times);
        rows.push(Row::new(
            "hooks",
            format!("hook prompt, {what} (spawn to exit), p50"),
            Target::AtMost(Duration::from_millis(20)),
            Measured::Time(p50),
        ));
        rows.push(Row::new(
            "hooks",
            format!("hook prompt, {what}, p99"),
            Target::None,
            Measured::Time(percentile(times, 0.99)),
        ));
    }
}
