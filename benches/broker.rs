//! Broker benchmarks at the protocol level: a real `claude-peers broker` process (release
//! build), real sockets, a real SQLite file in a temp directory, and the library client.
//! Prints one table: figure, target, measured. Run with `cargo bench --bench broker`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_peers::client::{Client, ConnectOptions, Event, decode};
use claude_peers::paths::Paths;
use claude_peers::protocol::*;

const BIN: &str = env!("CARGO_BIN_EXE_claude-peers");

struct Broker {
    child: Child,
    paths: Paths,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cpb-")
            .tempdir_in("/tmp")
            .unwrap();
        let paths = Paths::resolve(Some(&dir.path().join("h")), None).unwrap();
        let child = Command::new(BIN)
            .args(["broker", "--send-rate", "0", "--ack-wait", "5s"])
            .env("CLAUDE_PEERS_HOME", &paths.runtime_dir)
            .env("CLAUDE_PEERS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&paths.socket).is_err() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self {
            child,
            paths,
            _dir: dir,
        }
    }

    async fn peer(&self, name: &str) -> Client {
        peer_at(&self.paths, name).await
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn send(to: &str, text: String) -> Send {
    Send {
        to: vec![to.into()],
        text,
        in_reply_to: None,
        from: None,
    }
}

/// A receiver on its own thread and single-threaded runtime (as a separate session
/// would be) that acks every delivery it reads, batching the acks of one read burst.
/// Returns once it is registered.
fn spawn_acker(broker: &Broker, name: &str) -> std::thread::JoinHandle<u64> {
    let paths = broker.paths.clone();
    let name = name.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut b = peer_at(&paths, &name).await;
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
                if b.notify(Ack {
                    ids: std::mem::take(&mut ids),
                })
                .is_err()
                {
                    break;
                }
            }
            n
        })
    });
    ready_rx.recv().unwrap();
    handle
}

async fn peer_at(paths: &Paths, name: &str) -> Client {
    peer_with(paths, name, true).await
}

async fn peer_with(paths: &Paths, name: &str, push: bool) -> Client {
    let mut opts = ConnectOptions::new("bench");
    opts.autostart = false;
    opts.broker_exe = Some(PathBuf::from(BIN));
    let c = Client::connect(paths, &opts).await.unwrap();
    c.call(Register {
        name: name.into(),
        cwd: format!("/bench/{name}"),
        push,
        ..Default::default()
    })
    .await
    .unwrap();
    c
}

struct Row {
    figure: &'static str,
    target: &'static str,
    measured: String,
}

async fn round_trip(rows: &mut Vec<Row>) {
    let broker = Broker::start();
    let a = broker.peer("a").await;
    let _acker = spawn_acker(&broker, "b");
    let text = "x".repeat(100);
    for _ in 0..500 {
        a.call(send("b", text.clone())).await.unwrap();
    }
    let mut times = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let t = Instant::now();
        let sent = a.call(send("b", text.clone())).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(sent.recipients[0].state, DeliveryState::Delivered);
    }
    times.sort();
    rows.push(Row {
        figure: "send -> deliver -> ack round trip, p50",
        target: "<= 100 us",
        measured: format!("{:.0} us", percentile(&times, 0.5).as_secs_f64() * 1e6),
    });
    rows.push(Row {
        figure: "send -> deliver -> ack round trip, p99",
        target: "-",
        measured: format!("{:.0} us", percentile(&times, 0.99).as_secs_f64() * 1e6),
    });
}

async fn throughput(rows: &mut Vec<Row>) {
    let broker = Broker::start();
    let a = broker.peer("a").await;
    let _acker = spawn_acker(&broker, "b");
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
    rows.push(Row {
        figure: "sustained 1 -> 1, persisted and acked",
        target: ">= 50,000 msg/s",
        measured: format!("{:.0} msg/s", N as f64 / elapsed.as_secs_f64()),
    });
}

async fn memory(rows: &mut Vec<Row>) {
    let broker = Broker::start();
    let idle = broker.rss_kib();
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(peer_with(&broker.paths, &format!("p{i}"), false).await);
    }
    // Some traffic so buffers and caches are warm.
    for (i, c) in clients.iter().enumerate() {
        c.call(send(&format!("p{}", (i + 1) % 100), "warm".into()))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss = broker.rss_kib();
    rows.push(Row {
        figure: "broker RSS, idle",
        target: "-",
        measured: format!("{:.1} MB", idle as f64 / 1024.0),
    });
    rows.push(Row {
        figure: "broker RSS, 100 connected clients",
        target: "<= 20 MB",
        measured: format!("{:.1} MB", rss as f64 / 1024.0),
    });
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported and ignored.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    rt.block_on(async {
        if only.is_empty() || only == "rt" {
            round_trip(&mut rows).await;
        }
        if only.is_empty() || only == "tput" {
            throughput(&mut rows).await;
        }
        if only.is_empty() || only == "mem" {
            memory(&mut rows).await;
        }
    });
    println!();
    println!(
        "{:<42} {:<18} measured",
        "figure (broker protocol level)", "target"
    );
    for r in rows {
        println!("{:<42} {:<18} {}", r.figure, r.target, r.measured);
    }
}
