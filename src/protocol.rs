//! The wire protocol between the broker and its clients: one definition, used by both.
//!
//! Newline-delimited JSON over a Unix socket, one long-lived connection per client. The
//! client speaks first with `hello`; every client frame with an `id` gets exactly one
//! answer with the same `id` (`result` or `error`). The broker also writes frames without
//! an `id`: `deliver` (a message for this peer, to be acked) and `event` (the live log,
//! after `subscribe`). `docs/PROTOCOL.md` describes it for people.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Bumped when a change would confuse the other side. A client that finds an older broker
/// asks it to hand over; see [`Request::Shutdown`].
pub const PROTOCOL_VERSION: u32 = 3;

/// The largest frame either side accepts, newline excluded. A longer frame is answered
/// with [`ErrorCode::FrameTooLarge`] and the connection is closed, because the reader
/// cannot tell where the next frame starts without reading the rest.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// The most an answer's list (`peers`, `log`) takes of a frame: a longer one is cut into
/// pages, each naming where the next starts (`next`), so every answer fits
/// [`MAX_FRAME_BYTES`] with room for the frame around it.
pub const MAX_PAGE_BYTES: usize = MAX_FRAME_BYTES - 16 * 1024;

/// Entries a `log` answers when it names no `limit`, and the most it answers.
pub const LOG_DEFAULT: u32 = 50;
pub const LOG_MAX: u32 = 1000;

/// The longest paging cursor (`after`, `before`).
pub const MAX_CURSOR_BYTES: usize = 512;

/// The exit status of a `claude-peers broker` that found another broker holding the
/// lock: the client that started it tries again rather than report a failure.
pub const EXIT_ALREADY_RUNNING: u8 = 3;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The current time in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A frame from a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Echoed in the answer. Every request is answered (without `id` when it had none),
    /// except an `ack` without `id`, which gets no answer at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(flatten)]
    pub request: Request,
}

/// What a client can ask. The tag is `op`; the fields sit beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Must come first. Always answered with [`HelloReply`], which carries the broker's
    /// protocol version; after a hello of another version only `shutdown` is accepted.
    Hello(Hello),
    /// Claims a name and makes this connection that peer's mailbox. Answered with
    /// [`Registered`]; then every unacked message for the name is delivered.
    Register(Register),
    /// Sends one message to named peers. Answered with [`Sent`].
    Send(Send),
    /// Sends one message to every online peer in a scope. Answered with [`Sent`].
    Broadcast(Broadcast),
    /// Confirms that delivered messages reached their reader. Usually sent without `id`.
    Ack(Ack),
    /// Answered with [`PeerList`]. Changes nothing.
    ListPeers(ListPeers),
    /// This connection's own peer record. Answered with [`PeerInfo`].
    Whoami,
    /// Replaces this peer's summary. Answered with [`Done`].
    SetSummary(SetSummary),
    /// Answered with [`Status`].
    Status,
    /// Message history, newest last. Answered with [`LogReply`].
    Log(LogQuery),
    /// Starts the live log: [`LogEvent`]s follow as `event` frames. Answered with [`Done`].
    Subscribe,
    /// Asks the broker to finish its writes, close every connection and exit. Kept
    /// unchanged across protocol versions so any client can ask any broker to hand over.
    Shutdown(Shutdown),
}

impl Request {
    /// Every `op` the broker knows, to tell an unknown op from a bad known one.
    pub const OPS: &[&str] = &[
        "hello",
        "register",
        "send",
        "broadcast",
        "ack",
        "list_peers",
        "whoami",
        "set_summary",
        "status",
        "log",
        "subscribe",
        "shutdown",
    ];
}

/// A request with a known answer type, for typed client calls.
pub trait Call: Into<Request> {
    type Reply: DeserializeOwned;
}

macro_rules! calls {
    ($($req:ident => $reply:ty),* $(,)?) => {$(
        impl From<$req> for Request {
            fn from(r: $req) -> Request { Request::$req(r) }
        }
        impl Call for $req { type Reply = $reply; }
    )*};
}

calls! {
    Hello => HelloReply,
    Register => Registered,
    Send => Sent,
    Broadcast => Sent,
    Ack => Done,
    ListPeers => PeerList,
    SetSummary => Done,
    Log => LogReply,
    Shutdown => Done,
}

/// Unit requests, as typed calls.
#[derive(Debug, Clone, Copy)]
pub struct WhoamiCall;
#[derive(Debug, Clone, Copy)]
pub struct StatusCall;
#[derive(Debug, Clone, Copy)]
pub struct SubscribeCall;

