//! Issue 16's figures: ours as a ratio to the floor ([`crate::floor`]) over the same hops,
//! the two measured in alternating rounds of one run so that the VM's swings fall on both.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use claude_peers::protocol::DeliveryState;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::common::Home;
use crate::raw::RawSession;
use crate::util::{self, Measured, Row, Target, percentile, rss_mb};

/// Rounds of each comparison, alternating ours and the floor.
const ROUNDS: usize = 10;

/// A floor broker process, killed when dropped.
struct FloorBroker {
    child: std::process::Child,
    socket: PathBuf,
}

impl FloorBroker {
    fn start(dir: &Path, name: &str, sqlite: bool) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.env("CLAUDE_PEERS_FLOOR_ROLE", "broker")
            .env("CLAUDE_PEERS_FLOOR_SOCKET", &socket)
            .stdin(Stdio::null());
        if sqlite {
            cmd.env("CLAUDE_PEERS_FLOOR_DB", dir.join(format!("{name}.db")));
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the floor broker did not come up"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Self { child, socket }
    }

    fn session_cmd(&self, name: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.env("CLAUDE_PEERS_FLOOR_ROLE", "session")
            .env("CLAUDE_PEERS_FLOOR_SOCKET", &self.socket)
            .env("CLAUDE_PEERS_FLOOR_NAME", name);
        cmd
    }

    async fn session(&self, name: &str) -> RawSession {
        RawSession::spawn(self.session_cmd(name), true).await
    }
}

impl Drop for FloorBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two sessions, A sending to B.
struct Pair {
    a: RawSession,
    b: RawSession,
}

impl Pair {
    /// One `send_message` from A: the time until B's channel event is read; the answer
    /// to A is read after.
    async fn once(&mut self, send: &Value) -> Duration {
        let t = Instant::now();
        let id = self.a.request("tools/call", send.clone()).await;
        let event = self.b.next().await;
        let seen = t.elapsed();
        assert_eq!(event["method"], "notifications/claude/channel", "{event}");
        let answer = self.a.answer(id).await;
        assert_eq!(answer["result"]["isError"], false, "{answer}");
        seen
    }

    /// `n` sends written at once (all in flight); messages a second until B has shown
    /// them all.
    async fn burst(&mut self, n: usize) -> f64 {
        let mut lines = Vec::new();
        for i in 0..n {
            let v = json!({"jsonrpc": "2.0", "id": 1_000_000 + i, "method": "tools/call",
                "params": {"name": "send_message", "arguments": {"to": "b", "message": format!("burst {i}")}}});
            lines.extend(serde_json::to_vec(&v).unwrap());
            lines.push(b'\n');
        }
        let t = Instant::now();
        let Pair { a, b } = self;
        let write = async {
            a.stdin.write_all(&lines).await.unwrap();
        };
        let answers = async {
            let mut got = 0;
            while got < n {
                let line = a.stdout.next_line().await.unwrap().unwrap();
                if line.contains("\"id\":") {
                    assert!(line.contains("\"isError\":false"), "{line}");
                    got += 1;
                }
            }
        };
        let events = async {
            for _ in 0..n {
                let line = b.stdout.next_line().await.unwrap().unwrap();
                assert!(line.contains("notifications/claude/channel"), "{line}");
            }
            t.elapsed()
        };
        let ((), (), took) = tokio::join!(write, answers, events);
        n as f64 / took.as_secs_f64()
    }
}

fn ratio(ours: Duration, floor: Duration) -> Measured {
    Measured::Ratio(
        ours.as_secs_f64() / floor.as_secs_f64(),
        format!("{} vs {}", util::duration(ours), util::duration(floor)),
    )
}

