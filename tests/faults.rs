//! Faults, with real processes and real signals: the broker and `serve` killed with
//! SIGKILL in the middle of a stream of messages, the stale socket and lock a killed broker
//! leaves behind, databases that are locked or unreadable, and clients racing to start a
//! broker. Each test has its own `CLAUDE_PEERS_HOME`.
//!
//! What "exactly once" means here. On the wire a message is delivered at least once: an
//! unacked message is pushed again on every new registration, and clients drop duplicates
//! by id. So the tests check what the system promises: a send answered with success
//! always arrives, under the id the sender was told and with its text; no text arrives
//! under two ids (a failed send arrives at most once); nothing is delivered twice on one
//! connection; and nothing is delivered again once its ack was committed.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use claude_peers::client::{Client, ClientError, ConnectOptions, Event, decode};
use claude_peers::paths::Paths;
use claude_peers::protocol::*;
use common::serve::Serve;
use common::*;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Polls `cond` every few milliseconds, without blocking the runtime, for up to 10 s.
async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Connects to the broker and registers as `name` from `cwd`, trying again while no
/// broker answers (for up to 10 s). Each failed attempt is counted in `down` and kept in
/// `errors`. The name must come back unchanged: a reconnecting session keeps its name.
async fn connect_as(
    paths: &Paths,
    opts: &ConnectOptions,
    name: &str,
    cwd: &str,
    down: &AtomicUsize,
    errors: &mut Vec<ClientError>,
) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = match Client::connect(paths, opts).await {
            Ok(c) => c.call(register(name, cwd)).await.map(|reg| (c, reg)),
            Err(e) => Err(e),
        };
        match attempt {
            Ok((c, reg)) => {
                assert_eq!(reg.name, name, "{name} registered again under another name");
                return c;
            }
            Err(e) => {
                errors.push(e);
                down.fetch_add(1, Ordering::SeqCst);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name} found no broker for 10s: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------
// 1. The broker killed three times during a stream of 1,000 messages.
// ---------------------------------------------------------------------------------------

const STREAM: usize = 1000;
/// Sends in flight at once, so that a kill always catches some of them.
const WINDOW: usize = 8;
/// The sender asks for a kill just before these sends, with WINDOW sends in flight.
const KILL_BEFORE: [usize; 3] = [250, 500, 750];

/// What the sender was told.
#[derive(Default)]
struct SenderLedger {
    /// text -> message id, for every send answered with success.
    answered: HashMap<String, String>,
    /// Every send that failed, with its error.
    failed: Vec<(String, ClientError)>,
    /// Errors from connecting again while the broker was down.
    connect_errors: Vec<ClientError>,
    /// The id of the last message, sent after the stream.
    end_id: String,
}

/// Streams STREAM messages to bob, WINDOW at a time. At each KILL_BEFORE point it has the
/// broker killed (through `kill`) and goes on: sends fail, it reconnects and registers
/// again as alice, and carries on with the next message. Failed sends are not retried, so
/// each text is sent once. Ends with an "end" message.
async fn alice_streams(
    paths: Paths,
    opts: ConnectOptions,
    kill: mpsc::Sender<oneshot::Sender<()>>,
    down: Arc<AtomicUsize>,
) -> SenderLedger {
    let mut ledger = SenderLedger::default();
    let mut c = connect_as(
        &paths,
        &opts,
        "alice",
        "/a",
        &down,
        &mut ledger.connect_errors,
    )
    .await;
    let mut in_flight: VecDeque<(String, oneshot::Receiver<_>)> = VecDeque::new();
    let mut next = 0;
    let mut dead = false;
    loop {
        if dead && in_flight.is_empty() {
            c = connect_as(
                &paths,
                &opts,
                "alice",
                "/a",
                &down,
                &mut ledger.connect_errors,
            )
            .await;
            dead = false;
        }
        if !dead && next < STREAM && in_flight.len() < WINDOW {
            if KILL_BEFORE.contains(&next) {
                let (done, killed) = oneshot::channel();
                kill.send(done).await.unwrap();
                killed.await.unwrap();
            }
            let text = format!("m{next}");
            next += 1;
            match c.start(send("bob", &text)) {
                Ok(answer) => in_flight.push_back((text, answer)),
                Err(e) => {
                    ledger.failed.push((text, e));
                    dead = true;
                }
            }
            continue;
        }
        let Some((text, answer)) = in_flight.pop_front() else {
            break;
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .unwrap_or_else(|_| panic!("no answer to the send of {text} within 10s"));
        match decode::<Sent>(answer) {
            Ok(sent) => {
                ledger.answered.insert(text, sent.message_id);
            }
            Err(e) => {
                ledger.failed.push((text, e));
                dead = true;
            }
        }
    }
    ledger.end_id = c.call(send("bob", "end")).await.unwrap().message_id;
    ledger
}

/// What the recipient saw.
#[derive(Default)]
struct Received {
    /// message id -> text, for every delivery.
    texts: HashMap<String, String>,
    /// Ids whose ack the broker confirmed (it answers an ack with an id after its commit).
    acked: HashSet<String>,
    connections: usize,
    connect_errors: Vec<ClientError>,
}

/// Receives as bob until the "end" message is acked. Acks every delivery (with an id, so
/// the broker confirms the ack was stored); on a lost connection, reconnects and registers
/// again as bob. Checks each delivery as it comes: never twice on one connection, never
/// again after its ack was confirmed.
async fn bob_receives(
    paths: Paths,
    opts: ConnectOptions,
    registered: oneshot::Sender<()>,
    down: Arc<AtomicUsize>,
) -> Received {
    let mut got = Received::default();
    let mut c = connect_as(&paths, &opts, "bob", "/b", &down, &mut got.connect_errors).await;
    registered.send(()).unwrap();
    got.connections = 1;
    let mut this_connection = HashSet::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), c.next_event())
            .await
            .expect("bob received nothing for 10s");
        let d = match event {
            Some(Event::Deliver(d)) => d,
            Some(Event::Log(_) | Event::Lagged(_)) => continue,
            None => {
                // The broker is gone: come back under the same name.
                c = connect_as(&paths, &opts, "bob", "/b", &down, &mut got.connect_errors).await;
                got.connections += 1;
                this_connection.clear();
                continue;
            }
        };
        assert!(
            this_connection.insert(d.id.clone()),
            "{} ({}) delivered twice on one connection",
            d.id,
            d.text
        );
        assert!(
            !got.acked.contains(&d.id),
            "{} ({}) delivered again after its ack was stored",
            d.id,
            d.text
        );
        assert_eq!(d.from, "alice");
        if let Some(before) = got.texts.insert(d.id.clone(), d.text.clone()) {
            assert_eq!(before, d.text, "{} came back with another text", d.id);
        }
        match c.call(Ack::delivered(vec![d.id.clone()])).await {
            Ok(_) => {
                got.acked.insert(d.id.clone());
                if d.text == "end" {
                    return got;
                }
            }
            // The broker died before storing the ack: the message will come again.
            Err(e) => assert!(matches!(e, ClientError::Disconnected), "ack failed: {e}"),
        }
    }
}

