//! Issue 4's scale figures: 200 real `serve` sessions (release build, driven over stdio by
//! rmcp's client) on one broker.

use std::time::{Duration, Instant};

use claude_peers::protocol::{Broadcast, ListPeers, Scope, StatusCall};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::common::Home;
use crate::raw::RawSession;
use crate::serve::session;
use crate::util::{self, Measured, Row, Target, rss_mb, us};

const SESSIONS: usize = 200;
/// Timed `list_peers` calls; `BENCH_LISTINGS` sets another number (many more, to watch
/// the processes with a profiler).
const LISTINGS: usize = 200;

/// A `list_peers` answer, every field a client would read.
#[derive(Deserialize)]
struct ListAnswer {
    id: u64,
    result: ListResult,
}

#[derive(Deserialize)]
struct ListResult {
    content: Vec<TextBlock>,
    #[serde(rename = "structuredContent")]
    structured: Listed,
    #[serde(rename = "isError")]
    is_error: bool,
}

#[derive(Deserialize)]
struct TextBlock {
    text: String,
}

#[derive(Deserialize)]
struct Listed {
    peers: Vec<ListedPeer>,
}

#[derive(Deserialize)]
#[allow(dead_code)] // read, as a client would, but not looked at
struct ListedPeer {
    name: String,
    state: String,
    cwd: String,
    repo: Option<String>,
    branch: Option<String>,
    summary: String,
    last_seen: String,
}

pub async fn run(rows: &mut Vec<Row>) {
    let home = Home::new();
    // Every session reports its channel events on one stream.
    let (tx, mut events) = mpsc::unbounded_channel::<Instant>();
    let mut sessions = Vec::with_capacity(SESSIONS);
    let mut pids = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut s = session(&home, &format!("s{i:03}")).await;
        let mut own = s.take_events();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some((t, _)) = own.recv().await {
                let _ = tx.send(t);
            }
        });
        pids.push(s.pid);
        sessions.push(s);
    }
    for s in &sessions {
        s.whoami_when_ready().await;
    }
    let cli = util::client(&home.paths).await;
    let status = cli.call(StatusCall).await.unwrap();
    let registered = status.peers_online as usize;

    // list_peers from one more session, as the model would call it: the request written
    // to its stdin, the answer's line read from its stdout and parsed as JSON (as Claude
    // Code does; rmcp's own client parses through untagged enums, which would dominate).
    let mut raw = RawSession::start(&home, "lister", false).await;
    let lister = raw.child.id().expect("the lister runs");
    let harness = std::process::id();
    let listings = std::env::var("BENCH_LISTINGS").map_or(LISTINGS, |v| {
        v.parse().expect("BENCH_LISTINGS is a number of calls")
    });
    let mut times = Vec::with_capacity(listings);
    let mut cpu_before = [Duration::ZERO; 3];
    for i in 0..listings + 20 {
        if i == 20 {
            cpu_before = [lister, status.pid, harness].map(util::cpu_time);
        }
        let t = Instant::now();
        let id = raw
            .request(
                "tools/call",
                json!({"name": "list_peers", "arguments": {"scope": "machine"}}),
            )
            .await;
        let answer: ListAnswer = raw.typed_answer(id).await;
        let elapsed = t.elapsed();
        assert!(!answer.result.is_error && answer.id == id);
        assert!(
            answer.result.content[0]
                .text
                .starts_with("200 other sessions")
        );
        assert_eq!(answer.result.structured.peers.len(), SESSIONS);
        if i >= 20 {
            times.push(elapsed);
        }
    }
    // Where the time goes: CPU per call in the lister's serve, the broker and this
    // harness (its parsing of the answer is part of the figure, as Claude Code's is).
    let cpu = [lister, status.pid, harness]
        .map(util::cpu_time)
        .iter()
        .zip(cpu_before)
        .map(|(after, before)| us((*after - before) / listings as u32))
        .collect::<Vec<_>>()
        .join(" / ");
    let list_p50 = util::p50(&mut times);
    // The same listing at the protocol level, without MCP around it.
    let mut times = util::time_calls(20, 200, || async {
        let l = cli.call(ListPeers::default()).await.unwrap();
        assert_eq!(l.peers.len(), SESSIONS + 1);
    })
    .await;
    let raw_list_p50 = util::p50(&mut times);
    drop(raw);

    // A broadcast to all 200, from a client outside them (as `claude-peers send` would).
    let mut spreads = Vec::new();
    for round in 0..10 {
        while events.try_recv().is_ok() {}
        let t = Instant::now();
        cli.call(Broadcast {
            key: None,
            scope: Scope::Machine,
            text: format!("broadcast {round}"),
            in_reply_to: None,
            from: Some("bench".into()),
            cwd: None,
            git_common_dir: None,
        })
        .await
        .unwrap();
        let mut last = t;
        for _ in 0..SESSIONS {
            last = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("every session gets the broadcast")
                .unwrap();
        }
        spreads.push(last.duration_since(t));
    }
    let spread = util::p50(&mut spreads);
    let broker_rss = rss_mb(status.pid);
    let serve_rss: f64 = pids.iter().map(|&p| rss_mb(p)).sum::<f64>() / SESSIONS as f64;

    for s in sessions {
        s.close().await;
    }
    drop(home);

    rows.push(Row::new(
        "scale",
        "200 serve sessions: registered",
        Target::Count(SESSIONS),
        Measured::Count(registered),
    ));
    rows.push(Row::new(
        "scale",
        "200 sessions: list_peers tool call, p50",
        Target::AtMost(Duration::from_millis(2)),
        Measured::Time(list_p50),
    ));
    rows.push(Row::new(
        "scale",
        "200 sessions: list_peers CPU per call: serve / broker / harness",
        Target::None,
        Measured::Text(cpu),
    ));
    rows.push(Row::new(
        "scale",
        "200 sessions: list_peers at the protocol level, p50",
        Target::None,
        Measured::Time(raw_list_p50),
    ));
    rows.push(Row::new(
        "scale",
        "200 sessions: broadcast -> channel event in all 200, p50",
        Target::AtMost(Duration::from_millis(100)),
        Measured::Time(spread),
    ));
    rows.push(Row::new(
        "scale",
        "200 sessions: broker RSS",
        Target::Megabytes(50.0),
        Measured::Megabytes(broker_rss),
    ));
    rows.push(Row::new(
        "scale",
        "200 sessions: serve RSS, mean",
        Target::None,
        Measured::Megabytes(serve_rss),
    ));
}
