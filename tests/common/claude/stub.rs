//! The stub of the Messages API: a loopback HTTP/1.1 server that answers Claude Code
//! from the scripted replies (streaming SSE and JSON) and records every request.

use super::*;

// ---------------------------------------------------------------------------------------
// The stub server
// ---------------------------------------------------------------------------------------

#[derive(Default)]
pub(super) struct State {
    pub(super) requests: Mutex<Vec<Request>>,
    pub(super) arrived: Condvar,
    pub(super) script: Mutex<VecDeque<Reply>>,
    pub(super) ids: AtomicU64,
    pub(super) stop: AtomicBool,
}

/// The Anthropic Messages API on 127.0.0.1, scripted. Stops when dropped.
pub struct StubApi {
    pub addr: std::net::SocketAddr,
    pub(super) state: Arc<State>,
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

pub(super) fn summary(state: &State) -> String {
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
