//! The OpenAI Responses API as the stub speaks it to Codex: what a request shows the
//! model, the replies a test scripts, and how a reply is written (SSE).

use super::*;

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

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
        self.method == "POST" && self.route() == "/v1/responses"
    }

    /// The conversation items (`input`).
    pub fn input(&self) -> &[Value] {
        self.body["input"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The names of the tools offered in `namespace` (e.g. [`NAMESPACE`]).
    pub fn tools_in(&self, namespace: &str) -> Vec<String> {
        items(&self.body["tools"])
            .filter(|t| t["type"] == "namespace" && t["name"] == namespace)
            .flat_map(|t| items(&t["tools"]))
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
}

/// A string, or the `text` of each item of a content list, one a line.
fn texts(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => items(v)
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

impl Reply {
    pub fn new(items: Vec<Item>) -> Self {
        Self::of(items)
    }

    /// A call of our server's tool `name`.
    pub fn tool(name: &str, arguments: Value) -> Self {
        Self::of(Responses::call(name, arguments))
    }
}

// ---------------------------------------------------------------------------------------
// The answers
// ---------------------------------------------------------------------------------------

/// The OpenAI Responses API, as [`ResponsesApi`] speaks it.
#[derive(Clone, Debug)]
pub enum Responses {}

impl Api for Responses {
    type Answer = Vec<Item>;
    const BASE_PATH: &'static str = "/v1";

    // Every `/v1/responses` request is a turn.
    const IS_TURN: fn(&Request) -> bool = Request::is_responses;

    fn answer(mut x: Exchange<Self>) -> std::io::Result<()> {
        if !x.req.is_responses() {
            let desc = format!("{} {}", x.req.method, x.req.path);
            return x.json(
                404,
                &json!({ "error": { "message": format!("stub: no route {desc}") } }),
            );
        }
        let items = x.reply.take().unwrap_or_else(|| Self::text("ok".into()));
        let stream = sse(x.id(), &items);
        x.respond(200, "text/event-stream", &stream)
    }

    fn text(text: String) -> Vec<Item> {
        vec![Item::Text(text)]
    }

    fn call(tool: &str, arguments: Value) -> Vec<Item> {
        let namespace = Some(NAMESPACE.into());
        let name = tool.into();
        vec![Item::Call {
            namespace,
            name,
            arguments,
        }]
    }

    /// Our tools offered, and the tool results shown.
    fn describe(r: &Request) -> String {
        let mut s = String::new();
        if r.is_responses() {
            s.push_str(&format!(" ours={:?}", r.tools_in(NAMESPACE)));
            for t in r.tool_results() {
                let out: String = t.output.chars().take(200).collect();
                s.push_str(&format!("\n    {}({}) -> {out:?}", t.name, t.arguments));
            }
        }
        s
    }
}

/// The whole SSE stream of one response. Ids are unique across the stub's life: Codex
/// pairs each `function_call_output` with its call by `call_id`.
fn sse(id: u64, items: &[Item]) -> String {
    let rid = format!("resp_stub{id:04}");
    let mut s = String::new();
    let mut event = |data: Value| s.push_str(&sse_event(data["type"].as_str().unwrap(), &data));
    event(json!({ "type": "response.created", "response": { "id": rid } }));
    for (i, item) in items.iter().enumerate() {
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
