//! Reliability, round two: the faults of issue 11, each with real processes and files. A
//! full disk (a real tmpfs, filled), stdout closed under a running CLI, damaged rows in
//! the real database file, answers past the frame limit, a wall clock that jumps (the
//! broker run under libfaketime), readers that stall, and too many connections.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use claude_peers::client::{Client, ClientError, ConnectOptions};
use claude_peers::protocol::*;
use common::*;
use serde_json::Value;

/// A tmpfs mounted on a fresh directory; unmounted (and the directory removed) on drop.
struct Mount {
    dir: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A home on a tmpfs of `size` (`mount -o size=`), or `None`, with the reason printed,
/// where this process may not mount one (not root, or no `mount`).
fn home_on_tmpfs(size: &str) -> Option<(Mount, Home)> {
    let dir = tempfile::Builder::new()
        .prefix("cp-fs-")
        .tempdir_in("/tmp")
        .unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
        .arg("tmpfs")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "skipped: cannot mount a tmpfs to fill ({}): run as root",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            eprintln!("skipped: cannot run mount: {e}");
            return None;
        }
    }
    let mount = Mount {
        dir: dir.path().to_owned(),
    };
    Some((mount, Home::on(dir)))
}

/// Fills the file system holding `dir` with a file there, and returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // The last pages too: what is left is less than a chunk.
    while f.write_all(&[0u8; 512]).is_ok() {}
    path
}

fn alive(pid: u32) -> bool {
    rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap()).is_ok()
}

/// Options that start a broker as sessions do: detached, its output in the log file.
fn autostart(home: &Home) -> ConnectOptions {
    let mut opts = home.connect_options();
    opts.autostart = true;
    opts
}

/// Registers `name` and leaves again, so the broker knows it and queues its mail.
async fn known_offline(home: &Home, name: &str) {
    let (c, got) = home.peer(name, "/w").await;
    assert_eq!(got, name);
    drop(c);
    let watcher = home.client().await;
    wait_offline(&watcher, name).await;
}

/// Issue 11, item 1. The state directory's file system fills up under a running broker:
/// it stays up (its log cannot be written either), sends are refused with `disk_full`
/// naming the directory, a CLI says so, nothing answered is lost, and once space returns
/// it carries on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_and_the_broker_carries_on() {
    let Some((mount, home)) = home_on_tmpfs("16m") else {
        return;
    };
    let c = Client::connect(&home.paths, &autostart(&home))
        .await
        .unwrap();
    let broker_pid = c.broker().pid;
    known_offline(&home, "bob").await;

    let mut answered = HashSet::new();
    for i in 0..3 {
        let s = c
            .call(from("alice", "bob", &format!("before {i}")))
            .await
            .unwrap();
        answered.insert(s.message_id);
    }

    let filler = fill(&mount.dir);
    let big = "x".repeat(60 * 1024);
    let mut refused = Vec::new();
    for i in 0..200 {
        match c
            .call(from("alice", "bob", &format!("full {i} {big}")))
            .await
        {
            Ok(s) => {
                answered.insert(s.message_id);
            }
            Err(ClientError::Refused(e)) => refused.push(e),
            Err(e) => panic!("send {i}: {e}"),
        }
        if refused.len() >= 5 {
            break;
        }
    }
    assert!(refused.len() >= 5, "the full disk never refused a send");
    for e in &refused {
        assert_eq!(e.code, ErrorCode::DiskFull, "{e:?}");
        assert!(
            e.message
                .contains(&home.paths.db.parent().unwrap().display().to_string()),
            "names the directory: {}",
            e.message
        );
    }
    assert!(alive(broker_pid), "the broker died of the full disk");

    let out = home.run(&["send", "bob", "from the cli", "--from", "carol"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("is full"), "the CLI says why: {err}");
    // A session that registers now is refused (nothing of it saved), and the broker's
    // table of who is online stays true to the store: a broadcast after it is answered.
    let dave = home.client().await;
    let reg = dave.call(register("dave", "/d")).await;
    assert!(
        matches!(&reg, Err(ClientError::Refused(e)) if e.code == ErrorCode::DiskFull),
        "{reg:?}"
    );
    let b = c
        .call(Broadcast {
            scope: Scope::Machine,
            text: "anyone?".into(),
            in_reply_to: None,
            from: Some("alice".into()),
            cwd: None,
            git_common_dir: None,
            key: None,
        })
        .await;
    assert!(b.is_err(), "no one is online to hear it: {b:?}");
    assert!(
        alive(broker_pid),
        "the broker survived a refused registration"
    );

    std::fs::remove_file(&filler).unwrap();
    let after = c.call(from("alice", "bob", "after")).await.unwrap();
    answered.insert(after.message_id);
    assert_eq!(c.broker().pid, broker_pid);
    assert!(alive(broker_pid));

    let (mut bob, _) = home.peer("bob", "/w").await;
    let mut got = HashSet::new();
    while got.len() < answered.len() {
        let d = next_delivery(&mut bob).await;
        assert!(got.insert(d.id.clone()), "{} delivered twice", d.id);
    }
    assert_eq!(got, answered, "every answered send arrives");
    let status = home.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["pid"], broker_pid,
        "the same broker, not a restarted one"
    );
}

