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

#[path = "../common/mod.rs"]
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
    // The connection; `dead` from the first failure on it until it is replaced.
    let mut c: Option<Client> = None;
    let mut dead = true;
    let mut in_flight: VecDeque<(String, oneshot::Receiver<_>)> = VecDeque::new();
    let mut next = 0;
    loop {
        // At the start, and once a connection died and its answers are in: (re)connect.
        if dead && in_flight.is_empty() {
            let errors = &mut ledger.connect_errors;
            c = Some(connect_as(&paths, &opts, "alice", "/a", &down, errors).await);
            dead = false;
        }
        let c = c.as_ref().expect("connected");
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
    let c = c.expect("connected");
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
            Some(Event::Log(_) | Event::Peer(_) | Event::Lagged(_) | Event::Closed(_)) => continue,
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
    let history = history(&observer, "recv", 1000).await;
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

mod start;
