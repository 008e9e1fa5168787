//! The stub of the Gemini API: requests as recorded, scripted replies, and the loopback
//! HTTP/1.1 server that answers `gemini` from them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::*;

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

/// One request the stub received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The path with its query, e.g. `/v1beta/models/<model>:streamGenerateContent?alt=sse`.
    pub path: String,
    /// Header names in lower case (`x-goog-api-key`, `user-agent`, …).
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body; `Null` when there was none (or it was not JSON).
    pub body: Value,
}

impl Request {
    fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    /// `generateContent` or `streamGenerateContent`.
    pub fn is_generate(&self) -> bool {
        self.method == "POST"
            && (self.route().ends_with(":generateContent")
                || self.route().ends_with(":streamGenerateContent"))
    }

    /// A turn of the agent loop: a generate call that offers tools. Side calls (the
    /// router's classifier, summaries) come without.
    pub fn is_main(&self) -> bool {
        self.is_generate() && !self.tool_names().is_empty()
    }

    /// The model in the path.
    pub fn model(&self) -> &str {
        let r = self.route();
        let m = r.rsplit('/').next().unwrap_or(r);
        m.split(':').next().unwrap_or(m)
    }

    /// The names of every function declared.
    pub fn tool_names(&self) -> Vec<&str> {
        self.declarations()
            .filter_map(|d| d["name"].as_str())
            .collect()
    }

    fn declarations(&self) -> impl Iterator<Item = &Value> {
        self.body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["functionDeclarations"].as_array().into_iter().flatten())
    }

    /// The declaration of our tool `tool` (`name`, `description`, `parametersJsonSchema`).
    pub fn declaration(&self, tool: &str) -> Option<&Value> {
        let name = mcp_tool(tool);
        self.declarations().find(|d| d["name"] == name.as_str())
    }

    /// Whether our tool `tool` is offered.
    pub fn offers(&self, tool: &str) -> bool {
        self.declaration(tool).is_some()
    }

    /// Every `functionResponse` in the conversation, in order: (name, `response`).
    pub fn responses(&self) -> Vec<(&str, &Value)> {
        self.parts()
            .filter_map(|p| p.get("functionResponse"))
            .map(|r| (r["name"].as_str().unwrap_or_default(), &r["response"]))
            .collect()
    }

    /// The last `response` Gemini gave the model for our tool `tool`: `{"output": "..."}`,
    /// or `{"error": "..."}`.
    pub fn response_of(&self, tool: &str) -> Option<&Value> {
        let name = mcp_tool(tool);
        self.responses()
            .into_iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r)
    }

    /// [`Self::response_of`] flattened to text.
    pub fn result_of(&self, tool: &str) -> Option<String> {
        self.response_of(tool).map(text_of)
    }

    fn parts(&self) -> impl Iterator<Item = &Value> {
        self.body["contents"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["parts"].as_array().into_iter().flatten())
    }

    /// Every string in the conversation (`contents`): what the model was shown, flattened.
    pub fn contents_text(&self) -> String {
        text_of(&self.body["contents"])
    }

    /// The flattened text of the last `user` content (a prompt, or function responses).
    pub fn last_user_text(&self) -> String {
        self.body["contents"]
            .as_array()
            .and_then(|c| c.iter().rev().find(|c| c["role"] == "user"))
            .map(|c| text_of(&c["parts"]))
            .unwrap_or_default()
    }
}

type Pred = Arc<dyn Fn(&Request) -> bool + Send + Sync>;

/// A scripted answer to one turn: its parts (text, function calls).
#[derive(Clone)]
pub struct Reply {
    /// Answer only a request this accepts; `None` accepts any.
    pub when: Option<Pred>,
    pub parts: Vec<Block>,
}

impl Reply {
    pub fn new(parts: Vec<Block>) -> Self {
        Self { when: None, parts }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Self::new(vec![Block::Text(text.into())])
    }

    /// A call of our tool `tool` (`mcp_claude-peers_<tool>`) with `args`.
    pub fn tool(tool: &str, args: Value) -> Self {
        Self::call(mcp_tool(tool), args)
    }

    /// A call of the function `name` (any tool Gemini offers) with `args`.
    pub fn call(name: impl Into<String>, args: Value) -> Self {
        Self::new(vec![Block::ToolUse {
            name: name.into(),
            input: args,
        }])
    }

    /// Makes this reply answer only a request `pred` accepts; replies queued before it
    /// that match nothing are skipped over, not dropped.
    pub fn only_if(mut self, pred: impl Fn(&Request) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Arc::new(pred));
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
            .field("parts", &self.parts)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// The stub server
// ---------------------------------------------------------------------------------------

#[derive(Default)]
pub(super) struct State {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
    script: Mutex<VecDeque<Reply>>,
    ids: AtomicU64,
    stop: AtomicBool,
}

/// The Gemini API on 127.0.0.1, scripted. Stops when dropped.
pub struct GeminiApi {
    pub addr: std::net::SocketAddr,
    pub(super) state: Arc<State>,
}

impl GeminiApi {
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
                // A client that goes away mid-answer is not our failure.
                std::thread::spawn(move || drop(serve_conn(conn, &st)));
            }
        });
        Self { addr, state }
    }

    /// `GOOGLE_GEMINI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

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

    /// The turns of the agent loop so far (requests that offer tools).
    pub fn turns(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::is_main)
            .collect()
    }

    /// Waits for a request `pred` accepts (one already received counts); `None` after
    /// `timeout`.
    pub fn wait_for(&self, pred: impl Fn(&Request) -> bool, timeout: Duration) -> Option<Request> {
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

    /// One line per request: method, path, and for generate calls the tool count and the
    /// last user text's tail.
    pub fn summary(&self) -> String {
        summary(&self.state)
    }
}

