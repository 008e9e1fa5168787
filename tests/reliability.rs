//! Reliability, round two: the faults of issue 11, each with real processes and files. A
//! full disk (a real tmpfs, filled), stdout closed under a running CLI, damaged rows in
//! the real database file, answers past the frame limit, a wall clock that jumps (the
//! broker run under libfaketime), readers that stall, and too many connections.

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

/// Issue 11, item 5. History of 20 messages of 60 KiB, and a listing of 72 peers with
/// long (allowed) fields, are each larger than a frame: the broker answers in pages that
/// fit, and the CLI reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_larger_than_a_frame_come_in_pages() {
    let home = Home::new();
    let _b = home.broker(&[]);
    known_offline(&home, "bob").await;
    let c = home.client().await;
    let mut texts = Vec::new();
    for i in 0..20 {
        let text = format!("{i:02} {}", "y".repeat(60 * 1024));
        c.call(from("alice", "bob", &text)).await.unwrap();
        texts.push(text);
    }

    let mut raw = Raw::greeted(&home.paths.socket);
    let page = raw.call(r#"{"id":1,"op":"log","limit":1000}"#);
    let first = page["result"]["messages"].as_array().unwrap();
    assert!(first.len() < 20, "one frame cannot hold them all");
    assert!(
        page["result"]["next"].is_string(),
        "{}",
        page["result"]["next"]
    );
    assert!(serde_json::to_vec(&page).unwrap().len() <= MAX_FRAME_BYTES);

    let log = home.run_ok(&["log", "--json", "--limit", "100"]);
    let log: Vec<Value> = serde_json::from_slice(&log.stdout).unwrap();
    let got: Vec<&str> = log.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(got, texts, "all 20, whole, oldest first");
    let some = home.run(&["log", "--json", "--limit", "15"]);
    let some: Vec<Value> = serde_json::from_slice(&some.stdout).unwrap();
    let got: Vec<&str> = some.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(got, texts[5..], "the newest 15 across pages");

    let long = |c: char, n: usize| format!("/{}", c.to_string().repeat(n - 1));
    let mut sessions = Vec::new();
    for i in 0..72 {
        let s = home.client().await;
        let mut r = register(&format!("p{i:02}"), &long('d', 4000));
        r.context.git_root = Some(long('g', 4000));
        r.context.git_common_dir = Some(long('c', 4000));
        r.summary = Some("\u{1}".repeat(4000));
        s.call(r).await.unwrap();
        sessions.push(s);
    }
    let page = raw.call(r#"{"id":2,"op":"list_peers"}"#);
    assert!(page["result"]["next"].is_string(), "{page:.300}");
    assert!(serde_json::to_vec(&page).unwrap().len() <= MAX_FRAME_BYTES);
    let peers = home.run_ok(&["peers", "--json"]);
    let peers: Vec<Value> = serde_json::from_slice(&peers.stdout).unwrap();
    let names: Vec<&str> = peers.iter().map(|p| p["name"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..72).map(|i| format!("p{i:02}")).collect();
    assert_eq!(names, expected);
    let all = home.run(&["peers", "--all", "--json"]);
    let all: Vec<Value> = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(all.len(), 73, "bob too, offline, after the online ones");
    assert_eq!(all[72]["name"], "bob");
}

/// A field of /proc/<pid>/status in bytes (`VmRSS`, `VmHWM`: the peak).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

const MB: u64 = 1 << 20;

/// Issue 11, item 2. A subscriber that never reads (`claude-peers log -f | less`, paused)
/// while a pair exchanges 1,200 messages of 60 KiB: the broker keeps a bounded queue for
/// it (RSS stays under 50 MB, where it used to reach 152 MB), and when it reads again it
/// is told how many events it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_gets_a_lag_notice_not_unbounded_memory() {
    let home = Home::new();
    let broker = home.broker(&["--send-rate", "0", "--ack-wait", "0"]);
    let pid = broker.pid();
    let mut sub = Raw::greeted(&home.paths.socket);
    assert!(sub.call(r#"{"id":1,"op":"subscribe"}"#)["result"].is_object());

    let (mut bob, _) = home.peer("bob", "/w").await;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < 1200 {
            next_delivery(&mut bob).await;
            n += 1;
        }
        bob
    });
    let alice = home.client().await;
    let text = "z".repeat(60 * 1024);
    for i in 0..1200 {
        alice
            .call(from("alice", "bob", &format!("{i} {text}")))
            .await
            .unwrap();
    }
    let _bob = reader.await.unwrap();
    let peak = memory(pid, "VmHWM");
    eprintln!(
        "broker peak RSS with a stalled subscriber: {} MB",
        peak / MB
    );
    assert!(peak <= 50 * MB, "broker peak RSS {} MB", peak / MB);

    // It reads again: what fit its queue, then the notice, and together they count all.
    let mut events = 0;
    let missed = loop {
        let frame = sub.recv().expect("a frame");
        if let Some(l) = frame.get("lagged") {
            break l["missed"].as_u64().unwrap();
        }
        assert_eq!(frame["event"]["kind"], "sent", "{frame:.200}");
        events += 1;
    };
    assert!(missed > 0);
    assert_eq!(events + missed, 1200, "{events} events and {missed} missed");
    drop(sub);
    let after = memory(pid, "VmRSS");
    eprintln!("broker RSS after the subscriber left: {} MB", after / MB);
    assert!(after <= 50 * MB, "broker RSS after {} MB", after / MB);
}

/// Issue 11, item 2. A recipient that never reads: its mail stays in the store instead of
/// queueing in the broker's memory, and all of it arrives, in order, once it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_never_reads_leaves_its_mail_in_the_store() {
    let home = Home::new();
    let broker = home.broker(&["--send-rate", "0", "--ack-wait", "0"]);
    let pid = broker.pid();
    let mut bob = Raw::greeted(&home.paths.socket);
    let reg = bob.call(
        r#"{"id":1,"op":"register","name":"bob","context":{"cwd":"/w","pid":1,"push":true}}"#,
    );
    assert_eq!(reg["result"]["name"], "bob", "{reg}");

    let alice = home.client().await;
    let text = "q".repeat(60 * 1024);
    let mut ids = Vec::new();
    for i in 0..1200 {
        let sent = alice
            .call(from("alice", "bob", &format!("{i} {text}")))
            .await;
        ids.push(sent.unwrap().message_id);
    }
    let peak = memory(pid, "VmHWM");
    eprintln!("broker peak RSS with a stalled recipient: {} MB", peak / MB);
    assert!(peak <= 50 * MB, "broker peak RSS {} MB", peak / MB);

    let mut got = Vec::new();
    while got.len() < ids.len() {
        let frame = bob.recv().expect("a frame");
        let id = frame["deliver"]["id"]
            .as_str()
            .expect("a delivery")
            .to_string();
        got.push(id);
    }
    assert_eq!(got, ids, "all of it, in order, once");
}