pub async fn run(rows: &mut Vec<Row>) {
    let home = Home::new();
    let floor_sql = FloorBroker::start(home.dir.path(), "floor-sqlite", true);
    let floor_mem = FloorBroker::start(home.dir.path(), "floor", false);

    // Spawn -> initialize answered, each with its broker running, alternating.
    let mut ours_a = RawSession::start(&home, "a", false).await;
    ours_a.tool("whoami", json!({})).await;
    let (mut spawn_ours, mut spawn_floor) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let t = Instant::now();
        let s = RawSession::start(&home, &format!("spawn{i}"), false).await;
        spawn_ours.push(t.elapsed());
        drop(s);
        let t = Instant::now();
        let s = floor_sql.session(&format!("spawn{i}")).await;
        spawn_floor.push(t.elapsed());
        drop(s);
    }

    // End to end, alternating rounds of ours, the floor with SQLite and without.
    let mut ours = Pair {
        a: ours_a,
        b: RawSession::start(&home, "b", true).await,
    };
    ours.b.tool("whoami", json!({})).await;
    let mut sql = Pair {
        a: floor_sql.session("a").await,
        b: floor_sql.session("b").await,
    };
    let mut mem = Pair {
        a: floor_mem.session("a").await,
        b: floor_mem.session("b").await,
    };
    let send =
        json!({"name": "send_message", "arguments": {"to": "b", "message": "x".repeat(100)}});
    // Where the time goes: CPU and wake-ups per message of each process on the path.
    let ours_pids = [
        ours.a.child.id().unwrap(),
        broker_pid(&home),
        ours.b.child.id().unwrap(),
    ];
    let sql_pids = [
        sql.a.child.id().unwrap(),
        floor_sql.child.id(),
        sql.b.child.id().unwrap(),
    ];
    let before: Vec<(Duration, u64)> = ours_pids
        .iter()
        .chain(&sql_pids)
        .map(|&p| (util::cpu_time(p), util::wakeups(p)))
        .collect();
    let (mut lat_ours, mut lat_sql, mut lat_mem) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (pair, lat) in [
            (&mut ours, &mut lat_ours),
            (&mut sql, &mut lat_sql),
            (&mut mem, &mut lat_mem),
        ] {
            for i in 0..330 {
                let t = pair.once(&send).await;
                if i >= 30 {
                    lat.push(t);
                }
            }
        }
    }
    for lat in [&mut lat_ours, &mut lat_sql, &mut lat_mem] {
        lat.sort();
    }
    let per_message: Vec<String> = ours_pids
        .iter()
        .chain(&sql_pids)
        .zip(&before)
        .map(|(&p, (cpu, wakes))| {
            let n = (ROUNDS * 330) as f64;
            format!(
                "{:.0} us/{:.1}",
                (util::cpu_time(p) - *cpu).as_secs_f64() * 1e6 / n,
                (util::wakeups(p) - wakes) as f64 / n
            )
        })
        .collect();

    // Bursts of 1,000 in flight, alternating.
    let (mut burst_ours, mut burst_sql) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        burst_ours.push(ours.burst(1000).await);
        burst_sql.push(sql.burst(1000).await);
    }
    // After a second without work, `serve` gives back what the bursts freed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (rss_a, rss_b) = (
        rss_mb(ours.a.child.id().unwrap()),
        rss_mb(ours.b.child.id().unwrap()),
    );
    let anon_a = util::status_field(ours.a.child.id().unwrap(), "RssAnon:");
    burst_ours.sort_by(f64::total_cmp);
    burst_sql.sort_by(f64::total_cmp);
    drop((ours, sql, mem));

    // The broker's round trip at the protocol level against the floor broker's.
    let (mut rt_ours, mut rt_floor) = round_trips(&home, &floor_sql).await;

    let (o50, s50, m50) = (
        percentile(&lat_ours, 0.5),
        percentile(&lat_sql, 0.5),
        percentile(&lat_mem, 0.5),
    );
    rows.push(Row::new(
        "floor",
        "send_message A -> channel event B, p50, x floor+SQLite",
        Target::TimesFloorAtMost(1.5),
        ratio(o50, s50),
    ));
    rows.push(Row::new(
        "floor",
        "same, p99, x floor+SQLite p99",
        Target::TimesFloorAtMost(3.0),
        ratio(percentile(&lat_ours, 0.99), percentile(&lat_sql, 0.99)),
    ));
    rows.push(Row::new(
        "floor",
        "same, p50, x floor without SQLite",
        Target::None,
        ratio(o50, m50),
    ));
    rows.push(Row::new(
        "floor",
        "CPU/wake-ups per message: A / broker / B, ours",
        Target::None,
        Measured::Text(per_message[..3].join(" / ")),
    ));
    rows.push(Row::new(
        "floor",
        "same, floor+SQLite",
        Target::None,
        Measured::Text(per_message[3..].join(" / ")),
    ));
    let (bo, bs) = (burst_ours[2], burst_sql[2]);
    rows.push(Row::new(
        "floor",
        "burst of 1,000 in flight, msg/s, x floor+SQLite",
        Target::TimesFloorAtLeast(0.8),
        Measured::Ratio(
            bo / bs,
            format!("{}/s vs {}/s", util::thousands(bo), util::thousands(bs)),
        ),
    ));
    rows.push(Row::new(
        "floor",
        "broker send -> deliver -> ack, p50, x floor+SQLite",
        Target::TimesFloorAtMost(1.5),
        ratio(util::p50(&mut rt_ours), util::p50(&mut rt_floor)),
    ));
    rows.push(
        Row::new(
            "floor",
            "serve RSS after the bursts (5,000 messages), A / B",
            Target::Megabytes(10.0),
            Measured::Megabytes(rss_a.max(rss_b)),
        )
        .shown_as(format!(
            "{rss_a:.1} / {rss_b:.1} MB ({} of A's anonymous)",
            anon_a
        )),
    );
    rows.push(Row::new(
        "floor",
        "spawn -> initialize answered, p50, x floor",
        Target::TimesFloorAtMost(2.0),
        ratio(util::p50(&mut spawn_ours), util::p50(&mut spawn_floor)),
    ));
}