impl From<WhoamiCall> for Request {
    fn from(_: WhoamiCall) -> Request {
        Request::Whoami
    }
}
impl Call for WhoamiCall {
    type Reply = PeerInfo;
}
impl From<StatusCall> for Request {
    fn from(_: StatusCall) -> Request {
        Request::Status
    }
}
impl Call for StatusCall {
    type Reply = Status;
}
impl From<SubscribeCall> for Request {
    fn from(_: SubscribeCall) -> Request {
        Request::Subscribe
    }
}
impl Call for SubscribeCall {
    type Reply = Done;
}

/// Alias so the log request reads well at call sites.
pub type Log = LogQuery;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The client program, e.g. `claude-peers-cli` or `claude-peers-serve`.
    pub client: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol: u32,
    pub broker_version: String,
    pub pid: u32,
}

/// A session's identity and context.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// The name wanted. Taken by an online peer: the broker picks `name-2`, `name-3`, ….
    pub name: String,
    /// The name was chosen by the user (not derived from the directory): an offline peer
    /// of that name is reclaimed even from another directory.
    #[serde(default)]
    pub explicit: bool,
    pub cwd: String,
    #[serde(default)]
    pub git_root: Option<String>,
    #[serde(default)]
    pub git_common_dir: Option<String>,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub tty: Option<String>,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub host: Option<String>,
    /// Replaces the stored summary when set.
    #[serde(default)]
    pub summary: Option<String>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    pub name: String,
    /// An offline peer of this name existed and its mail is now this connection's.
    pub reclaimed: bool,
    /// Unacked messages waiting for this name; they are delivered right after this answer.
    pub queued: u64,
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
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "machine" => Ok(Scope::Machine),
            "directory" | "dir" => Ok(Scope::Directory),
            "repo" => Ok(Scope::Repo),
            _ => Err(format!(
                "unknown scope {s:?}; use machine, directory or repo"
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
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Pushed => "pushed",
            DeliveryState::Queued => "queued",
            DeliveryState::Held => "held",
            DeliveryState::Denied => "denied",
            DeliveryState::Damaged => "damaged",
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
    pub pid: u32,
    pub cwd: String,
    pub git_root: Option<String>,
    pub git_common_dir: Option<String>,
    pub branch: Option<String>,
    pub tty: Option<String>,
    pub host: Option<String>,
    pub summary: String,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    pub push: bool,
    pub first_seen: Millis,
    pub last_seen: Millis,
    /// Messages for this peer not yet acked.
    pub unread: u64,
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
    pub pid: u32,
    pub cwd: &'a str,
    pub git_root: Option<&'a str>,
    pub git_common_dir: Option<&'a str>,
    pub branch: Option<&'a str>,
    pub tty: Option<&'a str>,
    pub host: Option<&'a str>,
    pub summary: &'a str,
    pub client_name: Option<&'a str>,
    pub client_version: Option<&'a str>,
    pub push: bool,
    pub first_seen: Millis,
    pub last_seen: Millis,
    pub unread: u64,
}

impl PeerInfoRef<'_> {
    pub fn to_owned(&self) -> PeerInfo {
        let own = |s: Option<&str>| s.map(str::to_string);
        PeerInfo {
            name: self.name.to_string(),
            online: self.online,
            pid: self.pid,
            cwd: self.cwd.to_string(),
            git_root: own(self.git_root),
            git_common_dir: own(self.git_common_dir),
            branch: own(self.branch),
            tty: own(self.tty),
            host: own(self.host),
            summary: self.summary.to_string(),
            client_name: own(self.client_name),
            client_version: own(self.client_version),
            push: self.push,
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            unread: self.unread,
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
    pub connections: u64,
    /// Deliveries put aside because their stored message could not be read.
    #[serde(default)]
    pub quarantined: u64,
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

/// Every frame the broker writes. Exactly one of `result`, `error`, `deliver` and `event`
/// is set; `id` is present on `result` and `error` when the request had one that could
/// be read, and absent otherwise. The broker writes `ServerFrame<Reply>`; clients read
/// `ServerFrame<Box<RawValue>>` and decode the result by the type they asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerFrame<R> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<R>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<Delivery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<LogEvent>,
    /// Events this subscriber missed because it read too slowly (see [`Lagged`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lagged: Option<Lagged>,
}

/// Sent to a subscriber that fell behind: the broker keeps at most about 1 MiB of events
/// waiting for a reader, and dropped `missed` events since the last ones it wrote. Read
/// what was missed with `log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    pub missed: u64,
}

impl<R> ServerFrame<R> {
    pub fn result(id: Option<u64>, result: R) -> Self {
        Self {
            id,
            result: Some(result),
            error: None,
            deliver: None,
            event: None,
            lagged: None,
        }
    }
    pub fn error(id: Option<u64>, error: ErrorBody) -> Self {
        Self {
            id,
            result: None,
            error: Some(error),
            deliver: None,
            event: None,
            lagged: None,
        }
    }
    pub fn deliver(message: Delivery) -> Self {
        Self {
            id: None,
            result: None,
            error: None,
            deliver: Some(message),
            event: None,
            lagged: None,
        }
    }
    pub fn event(event: LogEvent) -> Self {
        Self {
            id: None,
            result: None,
            error: None,
            deliver: None,
            event: Some(event),
            lagged: None,
        }
    }
    pub fn lagged(missed: u64) -> Self {
        Self {
            id: None,
            result: None,
            error: None,
            deliver: None,
            event: None,
            lagged: Some(Lagged { missed }),
        }
    }
}

/// Every answer the broker gives, serialized bare inside `result`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Hello(HelloReply),
    Registered(Registered),
    Sent(Sent),
    /// A [`PeerList`], written by the core from its cached peer records ([`PeerListRef`]).
    Peers(Box<RawValue>),
    Peer(Box<PeerInfo>),
    Status(Status),
    Log(LogReply),
    Done(Done),
}

