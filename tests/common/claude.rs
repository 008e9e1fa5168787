//! The real Claude Code CLI against a stub of the Anthropic Messages API, so a test can
//! script what the "model" does and assert exactly what it was shown.
//!
//! - [`StubApi`]: a loopback HTTP/1.1 server speaking the Messages API as Claude Code
//!   uses it (streaming SSE and plain JSON, `count_tokens`), recording every request.
//!   Main-loop requests (those that carry `tools`) are answered from a queue of scripted
//!   [`Reply`]s; everything else gets the text "ok".
//! - [`ClaudeHome`]: a throwaway `HOME` for Claude Code with our MCP server configured,
//!   and the environment that points `claude` at the stub and keeps it offline.
//! - [`ClaudeHome::print`] runs `claude -p`; [`Interactive`] runs a session under tmux.
//!
//! Tests start with [`require_claude!`] (and [`require_tmux!`] for sessions), which skip
//! with a reason when the programs are not installed; `.ci/run` installs both.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{BIN, Home};

/// The name our MCP server has in Claude Code's config: tools are `mcp__claude-peers__<tool>`.
pub const SERVER: &str = "claude-peers";

/// Skips the test (returns from it) when `claude` is not installed.
#[macro_export]
macro_rules! require_claude {
    () => {
        if $crate::common::claude::claude_bin().is_none() {
            eprintln!("skipping: claude (Claude Code) is not installed; .ci/run installs it");
            return;
        }
    };
}

/// Skips the test (returns from it) when `tmux` is not installed.
#[macro_export]
macro_rules! require_tmux {
    () => {
        if $crate::common::claude::find_in_path("tmux").is_none() {
            eprintln!("skipping: tmux is not installed; .ci/run installs it");
            return;
        }
    };
}

/// `name` found on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The Claude Code CLI: `claude` on `PATH`, or where its native installer puts it.
pub fn claude_bin() -> Option<PathBuf> {
    find_in_path("claude").or_else(|| {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        [".local/bin/claude", ".claude/local/claude"]
            .iter()
            .map(|p| home.join(p))
            .find(|p| is_executable(p))
    })
}

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

/// One request the stub received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The path with its query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// The parsed JSON body; `Null` when there was none (or it was not JSON).
    pub body: Value,
}

impl Request {
    /// A Messages API call (`/v1/messages`, not `count_tokens`).
    pub fn is_messages(&self) -> bool {
        self.method == "POST" && path_only(&self.path) == "/v1/messages"
    }

    /// A main-loop request: a Messages call that offers tools. Side requests (titles,
    /// summaries, classifiers) come without.
    pub fn is_main(&self) -> bool {
        self.is_messages() && self.body["tools"].as_array().is_some_and(|t| !t.is_empty())
    }

    /// The names of the tools offered. A deferred MCP tool is listed only once
    /// `ToolSearch` has loaded it.
    pub fn tool_names(&self) -> Vec<&str> {
        self.body["tools"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
            .unwrap_or_default()
    }

    pub fn has_tool(&self, name: &str) -> bool {
        self.tool_names().contains(&name)
    }

    /// Every string in the conversation (`messages`): what the model was shown, flattened.
    pub fn messages_text(&self) -> String {
        text_of(&self.body["messages"])
    }

    /// The flattened text of the last `user` message (a prompt, or tool results).
    pub fn last_user_text(&self) -> String {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .map(text_of)
            .unwrap_or_default()
    }

    /// The content of every `tool_result` block in the conversation, flattened, in order.
    pub fn tool_results(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.body["messages"].as_array().into_iter().flatten() {
            for b in m["content"].as_array().into_iter().flatten() {
                if b["type"] == "tool_result" {
                    out.push(text_of(&b["content"]));
                }
            }
        }
        out
    }
}

fn path_only(p: &str) -> &str {
    p.split('?').next().unwrap_or(p)
}

/// Every string under `v` (depth first), one a line: enough to ask "was X shown".
pub fn text_of(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = String::new();
    walk(v, &mut out);
    out
}

/// One content block of a scripted answer.
#[derive(Clone, Debug)]
pub enum Block {
    Text(String),
    ToolUse { name: String, input: Value },
}

type Pred = Arc<dyn Fn(&Request) -> bool + Send + Sync>;

/// A scripted answer to one main-loop request.
#[derive(Clone)]
pub struct Reply {
    /// Answer only a request this accepts; `None` accepts any.
    pub when: Option<Pred>,
    pub blocks: Vec<Block>,
    /// Hold the answer (after `message_start`, with pings) this long...
    pub delay: Duration,
    /// ...and until this gate opens.
    pub gate: Option<Gate>,
}

impl Reply {
    pub fn new(blocks: Vec<Block>) -> Self {
        Self {
            when: None,
            blocks,
            delay: Duration::ZERO,
            gate: None,
        }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Self::new(vec![Block::Text(text.into())])
    }