/// Proves: with the broker `kill -9`ed three times during a stream of 1,000 messages
/// (and restarted each time), every send answered with success reaches the recipient,
/// under its id and with its text; no message arrives twice (a send that failed arrives
/// at most once); every failed send fails with `Disconnected`, whose message says to try
/// again; and both sessions reconnect and get their names back after each kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_three_times_mid_stream_loses_and_doubles_nothing() {
    let home = Home::new();
    let broker_args = ["--send-rate", "0"];
    let mut broker = home.broker(&broker_args);
    let alice_down = Arc::new(AtomicUsize::new(0));
    let bob_down = Arc::new(AtomicUsize::new(0));

    let (registered, bob_ready) = oneshot::channel();
    let bob = tokio::spawn(bob_receives(
        home.paths.clone(),
        home.connect_options(),
        registered,
        bob_down.clone(),
    ));
    // Sending to bob needs bob to exist.
    tokio::time::timeout(Duration::from_secs(10), bob_ready)
        .await
        .expect("bob registers")
        .unwrap();
    let (kill_tx, mut kill_rx) = mpsc::channel(1);
    let alice = tokio::spawn(alice_streams(
        home.paths.clone(),
        home.connect_options(),
        kill_tx,
        alice_down.clone(),
    ));

    for _ in KILL_BEFORE {
        let killed = tokio::time::timeout(Duration::from_secs(30), kill_rx.recv())
            .await
            .expect("alice asks for the next kill")
            .expect("alice is running");
        let (a, b) = (
            alice_down.load(Ordering::SeqCst),
            bob_down.load(Ordering::SeqCst),
        );
        broker.kill9();
        killed.send(()).unwrap();
        // Both sessions find the broker gone (a connect attempt fails) before a new one
        // starts, so sends really do fail while it is down.
        wait_until(
            || alice_down.load(Ordering::SeqCst) > a && bob_down.load(Ordering::SeqCst) > b,
            "both sessions to find the broker down",
        )
        .await;
        broker = home.broker(&broker_args);
    }

    let sent = tokio::time::timeout(Duration::from_secs(60), alice)
        .await
        .expect("alice finishes within 60s")
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), bob)
        .await
        .expect("bob receives the end within 30s")
        .unwrap();
    drop(broker);

    assert_eq!(sent.answered.len() + sent.failed.len(), STREAM);
    // A kill catches at most the sends in flight and the one after it.
    assert!(
        sent.answered.len() >= STREAM - KILL_BEFORE.len() * (WINDOW + 1),
        "only {} of {STREAM} sends answered",
        sent.answered.len()
    );
    // No loss: every answered send arrived, under the id the sender was told, with its text.
    for (text, id) in &sent.answered {
        assert_eq!(
            got.texts.get(id),
            Some(text),
            "answered send {text} ({id}) never arrived"
        );
    }
    assert_eq!(got.texts.get(&sent.end_id).map(String::as_str), Some("end"));
    // No doubles, nothing invented: each text arrived under one id at most, and only texts
    // that were sent arrived.
    let mut ids_of_text: HashMap<&str, &str> = HashMap::new();
    for (id, text) in &got.texts {
        let sent_text = text == "end"
            || sent.answered.contains_key(text)
            || sent.failed.iter().any(|(t, _)| t == text);
        assert!(sent_text, "{id} carries {text:?}, which was never sent");
        if let Some(other) = ids_of_text.insert(text, id) {
            panic!("{text} arrived twice, as {other} and {id}");
        }
    }
    // Each kill made at least one send fail (the one right after it), and every failure
    // is the same clear error: the connection closed, try again.
    assert!(
        sent.failed.len() >= KILL_BEFORE.len(),
        "{}",
        sent.failed.len()
    );
    for (text, e) in &sent.failed {
        assert!(
            matches!(e, ClientError::Disconnected),
            "send of {text}: {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("try again"), "send of {text}: {msg}");
    }
    // While the broker was down, connecting failed because no broker ran, and said where.
    let socket = home.paths.socket.display().to_string();
    for e in sent.connect_errors.iter().chain(&got.connect_errors) {
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
        assert!(e.to_string().contains(&socket), "{e}");
    }
    // Bob came back after every kill (and alice too, or she could not have finished).
    assert_eq!(got.connections, 1 + KILL_BEFORE.len());
}

