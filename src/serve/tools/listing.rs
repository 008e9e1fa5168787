//! A peer listing as the model reads it: the broker's pages read borrowed, one line per
//! peer as text and the records as `structuredContent`.

use super::*;

/// A peer as a listing shows it. Its strings are borrowed from the broker's answer where
/// they can be: a listing of hundreds of peers copies each string once, into the result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PeerOut<'a> {
    /// The address to send to: a peer name, `cc:<name>` for a Claude Code session that
    /// does not run claude-peers, or `pc:<name>` for a peer-channel session.
    pub name: Cow<'a, str>,
    /// "online" or "offline".
    pub state: &'static str,
    /// "claude-peers" (a peer: offline mail, history, broadcast), "claude-code" (a
    /// Claude Code session without claude-peers, reached through its own inbox while
    /// it runs) or "peer-channel" (a peer-channel session, reached through its socket
    /// while it runs).
    pub kind: &'static str,
    pub cwd: Cow<'a, str>,
    pub repo: Option<Cow<'a, str>>,
    pub branch: Option<Cow<'a, str>>,
    pub summary: Cow<'a, str>,
    /// RFC 3339 time this peer was last connected ("now" when online).
    pub last_seen: Cow<'a, str>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PeersOut<'a> {
    pub peers: Vec<PeerOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

/// The fields of the broker's peer record that a listing shows, borrowed from its answer;
/// the others are skipped unread.
#[derive(Deserialize)]
pub(super) struct ListedPeer<'a> {
    #[serde(borrow)]
    pub(super) name: Cow<'a, str>,
    pub(super) online: bool,
    #[serde(borrow)]
    pub(super) context: ListedContext<'a>,
    #[serde(borrow)]
    summary: Cow<'a, str>,
    last_seen: protocol::Millis,
    #[serde(default)]
    unreachable: bool,
}

/// The fields of a record's `context` that a listing shows.
#[derive(Deserialize)]
pub(super) struct ListedContext<'a> {
    pub(super) pid: u32,
    #[serde(borrow)]
    cwd: Cow<'a, str>,
    #[serde(borrow)]
    git_root: Option<Cow<'a, str>>,
    #[serde(borrow)]
    branch: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(super) struct Listed<'a> {
    #[serde(borrow)]
    pub(super) peers: Vec<ListedPeer<'a>>,
}

/// The peers of every page of a listing, borrowed from the pages.
pub(super) fn read_pages(pages: &[crate::client::Encoded]) -> Result<Vec<ListedPeer<'_>>, String> {
    let mut peers: Vec<ListedPeer<'_>> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for page in pages {
        let listed: Listed<'_> = page.read().map_err(|e| e.to_string())?;
        // A peer that went online or offline between two pages is listed once.
        peers.extend(
            listed
                .peers
                .into_iter()
                .filter(|p| names.insert(p.name.to_string())),
        );
    }
    Ok(peers)
}

/// The longest summary a listing shows the model, in bytes: a summary may be 4 KiB, and
/// a listing of many peers must stay readable (and under the host's tool-output limit).
const LISTED_SUMMARY_BYTES: usize = 300;

impl<'a> From<ListedPeer<'a>> for PeerOut<'a> {
    fn from(p: ListedPeer<'a>) -> Self {
        PeerOut {
            state: match (p.online, p.unreachable) {
                (true, _) => "online",
                (false, true) => "unreachable",
                (false, false) => "offline",
            },
            kind: "claude-peers",
            last_seen: if p.online {
                "now".into()
            } else {
                timestamp_rfc3339(p.last_seen).into()
            },
            name: p.name,
            cwd: p.context.cwd,
            repo: p.context.git_root,
            branch: p.context.branch,
            summary: clip(p.summary, LISTED_SUMMARY_BYTES),
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary, with "…" where it was cut.
pub(super) fn clip(s: Cow<'_, str>, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// A peer listing as a tool result: one readable line per peer as the text the model
/// reads, the records in `structuredContent`. (rmcp's `Json` would repeat the records as
/// JSON text: twice the bytes to write and parse, and more tokens, for hundreds of peers.)
pub struct PeerListing(CallToolResult);

impl PeerListing {
    pub(super) fn new(out: &PeersOut<'_>) -> Result<Self, String> {
        let structured =
            serde_json::to_value(out).map_err(|e| format!("cannot build the listing: {e}"))?;
        let mut result = CallToolResult::success(vec![ContentBlock::text(Self::text(out))]);
        result.structured_content = Some(structured);
        Ok(Self(result))
    }

    pub(super) fn text(out: &PeersOut<'_>) -> String {
        use std::fmt::Write;
        let peers = &out.peers;
        let mut text = match peers.len() {
            0 => "No other sessions found.".to_string(),
            1 => "1 other session:".to_string(),
            n => format!("{n} other sessions:"),
        };
        for p in peers {
            let _ = write!(text, "\n- {} ({}", p.name, p.state);
            match p.kind {
                "claude-code" => text.push_str(", Claude Code without claude-peers"),
                "peer-channel" => text.push_str(", peer-channel: no mail kept while it is away"),
                _ => {}
            }
            if p.state != "online" {
                let _ = write!(text, ", last seen {}", p.last_seen);
            }
            text.push(')');
            if !p.cwd.is_empty() {
                let _ = write!(text, " in {}", p.cwd);
            }
            if let Some(branch) = &p.branch {
                let _ = write!(text, " on {branch}");
            }
            if !p.summary.is_empty() {
                let _ = write!(text, ": {}", p.summary);
            }
        }
        if let Some(notice) = &out.notice {
            let _ = write!(text, "\n{notice}");
        }
        text
    }
}

impl IntoCallToolResult for PeerListing {
    fn into_call_tool_result(self) -> Result<CallToolResponse, McpError> {
        Ok(self.0.into())
    }
}