    /// A call of the tool `name` (stop_reason `tool_use`).
    pub fn tool(name: impl Into<String>, input: Value) -> Self {
        Self::new(vec![Block::ToolUse {
            name: name.into(),
            input,
        }])
    }

    /// `blocks`, for the first request `pred` accepts. Replies queued before it that
    /// match nothing are skipped over, not dropped.
    pub fn when(
        pred: impl Fn(&Request) -> bool + Send + Sync + 'static,
        blocks: Vec<Block>,
    ) -> Self {
        Self::new(blocks).only_if(pred)
    }

    /// Makes this reply conditional on `pred`.
    pub fn only_if(mut self, pred: impl Fn(&Request) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Arc::new(pred));
        self
    }

    /// For a request whose last user message (the prompt, a channel message, or tool
    /// results) contains `needle`.
    pub fn when_shown(needle: impl Into<String>, blocks: Vec<Block>) -> Self {
        let needle = needle.into();
        Self::when(move |r| r.last_user_text().contains(&needle), blocks)
    }

    /// Streams nothing but `message_start` and pings for `d` before the content: keeps the
    /// turn busy ("esc to interrupt" shown).
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// Holds the answer until `gate` is opened (or 120 s pass).
    pub fn held(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }

    fn accepts(&self, r: &Request) -> bool {
        self.when.as_ref().is_none_or(|p| p(r))
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("conditional", &self.when.is_some())
            .field("blocks", &self.blocks)
            .field("delay", &self.delay)
            .finish()
    }
}

/// The full name Claude Code gives our MCP server's tool `tool`.
pub fn mcp_tool(tool: &str) -> String {
    format!("mcp__{SERVER}__{tool}")
}

/// The two replies with which the model calls one of our MCP tools: Claude Code defers
/// MCP tools, so first `ToolSearch` `select:` loads its schema (skipped if it is already
/// loaded), then, once the request offers the tool (ToolSearch's result was shown), the
/// call itself.
pub fn call_mcp_tool(tool: &str, input: Value) -> [Reply; 2] {
    let name = mcp_tool(tool);
    let (a, b) = (name.clone(), name.clone());
    [
        Reply::tool("ToolSearch", json!({ "query": format!("select:{name}") }))
            .only_if(move |r| !r.has_tool(&a)),
        Reply::tool(name, input).only_if(move |r| r.has_tool(&b)),
    ]
}

/// A latch a test opens to release replies [`Reply::held`] on it.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }

    fn wait(&self, timeout: Duration) {
        let g = self.0.0.lock().unwrap();
        let _ = self.0.1.wait_timeout_while(g, timeout, |open| !*open);
    }

    fn is_open(&self) -> bool {
        *self.0.0.lock().unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// The stub server
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    script: Mutex<VecDeque<Reply>>,
    ids: AtomicU64,
    stop: AtomicBool,
}

/// The Anthropic Messages API on 127.0.0.1, scripted. Stops when dropped.
pub struct StubApi {
    pub addr: std::net::SocketAddr,
    state: Arc<State>,
}

