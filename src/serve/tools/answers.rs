//! What the tools answer: each answer's record (`structuredContent`, with its schema) and
//! the sentence a model reads (the text content). Both say the same; the text is what
//! Claude Code and Gemini CLI show their model, and what Codex shows once the record is
//! left out for it (it would show the record instead: [`text_only`]).

use std::fmt::Write;

use rmcp::ErrorData as McpError;
use rmcp::handler::server::tool::IntoCallToolResult;
use rmcp::model::{CallToolResponse, CallToolResult, ContentBlock};
use schemars::JsonSchema;
use serde::Serialize;

/// Whether a client shows its model a tool's `structuredContent` in place of its text
/// (Codex: measured with 0.171). It gets the text alone, and tools without an output
/// schema (which would oblige us to send the record).
pub fn text_only(client: &str) -> bool {
    client == "codex-mcp-client"
}

/// The tools as a text-only client should see them: no output schemas.
pub fn without_output_schemas(mut tools: Vec<rmcp::model::Tool>) -> Vec<rmcp::model::Tool> {
    for t in &mut tools {
        t.output_schema = None;
    }
    tools
}

/// A tool's result as a text-only client should get it: the text alone.
pub fn text_alone(mut response: CallToolResponse) -> CallToolResponse {
    if let CallToolResponse::Complete(r) = &mut response {
        r.structured_content = None;
    }
    response
}

/// A tool's answer: its record, and the text the model reads.
pub struct Answer<T> {
    record: T,
    text: String,
}

impl<T: Readable> Answer<T> {
    pub fn new(record: T) -> Self {
        let text = record.text();
        Self { record, text }
    }
}

impl<T> Answer<T> {
    /// An answer whose text is written elsewhere (mail, as the hooks show it).
    pub fn with_text(record: T, text: String) -> Self {
        Self { record, text }
    }
}

impl<T: Serialize> IntoCallToolResult for Answer<T> {
    fn into_call_tool_result(self) -> Result<CallToolResponse, McpError> {
        let record = serde_json::to_value(&self.record)
            .map_err(|e| McpError::internal_error(format!("cannot write the answer: {e}"), None))?;
        let mut result = CallToolResult::success(vec![ContentBlock::text(self.text)]);
        result.structured_content = Some(record);
        Ok(result.into())
    }
}

/// The sentence a model reads for a record.
pub trait Readable {
    fn text(&self) -> String;
}

fn notice(text: &mut String, notice: &Option<String>) {
    if let Some(n) = notice {
        let _ = write!(text, "\n{n}");
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct WhoamiOut {
    pub name: String,
    pub cwd: String,
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub summary: String,
    /// How peer messages reach you: "inbox" (Claude Code's own inbox: they arrive as
    /// <cross-session-message> turns), "channel" (channel events), or "poll"
    /// (check_messages reads them).
    pub delivery: String,
    /// The broker this session reaches (its socket) and the database it keeps: every
    /// session that should see each other must show the same.
    pub broker: String,
    pub database: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RecipientOut {
    pub name: String,
    /// delivered (the recipient's session has it), held (its user must approve it first),
    /// denied (its user declined it), pushed (sent, not confirmed), or queued (the
    /// recipient is offline or reads on request; it gets it then).
    pub state: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SentOut {
    pub message_id: String,
    pub recipients: Vec<RecipientOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SummaryOut {
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MessageOut {
    pub from: String,
    pub message_id: String,
    pub text: String,
    pub sent_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MessagesOut {
    pub messages: Vec<MessageOut>,
}

impl Readable for WhoamiOut {
    fn text(&self) -> String {
        let mut t = format!("You are {}, in {}", self.name, self.cwd);
        match (&self.repo, &self.branch) {
            (Some(repo), Some(branch)) => {
                let _ = write!(t, " (repository {repo}, branch {branch})");
            }
            (Some(repo), None) => {
                let _ = write!(t, " (repository {repo})");
            }
            _ => {}
        }
        if self.summary.is_empty() {
            t.push_str(". No summary yet: set_summary tells other sessions what you do.");
        } else {
            let _ = write!(t, ". Your summary: {}", self.summary);
        }
        let how = match self.delivery.as_str() {
            "inbox" => "arrive by themselves, as <cross-session-message> turns",
            "channel" => "arrive by themselves, as channel events",
            _ => "are not pushed: call check_messages when a result says mail waits",
        };
        let _ = write!(
            t,
            "\nPeer messages {how}.\nBroker {}, database {}.",
            self.broker, self.database
        );
        notice(&mut t, &self.notice);
        t
    }
}

impl Readable for SentOut {
    fn text(&self) -> String {
        let mut t = format!("Sent message {}", self.message_id);
        match self.recipients.as_slice() {
            [one] => {
                let _ = write!(t, " to {}: {}.", one.name, one.state);
            }
            all => {
                let _ = write!(t, " to {} sessions:", all.len());
                for (i, r) in all.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    let _ = write!(t, "{sep}{} {}", r.name, r.state);
                }
                t.push('.');
            }
        }
        notice(&mut t, &self.notice);
        t
    }
}

impl Readable for SummaryOut {
    fn text(&self) -> String {
        let mut t = format!("Your summary is now: {}", self.summary);
        notice(&mut t, &self.notice);
        t
    }
}
