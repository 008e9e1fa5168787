//! The core in-process: commands fed in as the connection tasks would, frames read from
//! the connections' queues as their writers would. No sockets, a real store in a temp dir.

use std::rc::Rc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{BrokerInfo, Command, ConnId, Core};
use crate::broker::outq::{Outbound, Outq};
use crate::config::Limits;
use crate::protocol::*;
use crate::store::Store;

struct Harness {
    dir: tempfile::TempDir,
    core: Core,
    queues: Vec<(ConnId, Rc<Outq>, UnboundedReceiver<Outbound>)>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("peers.db")).unwrap();
        let info = BrokerInfo {
            pid: 1,
            protocol: PROTOCOL_VERSION,
            started_at: now_millis(),
            started: Instant::now(),
            socket: "sock".into(),
            database: dir.path().join("peers.db").display().to_string(),
        };
        let core = Core::new(store, Limits::default(), info).unwrap();
        Self {
            dir,
            core,
            queues: Vec::new(),
        }
    }

    /// A new connection.
    fn connect(&mut self) -> ConnId {
        let conn = self.queues.len() as ConnId + 1;
        let (q, rx) = Outq::new();
        let q = Rc::new(q);
        self.queues.push((conn, q.clone(), rx));
        self.batch(vec![Command::Connected { conn, outq: q }]);
        conn
    }

    fn batch(&mut self, mut commands: Vec<Command>) {
        self.core.handle_batch(&mut commands);
    }

    fn request(&mut self, conn: ConnId, id: Option<u64>, request: impl Into<Request>) {
        self.batch(vec![Command::Request {
            conn,
            id,
            request: Box::new(request.into()),
        }]);
    }

    /// Everything written to `conn` so far, as the writer would write it (the bytes are
    /// counted as written).
    fn frames(&mut self, conn: ConnId) -> Vec<Value> {
        let (_, q, rx) = &mut self.queues[conn as usize - 1];
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Outbound::Answer(b) | Outbound::Push(b) = o {
                q.written(b.len(), 0);
                out.push(serde_json::from_slice(&b).unwrap());
            }
        }
        out
    }

    fn register(&mut self, name: &str) -> ConnId {
        let conn = self.connect();
        self.request(
            conn,
            Some(1),
            Register {
                name: name.into(),
                context: PeerContext {
                    cwd: "/w".into(),
                    pid: 1,
                    push: true,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let frames = self.frames(conn);
        assert_eq!(frames[0]["result"]["name"], name, "{frames:?}");
        conn
    }
}

fn send(to: &str, text: &str, key: Option<&str>) -> Send {
    Send {
        to: vec![to.into()],
        text: text.into(),
        in_reply_to: None,
        from: Some("alice".into()),
        key: key.map(str::to_string),
    }
}

#[test]
fn a_send_to_an_online_peer_is_answered_once_it_acks() {
    let mut h = Harness::new();
    let bob = h.register("bob");
    let alice = h.connect();
    h.request(alice, Some(7), send("bob", "hi", None));
    assert!(h.frames(alice).is_empty(), "the answer waits for bob's ack");
    let pushed = h.frames(bob);
    assert_eq!(pushed.len(), 1);
    let id = pushed[0]["deliver"]["id"].as_str().unwrap().to_string();
    assert_eq!(pushed[0]["deliver"]["text"], "hi");
    // An ack without id is not answered.
    h.request(bob, None, Ack::delivered(vec![id.clone()]));
    assert!(h.frames(bob).is_empty());
    let answer = h.frames(alice);
    assert_eq!(answer[0]["id"], 7);
    assert_eq!(answer[0]["result"]["message_id"], id.as_str());
    assert_eq!(answer[0]["result"]["recipients"][0]["state"], "delivered");
}

#[test]
fn a_retry_with_the_same_key_is_answered_with_the_first_message() {
    let mut h = Harness::new();
    let bob = h.register("bob");
    let alice = h.connect();
    // Both tries in one batch: the second sees the first, not yet committed.
    h.batch(vec![
        Command::Request {
            conn: alice,
            id: Some(1),
            request: Box::new(send("bob", "once", Some("k1")).into()),
        },
        Command::Request {
            conn: alice,
            id: Some(2),
            request: Box::new(send("bob", "once", Some("k1")).into()),
        },
    ]);
    let pushed = h.frames(bob);
    assert_eq!(pushed.len(), 1, "one message: {pushed:?}");
    let id = pushed[0]["deliver"]["id"].clone();
    h.request(bob, None, Ack::delivered(vec![id.as_str().unwrap().into()]));
    let answers = h.frames(alice);
    assert_eq!(answers.len(), 2, "{answers:?}");
    for a in &answers {
        assert_eq!(a["result"]["message_id"], id, "{a}");
    }
}

#[test]
fn a_recipient_whose_queue_is_full_gets_its_mail_from_the_store_in_order() {
    let mut h = Harness::new();
    let bob = h.register("bob");
    let alice = h.connect();
    let big = "x".repeat(60 * 1024);
    let mut pushed_ids = Vec::new();
    // Nothing is read from bob's queue: past about 1 MiB the rest stays in the store.
    for i in 0..40 {
        h.request(alice, None, send("bob", &format!("{i} {big}"), None));
    }
    let (_, q, rx) = &mut h.queues[bob as usize - 1];
    let mut queued = Vec::new();
    while let Ok(Outbound::Push(b)) = rx.try_recv() {
        queued.push(b);
    }
    assert!(queued.len() < 40, "held back once the queue was full");
    assert!(q.bytes() <= 2 << 20, "{} bytes queued", q.bytes());
    // The writer writes them; the core hears there is room and pushes the rest, in order.
    for b in &queued {
        let v: Value = serde_json::from_slice(b).unwrap();
        pushed_ids.push(
            v["deliver"]["text"].as_str().unwrap()[..2]
                .trim()
                .to_string(),
        );
    }
    let total: usize = queued.iter().map(Vec::len).sum();
    assert!(q.written(total, 0), "the core asked to hear of room");
    while pushed_ids.len() < 40 {
        h.batch(vec![Command::Drained { conn: bob }]);
        let more = h.frames(bob);
        assert!(!more.is_empty(), "drained but nothing more came");
        pushed_ids.extend(more.iter().map(|v| {
            v["deliver"]["text"].as_str().unwrap()[..2]
                .trim()
                .to_string()
        }));
    }
    let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    assert_eq!(pushed_ids, expected);
}

#[test]
fn a_bad_listing_cursor_is_a_bad_request() {
    let mut h = Harness::new();
    let c = h.connect();
    h.request(
        c,
        Some(3),
        ListPeers {
            after: Some("nonsense".into()),
            ..Default::default()
        },
    );
    let f = h.frames(c);
    assert_eq!(f[0]["error"]["code"], "bad_request", "{f:?}");
}

/// Second review: while the database refuses every write (another process holds its
/// write lock), a batch is refused as a whole, but what needs no write is still served:
/// `stop` works, and a connection waiting for room is pushed to from the store now, not
/// put back to be refused again and again (the core would never yield).
#[test]
fn a_refused_batch_still_serves_what_needs_no_write() {
    let mut h = Harness::new();
    let bob = h.register("bob");
    let alice = h.connect();
    let db = rusqlite::Connection::open(h.dir.path().join("peers.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    h.batch(vec![
        Command::Request {
            conn: alice,
            id: Some(1),
            request: Box::new(send("bob", "refused", None).into()),
        },
        Command::Drained { conn: bob },
        Command::Request {
            conn: alice,
            id: Some(2),
            request: Box::new(Shutdown { reason: None }.into()),
        },
    ]);
    let answers = h.frames(alice);
    assert_eq!(answers[0]["id"], 1);
    assert!(answers[0]["error"].is_object(), "{answers:?}");
    assert_eq!(answers[1]["id"], 2);
    assert!(
        answers[1]["result"].is_object(),
        "stop still works: {answers:?}"
    );
    assert!(h.core.stopping.is_some());
    assert!(h.core.drains.is_empty(), "nothing put back to spin on");
    db.execute_batch("ROLLBACK").unwrap();
}