impl Drop for GeminiApi {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

pub(super) fn summary(state: &State) -> String {
    let mut s = String::new();
    for r in state.requests.lock().unwrap().iter() {
        s.push_str(&format!("{} {}", r.method, r.path));
        if r.is_generate() {
            let last = r.last_user_text();
            let tail: String = last
                .chars()
                .rev()
                .take(160)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            s.push_str(&format!(
                " tools={} last_user=…{tail:?}",
                r.tool_names().len()
            ));
        }
        s.push('\n');
    }
    s
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
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let path = words.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    // The CLI's fetch sends a Content-Length with every body.
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; n];
    reader.read_exact(&mut body)?;
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let req = Request {
        method,
        path,
        headers,
        body,
    };

    // Take the script's reply before recording, so a test that sees this request
    // recorded also sees the queue without the reply it took.
    let reply = if req.is_main() {
        let mut script = st.script.lock().unwrap();
        let i = script.iter().position(|r| r.accepts(&req));
        i.and_then(|i| script.remove(i))
    } else {
        None
    };
    st.requests.lock().unwrap().push(req.clone());
    st.arrived.notify_all();

    let route = req.route();
    if req.method == "POST" && route.ends_with(":countTokens") {
        return respond(
            &mut out,
            200,
            "application/json",
            &json!({ "totalTokens": 10 }).to_string(),
        );
    }
    if !req.is_generate() {
        let err = json!({ "error": {
            "code": 404,
            "message": format!("stub: no route {} {}", req.method, req.path),
            "status": "NOT_FOUND"
        } });
        return respond(&mut out, 404, "application/json", &err.to_string());
    }
    let parts = match reply {
        Some(r) => r.parts,
        None => vec![Block::Text(side_answer(&req.body))],
    };
    let id = st.ids.fetch_add(1, Ordering::Relaxed);
    let answer = response_json(id, req.model(), &parts);
    if route.ends_with(":streamGenerateContent") {
        // `?alt=sse`: server-sent events, each `data:` line one GenerateContentResponse.
        respond(
            &mut out,
            200,
            "text/event-stream",
            &format!("data: {answer}\r\n\r\n"),
        )
    } else {
        respond(&mut out, 200, "application/json", &answer.to_string())
    }
}

fn respond(out: &mut TcpStream, status: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn response_json(id: u64, model: &str, parts: &[Block]) -> Value {
    let parts: Vec<Value> = parts
        .iter()
        .map(|b| match b {
            Block::Text(t) => json!({ "text": t }),
            Block::ToolUse { name, input } => {
                json!({ "functionCall": { "name": name, "args": input } })
            }
        })
        .collect();
    json!({
        "candidates": [{
            "content": { "role": "model", "parts": parts },
            "finishReason": "STOP",
            "index": 0
        }],
        "usageMetadata": { "promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15 },
        "modelVersion": model,
        "responseId": format!("stub{id:04}"),
    })
}

/// The text of an unscripted answer: "ok", or for a call that asks for JSON
/// (`responseMimeType: application/json`) a value of its schema.
fn side_answer(body: &Value) -> String {
    let config = &body["generationConfig"];
    if config["responseMimeType"] != "application/json" {
        return "ok".into();
    }
    let schema = [&config["responseJsonSchema"], &config["responseSchema"]]
        .into_iter()
        .find(|s| s.is_object())
        .unwrap_or(&Value::Null);
    sample(schema).to_string()
}

/// A value `schema` accepts: the first of an `enum`, a small one of a type (a number's
/// `minimum`, else 1 for an integer and 0 for a number). So the router's classifier (which
/// wants a score of 1 to 100) gets `{"complexity_reasoning": "stub", "complexity_score": 1}`,
/// and the loop detector (asked after 30 turns of one prompt)
/// `unproductive_state_confidence: 0`: no loop.
fn sample(schema: &Value) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    let kind = schema["type"]
        .as_str()
        .unwrap_or("object")
        .to_ascii_lowercase();
    match kind.as_str() {
        "string" => json!("stub"),
        "integer" => schema.get("minimum").cloned().unwrap_or(json!(1)),
        "number" => schema.get("minimum").cloned().unwrap_or(json!(0)),
        "boolean" => json!(false),
        "array" => json!([]),
        _ => Value::Object(
            schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), sample(v)))
                .collect(),
        ),
    }
}