impl StubApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    // A client that goes away mid-answer is not our failure.
                    let _ = serve_conn(conn, &st);
                });
            }
        });
        Self { addr, state }
    }

    /// `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `reply` for a main-loop request.
    pub fn push(&self, reply: Reply) {
        self.state.script.lock().unwrap().push_back(reply);
    }

    pub fn push_all(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// Scripted replies not yet used.
    pub fn pending(&self) -> usize {
        self.state.script.lock().unwrap().len()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The main-loop requests so far.
    pub fn main_requests(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::is_main)
            .collect()
    }

    /// Waits for a request `pred` accepts (one already received counts) and returns its
    /// body; `None` after `timeout`.
    pub fn wait_for(&self, pred: impl Fn(&Request) -> bool, timeout: Duration) -> Option<Value> {
        self.wait_for_request(pred, timeout).map(|r| r.body)
    }

    pub fn wait_for_request(
        &self,
        pred: impl Fn(&Request) -> bool,
        timeout: Duration,
    ) -> Option<Request> {
        let deadline = Instant::now() + timeout;
        let mut reqs = self.state.requests.lock().unwrap();
        loop {
            if let Some(r) = reqs.iter().find(|r| pred(r)) {
                return Some(r.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            reqs = self.state.arrived.wait_timeout(reqs, left).unwrap().0;
        }
    }

    /// One line per request: method, path, and for Messages calls the tool count and
    /// the last user text's tail.
    pub fn summary(&self) -> String {
        summary(&self.state)
    }
}

fn summary(state: &State) -> String {
    let requests = state.requests.lock().unwrap().clone();
    let mut s = String::new();
    for r in requests {
        s.push_str(&format!("{} {}", r.method, r.path));
        if r.is_messages() {
            let last = r.last_user_text();
            let cut = last.len()
                - last
                    .chars()
                    .rev()
                    .take(120)
                    .map(char::len_utf8)
                    .sum::<usize>();
            s.push_str(&format!(
                " tools={} stream={} last_user=…{:?}",
                r.tool_names().len(),
                r.body["stream"],
                &last[cut..]
            ));
        }
        s.push('\n');
    }
    s
}

impl Drop for StubApi {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_conn(conn: TcpStream, st: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    // One request per connection: we answer with `Connection: close`.
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        read_chunked(&mut reader)?
    } else {
        let n: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut b = vec![0; n];
        reader.read_exact(&mut b)?;
        b
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let req = Request { method, path, body };

    // Take the script's reply before recording, so a test that sees this request
    // recorded also sees the queue without the reply it took.
    let reply = if req.is_main() {
        let mut script = st.script.lock().unwrap();
        script
            .iter()
            .position(|r| r.accepts(&req))
            .and_then(|i| script.remove(i))
    } else {
        None
    };
    st.requests.lock().unwrap().push(req.clone());
    st.arrived.notify_all();

    let route = path_only(&req.path);
    if req.method == "POST" && route == "/v1/messages/count_tokens" {
        return respond_json(&mut out, 200, &json!({ "input_tokens": 10 }));
    }
    if !(req.method == "POST" && route == "/v1/messages") {
        let err = json!({
            "type": "error",
            "error": { "type": "not_found_error", "message": format!("stub: no route {} {}", req.method, req.path) }
        });
        return respond_json(&mut out, 404, &err);
    }
    let reply = reply.unwrap_or_else(|| Reply::text("ok"));
    let id = st.ids.fetch_add(1, Ordering::Relaxed);
    let model = req.body["model"]
        .as_str()
        .unwrap_or("claude-stub")
        .to_string();
    if req.body["stream"] == true {
        stream_reply(&mut out, id, &model, &reply)
    } else {
        hold(&reply, || Ok(()))?;
        respond_json(&mut out, 200, &message_json(id, &model, &reply))
    }
}

fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        r.read_exact(&mut crlf)?;
    }
}

fn respond_json(out: &mut TcpStream, status: u16, v: &Value) -> std::io::Result<()> {
    let body = v.to_string();
    let reason = if status == 200 { "OK" } else { "Not Found" };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Waits out the reply's delay and gate, calling `tick` about once a second.
fn hold(reply: &Reply, mut tick: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
    let deadline = Instant::now() + reply.delay;
    let gate_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = Instant::now();
        let gated = reply
            .gate
            .as_ref()
            .is_some_and(|g| !g.is_open() && now < gate_deadline);
        if now >= deadline && !gated {
            return Ok(());
        }
        let step = deadline
            .saturating_duration_since(now)
            .min(Duration::from_secs(1));
        match &reply.gate {
            Some(g) if gated && step.is_zero() => g.wait(Duration::from_secs(1)),
            _ => std::thread::sleep(step),
        }
        tick()?;
    }
}

fn usage() -> Value {
    json!({
        "input_tokens": 10,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0
    })
}

fn stop_reason(reply: &Reply) -> &'static str {
    if reply
        .blocks
        .iter()
        .any(|b| matches!(b, Block::ToolUse { .. }))
    {
        "tool_use"
    } else {
        "end_turn"
    }
}