/// The pid of the broker of `home` (from its lock file).
fn broker_pid(home: &Home) -> u32 {
    std::fs::read_to_string(&home.paths.lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Send -> deliver -> ack round trips: ours with the library client and a receiver that
/// acks on its own thread, the floor's with a blocking sender and receiver; alternating.
async fn round_trips(home: &Home, floor: &FloorBroker) -> (Vec<Duration>, Vec<Duration>) {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    let a = util::peer(&home.paths, "rt-a", true).await;
    let _acker = crate::broker::spawn_acker(home, "rt-b");
    // The floor's receiver acks each message on a thread of its own.
    let mut b = UnixStream::connect(&floor.socket).unwrap();
    b.write_all(b"rt-b\n").unwrap();
    let reader = BufReader::new(b.try_clone().unwrap());
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            let from = line.split('\t').nth(1).unwrap().to_string();
            if b.write_all(format!("A\t{from}\n").as_bytes()).is_err() {
                break;
            }
        }
    });
    let mut fa = UnixStream::connect(&floor.socket).unwrap();
    fa.write_all(b"rt-a\n").unwrap();
    let mut fa_lines = BufReader::new(fa.try_clone().unwrap()).lines();
    let out = format!("S\trt-b\t{}\n", "x".repeat(100));
    let text = "x".repeat(100);
    let (mut ours, mut floor_times) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for i in 0..550 {
            let t = Instant::now();
            let sent = a
                .call(crate::broker::send("rt-b", text.clone()))
                .await
                .unwrap();
            assert_eq!(sent.recipients[0].state, DeliveryState::Delivered);
            if i >= 50 {
                ours.push(t.elapsed());
            }
        }
        for i in 0..550 {
            let t = Instant::now();
            fa.write_all(out.as_bytes()).unwrap();
            assert_eq!(fa_lines.next().unwrap().unwrap(), "K");
            if i >= 50 {
                floor_times.push(t.elapsed());
            }
        }
    }
    (ours, floor_times)
}
