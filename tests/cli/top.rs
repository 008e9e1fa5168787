//! `claude-peers top` on a real terminal: tmux runs it in a pane of its own server, and
//! the test reads the screen (`capture-pane`) and types keys (`send-keys`). Skipped when
//! tmux is not installed; `.ci/run` installs it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use claude_peers::protocol::SetSummary;

use crate::common::*;

/// `top` in a 150x30 tmux pane; the tmux server goes when dropped.
struct Pane {
    socket: PathBuf,
}

impl Pane {
    fn start(home: &Home) -> Self {
        let socket = home.dir.path().join("tmux.sock");
        let top = home.cmd();
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&socket).args([
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "150",
            "-y",
            "30",
        ]);
        // The pane gets the test's environment for claude-peers, as `home.cmd()` sets it.
        for (k, v) in top.get_envs() {
            if let Some(v) = v {
                cmd.arg("-e")
                    .arg(format!("{}={}", k.to_string_lossy(), v.to_string_lossy()));
            }
        }
        cmd.arg("--").arg(top.get_program()).arg("top");
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Self { socket }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    /// Waits (10 s at most) until the screen shows every one of `texts`.
    fn wait_for(&self, texts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let screen = self.screen();
            if texts.iter().all(|t| screen.contains(t)) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {texts:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    fn literal(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// The screen shows a session that registers, its summary, a message that is sent and its
/// receipt; a key writes to the session; `top` follows the broker through a restart; `q`
/// ends it and gives the terminal back.
#[tokio::test(flavor = "multi_thread")]
async fn top_shows_sessions_and_messages_live() {
    if agent::missing("tmux") {
        return;
    }
    let home = Home::new();
    let pane = Pane::start(&home);
    pane.wait_for(&["claude-peers top", "started the broker", "scope machine"]);

    let (mut bob, _) = home.peer("bob", "/srv/api").await;
    bob.call(SetSummary {
        summary: "rewriting the auth flow".into(),
    })
    .await
    .unwrap();
    pane.wait_for(&[
        "bob",
        "online",
        "/srv/api",
        "rewriting the auth flow",
        "1 online",
    ]);

    home.run_ok(&["send", "bob", "rebase on main"]);
    let d = next_delivery(&mut bob).await;
    bob.notify(claude_peers::protocol::Ack::delivered(vec![d.id]))
        .unwrap();
    pane.wait_for(&["cli → bob ✓  rebase on main"]);

    // `m` writes to the selected session; Enter sends.
    pane.keys(&["m"]);
    pane.wait_for(&["to bob:"]);
    pane.literal("typed in top");
    pane.keys(&["Enter"]);
    let d = next_delivery(&mut bob).await;
    assert_eq!((d.from.as_str(), d.text.as_str()), ("cli", "typed in top"));
    pane.wait_for(&["sent to bob", "typed in top"]);

    // Enter on a message opens its thread.
    pane.keys(&["Tab", "Enter"]);
    pane.wait_for(&["thread (1 messages"]);
    pane.keys(&["Escape"]);
    pane.wait_for(&["messages (2)"]);

    // Nothing happening costs nothing: no timer wakes `top` (its pid is the pane's).
    let pid: u32 = pane
        .tmux(&["list-panes", "-F", "#{pane_pid}"])
        .trim()
        .parse()
        .unwrap();
    let before = wakeups(pid);
    std::thread::sleep(Duration::from_secs(2));
    let idle = wakeups(pid) - before;
    assert!(idle <= 2, "top woke {idle} times in 2 idle seconds");

    // The broker goes; the session goes offline with it; the next broker is found.
    let before: u32 = home.client().await.broker().pid;
    drop(bob);
    home.run_ok(&["stop"]);
    pane.wait_for(&["broker not running"]);
    home.run_ok(&["peers"]);
    let after = home.client().await.broker().pid;
    assert_ne!(before, after);
    pane.wait_for(&[&format!("broker pid {after}"), "0 online, 1 offline"]);

    pane.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pane.tmux(&["list-panes", "-F", "#{pane_dead}"]).trim() == "0" {
        assert!(
            Instant::now() < deadline,
            "top did not end on q:\n{}",
            pane.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Without a terminal, `top` says what to use instead.
#[test]
fn top_without_a_terminal_points_to_the_json_verbs() {
    let home = Home::new();
    let o = home.run(&["top"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("top needs a terminal") && err.contains("log -f --json"),
        "{err}"
    );
}