/// A call made on a connection whose broker was killed fails at once with
/// `Disconnected`, however soon after the kill it is made: none waits for an answer that
/// cannot come.
#[tokio::test]
async fn a_call_on_a_connection_whose_broker_died_fails_at_once() {
    let home = Home::new();
    let mut broker = home.broker(&[]);
    let soon = home.client().await;
    let later = home.client().await;
    broker.kill9();
    for (c, after) in [
        (&soon, Duration::ZERO),
        (&later, Duration::from_millis(300)),
    ] {
        // Later: the client has seen the connection end before the call is made.
        tokio::time::sleep(after).await;
        for _ in 0..2 {
            let call = c.call(ListPeers::default());
            let r = tokio::time::timeout(Duration::from_secs(5), call).await;
            assert!(
                matches!(r, Ok(Err(ClientError::Disconnected))),
                "a call {after:?} after the broker died: {r:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. The recipient's `serve` killed mid-stream and started again.
// ---------------------------------------------------------------------------------------

/// A channel event's message id and text; it must come from alice.
fn event_fields(ev: &Value) -> (String, String) {
    assert_eq!(ev["meta"]["from"], "alice", "{ev}");
    let id = ev["meta"]["message_id"].as_str().expect("message_id");
    let text = ev["content"].as_str().expect("content");
    (id.to_string(), text.to_string())
}

/// Sends `texts` to `to`, up to 16 at a time, and returns each text with its answer.
/// Every send must succeed: the broker is not disturbed here.
async fn send_all(
    c: &Client,
    to: &str,
    texts: impl Iterator<Item = String>,
) -> Vec<(String, Sent)> {
    let mut answered = Vec::new();
    let mut in_flight = VecDeque::new();
    let mut texts = texts.peekable();
    while texts.peek().is_some() || !in_flight.is_empty() {
        if in_flight.len() < 16
            && let Some(text) = texts.next()
        {
            let answer = c.start(send(to, &text)).unwrap();
            in_flight.push_back((text, answer));
            continue;
        }
        let (text, answer) = in_flight.pop_front().unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("an answer within 10s");
        answered.push((text, decode::<Sent>(answer).unwrap()));
    }
    answered
}

/// Proves: when the recipient's `serve` is `kill -9`ed mid-stream and started again from
/// the same directory, the new `serve` gets the same name, every message the old one did
/// not ack arrives as a channel event exactly once, and nothing it did ack comes again.
/// The old one acked only what it had pushed to its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_stream_gets_its_unacked_mail_once_under_the_same_name() {
    const FIRST: usize = 200; // sent before and while the first serve dies
    const SECOND: usize = 200; // sent after the second serve started
    const KILL_AFTER: usize = 60; // events shown by the first serve before its kill
    let home = Home::new();
    let _broker = home.broker(&["--send-rate", "0"]);
    let cwd = home.dir.path().join("recv");
    std::fs::create_dir(&cwd).unwrap();

    let mut first = Serve::start(home.serve_cmd(None, &cwd), true).await;
    let me = first.whoami_when_ready().await;
    assert_eq!(me["name"], "recv");
    assert_eq!(me["delivery"], "channel");

    let (alice, _) = home.peer("alice", "/a").await;
    let (go_on, second_started) = oneshot::channel::<()>();
    // Alice sends the first part at once (it is in flight when the first serve dies), the
    // rest once the second serve runs, then "end".
    let sender = tokio::spawn(async move {
        let mut sent = send_all(&alice, "recv", (0..FIRST).map(|i| format!("m{i}"))).await;
        second_started.await.unwrap();
        let rest = (FIRST..FIRST + SECOND).map(|i| format!("m{i}"));
        sent.extend(send_all(&alice, "recv", rest).await);
        sent.extend(send_all(&alice, "recv", std::iter::once("end".to_string())).await);
        sent
    });

    // The first serve shows some messages, then dies with more arriving. (Events are
    // handled on rmcp's tasks, so they may come out of order: compare sets, not order.)
    let mut shown_first: HashMap<String, String> = HashMap::new();
    while shown_first.len() < KILL_AFTER {
        let ev = first.event_within(Duration::from_secs(10)).await;
        let (id, text) = event_fields(&ev.expect("the first serve pushes messages"));
        assert!(
            shown_first.insert(id.clone(), text).is_none(),
            "{id} shown twice"
        );
    }
    for (id, text) in first.kill9().await.iter().map(event_fields) {
        assert!(
            shown_first.insert(id.clone(), text).is_none(),
            "{id} shown twice"
        );
    }

    // Once the broker has seen it go, what it acked is final: read it from the history.
    let observer = home.client().await;
    wait_offline(&observer, "recv").await;
    let history = observer
        .call(LogQuery {
            before: None,
            limit: Some(1000),
            peer: Some("recv".into()),
        })
        .await
        .unwrap();
    // Channel events are acked as pushed (nothing can confirm them).
    let acked: HashSet<String> = history
        .messages
        .iter()
        .filter(|e| e.state == DeliveryState::Pushed)
        .map(|e| e.id.clone())
        .collect();
    assert!(
        acked.len() >= KILL_AFTER / 2,
        "the first serve acked only {}",
        acked.len()
    );
    for id in &acked {
        assert!(
            shown_first.contains_key(id),
            "{id} was acked but the first serve never pushed it to its client"
        );
    }

    // The second serve, from the same directory, takes the name back, and the stream
    // goes on.
    let mut second = Serve::start(home.serve_cmd(None, &cwd), true).await;
    assert_eq!(second.whoami_when_ready().await["name"], "recv");
    go_on.send(()).unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the sender finishes within 30s")
        .unwrap();
    assert_eq!(sent.len(), FIRST + SECOND + 1);
    let answers: HashMap<String, DeliveryState> = sent
        .iter()
        .map(|(_, s)| (s.message_id.clone(), s.recipients[0].state))
        .collect();
    let sent: Vec<(String, String)> = sent
        .into_iter()
        .map(|(text, s)| (text, s.message_id))
        .collect();
    let unacked: HashMap<&String, &String> = sent
        .iter()
        .filter(|(_, id)| !acked.contains(id))
        .map(|(text, id)| (id, text))
        .collect();

    // Everything the first serve did not ack reaches the second, once, with its text;
    // nothing it did ack comes again.
    let mut shown_second: HashMap<String, String> = HashMap::new();
    while unacked.keys().any(|id| !shown_second.contains_key(*id)) {
        let Some((id, text)) = second
            .event_within(Duration::from_secs(10))
            .await
            .map(|e| event_fields(&e))
        else {
            let missing: Vec<_> = unacked
                .iter()
                .filter(|(id, _)| !shown_second.contains_key(**id))
                .collect();
            panic!("never reached the second serve: {missing:?}");
        };
        assert!(
            !acked.contains(&id),
            "{id} ({text}) was acked by the first serve and shown again"
        );
        assert_eq!(
            unacked.get(&id),
            Some(&&text),
            "{id} shown with another text, or never sent"
        );
        assert!(
            shown_second.insert(id.clone(), text).is_none(),
            "{id} shown twice"
        );
    }
    let late = second.event_within(Duration::from_millis(200)).await;
    if let Some((id, text)) = late.map(|e| event_fields(&e)) {
        panic!("unexpected event after all mail arrived: {id} ({text})");
    }
    // What the first serve showed was sent, with that text.
    let texts: HashMap<&String, &String> = sent.iter().map(|(text, id)| (id, text)).collect();
    for (id, text) in &shown_first {
        assert_eq!(texts.get(id), Some(&text), "{id} shown by the first serve");
    }
    // A sender is never told `delivered` for a channel event, which nothing confirms.
    for (id, state) in &answers {
        assert_ne!(*state, DeliveryState::Delivered, "{id}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Stale files, and databases that cannot be used.
// ---------------------------------------------------------------------------------------

/// Runs `cmd` and returns its output, failing the test if it has not exited within
/// `within` (the process is then killed, so a hang fails instead of blocking CI).
fn output_within(cmd: Command, within: Duration) -> Output {
    let shown = format!("{cmd:?}");
    common::claude::run_within(cmd, within).unwrap_or_else(|out| {
        panic!(
            "{shown} still running after {within:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn status_json(home: &Home) -> Value {
    let out = home.run(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn lock_pid(home: &Home) -> u32 {
    std::fs::read_to_string(&home.paths.lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The live `claude-peers broker` processes of this home (Linux: read from /proc).
fn brokers_of(home: &Home) -> Vec<u32> {
    let want = format!("CLAUDE_PEERS_HOME={}", home.root().display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let (Ok(cmdline), Ok(environ), Ok(stat)) = (
            std::fs::read(dir.join("cmdline")),
            std::fs::read(dir.join("environ")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // gone meanwhile
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_broker =
            args.len() >= 2 && args[0] == common::BIN.as_bytes() && args[1] == b"broker";
        let ours = environ.split(|b| *b == 0).any(|v| v == want.as_bytes());
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if is_broker && ours && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Proves: the socket and lock file a `kill -9`ed broker leaves behind stop neither a new
/// foreground broker (`claude-peers broker`) nor one started on demand by a CLI command;
/// and `status` reports such a leftover as "not running" instead of failing or hanging.
#[test]
fn stale_socket_and_lock_of_a_killed_broker_never_block_a_new_one() {
    let home = Home::new();
    for round in 0..2 {
        let mut b = home.broker(&[]);
        let pid = b.pid();
        assert_eq!(status_json(&home)["pid"], pid);
        b.kill9();
        // The leftovers: a socket nobody listens on, and a lock file naming a dead pid.
        assert!(
            home.paths.socket.exists(),
            "round {round}: socket left behind"
        );
        assert_eq!(lock_pid(&home), pid);
        assert!(std::os::unix::net::UnixStream::connect(&home.paths.socket).is_err());
        let out = output_within(
            {
                let mut c = home.cmd();
                c.args(["status", "--json"]);
                c
            },
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(1), "status with a stale socket");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["running"], false, "{v}");
    }
    // A CLI command starts a broker over the leftovers of the second kill.
    let killed = lock_pid(&home);
    let out = output_within(
        {
            let mut c = home.cmd();
            c.args(["peers", "--json"]);
            c
        },
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let pid = status_json(&home)["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid, killed);
    assert_eq!(lock_pid(&home), pid);
    assert_eq!(brokers_of(&home), [pid]);
    assert!(
        home.broker_output().contains("removed stale socket"),
        "{}",
        home.broker_output()
    );
}

/// How a test spoils the database.
enum BadDb {
    /// The database path is a directory.
    Directory,
    /// A file of random bytes.
    Garbage,
}

fn spoil(home: &Home, how: BadDb) {
    home.paths.prepare().unwrap();
    match how {
        BadDb::Directory => std::fs::create_dir(&home.paths.db).unwrap(),
        BadDb::Garbage => {
            let bytes: Vec<u8> = (0..8192u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            std::fs::write(&home.paths.db, bytes).unwrap();
        }
    }
}

/// Holds an exclusive SQLite lock on the database of `home`, as another program could.
/// With `wal`, the database is first made by a real broker (so it is in WAL mode, where an
/// exclusive transaction locks out writers only); otherwise it is a new file in SQLite's
/// default rollback-journal mode, where it locks out readers too.
fn lock_database(home: &Home, wal: bool) -> rusqlite::Connection {
    home.paths.prepare().unwrap();
    if wal {
        home.run_ok(&["peers"]);
        home.run_ok(&["stop"]);
    }
    let conn = rusqlite::Connection::open(&home.paths.db).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS held (x); BEGIN EXCLUSIVE; INSERT INTO held VALUES (1);",
    )
    .unwrap();
    conn
}

/// Runs `claude-peers broker` and checks it gives up quickly and clearly: it exits with
/// status 1 (within 10 s, else the test fails as a hang), its one-line error names the
/// database, says what is wrong (`cause`) and what to do, and it leaves no socket behind.
fn broker_refuses(home: &Home, cause: &str) {
    let out = output_within(
        {
            let mut c = home.cmd();
            c.arg("broker");
            c
        },
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let db = home.paths.db.display().to_string();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("claude-peers: error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains(&db), "does not name the database: {line}");
    assert!(line.contains(cause), "does not say {cause:?}: {line}");
    assert!(
        line.contains("CLAUDE_PEERS_DB"),
        "does not say what to do: {line}"
    );
    assert!(
        !home.paths.socket.exists(),
        "a failed broker left its socket"
    );
}

/// Runs a CLI command that needs a broker, and checks that it fails within 15 s with an
/// error naming the database and what is wrong with it (`cause`).
fn cli_autostart_refuses(home: &Home, cause: &str) {
    let out = output_within(
        {
            let mut c = home.cmd();
            c.args(["peers", "--json"]);
            c
        },
        Duration::from_secs(15),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let db = home.paths.db.display().to_string();
    assert!(stderr.contains(&db), "does not name the database: {stderr}");
    assert!(stderr.contains(cause), "does not say {cause:?}: {stderr}");
}

/// Proves: a database path that is a directory stops the broker at once with a clear error.
#[test]
fn database_that_is_a_directory_stops_the_broker_clearly() {
    let home = Home::new();
    spoil(&home, BadDb::Directory);
    broker_refuses(&home, "Is a directory");
}

/// Proves: a database file of garbage bytes stops the broker at once with a clear error.
#[test]
fn database_of_garbage_stops_the_broker_clearly() {
    let home = Home::new();
    spoil(&home, BadDb::Garbage);
    broker_refuses(&home, "not a database");
}

/// Proves: a database another process holds an exclusive lock on (rollback-journal mode,
/// so even reading waits) stops the broker after its short busy wait, with a clear error,
/// instead of hanging.
#[test]
fn exclusively_locked_database_stops_the_broker_clearly() {
    let home = Home::new();
    let lock = lock_database(&home, false);
    broker_refuses(&home, "locked");
    drop(lock);
}

/// Proves: a database in WAL mode whose write lock another process holds stops the broker
/// at start with a clear error. (It used to start, since reading works, and then
/// stall 2 s on every batch and answer every write with `internal`.)
#[test]
fn write_locked_database_stops_the_broker_at_start() {
    let home = Home::new();
    let lock = lock_database(&home, true);
    broker_refuses(&home, "locked");
    drop(lock);
}

/// Proves: a CLI command that starts a broker on demand reports why the broker could not
/// start — naming the database and what is wrong — for each kind of unusable database.
/// (It used to wait 5 s and say only "no broker answered ... See its log".)
#[test]
fn cli_autostart_reports_why_the_database_is_unusable() {
    for (how, cause) in [
        (BadDb::Directory, "Is a directory"),
        (BadDb::Garbage, "not a database"),
    ] {
        let home = Home::new();
        spoil(&home, how);
        cli_autostart_refuses(&home, cause);
    }
    let home = Home::new();
    let lock = lock_database(&home, false);
    cli_autostart_refuses(&home, "locked");
    // Brokers started on demand give up by themselves; none may outlive the lock and then
    // start for real.
    wait_for(
        || brokers_of(&home).is_empty(),
        "the started brokers to give up",
    );
    drop(lock);
}

/// Proves: when a send fails because the database is locked, it was not stored, so
/// trying again (as the error says) cannot deliver it twice. The lock is released just
/// after the broker fails to begin its transaction, while the send is still being handled.
/// (The send used to run outside any transaction: its writes committed on their own, and
/// the sender was told "nothing was saved, try again".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refused_for_a_locked_database_is_not_stored() {
    let home = Home::new();
    let _b = home.broker(&["--ack-wait", "0"]);
    let (bob, _) = home.peer("bob", "/b").await;
    drop(bob);
    let alice = home.client().await;
    wait_offline(&alice, "bob").await;

    let lock = rusqlite::Connection::open(&home.paths.db).unwrap();
    lock.busy_timeout(Duration::from_secs(10)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let answer = alice.start(send("bob", "exactly once")).unwrap();
    wait_for(
        || home.broker_output().contains("cannot start a transaction"),
        "the broker to fail to begin its transaction",
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("an answer within 10s");

    let mut bob = home.client().await;
    let reg = bob.call(register("bob", "/b")).await.unwrap();
    match decode::<Sent>(answer) {
        Ok(sent) => {
            assert_eq!(reg.queued, 1);
            assert_eq!(next_delivery(&mut bob).await.id, sent.message_id);
        }
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::Internal), "{e}");
            assert!(e.to_string().contains("try again"), "{e}");
            assert_eq!(
                reg.queued, 0,
                "the send was refused with {e:?}, yet it was stored: trying again sends it twice"
            );
        }
    }
}

/// Proves: requests that only read are answered while another program holds the
/// database's write lock (or a checkpoint holds writers back); only writes wait for it.
/// (Every batch used to begin as a write transaction, so a `peers` or `log` was refused
/// with "could not write its database" after the 2 s busy wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_the_write_lock_is_held() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (_bob, _) = home.peer("bob", "/b").await;
    let alice = home.client().await;
    alice.call(send("bob", "before the lock")).await.unwrap();

    let lock = rusqlite::Connection::open(&home.paths.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let peers = alice.call(ListPeers::default()).await.unwrap().peers;
    assert!(peers.iter().any(|p| p.name == "bob"));
    let log = alice.call(LogQuery::default()).await.unwrap().messages;
    assert!(log.iter().any(|m| m.text == "before the lock"));
    assert_eq!(alice.call(StatusCall).await.unwrap().peers_online, 1);
    lock.execute_batch("ROLLBACK").unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Twenty clients racing to start a broker.
// ---------------------------------------------------------------------------------------

/// Proves: twenty CLI commands started at once with no broker running all succeed, and
/// leave exactly one broker process, the one holding the lock and answering `status`.
#[test]
fn twenty_clients_starting_at_once_share_one_broker() {
    let home = Home::new();
    let children: Vec<_> = (0..20)
        .map(|_| {
            home.cmd()
                .args(["peers", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for c in children {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(c.wait_with_output()));
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..20 {
        let left = deadline.saturating_duration_since(Instant::now());
        let out = rx
            .recv_timeout(left)
            .expect("all twenty clients finish within 20s")
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    }
    // Brokers that lost the race for the lock exit by themselves; one must remain.
    wait_for(|| brokers_of(&home).len() == 1, "a single broker process");
    let pid = brokers_of(&home)[0];
    assert_eq!(status_json(&home)["pid"], pid);
    assert_eq!(lock_pid(&home), pid);
    let log = home.broker_output();
    assert_eq!(log.matches("broker started").count(), 1, "{log}");
}

/// One broker per database: a second broker (another runtime directory, the same
/// database, as when logind removed the runtime directory under a running broker) is
/// refused with an error that names the first, and the first keeps working.
#[test]
fn a_second_broker_on_one_database_is_refused() {
    let first = Home::new();
    let _b = first.broker(&[]);
    let second = Home::new();
    let out = second
        .cmd()
        .arg("broker")
        .env("CLAUDE_PEERS_DB", &first.paths.db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&first.paths.db.display().to_string()), "{err}");
    assert!(err.contains("another broker"), "{err}");
    assert!(
        err.contains(&first.paths.socket.display().to_string()),
        "names the first broker's socket: {err}"
    );
    assert!(!second.paths.socket.exists(), "no second socket");
    first.run_ok(&["status"]);
}
