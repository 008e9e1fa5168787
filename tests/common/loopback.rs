//! What the stubs of the model APIs share (the Messages API in `claude/`, the Responses API
//! in `codex/`, the Gemini API in `gemini/`): a loopback HTTP/1.1 server that reads each
//! request, records it, answers it from a queue of scripted [`Reply`]s, and lets a test
//! wait for a request; and the one line per request a failing test prints.
//!
//! An API is a type that implements [`Api`]: which requests take a scripted reply, what a
//! reply holds, how it is written back (SSE or JSON), and what its summary line adds.
//! Each module names the pieces for its API, e.g. `pub type Request = loopback::Request<Messages>`,
//! and adds its own methods to them (what a request offers and shows the model, how a
//! reply is made).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One model API as its stub speaks it.
pub trait Api: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// What a scripted reply holds (text, tool calls, …).
    type Answer: Send + 'static;
    /// What [`Server::base_url`] ends with after the address.
    const BASE_PATH: &'static str = "";

    /// Whether a request is a turn of the agent loop, answered from the script.
    const IS_TURN: fn(&Request<Self>) -> bool;

    /// Answers the request of `x`.
    fn answer(x: Exchange<Self>) -> std::io::Result<()>;

    /// An answer that says `text`.
    fn text(text: String) -> Self::Answer;

    /// An answer that calls our server's tool `tool` with `args`.
    fn call(tool: &str, args: Value) -> Self::Answer;

    /// What `r`'s summary line says after its method and path.
    fn describe(r: &Request<Self>) -> String;
}

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

/// One request the stub received.
#[derive(Clone, Debug)]
pub struct Request<A> {
    pub method: String,
    /// The path with its query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body; `Null` when there was none (or it was not JSON).
    pub body: Value,
    api: PhantomData<A>,
}

impl<A> Request<A> {
    /// The path without its query.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The last item of the list `list` (the conversation) whose `role` is `user`.
    pub fn last_user(&self, list: &str) -> Option<&Value> {
        items(&self.body[list]).rev().find(|m| m["role"] == "user")
    }
}

pub type Pred<A> = Arc<dyn Fn(&Request<A>) -> bool + Send + Sync>;

/// A scripted answer to one turn.
pub struct Reply<A: Api> {
    /// Answer only a request this accepts; `None` accepts any.
    pub when: Option<Pred<A>>,
    pub answer: A::Answer,
}

impl<A: Api> Reply<A> {
    /// `answer`, for any turn.
    pub fn of(answer: A::Answer) -> Self {
        Self { when: None, answer }
    }

    /// The text `text` (which ends the turn).
    pub fn text(text: impl Into<String>) -> Self {
        Self::of(A::text(text.into()))
    }

    /// Makes this reply answer only a request `pred` accepts; replies queued before it
    /// that match nothing are skipped over, not dropped.
    pub fn only_if(mut self, pred: impl Fn(&Request<A>) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Arc::new(pred));
        self
    }

    pub fn accepts(&self, r: &Request<A>) -> bool {
        self.when.as_ref().is_none_or(|p| p(r))
    }
}

impl<A: Api> Clone for Reply<A>
where
    A::Answer: Clone,
{
    fn clone(&self) -> Self {
        Self {
            when: self.when.clone(),
            answer: self.answer.clone(),
        }
    }
}

impl<A: Api> std::fmt::Debug for Reply<A>
where
    A::Answer: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("conditional", &self.when.is_some())
            .field("answer", &self.answer)
            .finish()
    }
}

/// The items of `v` if it is a list (none otherwise).
pub fn items(v: &Value) -> impl DoubleEndedIterator<Item = &Value> {
    v.as_array().into_iter().flatten()
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

/// The last `chars` characters of `s`.
pub fn tail(s: &str, chars: usize) -> &str {
    match chars.checked_sub(1) {
        None => "",
        Some(n) => &s[s.char_indices().rev().nth(n).map_or(0, |(i, _)| i)..],
    }
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

/// What the server shares with its connections: the requests so far and the script.
pub struct State<A: Api> {
    requests: Mutex<Vec<Request<A>>>,
    arrived: Condvar,
    script: Mutex<VecDeque<Reply<A>>>,
    ids: AtomicU64,
    stop: AtomicBool,
}

impl<A: Api> State<A> {
    /// One line per request: method, path, and what [`Api::describe`] adds.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for r in self.requests.lock().unwrap().iter() {
            s.push_str(&format!("{} {}{}\n", r.method, r.path, A::describe(r)));
        }
        s
    }
}