/// Newcomer's run, issue 11: no cap on connections. Past `--max-connections` a connection
/// gets a clear refusal and is closed; the broker goes on serving the others, and one
/// more fits once one closes.
#[tokio::test]
async fn connections_past_the_cap_are_refused_with_a_clear_error() {
    let home = Home::new();
    let _b = home.broker(&["--max-connections", "40"]);
    // Once the probe connections of start-up are gone, only ours count.
    let mut held = vec![Raw::greeted(&home.paths.socket)];
    wait_for(
        || held[0].call(r#"{"id":1,"op":"status"}"#)["result"]["connections"] == 1,
        "start-up connections to close",
    );
    held.extend((1..40).map(|_| Raw::greeted(&home.paths.socket)));
    let mut over = Raw::connect(&home.paths.socket);
    let refusal = over.recv().expect("a refusal");
    assert_eq!(
        error_code(&refusal),
        Some("too_many_connections"),
        "{refusal}"
    );
    assert!(
        refusal["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CLAUDE_PEERS_MAX_CONNECTIONS")
    );
    assert!(over.recv().is_none(), "then closed");
    let out = home.run(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connections open"),
        "{out:?}"
    );

    drop(held.pop());
    wait_for(
        || home.run(&["status", "--json"]).status.success(),
        "room for one more",
    );
    let v = held[0].call(r#"{"id":9,"op":"status"}"#);
    assert_eq!(v["result"]["connections"], 39, "{v}");
}

/// Newcomer's run, issue 11: slow half-frames. 300 clients each send most of a 1 MiB
/// frame and stall: the broker holds at most its budget for frames still arriving
/// (64 MiB), refuses the rest with `busy`, and serves everyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_half_frames_cannot_take_the_broker_s_memory() {
    let home = Home::new();
    let broker = home.broker(&[]);
    let pid = broker.pid();
    let half = vec![b'x'; 900 * 1024];
    let mut stalled = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let mut r = Raw::greeted(&home.paths.socket);
        r.send_bytes_until_closed(&half);
        stalled.push(r);
    }
    // Those past the budget were told so and closed.
    for r in &mut stalled {
        r.stream_set_read_timeout(Duration::from_millis(20));
        if let Some(Ok(v)) = r.try_recv() {
            assert_eq!(error_code(&v), Some("busy"), "{v}");
            refused += 1;
        }
    }
    assert!(refused > 200, "only {refused} of 300 refused");
    let peak = memory(pid, "VmHWM");
    eprintln!(
        "broker peak RSS with 300 stalled half-frames: {} MB",
        peak / MB
    );
    assert!(peak <= 120 * MB, "broker peak RSS {} MB", peak / MB);
    // Everyone else is served meanwhile.
    home.run_ok(&["status"]);
}

