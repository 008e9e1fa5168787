//! The Gemini API as the stub speaks it to `gemini`: what a request shows the model, the
//! replies a test scripts, and how a reply is written (SSE or JSON).

use super::*;

// ---------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------

impl Request {
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
        items(&self.body["tools"]).flat_map(|t| items(&t["functionDeclarations"]))
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
        items(&self.body["contents"]).flat_map(|c| items(&c["parts"]))
    }

    /// Every string in the conversation (`contents`): what the model was shown, flattened.
    pub fn contents_text(&self) -> String {
        text_of(&self.body["contents"])
    }

    /// The flattened text of the last `user` content (a prompt, or function responses).
    pub fn last_user_text(&self) -> String {
        let last = self.last_user("contents");
        last.map(|c| text_of(&c["parts"])).unwrap_or_default()
    }
}

impl Reply {
    pub fn new(parts: Vec<Block>) -> Self {
        Self::of(parts)
    }

    /// A call of our tool `tool` (`mcp_claude-peers_<tool>`) with `args`.
    pub fn tool(tool: &str, args: Value) -> Self {
        Self::of(Generate::call(tool, args))
    }

    /// A call of the function `name` (any tool Gemini offers) with `args`.
    pub fn call(name: impl Into<String>, args: Value) -> Self {
        Self::new(vec![Block::ToolUse {
            name: name.into(),
            input: args,
        }])
    }
}

// ---------------------------------------------------------------------------------------
// The answers
// ---------------------------------------------------------------------------------------

/// The Gemini API, as [`GeminiApi`] speaks it.
#[derive(Clone, Debug)]
pub enum Generate {}

impl Api for Generate {
    type Answer = Vec<Block>;

    // Side calls (the router's classifier, summaries) come without tools, and get "ok"
    // or a value of the schema they ask for.
    const IS_TURN: fn(&Request) -> bool = Request::is_main;

    fn answer(mut x: Exchange<Self>) -> std::io::Result<()> {
        let (req, route) = (x.req, x.req.route());
        if req.method == "POST" && route.ends_with(":countTokens") {
            return x.json(200, &json!({ "totalTokens": 10 }));
        }
        if !req.is_generate() {
            let err = json!({ "error": {
                "code": 404,
                "message": format!("stub: no route {} {}", req.method, req.path),
                "status": "NOT_FOUND"
            } });
            return x.json(404, &err);
        }
        let parts = x.reply.take();
        let parts = parts.unwrap_or_else(|| Self::text(side_answer(&req.body)));
        let answer = response_json(x.id(), req.model(), &parts);
        if route.ends_with(":streamGenerateContent") {
            // `?alt=sse`: server-sent events, each `data:` line one GenerateContentResponse.
            x.respond(200, "text/event-stream", &format!("data: {answer}\r\n\r\n"))
        } else {
            x.json(200, &answer)
        }
    }

    fn text(text: String) -> Vec<Block> {
        vec![Block::Text(text)]
    }

    fn call(tool: &str, input: Value) -> Vec<Block> {
        let name = mcp_tool(tool);
        vec![Block::ToolUse { name, input }]
    }

    /// For generate calls: the tool count and the last user text's tail.
    fn describe(r: &Request) -> String {
        if !r.is_generate() {
            return String::new();
        }
        let last = r.last_user_text();
        let tools = r.tool_names().len();
        format!(" tools={tools} last_user=…{:?}", tail(&last, 160))
    }
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