// Message and tool-use ids must be unique: Claude Code merges consecutive assistant
// messages that share an id into one, which makes a second call look like a repeat.
fn content_json(id: u64, reply: &Reply) -> Vec<Value> {
    reply
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            Block::Text(t) => json!({ "type": "text", "text": t }),
            Block::ToolUse { name, input } => json!({
                "type": "tool_use", "id": format!("toolu_stub{id:04}_{i}"), "name": name, "input": input
            }),
        })
        .collect()
}

fn message_json(id: u64, model: &str, reply: &Reply) -> Value {
    json!({
        "id": format!("msg_stub{id:04}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_json(id, reply),
        "stop_reason": stop_reason(reply),
        "stop_sequence": null,
        "usage": usage(),
    })
}

fn stream_reply(out: &mut TcpStream, id: u64, model: &str, reply: &Reply) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let send = |out: &mut TcpStream, event: &str, data: Value| -> std::io::Result<()> {
        let text = format!("event: {event}\ndata: {data}\n\n");
        write!(out, "{:x}\r\n{text}\r\n", text.len())?;
        out.flush()
    };
    let mut start = message_json(id, model, reply);
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = json!(1);
    send(
        out,
        "message_start",
        json!({ "type": "message_start", "message": start }),
    )?;
    {
        let mut o = out.try_clone()?;
        hold(reply, || send(&mut o, "ping", json!({ "type": "ping" })))?;
    }
    for (index, block) in content_json(id, reply).into_iter().enumerate() {
        let (empty, delta) = match block["type"].as_str() {
            Some("text") => (
                json!({ "type": "text", "text": "" }),
                json!({ "type": "text_delta", "text": block["text"] }),
            ),
            _ => (
                json!({ "type": "tool_use", "id": block["id"], "name": block["name"], "input": {} }),
                json!({ "type": "input_json_delta", "partial_json": block["input"].to_string() }),
            ),
        };
        send(
            out,
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block": empty }),
        )?;
        send(
            out,
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": index, "delta": delta }),
        )?;
        send(
            out,
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": index }),
        )?;
    }
    send(
        out,
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": { "stop_reason": stop_reason(reply), "stop_sequence": null },
            "usage": { "output_tokens": 5 }
        }),
    )?;
    send(out, "message_stop", json!({ "type": "message_stop" }))?;
    write!(out, "0\r\n\r\n")?;
    out.flush()
}

// ---------------------------------------------------------------------------------------
// Claude Code's home and environment
// ---------------------------------------------------------------------------------------

/// Any `sk-ant-` string passes the CLI's format check; the stub accepts everything.
pub const API_KEY: &str = "sk-ant-api03-stub0000000000000000000000000000000000000000-claudepeersAA";

/// A throwaway `HOME` for Claude Code: onboarding done, the key approved, the project
/// directory trusted, our MCP server configured and allowed.
pub struct ClaudeHome {
    /// Shared with the [`Interactive`] sessions started here, so it outlives them.
    pub dir: Arc<tempfile::TempDir>,
    /// `HOME`.
    pub home: PathBuf,
    /// The directory `claude` runs in (trusted in `.claude.json`).
    pub project: PathBuf,
    /// `--debug-file` of every run.
    pub debug_file: PathBuf,
    pub base_url: String,
    stub: Arc<State>,
    /// `~/.claude.json`, written again after [`ClaudeHome::config`].
    config: Value,
    /// Extra environment for `claude`.
    env: BTreeMap<String, String>,
}

