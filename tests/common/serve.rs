//! `claude-peers serve` driven as Claude Code drives it: the real binary over stdio, with
//! rmcp's client ([`TestClient`]). The one driver of `serve` for tests and benchmarks.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::TokioChildProcess;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Home;
use super::mcp::TestClient;

/// A running `serve` process and its MCP client.
pub struct Serve {
    pub pid: u32,
    /// `None` once the process was killed.
    service: Option<RunningService<RoleClient, TestClient>>,
    /// Channel events, each with the moment it arrived.
    events: mpsc::UnboundedReceiver<(Instant, Value)>,
}

impl Home {
    /// `claude-peers serve` in `cwd`, named `name` if given (else it takes the
    /// directory's name), logging only errors to a stderr that goes nowhere (rmcp's child
    /// transport would show it).
    pub fn serve_cmd(&self, name: Option<&str>, cwd: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.cmd());
        cmd.arg("serve")
            .current_dir(cwd)
            .env("CLAUDE_PEERS_LOG", "error")
            .stderr(Stdio::null());
        if let Some(name) = name {
            cmd.env("CLAUDE_PEERS_NAME", name);
        }
        cmd
    }

    /// `claude-peers serve` named `name` as a plain child process, its stdin and stdout
    /// piped (for tests that speak JSON-RPC by hand or watch the process), its stderr
    /// dropped.
    pub fn serve_child(&self, name: &str) -> std::process::Child {
        self.cmd()
            .arg("serve")
            .env("CLAUDE_PEERS_NAME", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// A session named `name` in the home's directory; with `channel`, its client
    /// declares the channel capability, so mail comes as channel events.
    pub async fn session(&self, name: &str, channel: bool) -> Serve {
        Serve::start(self.serve_cmd(Some(name), self.dir.path()), channel).await
    }

    /// A session in `cwd`, with more environment.
    pub async fn session_in(
        &self,
        name: &str,
        channel: bool,
        cwd: &Path,
        env: &[(&str, &str)],
    ) -> Serve {
        let mut cmd = self.serve_cmd(Some(name), cwd);
        cmd.envs(env.iter().copied());
        Serve::start(cmd, channel).await
    }
}

impl Serve {
    /// Starts `cmd` (a `serve` command) and completes the MCP handshake.
    pub async fn start(cmd: tokio::process::Command, channel: bool) -> Self {
        let transport = TokioChildProcess::new(cmd).unwrap();
        let pid = transport.id().expect("serve's pid");
        let (tx, events) = mpsc::unbounded_channel();
        let service = TestClient {
            channel,
            events: tx,
        }
        .serve(transport)
        .await
        .unwrap();
        Self {
            pid,
            service: Some(service),
            events,
        }
    }

    pub fn service(&self) -> &RunningService<RoleClient, TestClient> {
        self.service.as_ref().expect("serve is running")
    }

    pub async fn call(&self, tool: &str, args: Value) -> CallToolResult {
        let args = args.as_object().cloned().unwrap_or_default();
        self.service()
            .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args))
            .await
            .unwrap()
    }

    /// Calls a tool that must succeed and returns its structured content.
    pub async fn ok(&self, tool: &str, args: Value) -> Value {
        let r = self.call(tool, args).await;
        assert_eq!(r.is_error, Some(false), "{tool} failed: {r:?}");
        r.structured_content.expect("structured content")
    }

    /// `whoami`; the first tool call waits for the broker connection.
    pub async fn whoami_when_ready(&self) -> Value {
        self.ok("whoami", serde_json::json!({})).await
    }

    /// The next channel event, which must come within 5 s.
    pub async fn next_event(&mut self) -> Value {
        self.event_within(Duration::from_secs(5))
            .await
            .expect("a channel event within 5s")
    }

    /// The next channel event, or `None` if none comes `within`.
    pub async fn event_within(&mut self, within: Duration) -> Option<Value> {
        let (_, ev) = tokio::time::timeout(within, self.events.recv())
            .await
            .ok()?
            .expect("event stream open");
        Some(ev)
    }

    /// The channel events, taken out to be read elsewhere (by a task that gathers many
    /// sessions' events, for figures); this session's own readers see none after.
    pub fn take_events(&mut self) -> mpsc::UnboundedReceiver<(Instant, Value)> {
        std::mem::replace(&mut self.events, mpsc::unbounded_channel().1)
    }

    /// When the next channel event arrived (for latency figures).
    pub async fn next_arrival(&mut self) -> Instant {
        self.events.recv().await.expect("event stream open").0
    }

    pub async fn no_event(&mut self, quiet: Duration) {
        if let Some(v) = self.event_within(quiet).await {
            panic!("unexpected channel event: {v}");
        }
    }

    /// `kill -9`s the process, then returns every event it wrote before dying that has not
    /// been taken yet (rmcp's client reads its stdout to the end).
    pub async fn kill9(&mut self) -> Vec<Value> {
        super::kill9(self.pid);
        let service = self.service.take().expect("serve is running");
        tokio::time::timeout(Duration::from_secs(10), service.waiting())
            .await
            .expect("rmcp's client sees serve's stdout end within 10s")
            .unwrap();
        // The client handler (which holds the sending side) goes once the last
        // notification it was handling is done; then the stream ends.
        let mut rest = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .expect("the event stream ends within 10s of serve's death");
            match ev {
                Some((_, ev)) => rest.push(ev),
                None => return rest,
            }
        }
    }

    /// Ends the session as its host would, closing its stdin.
    pub async fn close(mut self) {
        if let Some(s) = self.service.take() {
            let _ = s.cancel().await;
        }
    }
}

/// A tool result's text, its blocks joined by newlines.
pub fn text_of(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}
