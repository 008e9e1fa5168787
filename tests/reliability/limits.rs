//! Bounds, round two: answers past a frame come in pages; readers that stall cannot
//! take the broker's memory; connection and half-frame caps; idempotent retries; log -f
//! across a stop; a client that dies with a full queue.

use super::*;

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
    // Once the probe connections of start-up are gone, only ours is open (status counts
    // the connections besides the one asking).
    let mut held = vec![Raw::greeted(&home.paths.socket)];
    wait_for(
        || held[0].call(r#"{"id":1,"op":"status"}"#)["result"]["connections"] == 0,
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
    // 39 held, counted besides the one asking.
    assert_eq!(v["result"]["connections"], 38, "{v}");
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
    assert_eq!(status.connections, 0, "only ours (not counted) is left");
}