impl ClaudeHome {
    /// A home whose `claude` talks to `api` and runs `claude-peers serve` against `peers`.
    pub fn new(peers: &Home, api: &StubApi) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cc-")
            .tempdir_in("/tmp")
            .map(Arc::new)
            .unwrap();
        // Claude Code keys projects by the canonical path.
        let root = dir.path().canonicalize().unwrap();
        let home = root.join("home");
        let project = root.join("project");
        std::fs::create_dir_all(home.join(".claude")).unwrap();
        std::fs::create_dir_all(&project).unwrap();
        let key_tail = &API_KEY[API_KEY.len() - 20..];
        let config = json!({
            // Skips the theme picker and the welcome screens.
            "hasCompletedOnboarding": true,
            // "Do you want to use this API key?": yes, for this key.
            "customApiKeyResponses": { "approved": [key_tail], "rejected": [] },
            // "Do you trust the files in this folder?": yes.
            "projects": { project.to_str().unwrap(): {
                "hasTrustDialogAccepted": true,
                "hasCompletedProjectOnboarding": true
            } },
            "mcpServers": { SERVER: {
                "type": "stdio",
                "command": BIN,
                "args": ["serve"],
                "env": {
                    "CLAUDE_PEERS_HOME": peers.root().to_str().unwrap(),
                    // As `Home::cmd`: a broker the test leaves behind goes away by itself.
                    "CLAUDE_PEERS_IDLE_TIMEOUT": "20s"
                }
            } }
        });
        // The default permission mode ("auto") sends an MCP call with no allow rule to
        // a classifier the stub cannot answer; allow ours, as "don't ask again" would.
        std::fs::write(
            home.join(".claude/settings.json"),
            serde_json::to_string_pretty(&json!({
                "permissions": { "allow": [format!("mcp__{SERVER}")] }
            }))
            .unwrap(),
        )
        .unwrap();
        let debug_file = root.join("claude-debug.log");
        let me = Self {
            dir,
            home,
            project,
            debug_file,
            base_url: api.base_url(),
            stub: api.state.clone(),
            config,
            env: BTreeMap::new(),
        };
        me.write_config();
        me
    }

    /// Changes `~/.claude.json` (e.g. `c["mcpServers"]["claude-peers"]["env"]["X"] = ..`).
    pub fn config(&mut self, f: impl FnOnce(&mut Value)) {
        f(&mut self.config);
        self.write_config();
    }

    /// Sets a variable in our MCP server's environment (e.g. `CLAUDE_PEERS_NAME`).
    pub fn server_env(&mut self, key: &str, value: &str) {
        self.config(|c| c["mcpServers"][SERVER]["env"][key] = json!(value));
    }

    /// Sets a variable in `claude`'s own environment.
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.insert(key.into(), value.into());
    }

    fn write_config(&self) {
        std::fs::write(
            self.home.join(".claude.json"),
            serde_json::to_string_pretty(&self.config).unwrap(),
        )
        .unwrap();
    }

    /// The whole environment `claude` runs with (nothing else is inherited, so a test
    /// run from inside Claude Code, or with ANTHROPIC_* set, behaves the same).
    pub fn vars(&self) -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        let keep = |k: &str| std::env::var(k).ok();
        v.insert(
            "PATH".into(),
            keep("PATH").unwrap_or("/usr/bin:/bin".into()),
        );
        for k in ["LANG", "LC_ALL", "TMPDIR"] {
            if let Some(x) = keep(k) {
                v.insert(k.into(), x);
            }
        }
        v.insert("HOME".into(), self.home.to_str().unwrap().into());
        // Where Claude Code sends every model call.
        v.insert("ANTHROPIC_BASE_URL".into(), self.base_url.clone());
        v.insert("ANTHROPIC_API_KEY".into(), API_KEY.into());
        // No update check or self-update at start.
        v.insert("DISABLE_AUTOUPDATER".into(), "1".into());
        // Without it Claude Code also calls api.anthropic.com directly (bootstrap, fast
        // mode status, the MCP registry, event logging): with no network those fail
        // after a DNS lookup, with a network they would leave the machine.
        v.insert(
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
            "1".into(),
        );
        // Interactive sessions otherwise install the official plugin marketplace at start:
        // a download from downloads.claude.ai, then `git clone` from github.com over HTTPS
        // and SSH. Not covered by the variable above.
        v.insert(
            "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL".into(),
            "1".into(),
        );
        v.extend(self.env.clone());
        v
    }

    /// `claude` with [`Self::vars`], in the project directory, logging to the debug file.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(claude_bin().expect("claude is installed"));
        cmd.env_clear()
            .envs(self.vars())
            .current_dir(&self.project)
            .arg("--debug-file")
            .arg(&self.debug_file)
            .stdin(Stdio::null());
        cmd
    }

    /// `claude -p <prompt>` for a turn whose scripted model calls our `whoami` (the replies
    /// already pushed): checks that the model was shown its answer, naming `name`, and
    /// that the turn ended cleanly with every scripted reply used.
    pub fn print_shows_whoami(&self, api: &StubApi, prompt: &str, name: &str) -> Output {
        let out = self.print(prompt);
        let needle = format!("\"name\":\"{name}\"");
        let shown = api.wait_for(
            |r| r.is_main() && r.tool_results().iter().any(|t| t.contains(&needle)),
            Duration::from_secs(5),
        );
        assert!(
            shown.is_some(),
            "the model was never shown whoami's answer\nstdout: {}\nstderr: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        assert!(out.status.success(), "{out:?}\n{}", self.diagnostics());
        // After the tool's result the queue is empty: the stub's default answer ends the turn.
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "{}",
            self.diagnostics()
        );
        assert_eq!(api.pending(), 0, "{}", self.diagnostics());
        out
    }

    /// `claude -p <prompt>`: one turn, failing after 90 s.
    pub fn print(&self, prompt: &str) -> Output {
        self.print_with(&["-p", prompt], Duration::from_secs(90))
    }

    /// `claude <args>`, killed (and the test failed) after `timeout`.
    pub fn print_with(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        run_within(cmd, timeout).unwrap_or_else(|out| {
            panic!(
                "claude {args:?} still running after {timeout:?}; killed\nstdout: {}\nstderr: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.diagnostics()
            )
        })
    }

    /// The last `lines` lines of the `--debug-file` log.
    pub fn debug_tail(&self, lines: usize) -> String {
        debug_tail(&self.debug_file, lines)
    }

    /// What to print when a test fails: the stub's requests and the debug log's tail.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- stub requests ---\n{}{}",
            summary(&self.stub),
            self.debug_tail(60)
        )
    }
}

