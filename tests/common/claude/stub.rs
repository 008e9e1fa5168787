//! The Messages API as the stub speaks it to Claude Code: which requests the script
//! answers, and how a reply is written (streaming SSE, or JSON).

use super::*;

/// The Anthropic Messages API, as [`StubApi`] speaks it.
#[derive(Clone, Debug)]
pub enum Messages {}

impl Api for Messages {
    type Answer = Answer;

    // Side requests (titles, summaries, classifiers) come without tools, and get "ok".
    const IS_TURN: fn(&Request) -> bool = Request::is_main;

    fn answer(mut x: Exchange<Self>) -> std::io::Result<()> {
        let req = x.req;
        if req.method == "POST" && req.route() == "/v1/messages/count_tokens" {
            return x.json(200, &json!({ "input_tokens": 10 }));
        }
        if !req.is_messages() {
            let err = json!({
                "type": "error",
                "error": { "type": "not_found_error", "message": format!("stub: no route {} {}", req.method, req.path) }
            });
            return x.json(404, &err);
        }
        let reply = x.reply.take().unwrap_or_else(|| Self::text("ok".into()));
        let id = x.id();
        let model = req.body["model"].as_str().unwrap_or("claude-stub");
        if req.body["stream"] == true {
            stream_reply(&mut x.out, id, model, &reply)
        } else {
            hold(&reply, || Ok(()))?;
            x.json(200, &message_json(id, model, &reply))
        }
    }

    fn text(text: String) -> Answer {
        Answer::of(vec![Block::Text(text)])
    }

    /// Our tool, once the request offers it (see [`call_mcp_tool`]).
    fn call(tool: &str, input: Value) -> Answer {
        let name = mcp_tool(tool);
        Answer::of(vec![Block::ToolUse { name, input }])
    }

    /// For Messages calls: the tool count and the last user text's tail.
    fn describe(r: &Request) -> String {
        if !r.is_messages() {
            return String::new();
        }
        format!(
            " tools={} stream={} last_user=…{:?}",
            r.tool_names().len(),
            r.body["stream"],
            tail(&r.last_user_text(), 120)
        )
    }
}

impl StubApi {
    /// The main-loop requests so far.
    pub fn main_requests(&self) -> Vec<Request> {
        self.turns()
    }

    /// Waits for a request `pred` accepts (one already received counts) and returns its
    /// body; `None` after `timeout`.
    pub fn wait_for(&self, pred: impl Fn(&Request) -> bool, timeout: Duration) -> Option<Value> {
        self.wait_for_request(pred, timeout).map(|r| r.body)
    }
}

/// Waits out the reply's delay and gate, calling `tick` about once a second.
fn hold(reply: &Answer, mut tick: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
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

fn stop_reason(reply: &Answer) -> &'static str {
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
fn content_json(id: u64, reply: &Answer) -> Vec<Value> {
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

fn message_json(id: u64, model: &str, reply: &Answer) -> Value {
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

fn stream_reply(out: &mut TcpStream, id: u64, model: &str, reply: &Answer) -> std::io::Result<()> {
    out.write_all(head(200, "text/event-stream", None).as_bytes())?;
    let send = |out: &mut TcpStream, event: &str, data: Value| -> std::io::Result<()> {
        let text = sse_event(event, &data);
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
