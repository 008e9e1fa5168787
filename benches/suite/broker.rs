//! Issue 2's figures at the protocol level: a real broker process (release build), real
//! sockets, a real SQLite file in a temp directory, and the library client.

use std::time::{Duration, Instant};

use claude_peers::client::{Event, decode};
use claude_peers::protocol::*;

use crate::common::Home;
use crate::util::*;

pub fn send(to: &str, text: String) -> Send {
    Send {
        key: None,
        to: vec![to.into()],
        text,
        in_reply_to: None,
        from: None,
    }
}

/// A receiver on its own thread and single-threaded runtime (as a separate session
/// would be) that acks every delivery it reads, batching the acks of one read burst.
/// Returns once it is registered.
pub fn spawn_acker(home: &Home, name: &str) -> std::thread::JoinHandle<u64> {
    let paths = home.paths.clone();
    let name = name.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut b = peer(&paths, &name, true).await;
            ready_tx.send(()).unwrap();
            let mut n = 0u64;
            let mut ids = Vec::with_capacity(256);
            while let Some(ev) = b.next_event().await {
                if let Event::Deliver(d) = ev {
                    ids.push(d.id);
                }
                while let Some(ev) = b.try_next_event() {
                    if let Event::Deliver(d) = ev {
                        ids.push(d.id);
                    }
                }
                if ids.is_empty() {
                    continue;
                }
                n += ids.len() as u64;
                if b.notify(Ack::delivered(std::mem::take(&mut ids))).is_err() {
                    break;
                }
            }
            n
        })
    });
    ready_rx.recv().unwrap();
    handle
}

async fn round_trip(rows: &mut Vec<Row>) {
    let home = Home::new();
    let _broker = broker(&home);
    let a = peer(&home.paths, "a", true).await;
    let _acker = spawn_acker(&home, "b");
    let text = "x".repeat(100);
    let mut times = time_calls(500, 5000, || async {
        let sent = a.call(send("b", text.clone())).await.unwrap();
        assert_eq!(sent.recipients[0].state, DeliveryState::Delivered);
    })
    .await;
    let median = p50(&mut times);
    rows.push(Row::new(
        "broker",
        "send -> deliver -> ack round trip, p50",
        // Issue 16: stated as a ratio to the floor (group `floor`), not absolutely.
        Target::None,
        Measured::Time(median),
    ));
    rows.push(Row::new(
        "broker",
        "send -> deliver -> ack round trip, p99",
        Target::None,
        Measured::Time(percentile(&times, 0.99)),
    ));
}

async fn throughput(rows: &mut Vec<Row>) {
    let home = Home::new();
    let _broker = broker(&home);
    let a = peer(&home.paths, "a", true).await;
    let _acker = spawn_acker(&home, "b");
    const N: usize = 100_000;
    const WINDOW: usize = 5000;
    let text = "y".repeat(100);
    let t = Instant::now();
    let mut inflight = std::collections::VecDeque::with_capacity(WINDOW);
    for i in 0..N {
        if inflight.len() == WINDOW {
            let s: Sent = decode(inflight.pop_front().unwrap().await).unwrap();
            debug_assert_eq!(s.recipients[0].state, DeliveryState::Delivered);
        }
        inflight.push_back(a.start(send("b", format!("{i} {text}"))).unwrap());
    }
    let mut delivered = 0;
    for w in inflight {
        let s: Sent = decode(w.await).unwrap();
        delivered += (s.recipients[0].state == DeliveryState::Delivered) as usize;
    }
    let elapsed = t.elapsed();
    let status = a.call(StatusCall).await.unwrap();
    assert_eq!(status.queued, 0, "every message acked");
    assert_eq!(delivered, WINDOW.min(N));
    let rate = N as f64 / elapsed.as_secs_f64();
    rows.push(Row::new(
        "broker",
        "sustained 1 -> 1, persisted and acked",
        // Issue 16: stated as a ratio to the floor (group `floor`), not absolutely.
        Target::None,
        Measured::PerSecond(rate),
    ));
}

async fn memory(rows: &mut Vec<Row>) {
    let home = Home::new();
    let broker = broker(&home);
    let idle = rss_mb(broker.pid());
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(peer(&home.paths, &format!("p{i}"), false).await);
    }
    // Some traffic so buffers and caches are warm.
    for (i, c) in clients.iter().enumerate() {
        c.call(send(&format!("p{}", (i + 1) % 100), "warm".into()))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss = rss_mb(broker.pid());
    rows.push(Row::new(
        "broker",
        "broker RSS, idle",
        Target::None,
        Measured::Megabytes(idle),
    ));
    rows.push(Row::new(
        "broker",
        "broker RSS, 100 connected clients",
        Target::Megabytes(20.0),
        Measured::Megabytes(rss),
    ));
}

/// Every figure of issue 2, each against a fresh broker.
pub async fn run(rows: &mut Vec<Row>) {
    round_trip(rows).await;
    throughput(rows).await;
    memory(rows).await;
}
