//! What the tools take: their arguments, with the schemas the model is shown.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::protocol::Scope;

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScopeArg {
    /// Every session on this machine.
    #[default]
    Machine,
    /// Sessions in the same working directory.
    Directory,
    /// Sessions in the same git repository, worktrees included.
    Repo,
    /// Every online session of every machine this one is bridged to, as name@host.
    Network,
}

impl From<ScopeArg> for Scope {
    fn from(s: ScopeArg) -> Scope {
        match s {
            ScopeArg::Machine => Scope::Machine,
            ScopeArg::Directory => Scope::Directory,
            ScopeArg::Repo => Scope::Repo,
            ScopeArg::Network => Scope::Network,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListPeersArgs {
    /// Which sessions: machine (default), directory, repo or network.
    #[serde(default)]
    pub scope: ScopeArg,
    /// Also list sessions that are offline (their mail waits for them).
    #[serde(default)]
    pub include_offline: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SendArgs {
    /// The recipient's peer name (from list_peers).
    #[serde(default)]
    pub to: Option<String>,
    /// Same as `to` (the spelling of the older claude-peers).
    #[serde(default)]
    pub to_id: Option<String>,
    /// The message text.
    pub message: String,
    /// The message_id this answers, to thread a reply.
    #[serde(default)]
    pub in_reply_to: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct BroadcastArgs {
    /// The message text.
    pub message: String,
    /// Who gets it: every online session in this scope (machine, directory, repo, or
    /// network: every machine this one is bridged to).
    pub scope: ScopeArg,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SummaryArgs {
    /// One or two lines on what this session is doing, shown to other sessions.
    pub summary: String,
}