fn debug_tail(file: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(file).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    format!(
        "--- claude debug log {} (last {lines} of {} lines) ---\n{}",
        file.display(),
        all.len(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

/// `screen` with each run of blank lines shown as one.
fn squeeze_blank_lines(screen: &str) -> String {
    let mut out = String::new();
    let mut blank = false;
    for l in screen.lines() {
        let b = l.trim().is_empty();
        if !(b && blank) {
            out.push_str(l);
            out.push('\n');
        }
        blank = b;
    }
    out
}

fn kill(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

// ---------------------------------------------------------------------------------------
// Interactive sessions under tmux
// ---------------------------------------------------------------------------------------

/// An interactive `claude` in a detached tmux session of its own (a private tmux server,
/// so tests run in parallel). The server, and with it `claude`, is killed when dropped.
pub struct Interactive {
    socket: PathBuf,
    pid: u32,
    debug_file: PathBuf,
    stub: Arc<State>,
    // Removed only after `claude` has exited: it writes there (MCP logs, `.claude.json`)
    // while it shuts down.
    _dir: Arc<tempfile::TempDir>,
}

impl Interactive {
    /// Starts `claude <args>` in a 200x50 pane and waits for its prompt (60 s), getting
    /// past any first-run dialog on the way.
    pub fn start(home: &ClaudeHome, args: &[&str]) -> Self {
        // A socket of its own per session: a second session from the same home must not
        // meet the first one's tmux server on its way out ("server exited unexpectedly").
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let socket = home.dir.path().join(format!("tmux-{n}.sock"));
        let conf = home.dir.path().join("tmux.conf");
        // remain-on-exit: a `claude` that exits leaves its last screen to capture.
        std::fs::write(
            &conf,
            "set -g remain-on-exit on\nset -g default-terminal xterm-256color\nset -g history-limit 10000\n",
        )
        .unwrap();
        let claude = claude_bin().expect("claude is installed");
        let mut vars = home.vars();
        if args.contains(&"--dangerously-skip-permissions") {
            // Otherwise refused when running as root.
            vars.insert("IS_SANDBOX".into(), "1".into());
        }
        let mut cmd = Command::new("tmux");
        // The tmux server is new, so the pane gets exactly this environment.
        cmd.env_clear()
            .envs(vars)
            .env("TERM", "xterm-256color")
            .arg("-S")
            .arg(&socket)
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-x", "200", "-y", "50", "-P", "-F"])
            .arg("#{pane_pid}")
            .arg("-c")
            .arg(&home.project)
            // Several arguments: tmux runs them without a shell, so the pane's pid is
            // claude's.
            .arg("--")
            .arg(claude)
            .arg("--debug-file")
            .arg(&home.debug_file)
            .args(args)
            .stdin(Stdio::null());
        let out = cmd.output().expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let s = Self {
            socket,
            pid,
            debug_file: home.debug_file.clone(),
            stub: home.stub.clone(),
            _dir: home.dir.clone(),
        };
        s.get_to_prompt(Duration::from_secs(60));
        s
    }

    /// `claude`'s pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs")
    }

    /// Sends tmux key names (`"Enter"`, `"Escape"`, `"C-c"`, `"Down"`), each as one key.
    pub fn send_keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend_from_slice(keys);
        let out = self.tmux(&args);
        assert!(out.status.success(), "send-keys: {out:?}");
    }

    /// Types `text` literally.
    pub fn type_text(&self, text: &str) {
        let out = self.tmux(&["send-keys", "-t", "0", "-l", text]);
        assert!(out.status.success(), "send-keys -l: {out:?}");
    }

    /// Types `text` and, once it shows in the prompt, presses Enter.
    pub fn submit(&self, text: &str) {
        self.type_text(text);
        // Enter sent with the text could land before the input box has taken the text
        // (as a paste), and be swallowed.
        let probe: String = text.chars().take(40).collect();
        self.wait_until(|s| s.contains(&probe), Duration::from_secs(15))
            .unwrap_or_else(|| panic!("typed text not shown\n{}", self.diagnostics()));
        self.send_keys(&["Enter"]);
    }

    /// The visible screen, as text.
    pub fn capture(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "0"]).stdout).into()
    }

    /// Whether `claude` has exited (the pane is kept: remain-on-exit).
    pub fn exited(&self) -> bool {
        let out = self.tmux(&["display-message", "-p", "-t", "0", "#{pane_dead}"]);
        String::from_utf8_lossy(&out.stdout).trim() != "0"
    }

    /// Polls the screen until `cond` accepts it; returns that screen, or `None` after
    /// `timeout` (or as soon as `claude` has exited and the screen does not match).
    pub fn wait_until(&self, cond: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if cond(&screen) {
                return Some(screen);
            }
            if Instant::now() >= deadline || self.exited() {
                return None;
            }
            // tmux gives no "screen changed" event to wait on without a control client.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for an idle prompt (input box drawn, no turn running); panics with
    /// diagnostics after `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> String {
        self.wait_until(is_idle, timeout)
            .unwrap_or_else(|| panic!("claude not idle after {timeout:?}\n{}", self.diagnostics()))
    }

    /// Waits for `needle` on screen; panics with diagnostics after `timeout`.
    pub fn wait_for_text(&self, needle: &str, timeout: Duration) -> String {
        self.wait_until(|s| s.contains(needle), timeout)
            .unwrap_or_else(|| {
                panic!(
                    "{needle:?} not on screen after {timeout:?}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// Gets from start-up to the first prompt, answering the first-run dialogs that
    /// `.claude.json` did not already settle.
    fn get_to_prompt(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if is_idle(&screen) {
                return;
            }
            if let Some(keys) = dialog_answer(&screen) {
                // One key at a time, each after the last has shown (Ink may read keys
                // that arrive together as one input).
                let mut before = screen;
                for key in keys {
                    self.send_keys(&[key]);
                    before = self
                        .wait_until(|s| s != before, Duration::from_secs(10))
                        .unwrap_or_else(|| panic!("dialog ignored {key}\n{}", self.diagnostics()));
                }
                continue;
            }
            assert!(
                Instant::now() < deadline && !self.exited(),
                "claude did not reach its prompt within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket on which this `claude` takes injected messages (its "uds-messaging"
    /// inbox: `/tmp/cc-socks/<pid>.sock`, or under `$XDG_RUNTIME_DIR/cc-socks`), once it
    /// listens. Read from the debug log's "[uds-messaging] Listening: <path>" line, else
    /// looked for where Claude Code puts it.
    pub fn inbox_socket(&self) -> Option<PathBuf> {
        let name = format!("{}.sock", self.pid);
        let log = std::fs::read_to_string(&self.debug_file).unwrap_or_default();
        let logged = log
            .lines()
            .filter_map(|l| l.split("[uds-messaging] Listening: ").nth(1))
            .map(|p| PathBuf::from(p.trim()))
            .find(|p| p.ends_with(&name));
        if logged.is_some() {
            return logged;
        }
        let uid = rustix::process::getuid().as_raw();
        let mut dirs = vec![
            PathBuf::from("/tmp/cc-socks"),
            PathBuf::from(format!("/tmp/cc-socks-{uid}")),
            PathBuf::from(format!("/run/user/{uid}/cc-socks")),
        ];
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
            dirs.push(PathBuf::from(x).join("cc-socks"));
        }
        dirs.into_iter().map(|d| d.join(&name)).find(|p| p.exists())
    }

    /// Waits for [`Self::inbox_socket`]; panics with diagnostics after `timeout`.
    pub fn wait_inbox_socket(&self, timeout: Duration) -> PathBuf {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.inbox_socket() {
                return p;
            }
            assert!(
                Instant::now() < deadline && !self.exited(),
                "no inbox socket after {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What to print when a test fails: the screen, the stub's requests and the debug
    /// log's tail.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- screen (claude pid {}, exited: {}) ---\n{}\n--- stub requests ---\n{}{}",
            self.pid,
            self.exited(),
            squeeze_blank_lines(&self.capture()),
            summary(&self.stub),
            debug_tail(&self.debug_file, 60)
        )
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        // SIGTERM, and wait for the exit: claude stops its MCP servers and writes its
        // last files on the way out, and the home is removed right after.
        kill(self.pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.exited() {
            if Instant::now() >= deadline {
                kill(self.pid, rustix::process::Signal::KILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.tmux(&["kill-server"]);
    }
}

/// Idle: the input box is drawn (a line starting with `❯` right under a rule; a dialog's
/// `❯` cursor is indented) and no turn is running.
pub fn is_idle(screen: &str) -> bool {
    let lines: Vec<&str> = screen.lines().collect();
    let input_box = lines
        .windows(2)
        .any(|w| w[0].starts_with('─') && w[1].starts_with('❯'));
    input_box && !screen.contains("esc to interrupt")
}

/// First-run dialogs: text that identifies one, and the option to choose. All are
/// selection lists (`❯` marks the current line, Enter confirms).
const DIALOGS: &[(&str, &str)] = &[
    // Folder trust, "Accessing workspace: ... Quick safety check: Is this a project you
    // created or one you trust?". The cursor starts on "No, exit". Settled by
    // `projects.<dir>.hasTrustDialogAccepted`.
    ("Quick safety check", "Yes, I trust this folder"),
    // "Detected a custom API key in your environment ... Do you want to use this API
    // key?"; the cursor starts on "No (recommended)". Settled by
    // `customApiKeyResponses.approved`.
    ("Do you want to use this API key?", "Yes"),
    // `--dangerously-skip-permissions`: "WARNING: Claude Code running in Bypass
    // Permissions mode"; the cursor starts on "No, exit".
    ("Bypass Permissions mode", "Yes, I accept"),
];
// Not a dialog we can answer: without `hasCompletedOnboarding` the first run checks its
// connection to api.anthropic.com and stops at "Unable to connect to Anthropic services".

/// The keys that choose the right option of the first-run dialog on `screen`, if one is
/// shown: Up or Down from the cursor to the option's line, then Enter.
fn dialog_answer(screen: &str) -> Option<Vec<&'static str>> {
    let (_, option) = DIALOGS.iter().find(|(text, _)| screen.contains(text))?;
    let lines: Vec<&str> = screen.lines().map(str::trim).collect();
    let cursor = lines.iter().position(|l| l.starts_with('❯'))?;
    let target = lines
        .iter()
        .position(|l| l.trim_start_matches('❯').trim() == *option)?;
    let step = if target > cursor { "Down" } else { "Up" };
    let mut keys = vec![step; target.abs_diff(cursor)];
    keys.push("Enter");
    Some(keys)
}

/// Runs `cmd` with its output captured (here, not in `common/mod.rs`, because the
/// benches include this file alone; `tests/faults.rs` uses it too), and kills it (SIGKILL) if it has not exited
/// within `within`: `Ok` with the output of a process that exited, `Err` with what a
/// killed one had written, for the caller's failure message.
pub fn run_within(mut cmd: Command, within: Duration) -> Result<Output, Output> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(within) {
        Ok(out) => Ok(out.unwrap()),
        Err(_) => {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
            Err(rx.recv().unwrap().unwrap())
        }
    }
}
