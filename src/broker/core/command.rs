//! What the core is asked: the commands of connection tasks, the signal handler and the
//! bridge, and which of them only read.

use std::rc::Rc;

use super::super::outq::Outq;
use super::ConnId;
use crate::protocol::Request;

/// What connection tasks (and the signal handler) ask of the core.
#[derive(Debug)]
pub enum Command {
    Connected {
        conn: ConnId,
        outq: Rc<Outq>,
    },
    /// The connection's queue has room again after the core held something back.
    Drained {
        conn: ConnId,
    },
    Request {
        conn: ConnId,
        id: Option<u64>,
        request: Box<Request>,
    },
    Disconnected {
        conn: ConnId,
    },
    /// Finish the current batch, close every connection and stop.
    Shutdown {
        reason: String,
    },
    /// The bridge: JetStream has outbox publication `seq`.
    Published {
        seq: i64,
    },
    /// The bridge: mail or a receipt from another machine; `done` hears whether it was
    /// saved.
    Relayed {
        relayed: crate::broker::bridge::Relayed,
        done: tokio::sync::oneshot::Sender<bool>,
    },
    /// The bridge's NATS connection came or went.
    Network {
        connected: bool,
    },
    /// The bridge: another machine asks who is online here.
    Listing {
        reply: tokio::sync::oneshot::Sender<Vec<u8>>,
    },
    /// The bridge: the other machines' answers to our question `token` (`Listing`s).
    Gathered {
        token: u64,
        replies: Vec<Vec<u8>>,
    },
}

/// Whether a command only reads (from memory, or from the store in autocommit). A batch
/// of only such commands runs outside a write transaction.
pub(super) fn reads_only(cmd: &Command) -> bool {
    match cmd {
        Command::Request { request, .. } => writes_nothing(request),
        Command::Network { .. } | Command::Listing { .. } => true,
        _ => false,
    }
}

/// Requests whose effect needs no write: their answers stand even if their batch fails.
pub(super) fn writes_nothing(request: &Request) -> bool {
    matches!(
        request,
        Request::ListPeers(_)
            | Request::Whoami
            | Request::Status
            | Request::Log(_)
            | Request::Subscribe(_)
            | Request::Shutdown(_)
    )
}