/// A refusal: a stable code for programs and a sentence for people that says what went
/// wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// For `unknown_peer`: the closest known names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            candidates: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not UTF-8.
    BadFrame,
    /// Over [`MAX_FRAME_BYTES`]; the connection is closed after this.
    FrameTooLarge,
    /// An `op` the broker does not know.
    UnknownOp,
    /// A known `op` with missing or mistyped fields.
    BadRequest,
    /// A peer name that breaks the naming rules.
    BadName,
    UnknownPeer,
    /// Message text over the configured limit.
    MessageTooLarge,
    /// Message text empty or only whitespace.
    EmptyMessage,
    /// The recipient has too much unread mail.
    MailboxFull,
    /// Too many sends per second on this connection.
    RateLimited,
    /// The request needs a registered connection.
    NotRegistered,
    /// A request before `hello`. (A second `hello` is `bad_request`.)
    HelloRequired,
    ProtocolMismatch,
    /// The connecting process belongs to another user.
    Forbidden,
    /// No online peer in the scope.
    NoRecipients,
    ShuttingDown,
    /// The file system holding the database is full; nothing was saved.
    DiskFull,
    /// The broker has as many connections as it allows; this one is closed.
    TooManyConnections,
    /// Too many large frames are arriving at once; this connection is closed.
    Busy,
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let f = ClientFrame {
            id: Some(7),
            request: Send {
                key: None,
                to: vec!["bob".into()],
                text: "hi".into(),
                in_reply_to: None,
                from: None,
            }
            .into(),
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"id":7,"op":"send","to":["bob"],"text":"hi"}"#
        );
        let back: ClientFrame = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert!(matches!(back.request, Request::Status));
        assert_eq!(back.id, None);
    }

    #[test]
    fn ops_list_matches_the_enum() {
        for op in Request::OPS {
            let v = serde_json::json!({ "op": op });
            let err = serde_json::from_value::<Request>(v)
                .err()
                .map(|e| e.to_string());
            assert!(
                !err.unwrap_or_default().contains("unknown variant"),
                "{op} is not a Request variant"
            );
        }
    }

    #[test]
    fn borrowed_peer_records_read_back_as_owned_ones() {
        let r = PeerInfoRef {
            name: "bob",
            online: true,
            pid: 7,
            cwd: "/w/a \"q\"",
            git_root: Some("/w"),
            git_common_dir: None,
            branch: Some("main"),
            tty: None,
            host: Some("h"),
            summary: "line\nbreak",
            client_name: Some("claude-code"),
            client_version: None,
            push: true,
            first_seen: 1,
            last_seen: 2,
            unread: 3,
        };
        let expected = r.to_owned();
        let s = serde_json::to_string(&PeerListRef {
            next: None,
            peers: vec![r],
        })
        .unwrap();
        let back: PeerList = serde_json::from_str(&s).unwrap();
        assert_eq!(back.peers, vec![expected]);
        // Every field of PeerInfo is written by PeerInfoRef, under the same name.
        let owned = serde_json::to_value(&back.peers[0]).unwrap();
        let borrowed: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(owned, borrowed["peers"][0]);
    }

    #[test]
    fn server_frames_round_trip() {
        let f = ServerFrame::result(Some(1), Reply::Done(Done {}));
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(s, r#"{"id":1,"result":{}}"#);
        let back: ServerFrame<Box<serde_json::value::RawValue>> = serde_json::from_str(&s).unwrap();
        assert_eq!(back.result.unwrap().get(), "{}");
    }
}
