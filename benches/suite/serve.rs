//! Issue 3's figures, end to end through `claude-peers serve`: real serve processes
//! (release build) driven by rmcp's client over stdio, a real broker, messages persisted
//! on the way. The harness drives every session from one thread, like Claude Code's own
//! event loop, so the figures measure claude-peers, not wake-ups between harness threads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, CustomNotification, Implementation,
    JsonObject, ProtocolVersion,
};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, ServiceExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::raw::RawSession;
use crate::util::{self, BIN, Row, ms, percentile, rss_mb, us};

/// An MCP client like Claude Code: declares the channel capability and reports when
/// each channel event arrives.
pub struct Channel {
    pub events: mpsc::UnboundedSender<Instant>,
}

impl ClientHandler for Channel {
    fn get_info(&self) -> ClientConfig {
        let mut exp = BTreeMap::new();
        exp.insert("claude/channel".to_string(), JsonObject::new());
        ClientConfig::new(
            ClientCapabilities::builder()
                .enable_experimental_with(exp)
                .build(),
            Implementation::new("bench", "1"),
        )
        .with_protocol_version(ProtocolVersion::V_2025_11_25)
    }

    async fn on_custom_notification(
        &self,
        _n: CustomNotification,
        _c: NotificationContext<RoleClient>,
    ) {
        let _ = self.events.send(Instant::now());
    }
}

/// A temp claude-peers home for serve sessions.
pub struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("cps-")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("h")
    }

    pub fn command(&self, name: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("serve")
            .env("CLAUDE_PEERS_HOME", self.home())
            .env("CLAUDE_PEERS_NAME", name)
            .env("CLAUDE_PEERS_SEND_RATE", "0")
            .env("CLAUDE_PEERS_LOG", "error")
            // A broker a session restarts after the final stop goes away soon by itself.
            .env("CLAUDE_PEERS_IDLE_TIMEOUT", "5s")
            .current_dir(self.dir.path())
            .stderr(Stdio::null());
        cmd
    }

    /// A session; returns once initialize is answered, with its pid and event stream.
    pub async fn session(
        &self,
        name: &str,
    ) -> (
        RunningService<RoleClient, Channel>,
        u32,
        mpsc::UnboundedReceiver<Instant>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let transport = TokioChildProcess::new(self.command(name)).unwrap();
        let pid = transport.id().unwrap();
        let s = Channel { events: tx }.serve(transport).await.unwrap();
        (s, pid, rx)
    }

    pub fn stop(&self) {
        let _ = std::process::Command::new(BIN)
            .arg("stop")
            .env("CLAUDE_PEERS_HOME", self.home())
            .output();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn send_args(to: &str, text: &str) -> CallToolRequestParams {
    CallToolRequestParams::new("send_message").with_arguments(
        json!({"to": to, "message": text})
            .as_object()
            .unwrap()
            .clone(),
    )
}

pub async fn wait_ready(s: &RunningService<RoleClient, Channel>) {
    let r = s
        .call_tool(CallToolRequestParams::new("whoami"))
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(false), "{r:?}");
}

/// Every figure of issue 3. Runs on a current-thread runtime.
pub async fn run(rows: &mut Vec<Row>) {
    // Spawn -> initialize answered, with no broker (the first session starts one) and
    // with a running broker.
    let env = Env::new();
    let t = Instant::now();
    let (first, _, _) = env.session("first").await;
    let cold = t.elapsed();
    wait_ready(&first).await;
    let mut warm = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let (s, _, _) = env.session(&format!("w{i}")).await;
        warm.push(t.elapsed());
        let _ = s.cancel().await;
    }
    warm.sort();
    let _ = first.cancel().await;
    drop(env);

    // End to end as Claude Code sees it: the request line written to A's stdin, B's
    // stdout read until the channel event's line arrives and is parsed.
    let env = Env::new();
    let mut a = RawSession::start(&env, "a", false).await;
    let mut b = RawSession::start(&env, "b", true).await;
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
    drop(env);

    let env = Env::new();
    let (a, a_pid, _) = env.session("a").await;
    let (b, b_pid, mut b_events) = env.session("b").await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    // The same with rmcp's client on both ends, for comparison.
    let text = "x".repeat(100);
    for _ in 0..300 {
        a.call_tool(send_args("b", &text)).await.unwrap();
        b_events.recv().await.unwrap();
    }
    let mut rmcp_lat = Vec::with_capacity(3000);
    for _ in 0..3000 {
        let t = Instant::now();
        let call = a.call_tool(send_args("b", &text));
        let (r, seen) = tokio::join!(call, b_events.recv());
        assert_eq!(r.unwrap().is_error, Some(false));
        rmcp_lat.push(seen.unwrap().duration_since(t));
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
                    let r = a.call_tool(send_args("b", "y")).await.unwrap();
                    assert_eq!(r.is_error, Some(false), "{r:?}");
                    drop(permit);
                });
            }
        })
    };
    for _ in 0..N {
        b_events.recv().await.unwrap();
    }
    let rate = N as f64 / t.elapsed().as_secs_f64();
    sender.await.unwrap();
    let rss_a = rss_mb(a_pid);
    let rss_b = rss_mb(b_pid);
    // End the sessions before the broker, or they would reconnect and start a new one.
    if let Ok(a) = Arc::try_unwrap(a) {
        let _ = a.cancel().await;
    }
    let _ = b.cancel().await;
    drop(env);

    let median = util::p50(&mut lat);
    let p99 = percentile(&lat, 0.99);
    let rmcp_median = util::p50(&mut rmcp_lat);
    let rmcp_p99 = percentile(&rmcp_lat, 0.99);
    rows.push(Row::new(
        "serve",
        "send_message in A -> channel event in B, p50",
        "<= 300 us",
        us(median),
        Some(median <= Duration::from_micros(300)),
    ));
    rows.push(Row::new(
        "serve",
        "send_message in A -> channel event in B, p99",
        "<= 2 ms",
        us(p99),
        Some(p99 <= Duration::from_millis(2)),
    ));
    rows.push(Row::new(
        "serve",
        "same, rmcp's client on both ends, p50 / p99",
        "-",
        format!("{} / {}", us(rmcp_median), us(rmcp_p99)),
        None,
    ));
    rows.push(Row::new(
        "serve",
        "messages/s, 64 sends in flight",
        ">= 5,000",
        format!("{rate:.0}"),
        Some(rate >= 5000.0),
    ));
    rows.push(Row::new(
        "serve",
        "serve RSS after the runs (sender / receiver)",
        "<= 10 MB",
        format!("{rss_a:.1} / {rss_b:.1} MB"),
        Some(rss_a.max(rss_b) <= 10.0),
    ));
    let warm50 = util::p50(&mut warm);
    rows.push(Row::new(
        "serve",
        "spawn -> initialize answered, broker running, p50",
        "<= 50 ms",
        ms(warm50),
        Some(warm50 <= Duration::from_millis(50)),
    ));
    rows.push(Row::new(
        "serve",
        "spawn -> initialize answered, no broker yet",
        "<= 150 ms",
        ms(cold),
        Some(cold <= Duration::from_millis(150)),
    ));
}
