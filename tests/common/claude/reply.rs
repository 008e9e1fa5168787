//! Requests as the stub recorded them, the replies a test scripts for the model, and a
//! gate to hold a reply until the test opens it.

use super::*;

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

impl Request {
    /// A Messages API call (`/v1/messages`, not `count_tokens`).
    pub fn is_messages(&self) -> bool {
        self.method == "POST" && self.route() == "/v1/messages"
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
        self.last_user("messages").map(text_of).unwrap_or_default()
    }

    /// The content of every `tool_result` block in the conversation, flattened, in order.
    pub fn tool_results(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in items(&self.body["messages"]) {
            for b in items(&m["content"]) {
                if b["type"] == "tool_result" {
                    out.push(text_of(&b["content"]));
                }
            }
        }
        out
    }
}

/// One content block of a scripted answer.
#[derive(Clone, Debug)]
pub enum Block {
    Text(String),
    ToolUse { name: String, input: Value },
}

/// What a scripted answer to one main-loop request holds.
#[derive(Clone, Debug)]
pub struct Answer {
    pub blocks: Vec<Block>,
    /// Hold the answer (after `message_start`, with pings) this long...
    pub delay: Duration,
    /// ...and until this gate opens.
    pub gate: Option<Gate>,
}

impl Answer {
    /// `blocks`, at once.
    pub fn of(blocks: Vec<Block>) -> Self {
        Self {
            blocks,
            delay: Duration::ZERO,
            gate: None,
        }
    }
}

impl Reply {
    pub fn new(blocks: Vec<Block>) -> Self {
        Self::of(Answer::of(blocks))
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

    /// For a request whose last user message (the prompt, a channel message, or tool
    /// results) contains `needle`.
    pub fn when_shown(needle: impl Into<String>, blocks: Vec<Block>) -> Self {
        let needle = needle.into();
        Self::when(move |r| r.last_user_text().contains(&needle), blocks)
    }

    /// Streams nothing but `message_start` and pings for `d` before the content: keeps the
    /// turn busy ("esc to interrupt" shown).
    pub fn delayed(mut self, d: Duration) -> Self {
        self.answer.delay = d;
        self
    }

    /// Holds the answer until `gate` is opened (or 120 s pass).
    pub fn held(mut self, gate: &Gate) -> Self {
        self.answer.gate = Some(gate.clone());
        self
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
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }

    pub(super) fn wait(&self, timeout: Duration) {
        let g = self.0.0.lock().unwrap();
        let _ = self.0.1.wait_timeout_while(g, timeout, |open| !*open);
    }

    pub(super) fn is_open(&self) -> bool {
        *self.0.0.lock().unwrap()
    }
}
