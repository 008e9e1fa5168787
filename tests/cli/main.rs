//! Every CLI verb, run as a person or a script would: the real binary, its output and exit
//! codes.

#[path = "../common/mod.rs"]
mod common;
mod first_hour;
mod top;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use common::*;
use serde_json::Value;

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn status_before_and_after_start() {
    let home = Home::new();
    let o = home.run(&["status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("not running"), "{}", stdout(&o));
    let o = home.run(&["status", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["running"], false);

    // `peers` starts a broker on demand.
    home.run_ok(&["peers"]);
    let o = home.run_ok(&["status"]);
    let text = stdout(&o);
    for key in [
        "broker", "version", "uptime", "socket", "database", "peers", "queued",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(key)),
            "{key} missing in\n{text}"
        );
    }
    let v = json(&home.run(&["status", "--json"]));
    assert!(v["pid"].as_u64().unwrap() > 0);
    assert_eq!(v["protocol"], claude_peers::protocol::PROTOCOL_VERSION);
    assert_eq!(v["peers_online"], 0);
    assert_eq!(v["socket"], home.paths.socket.display().to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_send_and_log() {
    let home = Home::new();
    assert!(home.run(&["status"]).status.code() == Some(1));
    // Start via the CLI (auto-start), then register a session with the library.
    home.run_ok(&["peers", "--all"]);
    let (mut bob, _) = home.peer("bob", "/home/u/api").await;
    bob.call(claude_peers::protocol::SetSummary {
        summary: "rewriting the\nauth flow".into(),
    })
    .await
    .unwrap();

    let o = home.run_ok(&["peers"]);
    let table = stdout(&o);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "NAME",
        "STATE",
        "DIRECTORY",
        "BRANCH",
        "SUMMARY",
        "LAST SEEN",
        "UNREAD",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = lines.next().unwrap();
    assert!(row.starts_with("bob "), "{row}");
    assert!(
        row.contains("online") && row.contains("rewriting the auth flow"),
        "{row}"
    );
    // Columns line up: STATE starts at the same offset in header and row.
    assert_eq!(header.find("STATE"), row.find("online"));

    let v = json(&home.run(&["peers", "--json"]));
    assert_eq!(v[0]["name"], "bob");
    assert_eq!(v[0]["online"], true);
    assert_eq!(v[0]["context"]["cwd"], "/home/u/api");

    // send: text, then JSON, then from stdin.
    let o = home.run_ok(&["send", "bob", "hello from the shell"]);
    assert!(stdout(&o).contains("bob"), "{}", stdout(&o));
    let d = next_delivery(&mut bob).await;
    assert_eq!(
        (d.from.as_str(), d.text.as_str()),
        ("cli", "hello from the shell")
    );
    bob.notify(claude_peers::protocol::Ack::delivered(vec![d.id]))
        .unwrap();

    let v = json(&home.run(&["send", "bob", "json please", "--from", "ops", "--json"]));
    assert!(v["message_id"].as_str().is_some_and(|s| s.len() == 36));
    assert_eq!(v["recipients"][0]["name"], "bob");
    assert!(["delivered", "pushed"].contains(&v["recipients"][0]["state"].as_str().unwrap()));
    let d = next_delivery(&mut bob).await;
    assert_eq!(d.from, "ops");
    // The CLI cannot borrow a session's name.
    let o = home.run(&["send", "bob", "hi", "--from", "bob"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is the name of a session"),
        "{}",
        stderr(&o)
    );

    let mut child = home
        .cmd()
        .args(["send", "bob", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(next_delivery(&mut bob).await.text, "line one\nline two");

    // log: people and scripts.
    let o = home.run_ok(&["log"]);
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.contains("cli -> bob") && text.contains("[delivered]"),
        "{text}"
    );
    let v = json(&home.run(&["log", "--json", "-n", "2"]));
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["text"], "line one\nline two");
    let v = json(&home.run(&["log", "--json", "--peer", "ops"]));
    assert_eq!(v.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn log_follow_streams_new_messages() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let (_bob, _) = home.peer("bob", "/b").await;
    let mut follow = home
        .cmd()
        .args(["log", "-f", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    // The first message may come from history or live; once it is printed the follower
    // has subscribed (it subscribes before reading history), so the second is live.
    home.run_ok(&["send", "bob", "live 0"]);
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["text"], "live 0");
    home.run_ok(&["send", "bob", "live 1"]);
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["text"], "live 1");
    assert_eq!(second["to"], "bob");
    assert_eq!(second["from"], "cli");
    let _ = follow.kill();
    let _ = follow.wait();
}

#[test]
fn stop_is_clean_and_idempotent() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let pid: u32 = std::fs::read_to_string(&home.paths.lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let o = home.run_ok(&["stop"]);
    assert!(
        stdout(&o).contains(&format!("broker stopped (pid {pid})")),
        "{}",
        stdout(&o)
    );
    assert!(!home.paths.socket.exists(), "socket removed");
    wait_for(
        || !claude_peers::platform::process_exists(pid),
        "broker exit",
    );
    // The lock is free again.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&home.paths.lock)
        .unwrap();
    assert!(f.try_lock().is_ok());
    drop(f);
    let o = home.run_ok(&["kill-broker"]);
    assert!(stdout(&o).contains("no broker is running"));
    assert!(
        home.broker_output()
            .contains("broker stopped: claude-peers stop")
    );
}

#[test]
fn failures_and_usage_errors_have_distinct_exit_codes() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let o = home.run(&["send", "ghost", "boo"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("claude-peers: error: no peer is named \"ghost\""),
        "{err}"
    );

    let o = home.run(&["send", "bob"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "missing argument is a usage error"
    );
    let o = home.run(&["peers", "--scope", "galaxy"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("machine, directory, repo or network"),
        "{}",
        stderr(&o)
    );
    let o = home.run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn refuses_a_home_reached_through_a_symlink() {
    let home = Home::new();
    let real = home.dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = home.dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = home
        .cmd()
        .env("CLAUDE_PEERS_HOME", &link)
        .arg("peers")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
}