/// Newcomer's run, issue 11: a send whose answer was lost (the broker died after storing
/// it) and that is tried again must not arrive twice. The client picks an idempotency key
/// before the first try; a retry with it, even to a restarted broker, is answered with
/// the first message, and nothing more is stored.
#[tokio::test]
async fn a_retried_send_with_the_same_key_is_stored_once() {
    let home = Home::new();
    let mut broker = home.broker(&[]);
    known_offline(&home, "bob").await;
    let send = r#"{"id":1,"op":"send","to":["bob"],"text":"exactly once","from":"alice","key":"k-19b76da"}"#;
    let first = Raw::greeted(&home.paths.socket).call(send);
    let id = first["result"]["message_id"].as_str().unwrap().to_string();
    broker.kill9();

    let _broker = home.broker(&[]);
    let again = Raw::greeted(&home.paths.socket).call(send);
    assert_eq!(again["result"]["message_id"], id.as_str(), "{again}");
    assert_eq!(again["result"]["recipients"][0]["state"], "queued");
    let other = Raw::greeted(&home.paths.socket).call(&send.replace("alice", "carol"));
    assert_eq!(error_code(&other), Some("bad_request"), "{other}");

    let (mut bob, _) = home.peer("bob", "/w").await;
    assert_eq!(next_delivery(&mut bob).await.id, id);
    assert_no_delivery(&mut bob, Duration::from_millis(300)).await;
    let log = home.run(&["log", "--json"]);
    let log: Vec<Value> = serde_json::from_slice(&log.stdout).unwrap();
    assert_eq!(log.len(), 1, "stored once: {log:?}");
}

/// Newcomer's run, issue 11: `log -f` follows across a broker that stops and comes back,
/// instead of exiting.
#[tokio::test]
async fn log_follow_carries_on_across_a_stopped_broker() {
    let home = Home::new();
    let _first = home.broker(&[]);
    known_offline(&home, "bob").await;
    let mut follow = home
        .cmd()
        .args(["log", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let expect = async |lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>, text: &str| {
        let wait = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(l) = lines.recv().await {
                if l.contains(text) {
                    return;
                }
            }
            panic!("log -f ended");
        });
        wait.await.unwrap_or_else(|_| panic!("{text:?} not shown"));
    };
    let c = home.client().await;
    c.call(from("alice", "bob", "one")).await.unwrap();
    expect(&mut lines, "one").await;
    drop(c);

    home.run_ok(&["stop"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(follow.try_wait().unwrap().is_none(), "log -f exited");

    let _second = home.broker(&[]);
    let c = home.client().await;
    c.call(from("alice", "bob", "two")).await.unwrap();
    expect(&mut lines, "two").await;
    let _ = follow.kill();
}

/// Review of issue 11's queues: a session killed while the broker waits for room to push
/// its backlog. The broker's reader, which had stopped reading from it, must still see it
/// go: the peer goes offline and its connection is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dies_with_a_full_queue_goes_offline() {
    let home = Home::new();
    let _b = home.broker(&["--send-rate", "0"]);
    known_offline(&home, "bob").await;
    let alice = home.client().await;
    let text = "w".repeat(60 * 1024);
    for i in 0..100 {
        alice
            .call(from("alice", "bob", &format!("{i} {text}")))
            .await
            .unwrap();
    }
    let mut bob = Raw::greeted(&home.paths.socket);
    bob.send(r#"{"id":1,"op":"register","name":"bob","context":{"cwd":"/w","pid":1,"push":true}}"#);
    // It reads nothing; its backlog fills its queue; it asks one more thing (so the
    // broker's reader, after it, waits for room), and dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.send(r#"{"id":2,"op":"status"}"#);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(bob);
    wait_offline(&alice, "bob").await;
    let status = alice.call(StatusCall).await.unwrap();
    assert_eq!(status.peers_online, 0);
    assert_eq!(status.connections, 1, "only ours is left");
}