/// Issue 11, item 1. A CLI that has to start a broker on a full disk says the disk is
/// full, instead of "no broker answered" with an empty log.
#[test]
fn a_cli_starting_a_broker_on_a_full_disk_says_the_disk_is_full() {
    let Some((mount, home)) = home_on_tmpfs("2m") else {
        return;
    };
    std::fs::create_dir_all(&home.paths.state_dir).unwrap();
    fill(&mount.dir);
    let out = home.run(&["send", "bob", "hi", "--from", "alice"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("is full"), "says why: {err}");
    assert!(
        err.contains(&home.paths.state_dir.display().to_string()),
        "names the directory: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue 11, item 1. `claude-peers log | head`: the reader leaves before the CLI writes.
/// The CLI ends quietly, as filters do, instead of panicking in println!.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let out = home.run(&["send", "nobody", "x", "--from", "alice"]);
    assert!(!out.status.success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (bob, _) = home.peer("bob", "/w").await;
        let c = home.client().await;
        for i in 0..50 {
            c.call(from("alice", "bob", &format!("line {i}")))
                .await
                .unwrap();
        }
        drop(bob);
    });
    for args in [
        &["log"][..],
        &["log", "--json"],
        &["peers", "--all"],
        &["status"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = home
            .cmd()
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// A send from an unregistered sender, as scripts make them.
fn from(sender: &str, to: &str, text: &str) -> Send {
    Send {
        from: Some(sender.into()),
        ..send(to, text)
    }
}

/// Issue 11, item 4. One message's stored text is not UTF-8 (a damaged file, or a write
/// by another program). The recipient still gets the other 39, the damaged one is put
/// aside with its id in the broker log and counted in `status`, and `log` still answers.
#[tokio::test]
async fn a_damaged_row_is_put_aside_and_the_rest_is_delivered() {
    let home = Home::new();
    let mut broker = home.broker(&[]);
    known_offline(&home, "bob").await;
    let c = home.client().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            c.call(from("alice", "bob", &format!("m{i}")))
                .await
                .unwrap()
                .message_id,
        );
    }
    drop(c);
    broker.kill9();

    let damaged = &ids[17];
    {
        let db = rusqlite::Connection::open(&home.paths.db).unwrap();
        let n = db
            .execute(
                "UPDATE messages SET text = CAST(X'6869ff80fe' AS TEXT) WHERE id = ?1",
                [damaged],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    let _broker = home.broker(&[]);
    let (mut bob, _) = home.peer("bob", "/w").await;
    let mut got = Vec::new();
    for _ in 0..39 {
        got.push(next_delivery(&mut bob).await.id);
    }
    let expected: Vec<String> = ids.iter().filter(|i| *i != damaged).cloned().collect();
    assert_eq!(got, expected, "the intact 39, in order");
    assert_no_delivery(&mut bob, Duration::from_millis(300)).await;
    bob.call(Ack::delivered(got)).await.unwrap();

    let status = home.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["quarantined"], 1, "{status}");
    assert_eq!(status["queued"], 0, "{status}");
    let text = String::from_utf8(home.run(&["status"]).stdout).unwrap();
    assert!(text.contains("damaged"), "{text}");
    assert!(
        home.broker_output().contains(damaged.as_str()),
        "the broker log names the damaged message"
    );

    let log = home.run_ok(&["log", "--json", "--limit", "100"]);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&log.stdout).unwrap();
    assert_eq!(entries.len(), 40);
    let bad = entries
        .iter()
        .find(|e| e["id"] == damaged.as_str())
        .unwrap();
    assert_eq!(bad["state"], "damaged");
    assert_eq!(bad["text"], "hi\u{fffd}\u{fffd}\u{fffd}");

    // A new registration does not bring it back, and new mail flows.
    drop(bob);
    let c = home.client().await;
    wait_offline(&c, "bob").await;
    let after = c
        .call(from("alice", "bob", "after"))
        .await
        .unwrap()
        .message_id;
    let (mut bob, _) = home.peer("bob", "/w").await;
    assert_eq!(next_delivery(&mut bob).await.id, after);
}

/// libfaketime, which moves the wall clock of one process (and leaves its boot clock
/// alone), or `None` with the reason printed.
fn faketime() -> Option<&'static str> {
    const LIBS: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    let lib = LIBS.iter().copied().find(|p| Path::new(p).exists());
    if lib.is_none() {
        eprintln!("skipped: libfaketime not found (apt-get install faketime)");
    }
    lib
}

/// A broker whose wall clock is `offset` off (libfaketime's syntax: "-10d", "+1d").
fn broker_with_clock(home: &Home, lib: &str, offset: &str) -> Broker {
    home.broker_with_env(
        &[],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
}

/// Issue 11, item 7. Mail sent while the wall clock was 10 days behind, then the clock
/// corrected: the first retention sweep must not take it for 10-day-old mail (retention
/// is 7 days) and delete it unread.
#[tokio::test]
async fn mail_stamped_by_a_clock_that_was_behind_survives_the_sweep() {
    let Some(lib) = faketime() else { return };
    let home = Home::new();
    let mut behind = broker_with_clock(&home, lib, "-10d");
    known_offline(&home, "bob").await;
    let c = home.client().await;
    let sent = c
        .call(from("alice", "bob", "sent while the clock was behind"))
        .await;
    let sent = sent.unwrap();
    assert!(
        sent.sent_at < now_millis() - 9 * 86_400_000,
        "the broker's clock was behind"
    );
    drop(c);
    behind.kill9();

    // The clock is right again. This broker sweeps a second after it starts.
    // (The broker before it logged at info, which names a sweep only when it removed
    // something; this one logs every sweep.)
    let _b = home.broker_with_env(&[], &[("CLAUDE_PEERS_LOG", "debug")]);
    wait_for(
        || home.broker_output().contains("retention sweep"),
        "the first retention sweep",
    );
    let (mut bob, _) = home.peer("bob", "/w").await;
    let d = next_delivery(&mut bob).await;
    assert_eq!(d.id, sent.message_id);
}

/// Issue 11, item 7. A message stored while the wall clock was a day ahead, then one after
/// the clock was corrected: the backlog arrives in the order it was stored.
#[tokio::test]
async fn a_clock_set_back_does_not_reorder_the_backlog() {
    let Some(lib) = faketime() else { return };
    let home = Home::new();
    let mut ahead = broker_with_clock(&home, lib, "+1d");
    known_offline(&home, "bob").await;
    let c = home.client().await;
    let first = c.call(from("alice", "bob", "first")).await.unwrap();
    drop(c);
    ahead.kill9();

    let _b = home.broker(&[]);
    let c = home.client().await;
    let second = c.call(from("alice", "bob", "second")).await.unwrap();
    assert!(second.sent_at < first.sent_at, "the clock went back");
    let (mut bob, _) = home.peer("bob", "/w").await;
    assert_eq!(next_delivery(&mut bob).await.id, first.message_id);
    assert_eq!(next_delivery(&mut bob).await.id, second.message_id);
    let log = home.run(&["log", "--json"]);
    let log: Vec<serde_json::Value> = serde_json::from_slice(&log.stdout).unwrap();
    let texts: Vec<&str> = log.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["first", "second"], "history in stored order");
}

mod limits;
