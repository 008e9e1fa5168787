//! Issue 4's store figures: the same calls against a broker whose database holds
//! 1,000,000 delivered messages and against one with an empty database.

use std::time::Duration;

use claude_peers::client::Client;
use claude_peers::paths::Paths;
use claude_peers::protocol::*;
use claude_peers::store::{NewMessage, PeerRow, Store};

use crate::broker::{send, spawn_acker};
use crate::common::Home;
use crate::util::{self, Measured, Row, Target, us};

const MESSAGES: usize = 1_000_000;
const PEERS: usize = 50;

/// Fills the database of `paths` with `n` delivered messages among [`PEERS`] peers, sent
/// over the last `n` milliseconds (well inside retention), plus one old message to the
/// peer `quiet`, whose history is then the slowest to find.
fn fill(paths: &Paths, n: usize) {
    paths.prepare().unwrap();
    let store = Store::open(&paths.db).unwrap();
    let now = now_millis();
    store.begin().unwrap();
    for name in (0..PEERS).map(|i| format!("p{i}")).chain(["quiet".into()]) {
        store
            .upsert_peer(&PeerRow {
                name,
                first_seen: now,
                last_seen: now,
                context: claude_peers::protocol::PeerContext {
                    cwd: "/bench".into(),
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
    }
    let text = "z".repeat(100);
    let put = |i: usize, at: Millis, from: &str, to: &str| {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            (at / 1000) as u64,
            ((at % 1000) as u32) * 1_000_000 + i as u32 % 1_000_000,
        );
        let id = uuid::Uuid::new_v7(ts).to_string();
        store
            .insert_message(
                &NewMessage {
                    key: None,
                    id: &id,
                    sender: from,
                    text: &text,
                    in_reply_to: None,
                    sent_at: at,
                    expires_at: at + 7 * 24 * 3600 * 1000,
                },
                &[to],
            )
            .unwrap();
        assert!(store.mark_delivered(&id, to, at).unwrap());
    };
    put(0, now - n as i64 - 1000, "p0", "quiet");
    for i in 0..n {
        let from = format!("p{}", i % PEERS);
        let to = format!("p{}", (i + 1) % PEERS);
        put(i + 1, now - (n - i) as i64, &from, &to);
        if i % 100_000 == 99_999 {
            store.commit().unwrap();
            store.begin().unwrap();
        }
    }
    store.commit().unwrap();
}

struct Figures {
    send: Duration,
    peers: Duration,
    log: Duration,
    log_quiet: Duration,
}

async fn measure(messages: usize) -> Figures {
    let home = Home::new();
    fill(&home.paths, messages);
    let _broker = util::broker(&home);
    let a = util::peer(&home.paths, "sender", true).await;
    let _acker = spawn_acker(&home, "receiver");
    let text = "x".repeat(100);
    let mut send_times = util::time_calls(200, 2000, || async {
        a.call(send("receiver", text.clone())).await.unwrap();
    })
    .await;
    // The checkpoint that follows a burst of 2,000 writes holds writers back for a moment
    // (README, Durability); the reads below measure the store, not that moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cli: Client = util::client(&home.paths).await;
    let mut peer_times = util::time_calls(20, 500, || async {
        let l = cli
            .call(ListPeers {
                include_offline: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(l.peers.len() > PEERS);
    })
    .await;
    let mut log_times = util::time_calls(10, 200, || async {
        let l = cli.call(LogQuery::default()).await.unwrap();
        assert!(!l.messages.is_empty());
    })
    .await;
    let mut quiet_times = util::time_calls(10, 200, || async {
        let l = cli
            .call(LogQuery {
                before: None,
                limit: None,
                peer: Some("quiet".into()),
            })
            .await
            .unwrap();
        assert_eq!(l.messages.len(), 1);
    })
    .await;
    Figures {
        send: util::p50(&mut send_times),
        peers: util::p50(&mut peer_times),
        log: util::p50(&mut log_times),
        log_quiet: util::p50(&mut quiet_times),
    }
}

pub async fn run(rows: &mut Vec<Row>) {
    let empty = measure(0).await;
    let full = measure(MESSAGES).await;
    // "As fast": within half again of the empty store's figure, plus 50 us of noise.
    let same = |e: Duration, f: Duration| f <= e.mul_f64(1.5) + Duration::from_micros(50);
    for (figure, e, f) in [
        (
            "1M-message store: send round trip p50 (empty / 1M)",
            empty.send,
            full.send,
        ),
        (
            "1M-message store: peers p50 (empty / 1M)",
            empty.peers,
            full.peers,
        ),
        (
            "1M-message store: log p50 (empty / 1M)",
            empty.log,
            full.log,
        ),
        (
            "1M-message store: log of a quiet peer p50 (empty / 1M)",
            empty.log_quiet,
            full.log_quiet,
        ),
    ] {
        rows.push(
            Row::new(
                "store",
                figure,
                Target::Claim("as with empty"),
                Measured::Holds(same(e, f)),
            )
            .shown_as(format!("{} / {}", us(e), us(f))),
        );
    }
}
