//! What the broker answers and pushes: results, deliveries, peer records, history and
//! log events.

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol: u32,
    pub broker_version: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    pub name: String,
    /// An offline peer of this name existed and its mail is now this connection's.
    pub reclaimed: bool,
    /// Unacked messages waiting for this name; they are delivered right after this answer.
    pub queued: u64,
}

/// An empty success.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Done {}

/// What happened to a message for one recipient, as far as the broker knows when it
/// answers the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// The recipient's client confirmed that its reader has it.
    Delivered,
    /// Sent to the online recipient and not confirmed: not yet acked, or written on a
    /// path that cannot confirm (a channel event).
    Pushed,
    /// Stored; the recipient is offline or reads mail on request.
    Queued,
    /// In the recipient session, waiting for its user to approve it.
    Held,
    /// The recipient's user declined it; it was not shown.
    Denied,
    /// The stored message could not be read (a damaged row); put aside, never delivered.
    Damaged,
    /// To a session on another machine: stored here, on its way there (through NATS),
    /// not yet confirmed by that machine's broker.
    Relaying,
    /// The other machine's broker has no session of that name; it was not stored there.
    Undeliverable,
}

impl DeliveryState {
    /// How far along a delivery the state is, for readers of history and live events,
    /// which may cross: a state is news only after an earlier one.
    pub fn progress(self) -> u8 {
        match self {
            DeliveryState::Relaying => 0,
            // Stored here, or (after relaying) on the recipient's machine.
            DeliveryState::Queued => 1,
            DeliveryState::Pushed | DeliveryState::Held => 2,
            DeliveryState::Delivered
            | DeliveryState::Denied
            | DeliveryState::Damaged
            | DeliveryState::Undeliverable => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Pushed => "pushed",
            DeliveryState::Queued => "queued",
            DeliveryState::Held => "held",
            DeliveryState::Denied => "denied",
            DeliveryState::Damaged => "damaged",
            DeliveryState::Relaying => "relaying",
            DeliveryState::Undeliverable => "undeliverable",
        }
    }
}

impl From<AckState> for DeliveryState {
    fn from(s: AckState) -> Self {
        match s {
            AckState::Delivered => DeliveryState::Delivered,
            AckState::Pushed => DeliveryState::Pushed,
            AckState::Held => DeliveryState::Held,
            AckState::Denied => DeliveryState::Denied,
            AckState::Returned => DeliveryState::Queued,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientState {
    pub name: String,
    pub state: DeliveryState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sent {
    pub message_id: String,
    pub sent_at: Millis,
    pub recipients: Vec<RecipientState>,
}

/// A peer as listed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub online: bool,
    pub context: PeerContext,
    pub summary: String,
    pub first_seen: Millis,
    pub last_seen: Millis,
    /// Messages for this peer not yet acked.
    pub unread: u64,
    /// On another machine that answered a network listing before and not this time
    /// (NATS partitioned, or its broker down): its mail is kept until it is back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unreachable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerList {
    pub peers: Vec<PeerInfo>,
    /// Set when more peers did not fit this page: ask again with this as `after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// [`PeerInfo`] borrowed from the broker's own records, so that a peer's record is
/// written without copying its strings first. Serializes to exactly what [`PeerInfo`]
/// reads (a unit test holds the two together).
#[derive(Debug, Serialize)]
pub struct PeerInfoRef<'a> {
    pub name: &'a str,
    pub online: bool,
    pub context: &'a PeerContext,
    pub summary: &'a str,
    pub first_seen: Millis,
    pub last_seen: Millis,
    pub unread: u64,
}

impl PeerInfoRef<'_> {
    pub fn to_owned(&self) -> PeerInfo {
        PeerInfo {
            name: self.name.to_string(),
            online: self.online,
            context: self.context.clone(),
            summary: self.summary.to_string(),
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            unread: self.unread,
            unreachable: false,
        }
    }
}

/// [`PeerList`] written from records held elsewhere: borrowed ([`PeerInfoRef`]) or
/// already serialized (`&RawValue`).
#[derive(Debug, Serialize)]
pub struct PeerListRef<T> {
    pub peers: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub protocol: u32,
    pub started_at: Millis,
    pub uptime_ms: u64,
    pub socket: String,
    pub database: String,
    pub peers_online: u64,
    pub peers_offline: u64,
    pub queued: u64,
    /// Open connections besides the one asking.
    pub connections: u64,
    /// Deliveries put aside because their stored message could not be read.
    #[serde(default)]
    pub quarantined: u64,
    /// The bridge to other machines, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Box<NetworkStatus>>,
}

/// The bridge to other machines' brokers, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// The NATS server.
    pub url: String,
    /// This machine's name in addresses.
    pub host: String,
    /// The JetStream stream the brokers share.
    pub stream: String,
    pub connected: bool,
    /// Publications (mail, receipts) waiting in the outbox for JetStream.
    pub waiting: u64,
}

/// A message as the recipient gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub from: String,
    pub to: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    pub sent_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_summary: Option<String>,
}

/// One message to one recipient, as history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: String,
    pub from: String,
    pub to: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
    pub sent_at: Millis,
    /// `queued` or `delivered` (stored states).
    pub state: DeliveryState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Millis>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogReply {
    /// Oldest first: the newest entries older than the cursor that fit one page.
    pub messages: Vec<LogEntry>,
    /// Set when the page was full before `limit` was reached: ask again with this as
    /// `before` for the older entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A change in history, streamed after `subscribe`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEvent {
    pub kind: LogEventKind,
    pub entry: LogEntry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEventKind {
    Sent,
    Delivered,
}

/// A session that came online, went offline or changed what it shows (summary), streamed
/// after `subscribe` with `peers` (for live views: `claude-peers top`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEvent {
    pub name: String,
    pub change: PeerChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerChange {
    Online,
    Offline,
    Summary,
}

/// Sent to a subscriber that fell behind: the broker keeps at most about 1 MiB of events
/// waiting for a reader, and dropped `missed` events since the last ones it wrote. Read
/// what was missed with `log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    pub missed: u64,
}
