//! What one session knows and changes, kept together behind the session's one lock
//! ([`super::Session`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use rmcp::service::{Peer, RoleServer};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use super::Route;
use super::inbox::{Inbound, Inbox};
use super::paced::InFlight;
use crate::protocol::{Delivery, Register};

/// One message queued for the inbox: where, what, and which write of it this is.
pub(super) type InboxJob = (Arc<Inbox>, Delivery, u32);

pub(super) struct State {
    /// What we register with. After the first success `name` is the assigned name and
    /// `explicit` is set, so a reconnect asks for exactly it.
    pub identity: Register,
    /// Whether the broker has given us `identity.name`.
    pub registered: bool,
    /// How deliveries reach the model (decided at initialize), and why.
    pub route: Route,
    pub route_why: String,
    /// Mail may start a turn by itself (through `hook wait`): not where the inbox was
    /// withheld for the user's hold.
    pub may_wake: bool,
    /// Inbox writes go through the relay ([`super::relay`]), so that Claude Code holds
    /// them.
    pub use_relay: bool,
    /// Receipts and replies from the reply sockets, until the session's task takes them.
    pub inbound_rx: Option<UnboundedReceiver<Inbound>>,
    /// Messages written to the inbox and not yet settled by a receipt, for a receipt that
    /// gives one back (`expired`): id → the delivery.
    pub in_inbox: HashMap<String, InFlight>,
    /// Per sender, the queue its mail is written to the inbox from, in order and paced.
    pub outboxes: HashMap<String, UnboundedSender<InboxJob>>,
    /// Ids a `held` receipt arrived for.
    pub held: HashSet<String>,
    /// The newest message id from each sender, to thread a reply made through the inbox.
    pub last_from: HashMap<String, String>,
    /// Our hook sockets (the host's, and our agent session's once known), each with its
    /// inode: removed at exit unless a newer `serve` has put its own in its place.
    pub hook_sockets: Vec<(PathBuf, u64)>,
    /// The agent's id of our session, once it told us (Codex: at each tool call).
    pub agent_session: Option<String>,
    /// Our host runs several sessions' servers (Codex's app-server: every window and
    /// thread), so its pid says nothing of which session we serve.
    pub shared_host: bool,
    /// Mail waiting for `check_messages` or a hook, oldest first.
    pub unread: VecDeque<Delivery>,
    /// Inbox messages acked delivered in the last 20 s (`paced::RECENT`): a late
    /// receipt (Claude Code tells of a drop seconds after) may still hold them or send
    /// them back.
    pub recent: VecDeque<(tokio::time::Instant, Delivery, u32)>,
    /// The inbox sockets of the Claude Code sessions without claude-peers we wrote to:
    /// address (`cc:<name>`) → socket.
    pub native_sockets: HashMap<String, PathBuf>,
    /// Ids lent to a hook and not yet shown or given back: a redelivery meanwhile is not
    /// kept a second time.
    pub lent: HashSet<String>,
    /// Messages given to the relay, waiting for its word: id → whether it was held.
    pub relay_pending: HashMap<String, oneshot::Sender<Result<bool, String>>>,
    /// How many `hook wait`s have come; only the newest waits.
    pub hook_waits: u64,
    /// Ids already shown to the model in this process's life: a redelivery after a broker
    /// restart is acked again but never shown twice.
    pub seen: SeenIds,
    /// The MCP peer, for notifications.
    pub peer: Option<Peer<RoleServer>>,
    /// Why the last attempt to reach the broker failed, while it is not reachable; tool
    /// errors show it, since the cause (a refused directory, a bad database) is what the
    /// user must fix.
    pub last_error: Option<String>,
}

impl State {
    pub fn new(identity: Register, inbound_rx: UnboundedReceiver<Inbound>) -> Self {
        Self {
            identity,
            registered: false,
            route: Route::Poll,
            route_why: "the client has not initialized yet".into(),
            may_wake: true,
            use_relay: false,
            inbound_rx: Some(inbound_rx),
            in_inbox: HashMap::new(),
            outboxes: HashMap::new(),
            held: HashSet::new(),
            last_from: HashMap::new(),
            hook_sockets: Vec::new(),
            agent_session: None,
            shared_host: false,
            unread: VecDeque::new(),
            recent: VecDeque::new(),
            native_sockets: HashMap::new(),
            lent: HashSet::new(),
            relay_pending: HashMap::new(),
            hook_waits: 0,
            seen: SeenIds::default(),
            peer: None,
            last_error: None,
        }
    }

    /// Our assigned name, once registered.
    pub fn name(&self) -> Option<&str> {
        self.registered.then_some(self.identity.name.as_str())
    }

    /// The broker gave us `name`: keep it across reconnects by asking for exactly it.
    pub fn registered(&mut self, name: String) {
        self.identity.name = name;
        self.identity.explicit = true;
        self.registered = true;
    }
}

/// Message ids shown in this process's life. The broker's ids are UUIDs, kept as 16
/// bytes each rather than as a 36-character string on the heap, since the set only
/// grows; anything else is kept as text.
#[derive(Default)]
pub(super) struct SeenIds {
    uuids: HashSet<u128>,
    other: HashSet<String>,
}

impl SeenIds {
    pub fn insert(&mut self, id: &str) {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.insert(u.as_u128()),
            Err(_) => self.other.insert(id.to_string()),
        };
    }

    pub fn remove(&mut self, id: &str) {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.remove(&u.as_u128()),
            Err(_) => self.other.remove(id),
        };
    }

    pub fn contains(&self, id: &str) -> bool {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.contains(&u.as_u128()),
            Err(_) => self.other.contains(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SeenIds;

    #[test]
    fn seen_ids_hold_uuids_and_other_text() {
        let mut seen = SeenIds::default();
        let id = "019b76da-a87b-7c3e-9a41-5d2f0b6e8c17";
        assert!(!seen.contains(id));
        seen.insert(id);
        seen.insert("not-a-uuid");
        assert!(seen.contains(id) && seen.contains("not-a-uuid"));
        assert!(!seen.contains("019b76da-a87b-7c3e-9a41-5d2f0b6e8c18"));
        assert_eq!((seen.uuids.len(), seen.other.len()), (1, 1));
    }
}
