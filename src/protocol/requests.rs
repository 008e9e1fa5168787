//! What clients ask: each request's fields, as they are on the wire.

use super::Millis;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The client program, e.g. `claude-peers-cli` or `claude-peers-serve`.
    pub client: String,
    pub version: String,
}

/// Where a session works and what runs it: one definition, carried by `register` and
/// by every peer record (listed and stored). Unknown values are `null` on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerContext {
    pub cwd: String,
    #[serde(default)]
    pub git_root: Option<String>,
    /// The repository's common git directory: equal for all worktrees of one repository.
    #[serde(default)]
    pub git_common_dir: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    /// The repository's `origin` remote, normalized (`github.com/org/repo`): what the
    /// `repo` scope compares across machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_remote: Option<String>,
    #[serde(default)]
    pub tty: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub client_name: Option<String>,
    #[serde(default)]
    pub client_version: Option<String>,
    /// The client shows deliveries as they arrive (and acks them), so a send waits
    /// briefly for the ack. Otherwise the client still gets `deliver` frames but holds
    /// them until its reader asks, and senders are told `queued` at once.
    #[serde(default)]
    pub push: bool,
}

/// A session's name and context.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The name wanted. Taken by an online peer: the broker picks `name-2`, `name-3`, ….
    pub name: String,
    /// The name was chosen by the user (not derived from the directory): an offline peer
    /// of that name is reclaimed even from another directory.
    #[serde(default)]
    pub explicit: bool,
    pub context: PeerContext,
    /// Replaces the stored summary when set.
    #[serde(default)]
    pub summary: Option<String>,
    /// Which agent session this connection serves, for telling a newer process of the
    /// same session (it takes the name over) from another session (it gets `name-2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionKey>,
}

/// An agent session, as its `serve` knows it: a key equal for every process that serves
/// the same session (by default the agent's process: its pid and start time), and when
/// this process started. Of two online connections with one key, the later started is
/// the session's; the earlier is closed with `replaced`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionKey {
    pub key: String,
    /// Milliseconds since the Unix epoch.
    pub started: Millis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    pub to: Vec<String>,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    /// Sender name for connections that did not register (the CLI). Ignored otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Idempotency key, chosen by the client before its first try (1-128 bytes): a send
    /// with a key this sender already used stores nothing and is answered with that
    /// message's id and its recipients' states now. Retrying with the same key after a
    /// lost answer can therefore never send twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every peer on this machine.
    #[default]
    Machine,
    /// Peers whose working directory is the same as ours.
    Directory,
    /// Peers in the same git repository, worktrees included (same git common dir).
    Repo,
    /// Every online peer of every machine this broker is bridged to (through NATS), as
    /// `name@host`, with this machine's own as in `machine`. Listing only.
    Network,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "machine" => Ok(Scope::Machine),
            "directory" | "dir" => Ok(Scope::Directory),
            "repo" => Ok(Scope::Repo),
            "network" => Ok(Scope::Network),
            _ => Err(format!(
                "unknown scope {s:?}; use machine, directory, repo or network"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broadcast {
    pub scope: Scope,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Where "here" is for the `directory` and `repo` scopes, for connections that did not
    /// register; a registered connection always uses its own record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_common_dir: Option<String>,
    /// As for [`Send`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub ids: Vec<String>,
    /// How the messages reached the session's reader: `delivered` when absent.
    #[serde(default, skip_serializing_if = "AckState::is_delivered")]
    pub state: AckState,
}

impl Ack {
    /// The messages reached the reader.
    pub fn delivered(ids: Vec<String>) -> Self {
        Ack {
            ids,
            state: AckState::Delivered,
        }
    }
}

/// What a client confirms with an [`Ack`]. Each moves a queued delivery out of the queue
/// for good: it is not pushed again on the next registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckState {
    /// Handed to the reader by a path that cannot drop it silently (an inbox write that
    /// was accepted, a tool result, hook output). Also moves a `held` delivery on.
    #[default]
    Delivered,
    /// Written on a path with no confirmation (a channel event): the session may not
    /// show it, and nothing will tell.
    Pushed,
    /// Accepted by the session, which waits for its user to approve it.
    Held,
    /// A held message its user declined: it never reached the reader, and never will.
    Denied,
    /// A held message the session let go without showing it (it expired, or the session
    /// ended): queued again, for this client to show by another path or for the next
    /// registration.
    Returned,
}

impl AckState {
    pub fn is_delivered(&self) -> bool {
        *self == AckState::Delivered
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListPeers {
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub include_offline: bool,
    /// As for [`Broadcast`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_common_dir: Option<String>,
    /// Continue a listing after this point: the `next` of the page before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSummary {
    pub summary: String,
}

/// Starts the live log (see [`Request::Subscribe`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// Also stream sessions coming, going and changing ([`PeerEvent`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peers: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// At most this many entries, the newest (default 50, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Only messages from or to this peer.
    #[serde(default)]
    pub peer: Option<String>,
    /// Continue with entries older than this point: the `next` of the page before. The
    /// `limit` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Shutdown {
    #[serde(default)]
    pub reason: Option<String>,
}
