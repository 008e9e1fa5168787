//! Issue 3's figures, end to end through `claude-peers serve`: real serve processes
//! (release build) driven by rmcp's client over stdio, a real broker, messages persisted
//! on the way. The harness drives every session from one thread, like Claude Code's own
//! event loop, so the figures measure claude-peers, not wake-ups between harness threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::Home;
use crate::common::serve::Serve;
use crate::raw::RawSession;
use crate::util::{self, Measured, Row, Target, percentile, rss_mb};

/// `serve` as the figures run it: no send-rate limit, and a broker a session restarts
/// after the final stop goes away soon by itself.
pub fn command(home: &Home, name: &str) -> tokio::process::Command {
    let mut cmd = home.serve_cmd(Some(name), home.dir.path());
    cmd.env("CLAUDE_PEERS_SEND_RATE", "0")
        .env("CLAUDE_PEERS_IDLE_TIMEOUT", "5s");
    cmd
}

/// A session like Claude Code with channels: mail comes as channel events. Returns once
/// initialize is answered.
pub async fn session(home: &Home, name: &str) -> Serve {
    Serve::start(command(home, name), true).await
}

fn send_args(to: &str, text: &str) -> Value {
    json!({"to": to, "message": text})
}

/// Every figure of issue 3. Runs on a current-thread runtime.
pub async fn run(rows: &mut Vec<Row>) {
    // Spawn -> initialize answered, with no broker (the first session starts one) and
    // with a running broker.
    let home = Home::new();
    let t = Instant::now();
    let first = session(&home, "first").await;
    let cold = t.elapsed();
    first.whoami_when_ready().await;
    let mut warm = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let s = session(&home, &format!("w{i}")).await;
        warm.push(t.elapsed());
        s.close().await;
    }
    warm.sort();
    first.close().await;
    drop(home);

    // End to end as Claude Code sees it: the request line written to A's stdin, B's
    // stdout read until the channel event's line arrives and is parsed.
    let home = Home::new();
    let mut a = RawSession::start(&home, "a", false).await;
    let mut b = RawSession::start(&home, "b", true).await;
    a.tool("whoami", json!({})).await;
    b.tool("whoami", json!({})).await;
    let send =
        json!({"name": "send_message", "arguments": {"to": "b", "message": "x".repeat(100)}});
    let mut lat = Vec::with_capacity(3000);
    for i in 0..3300 {
        let t = Instant::now();
        let id = a.request("tools/call", send.clone()).await;
        let event = b.next().await;
        let seen = t.elapsed();
        assert_eq!(event["method"], "notifications/claude/channel", "{event}");
        let answer = a.answer(id).await;
        assert_eq!(answer["result"]["isError"], false, "{answer}");
        if i >= 300 {
            lat.push(seen);
        }
    }
    drop((a, b));
    drop(home);

    let home = Home::new();
    let a = session(&home, "a").await;
    let mut b = session(&home, "b").await;
    let (a_pid, b_pid) = (a.pid, b.pid);
    a.whoami_when_ready().await;
    b.whoami_when_ready().await;
    // The same with rmcp's client on both ends, for comparison.
    let text = "x".repeat(100);
    for _ in 0..300 {
        a.ok("send_message", send_args("b", &text)).await;
        b.next_arrival().await;
    }
    let mut rmcp_lat = Vec::with_capacity(3000);
    for _ in 0..3000 {
        let t = Instant::now();
        let call = a.ok("send_message", send_args("b", &text));
        let (_, seen) = tokio::join!(call, b.next_arrival());
        rmcp_lat.push(seen.duration_since(t));
    }

    // Many sends in flight.
    const N: usize = 20_000;
    const IN_FLIGHT: usize = 64;
    let a = Arc::new(a);
    let t = Instant::now();
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            for _ in 0..N {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let a = a.clone();
                tokio::spawn(async move {
                    a.ok("send_message", send_args("b", "y")).await;
                    drop(permit);
                });
            }
        })
    };
    for _ in 0..N {
        b.next_arrival().await;
    }
    let rate = N as f64 / t.elapsed().as_secs_f64();
    sender.await.unwrap();
    let rss_a = rss_mb(a_pid);
    let rss_b = rss_mb(b_pid);
    // End the sessions before the broker, or they would reconnect and start a new one.
    if let Ok(a) = Arc::try_unwrap(a) {
        a.close().await;
    }
    b.close().await;
    drop(home);

    let median = util::p50(&mut lat);
    let p99 = percentile(&lat, 0.99);
    let rmcp_median = util::p50(&mut rmcp_lat);
    let rmcp_p99 = percentile(&rmcp_lat, 0.99);
    rows.push(Row::new(
        "serve",
        "send_message in A -> channel event in B, p50",
        // Issue 16: stated as a ratio to the floor (group `floor`), not absolutely.
        Target::None,
        Measured::Time(median),
    ));
    rows.push(Row::new(
        "serve",
        "send_message in A -> channel event in B, p99",
        // Issue 16: stated as a ratio to the floor (group `floor`), not absolutely.
        Target::None,
        Measured::Time(p99),
    ));
    rows.push(Row::new(
        "serve",
        "same, rmcp's client on both ends, p50 / p99",
        Target::None,
        Measured::Text(format!(
            "{} / {}",
            util::duration(rmcp_median),
            util::duration(rmcp_p99)
        )),
    ));
    rows.push(Row::new(
        "serve",
        "messages/s, 64 sends in flight",
        // Issue 16: stated as a ratio to the floor (group `floor`), not absolutely.
        Target::None,
        Measured::PerSecond(rate),
    ));
    rows.push(
        Row::new(
            "serve",
            "serve RSS after the runs (sender / receiver)",
            Target::Megabytes(10.0),
            Measured::Megabytes(rss_a.max(rss_b)),
        )
        .shown_as(format!("{rss_a:.1} / {rss_b:.1} MB")),
    );
    let warm50 = util::p50(&mut warm);
    rows.push(Row::new(
        "serve",
        "spawn -> initialize answered, broker running, p50",
        Target::AtMost(Duration::from_millis(50)),
        Measured::Time(warm50),
    ));
    rows.push(Row::new(
        "serve",
        "spawn -> initialize answered, no broker yet",
        Target::AtMost(Duration::from_millis(150)),
        Measured::Time(cold),
    ));
}