/// The API `A` on 127.0.0.1, scripted. Stops when dropped.
pub struct Server<A: Api> {
    pub addr: SocketAddr,
    state: Arc<State<A>>,
}

impl<A: Api> Server<A> {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            requests: Mutex::default(),
            arrived: Condvar::new(),
            script: Mutex::default(),
            ids: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
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

    /// Where the agent is to send its model calls (`ANTHROPIC_BASE_URL`, the provider's
    /// `base_url`, `GOOGLE_GEMINI_BASE_URL`).
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.addr, A::BASE_PATH)
    }

    /// The requests and the script, for a home to print [`State::summary`] from.
    pub fn state(&self) -> Arc<State<A>> {
        self.state.clone()
    }

    /// Queues `reply` for a turn.
    pub fn push(&self, reply: Reply<A>) {
        self.state.script.lock().unwrap().push_back(reply);
    }

    pub fn push_all(&self, replies: impl IntoIterator<Item = Reply<A>>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// Scripted replies not yet used.
    pub fn pending(&self) -> usize {
        self.state.script.lock().unwrap().len()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request<A>> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The turns of the agent loop so far (the requests answered from the script).
    pub fn turns(&self) -> Vec<Request<A>> {
        self.requests().into_iter().filter(A::IS_TURN).collect()
    }

    /// Waits for a request `pred` accepts (one already received counts); `None` after
    /// `timeout`.
    pub fn wait_for_request(
        &self,
        pred: impl Fn(&Request<A>) -> bool,
        timeout: Duration,
    ) -> Option<Request<A>> {
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

    /// One line per request (see [`State::summary`]).
    pub fn summary(&self) -> String {
        self.state.summary()
    }
}

impl<A: Api> Drop for Server<A> {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_conn<A: Api>(conn: TcpStream, st: &State<A>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    // One request per connection: we answer with `Connection: close`.
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    // Take the script's reply before recording, so a test that sees this request
    // recorded also sees the queue without the reply it took.
    let reply = if (A::IS_TURN)(&req) {
        let mut script = st.script.lock().unwrap();
        let i = script.iter().position(|r| r.accepts(&req));
        i.and_then(|i| script.remove(i))
    } else {
        None
    };
    st.requests.lock().unwrap().push(req.clone());
    st.arrived.notify_all();
    A::answer(Exchange {
        req: &req,
        reply: reply.map(|r| r.answer),
        out: conn,
        ids: &st.ids,
    })
}

/// The request line, the headers, and a body sent with a Content-Length or chunked (a
/// body that is not JSON is recorded as `Null`); `None` for a connection closed at once.
fn read_request<A>(reader: &mut impl BufRead) -> std::io::Result<Option<Request<A>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
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
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v: &String| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(reader)?
    } else {
        let n: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut b = vec![0; n];
        reader.read_exact(&mut b)?;
        b
    };
    Ok(Some(Request {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        api: PhantomData,
    }))
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

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

/// A request to answer, the scripted reply it took, and the connection to answer on.
pub struct Exchange<'a, A: Api> {
    pub req: &'a Request<A>,
    /// What the turn's scripted reply holds; `None` for a request that is not a turn, or
    /// a turn no reply in the script accepted.
    pub reply: Option<A::Answer>,
    pub out: TcpStream,
    ids: &'a AtomicU64,
}

impl<A: Api> Exchange<'_, A> {
    /// A number unique across the stub's life, for the ids of an answer.
    pub fn id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// A whole answer: `body` of type `kind`.
    pub fn respond(&mut self, status: u16, kind: &str, body: &str) -> std::io::Result<()> {
        let head = head(status, kind, Some(body.len()));
        self.out.write_all(format!("{head}{body}").as_bytes())?;
        self.out.flush()
    }

    /// A whole answer in JSON.
    pub fn json(&mut self, status: u16, v: &Value) -> std::io::Result<()> {
        self.respond(status, "application/json", &v.to_string())
    }
}

/// The status line and headers of an answer of type `kind`, closed after it; its body
/// has `length` bytes, or is chunked when `None`.
pub fn head(status: u16, kind: &str, length: Option<usize>) -> String {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let length = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".into(),
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nCache-Control: no-cache\r\n{length}\r\nConnection: close\r\n\r\n"
    )
}

/// One server-sent event.
pub fn sse_event(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}
