//! Mail that wakes an idle Claude Code session, end to end: from the moment a sender
//! starts `claude-peers send bob <text> --from alice` to the moment the stub Messages API
//! receives the request of the turn that the message started. Bob is a real interactive
//! `claude` under tmux (tests/common/claude/: stub API, throwaway `HOME`) running our
//! release-built `serve`, which writes the message into Claude Code's native inbox; the
//! session is idle, so Claude Code starts a turn by itself.
//!
//! Two figures, each as p50 and p99: the send by the CLI (a new process each time), and the
//! same send through the library client (a new connection each time, as the CLI makes),
//! so the difference is the CLI's own start-up. The two are interleaved, one of each per
//! round, so both see the same conversation length and machine load. After each woken
//! turn the harness waits for the scripted answer to be drawn and the prompt to be idle
//! again before the next send.
//!
//! Claude Code drops mail from a sender that outpaces it (its peer-guard: a token bucket
//! per sender of 30 messages, refilled at one per 2 s, by default), and the run sends
//! every message from `alice`. So the sends are spaced evenly, no closer than keeps the
//! whole run within that bucket: at 30 samples, one send every 1.2 s (the woken turn and
//! the wait for the idle prompt included).
//!
//! The stub records requests without their arrival times: a thread blocked in
//! `StubApi::wait_for_request` (a condvar the stub signals as it records each request)
//! takes the time when it wakes, which is later than the arrival by one thread wake-up.
//!
//! `BENCH_CLAUDE_SAMPLES` sets the samples per row (30). Skipped, with the reason
//! printed, when `claude` or `tmux` is not installed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claude_peers::protocol::{ListPeers, Send};

use crate::common::Home;
use crate::common::claude::{
    self as harness, Block, ClaudeHome, Interactive, Reply, StubApi, is_idle,
};
use crate::util::{self, Measured, Row, Target, percentile};

#[derive(Clone, Copy)]
enum Via {
    Cli,
    Library,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Library => "lib",
        }
    }
}

/// How long any one step may take before the run fails.
const STEP: Duration = Duration::from_secs(60);

pub async fn run(rows: &mut Vec<Row>) {
    if harness::claude_bin().is_none() {
        println!("claude: skipped: claude (Claude Code) is not installed; .ci/run installs it");
        return;
    }
    if harness::find_in_path("tmux").is_none() {
        println!("claude: skipped: tmux is not installed; .ci/run installs it");
        return;
    }
    let n: usize = std::env::var("BENCH_CLAUDE_SAMPLES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(30);

    let peers = Home::new();
    let _broker = util::broker(&peers);
    let api = Arc::new(StubApi::start());
    let mut cc = ClaudeHome::new(&peers, &api);
    cc.server_env("CLAUDE_PEERS_NAME", "bob");
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session).await;
    session.wait_idle(STEP);

    // One unmeasured round first: the first turn of a session does work of its own.
    let rounds = std::iter::once("warm".to_string()).chain((0..n).map(|i| format!("{i:03}")));
    let spacing = send_spacing(2 * (n + 1));
    let mut next_send = Instant::now();
    let mut cli = Vec::with_capacity(n);
    let mut lib = Vec::with_capacity(n);
    for (round, tag) in rounds.enumerate() {
        for via in [Via::Cli, Via::Library] {
            let wait = next_send.saturating_duration_since(Instant::now());
            tokio::time::sleep(wait).await;
            next_send = Instant::now() + spacing;
            let took = sample(&peers, &api, &session, via, &tag).await;
            if round > 0 {
                match via {
                    Via::Cli => cli.push(took),
                    Via::Library => lib.push(took),
                }
            }
        }
    }
    cli.sort();
    lib.sort();

    for (times, what) in [
        (&cli, "CLI send -> woken idle session's API request"),
        (&lib, "library client send -> the same"),
    ] {
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            rows.push(Row::new(
                "claude",
                format!("{what}, {name}"),
                Target::None,
                Measured::Time(percentile(times, p)),
            ));
        }
    }
}

/// The time between the starts of two sends that keeps `messages` sends from one sender
/// within the pace `serve` writes one sender's mail into the inbox at (a burst of 25,
/// then one every 2.2 s, under Claude Code's own limit of 30 and one every 2 s), with
/// 10% to spare: faster, the figure would be `serve` waiting its turn, not a wake-up.
fn send_spacing(messages: usize) -> Duration {
    const BUCKET: f64 = 25.0;
    const REFILL_PER_SEC: f64 = 1.0 / 2.2;
    let m = messages as f64;
    if m <= BUCKET {
        return Duration::ZERO;
    }
    // The bucket, plus what refills over (m - 1) intervals, must cover m sends.
    Duration::from_secs_f64(1.1 * (m - BUCKET) / (REFILL_PER_SEC * (m - 1.0)))
}

/// One message to the idle session: the time from just before the send to the stub's
/// receipt of the request that shows it; returns once the woken turn is over and the
/// prompt idle again.
async fn sample(
    peers: &Home,
    api: &Arc<StubApi>,
    session: &Interactive,
    via: Via,
    tag: &str,
) -> Duration {
    let text = format!("bench wake {} {tag} from alice", via.name());
    let answer = format!("woken {} {tag}", via.name());
    {
        let text = text.clone();
        api.push(Reply::when(
            move |r| r.messages_text().contains(&text),
            vec![Block::Text(answer.clone())],
        ));
    }

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let waiter = {
        let api = api.clone();
        let text = text.clone();
        std::thread::spawn(move || {
            ready_tx.send(()).unwrap();
            api.wait_for_request(|r| r.is_main() && r.messages_text().contains(&text), STEP)
                .map(|_| Instant::now())
        })
    };
    ready_rx.recv().unwrap();

    let start = Instant::now();
    let state = match via {
        Via::Cli => {
            let out = peers
                .cmd()
                .args(["send", "bob", &text, "--from", "alice"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "claude-peers send failed: {out:?}\n{}",
                session.diagnostics()
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
        Via::Library => {
            let c = util::client(&peers.paths).await;
            let sent = c
                .call(Send {
                    key: None,
                    to: vec!["bob".into()],
                    text: text.clone(),
                    in_reply_to: None,
                    from: Some("alice".into()),
                })
                .await
                .unwrap();
            format!("{:?}", sent.recipients[0].state)
        }
    };
    let Some(received) = waiter.join().unwrap() else {
        panic!(
            "the model was never shown {text:?} (send: {state})\n{}",
            session.diagnostics()
        );
    };
    let took = received.duration_since(start);

    if session
        .wait_until(|s| s.contains(&answer) && is_idle(s), STEP)
        .is_none()
    {
        panic!(
            "the turn woken by {text:?} did not end\n{}",
            session.diagnostics()
        );
    }
    took
}

/// Waits until the broker lists `name` online (the session's `serve` registered).
async fn wait_online(peers: &Home, name: &str, session: &Interactive) {
    let c = util::client(&peers.paths).await;
    let deadline = Instant::now() + STEP;
    loop {
        let list = c.call(ListPeers::default()).await.unwrap();
        if list.peers.iter().any(|p| p.name == name && p.online) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never came online\n{}",
            session.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
