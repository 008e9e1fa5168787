//! The stub of the OpenAI Responses API: a loopback HTTP/1.1 server that answers Codex
//! from scripted replies (SSE) and records every request, and the request and reply types.

use super::*;

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

/// One request the stub received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case (Codex sends `session-id`, `x-codex-turn-metadata`, …).
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body; `Null` when there was none (or it was not JSON).
    pub body: Value,
}

/// A tool call the model made and the result Codex gave back for it.
#[derive(Clone, Debug)]
pub struct ToolResult {
    pub namespace: Option<String>,
    pub name: String,
    pub arguments: Value,
    /// The `output`, flattened to text ("Wall time: …\nOutput:\n…").
    pub output: String,
}

impl ToolResult {
    /// What the tool answered: the output after Codex's "Output:" header.
    pub fn answer(&self) -> &str {
        self.output
            .split_once("Output:\n")
            .map_or(self.output.as_str(), |(_, a)| a)
    }

    /// [`Self::answer`] as JSON (a tool's `structuredContent`), if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(self.answer()).ok()
    }
}

impl Request {
    /// A turn request (`POST /v1/responses`).
    pub fn is_responses(&self) -> bool {
        self.method == "POST" && self.path.split('?').next() == Some("/v1/responses")
    }

    /// The conversation items (`input`).
    pub fn input(&self) -> &[Value] {
        self.body["input"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The names of the tools offered in `namespace` (e.g. [`NAMESPACE`]).
    pub fn tools_in(&self, namespace: &str) -> Vec<String> {
        self.body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["type"] == "namespace" && t["name"] == namespace)
            .flat_map(|t| t["tools"].as_array().into_iter().flatten())
            .filter_map(|t| t["name"].as_str().map(String::from))
            .collect()
    }

    /// Whether our server's tool `name` is offered.
    pub fn offers(&self, name: &str) -> bool {
        self.tools_in(NAMESPACE).iter().any(|t| t == name)
    }

    /// The texts of the `message` items from `role` (`user`, `developer`, `assistant`).
    pub fn messages(&self, role: &str) -> Vec<String> {
        self.input()
            .iter()
            .filter(|i| i["type"] == "message" && i["role"] == role)
            .map(|i| texts(&i["content"]))
            .collect()
    }

    /// Every tool call in the conversation with its result, in order.
    pub fn tool_results(&self) -> Vec<ToolResult> {
        let input = self.input();
        input
            .iter()
            .filter(|i| i["type"] == "function_call_output")
            .map(|out| {
                let call = input
                    .iter()
                    .find(|i| i["type"] == "function_call" && i["call_id"] == out["call_id"]);
                let field = |k: &str| call.and_then(|c| c[k].as_str()).map(String::from);
                ToolResult {
                    namespace: field("namespace"),
                    name: field("name").unwrap_or_default(),
                    arguments: field("arguments")
                        .and_then(|a| serde_json::from_str(&a).ok())
                        .unwrap_or(Value::Null),
                    output: texts(&out["output"]),
                }
            })
            .collect()
    }

    /// The result of the last call of our tool `name`, if there is one yet.
    pub fn result_of(&self, name: &str) -> Option<ToolResult> {
        self.tool_results()
            .into_iter()
            .rev()
            .find(|r| r.namespace.as_deref() == Some(NAMESPACE) && r.name == name)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A string, or the `text` of each item of a content list, one a line.
fn texts(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// One output item of a scripted answer.
#[derive(Clone, Debug)]
pub enum Item {
    Text(String),
    /// A function call; `namespace` is `Some(NAMESPACE)` for our tools, `None` for Codex's.
    Call {
        namespace: Option<String>,
        name: String,
        arguments: Value,
    },
}

type Pred = Arc<dyn Fn(&Request) -> bool + Send + Sync>;

/// A scripted answer to one `/v1/responses` request.
#[derive(Clone)]
pub struct Reply {
    /// Answer only a request this accepts; `None` accepts any.
    pub when: Option<Pred>,
    pub items: Vec<Item>,
}

impl Reply {
    pub fn new(items: Vec<Item>) -> Self {
        Self { when: None, items }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Self::new(vec![Item::Text(text.into())])
    }

    /// A call of our server's tool `name`.
    pub fn tool(name: &str, arguments: Value) -> Self {
        Self::new(vec![Item::Call {
            namespace: Some(NAMESPACE.into()),
            name: name.into(),
            arguments,
        }])
    }

    /// Makes this reply conditional on `pred`; replies queued before it that match
    /// nothing are skipped over, not dropped.
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
            .field("items", &self.items)
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

/// The OpenAI Responses API on 127.0.0.1, scripted. Stops when dropped.
pub struct ResponsesApi {
    pub addr: std::net::SocketAddr,
    pub(super) state: Arc<State>,
}

impl ResponsesApi {
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
                std::thread::spawn(move || {
                    let _ = serve_conn(conn, &st);
                });
            }
        });
        Self { addr, state }
    }

    /// The provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
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

    /// The `/v1/responses` requests so far.
    pub fn turns(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(Request::is_responses)
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

    /// One line per request: method, path, our tools offered, the tool results shown.
    pub fn summary(&self) -> String {
        summary(&self.state)
    }
}

pub(super) fn summary(state: &State) -> String {
    let mut s = String::new();
    for r in state.requests.lock().unwrap().iter() {
        s.push_str(&format!("{} {}", r.method, r.path));
        if r.is_responses() {
            s.push_str(&format!(" ours={:?}", r.tools_in(NAMESPACE)));
            for t in r.tool_results() {
                let out: String = t.output.chars().take(200).collect();
                s.push_str(&format!("\n    {}({}) -> {out:?}", t.name, t.arguments));
            }
        }
        s.push('\n');
    }
    s
}

impl Drop for ResponsesApi {
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
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    // Codex sends its body with a Content-Length, uncompressed to a custom provider; a
    // chunked or compressed body is recorded as Null (and the test fails on it).
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; n];
    reader.read_exact(&mut body)?;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let req = Request {
        method,
        path,
        headers,
        body,
    };

    // Take the script's reply before recording, so a test that sees this request
    // recorded also sees the queue without the reply it took.
    let reply = if req.is_responses() {
        let mut script = st.script.lock().unwrap();
        script
            .iter()
            .position(|r| r.accepts(&req))
            .and_then(|i| script.remove(i))
    } else {
        None
    };
    let is_turn = req.is_responses();
    let desc = format!("{} {}", req.method, req.path);
    st.requests.lock().unwrap().push(req);
    st.arrived.notify_all();

    if !is_turn {
        let body = json!({ "error": { "message": format!("stub: no route {desc}") } }).to_string();
        return respond(&mut out, "404 Not Found", "application/json", &body);
    }
    let reply = reply.unwrap_or_else(|| Reply::text("ok"));
    let id = st.ids.fetch_add(1, Ordering::Relaxed);
    respond(&mut out, "200 OK", "text/event-stream", &sse(id, &reply))
}

fn respond(out: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nCache-Control: no-cache\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// The whole SSE stream of one response. Ids are unique across the stub's life: Codex
/// pairs each `function_call_output` with its call by `call_id`.
fn sse(id: u64, reply: &Reply) -> String {
    let rid = format!("resp_stub{id:04}");
    let mut s = String::new();
    let mut event = |data: Value| {
        s.push_str(&format!(
            "event: {}\ndata: {data}\n\n",
            data["type"].as_str().unwrap()
        ));
    };
    event(json!({ "type": "response.created", "response": { "id": rid } }));
    for (i, item) in reply.items.iter().enumerate() {
        let item = match item {
            Item::Text(t) => json!({
                "type": "message", "id": format!("msg_stub{id:04}_{i}"), "role": "assistant",
                "content": [{ "type": "output_text", "text": t }]
            }),
            Item::Call {
                namespace,
                name,
                arguments,
            } => {
                let mut c = json!({
                    "type": "function_call", "id": format!("fc_stub{id:04}_{i}"),
                    "call_id": format!("call_stub{id:04}_{i}"),
                    "name": name, "arguments": arguments.to_string()
                });
                if let Some(ns) = namespace {
                    c["namespace"] = json!(ns);
                }
                c
            }
        };
        for kind in ["response.output_item.added", "response.output_item.done"] {
            event(json!({ "type": kind, "output_index": i, "item": item }));
        }
    }
    event(json!({
        "type": "response.completed",
        "response": { "id": rid, "usage": {
            "input_tokens": 10, "input_tokens_details": null,
            "output_tokens": 5, "output_tokens_details": null, "total_tokens": 15
        } }
    }));
    s
}
