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

mod frame;
mod replies;
mod requests;
#[cfg(test)]
mod tests;

pub use frame::*;
pub use replies::*;
pub use requests::*;

/// Bumped when a change would confuse the other side. A client that finds an older broker
/// asks it to hand over; see [`Request::Shutdown`].
pub const PROTOCOL_VERSION: u32 = 4;

/// The largest frame either side accepts, newline excluded. A longer frame is answered
/// with [`ErrorCode::FrameTooLarge`] and the connection is closed, because the reader
/// cannot tell where the next frame starts without reading the rest.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// The most an answer's list (`peers`, `log`) takes of a frame: a longer one is cut into
/// pages, each naming where the next starts (`next`), so every answer fits
/// [`MAX_FRAME_BYTES`] with room for the frame around it.
pub const MAX_PAGE_BYTES: usize = MAX_FRAME_BYTES - 16 * 1024;

/// Whether `s` is a message id as the broker writes them: a UUID, lowercase and
/// hyphenated (the other spellings a UUID parser takes would not match the message's id).
pub fn is_message_id(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok_and(|u| u.hyphenated().to_string() == s)
}

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
    /// Starts the live log: [`LogEvent`]s follow as `event` frames, and with `peers`
    /// [`PeerEvent`]s as `peer` frames. Answered with [`Done`].
    Subscribe(Subscribe),
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

/// Requests without fields, as typed calls: a unit struct each.
macro_rules! unit_calls {
    ($($call:ident: $req:ident => $reply:ty),* $(,)?) => {$(
        #[doc = concat!("`", stringify!($req), "` as a typed call.")]
        #[derive(Debug, Clone, Copy)]
        pub struct $call;
        impl From<$call> for Request {
            fn from(_: $call) -> Request { Request::$req }
        }
        impl Call for $call { type Reply = $reply; }
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
    Subscribe => Done,
    Shutdown => Done,
}

unit_calls! {
    WhoamiCall: Whoami => PeerInfo,
    StatusCall: Status => Status,
}

/// Alias so the log request reads well at call sites.
pub type Log = LogQuery;

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
    /// A newer process of the same agent session (same `session` key) registered this
    /// connection's name; this connection is closed, unregistered.
    Replaced,
    Internal,
}
