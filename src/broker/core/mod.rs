//! The broker's core: the one task that owns the store and the table of who is online.
//!
//! The broker is single-threaded (a current-thread runtime), so handing a command from a
//! connection task to the core costs no thread wake-up. Connection tasks turn frames into
//! [`Command`]s; the core handles them in arrival order.
//! Everything it takes in one wake-up is written in one SQLite transaction (group commit),
//! and only after that commit does anything leave: answers, deliveries, log events. So a
//! send answered with success is always on disk first, and a recipient never sees a
//! message the store does not hold.
//!
//! Timers (sends waiting for acks, idle exit, retention sweeps) are deadlines checked
//! between batches; the core sleeps until the next one or the next command.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use super::clock::StoreClock;
use super::outq::{Outbound, Outq, ROOM_BYTES};
use crate::config::Limits;
use crate::protocol::*;
use crate::store::{PeerRow, Store, StoreError};
use crate::wire;

mod command;
mod failure;
mod mail;
pub mod network;
mod peers;
mod retention;
#[cfg(test)]
mod tests;

pub use command::Command;
use command::{reads_only, writes_nothing};
use mail::AwaitingAcks;
use peers::CachedRecord;
use retention::SWEEP_EVERY;

/// Identifies one accepted connection for the life of the broker.
pub type ConnId = u64;

/// What handling one request comes to.
enum Outcome {
    /// Answer it with this now.
    Answer(Result<Reply, ErrorBody>),
    /// The answer comes later: a send that waits for its recipients' acks.
    Deferred,
    /// The handler answered already (`register`: its answer goes before its backlog).
    Answered,
    /// No answer is wanted: an ack without id.
    Unanswered,
}

/// A frame the core made in the current batch, for one connection, released after the
/// commit. Encoded when made, so its bytes count in the connection's queue at once.
enum Effect {
    /// The answer to request `id`; `ok` unless it is an error. `settled`: it reports what
    /// an earlier, committed batch did (a send whose acks came in now), so it stands even
    /// if this batch fails.
    Answer {
        id: Option<u64>,
        ok: bool,
        settled: bool,
        bytes: Vec<u8>,
    },
    /// A delivery or log event; `lagged` is the count of missed events a lag notice
    /// carries (0 for anything else), given back if the notice is withheld.
    Push { bytes: Vec<u8>, lagged: u64 },
}

/// Facts about the running broker, for `status`.
pub struct BrokerInfo {
    pub pid: u32,
    pub protocol: u32,
    pub started_at: Millis,
    pub started: Instant,
    pub socket: String,
    pub database: String,
}

/// A connection as the core sees it.
struct Conn {
    outq: Rc<Outq>,
    /// Set by `register`; the peer this connection is the mailbox of.
    name: Option<String>,
    /// The agent session it serves, as `register` said.
    session: Option<SessionKey>,
    /// The client shows deliveries as they come and acks them.
    push: bool,
    /// Gets the live log.
    subscribed: bool,
    /// Gets sessions coming, going and changing ([`Core::peer_event`]).
    peer_events: bool,
    /// The id of the last message delivered on this connection: mail is pushed in id
    /// order, so what is queued after it has not been pushed here yet.
    pushed_upto: Option<String>,
    /// Deliveries are held back (the queue was full, or the backlog is being pushed a
    /// page at a time): new mail stays in the store until `Drained` pushes it.
    holding: bool,
    /// Log events dropped since the last one written, for the lag notice.
    missed: u64,
}

pub struct Core {
    store: Store,
    limits: Limits,
    info: BrokerInfo,
    conns: HashMap<ConnId, Conn>,
    /// Registered names with their connection: exactly the online peers.
    online: HashMap<String, ConnId>,
    /// Every known peer, online or not; mirrors the `peers` table.
    peers: HashMap<String, PeerRow>,
    /// Unacked deliveries per recipient; mirrors the queued rows of `deliveries`.
    queued: HashMap<String, u64>,
    /// Each peer's record as the last listing wrote it (see [`CachedRecord`]).
    records: RefCell<HashMap<String, CachedRecord>>,
    /// Sends waiting for acks, by message id, with their deadlines in order (every wait is
    /// the same length, so arrival order is deadline order).
    awaiting: HashMap<String, AwaitingAcks>,
    deadlines: VecDeque<(Instant, String)>,
    /// Output of the current batch, released after its commit.
    effects: Vec<(ConnId, Effect)>,
    /// Connections that held something back in this batch and want to hear of room.
    room_wanted: Vec<ConnId>,
    /// Connections that have room again without their writer saying so: `Drained` for
    /// each is handled in the next batch.
    drains: Vec<ConnId>,
    /// Sends of the current batch that wait for acks: dropped if its commit fails.
    awaiting_in_batch: Vec<String>,
    /// A write of the current batch failed: the batch is rolled back instead of committed.
    batch_error: Option<StoreError>,
    /// Connections registered in the current batch (undone if it fails).
    registered_in_batch: Vec<ConnId>,
    /// Where each connection pushed to in the current batch had got to before it (put
    /// back if the batch fails).
    pushed_before: HashMap<ConnId, Option<String>>,
    /// Connections whose backlog could not be read, and when to try again.
    retry_backlog: Vec<ConnId>,
    retry_backlog_at: Option<Instant>,
    /// Deliveries put aside as damaged; mirrors the store's state 5 rows.
    quarantined: u64,
    /// Stamps ids and expiries; see [`StoreClock`].
    clock: StoreClock,
    idle_since: Option<Instant>,
    next_sweep: Instant,
    stopping: Option<String>,
    /// The bridge to other machines, when there is one.
    network: Option<network::Network>,
    /// Outbox rows of the current batch, for the bridge after the commit.
    outbox_in_batch: Vec<crate::store::OutboxRow>,
    /// What the bridge handed over in the current batch, waiting to hear of the commit.
    relayed_in_batch: Vec<tokio::sync::oneshot::Sender<bool>>,
    /// Outbox rows JetStream took, removed in the current batch; and those a failed batch
    /// could not remove, for the next.
    published_in_batch: Vec<i64>,
    published_retry: Vec<i64>,
    /// Network listings waiting for the other machines' answers, by token.
    gathers: HashMap<u64, (ConnId, Option<u64>, network::Gather)>,
    next_gather: u64,
}

/// Most commands handled in one transaction.
const MAX_BATCH: usize = 1024;

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

impl Core {
    pub fn new(store: Store, limits: Limits, info: BrokerInfo) -> Result<Self, StoreError> {
        let peers = store
            .load_peers()?
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let queued = store.queued_counts()?;
        let quarantined = store.quarantined()?;
        let clock = StoreClock::start(&store)?;
        let now = Instant::now();
        Ok(Self {
            store,
            limits,
            info,
            conns: HashMap::new(),
            online: HashMap::new(),
            peers,
            queued,
            awaiting: HashMap::new(),
            deadlines: VecDeque::new(),
            effects: Vec::new(),
            room_wanted: Vec::new(),
            drains: Vec::new(),
            awaiting_in_batch: Vec::new(),
            batch_error: None,
            registered_in_batch: Vec::new(),
            pushed_before: HashMap::new(),
            retry_backlog: Vec::new(),
            retry_backlog_at: None,
            quarantined,
            clock,
            idle_since: Some(now),
            // First sweep soon after start, to clear what expired while we were down.
            next_sweep: now + Duration::from_secs(1),
            stopping: None,
            records: RefCell::default(),
            network: None,
            outbox_in_batch: Vec::new(),
            relayed_in_batch: Vec::new(),
            gathers: HashMap::new(),
            published_in_batch: Vec::new(),
            published_retry: Vec::new(),
            next_gather: 0,
        })
    }

    /// Runs until shutdown is asked for, the idle timeout passes, or every sender is gone.
    /// Returns why it stopped.
    pub async fn run(mut self, mut rx: UnboundedReceiver<Command>) -> String {
        let mut batch = Vec::with_capacity(64);
        loop {
            batch.extend(self.drains.drain(..).map(|conn| Command::Drained { conn }));
            if batch.is_empty() {
                let deadline = tokio::time::Instant::from_std(self.next_deadline());
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => batch.push(cmd),
                        None => {
                            self.stopping.get_or_insert_with(|| "listener closed".into());
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.handle_batch(&mut batch);
            }
            self.fire_timers();
            if let Some(reason) = self.stopping.take() {
                self.close_all();
                return reason;
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut next = self.next_sweep;
        if let Some((d, _)) = self.deadlines.front() {
            next = next.min(*d);
        }
        if let (Some(since), false) = (self.idle_since, self.limits.idle_timeout.is_zero()) {
            next = next.min(since + self.limits.idle_timeout);
        }
        if let Some(at) = self.retry_backlog_at {
            next = next.min(at);
        }
        next
    }

    fn handle_batch(&mut self, batch: &mut Vec<Command>) {
        if batch.iter().all(reads_only) {
            // No write lock to take: not held up by a checkpoint that holds writers back.
            for cmd in batch.drain(..) {
                self.handle(cmd);
            }
            self.flush_effects();
            return;
        }
        if let Err(e) = self.store.begin() {
            tracing::error!("cannot start a transaction: {e}; answering this batch with errors");
            self.refuse_batch(batch, &e);
            self.flush_effects();
            return;
        }
        self.awaiting_in_batch.clear();
        self.retry_published();
        self.registered_in_batch.clear();
        self.pushed_before.clear();
        let mut commands = batch.drain(..);
        while let Some(cmd) = commands.next() {
            self.handle(cmd);
            if self.batch_error.is_none() && !self.store.in_transaction() {
                // SQLite rolled the transaction back by itself (after some errors it
                // does): what follows would be saved one by one, under answers that say
                // nothing was.
                self.batch_error = Some(StoreError::RolledBack);
            }
            if let Some(e) = self.batch_error.take() {
                let mut rest: Vec<Command> = commands.by_ref().collect();
                self.refuse_batch(&mut rest, &e);
                self.batch_error = Some(e);
            }
        }
        // A write that failed inside the batch may have left part of itself in the
        // transaction: the whole batch is rolled back, as if its commit had failed.
        let outcome = match self.batch_error.take() {
            Some(e) => Err(e),
            None => self.store.commit(),
        };
        let saved = outcome.is_ok();
        if let Err(e) = outcome {
            tracing::error!("commit failed: {e}; answering this batch with errors");
            self.store.rollback();
            self.fail_effects(&e);
            self.reload();
        }
        self.after_commit(saved);
        self.flush_effects();
    }

    fn flush_effects(&mut self) {
        // A connection whose queue already has room hears of it without waiting for its
        // writer (which may have nothing left to write).
        for conn in std::mem::take(&mut self.room_wanted) {
            if let Some(c) = self.conns.get(&conn)
                && c.outq.bytes() <= ROOM_BYTES
                && c.outq.take_wants_room()
            {
                self.drains.push(conn);
            }
        }
        for (conn, effect) in self.effects.drain(..) {
            if let Some(c) = self.conns.get(&conn) {
                // A closed writer means the connection is going away; its Disconnected
                // command is on the way.
                c.outq.send(match effect {
                    Effect::Answer { bytes, .. } => Outbound::Answer(bytes),
                    Effect::Push { bytes, .. } => Outbound::Push(bytes),
                });
            }
        }
    }

    /// Queues a frame for `conn`, counted in its queue at once and written after the
    /// batch commits.
    fn emit(&mut self, conn: ConnId, frame: ServerFrame<Reply>) {
        self.emit_as(conn, frame, false);
    }

    /// [`Core::emit`]; a `settled` answer stands even if this batch fails (it reports
    /// what needs nothing of this batch). Returns whether it was queued (the connection
    /// may be gone).
    fn emit_as(&mut self, conn: ConnId, frame: ServerFrame<Reply>, settled: bool) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        let mut bytes = Vec::new();
        wire::encode(&frame, &mut bytes);
        c.outq.reserve(bytes.len());
        let effect = match frame.body {
            Body::Result(_) | Body::Error(_) => Effect::Answer {
                id: frame.id,
                ok: matches!(frame.body, Body::Result(_)),
                settled,
                bytes,
            },
            Body::Lagged(l) => Effect::Push {
                bytes,
                lagged: l.missed,
            },
            Body::Deliver(_) | Body::Event(_) | Body::Peer(_) => Effect::Push { bytes, lagged: 0 },
        };
        self.effects.push((conn, effect));
        true
    }

    fn answer(&mut self, conn: ConnId, id: Option<u64>, outcome: Result<Reply, ErrorBody>) {
        self.answer_as(conn, id, outcome, false);
    }

    /// [`Core::answer`], `settled` as for [`Core::emit_as`].
    fn answer_as(
        &mut self,
        conn: ConnId,
        id: Option<u64>,
        outcome: Result<Reply, ErrorBody>,
        settled: bool,
    ) {
        let frame = match outcome {
            Ok(reply) => ServerFrame::result(id, reply),
            Err(e) => ServerFrame::error(id, e),
        };
        self.emit_as(conn, frame, settled);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connected { conn, outq } => {
                self.conns.insert(
                    conn,
                    Conn {
                        outq,
                        name: None,
                        session: None,
                        push: false,
                        subscribed: false,
                        peer_events: false,
                        pushed_upto: None,
                        holding: false,
                        missed: 0,
                    },
                );
                self.idle_since = None;
            }
            Command::Drained { conn } => self.drained(conn),
            Command::Disconnected { conn } => self.disconnected(conn),
            Command::Shutdown { reason } => {
                self.stopping.get_or_insert(reason);
            }
            Command::Published { seq } => self.published(seq),
            Command::Relayed { relayed, done } => self.relayed(relayed, done),
            Command::Network { connected } => {
                if let Some(n) = &mut self.network {
                    n.connected = connected;
                }
            }
            Command::Listing { reply } => {
                let _ = reply.send(self.network_listing());
            }
            Command::Gathered { token, replies } => self.gathered(token, replies),
            Command::Request { conn, id, request } => {
                if !self.conns.contains_key(&conn) {
                    return;
                }
                // What writes nothing stands whatever becomes of the batch (a shutdown
                // asked for is under way; a subscription is made).
                let settled = writes_nothing(&request);
                match self.request(conn, id, *request) {
                    Outcome::Answer(answer) => self.answer_as(conn, id, answer, settled),
                    Outcome::Deferred | Outcome::Answered | Outcome::Unanswered => {}
                }
            }
        }
    }

    fn disconnected(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        // The writer ends after what it was given (it shares the queue, so it cannot see
        // the senders go).
        c.outq.send(Outbound::Close);
        if let Some(name) = c.name {
            self.online.remove(&name);
            let now = now_millis();
            if let Some(p) = self.peers.get_mut(&name) {
                p.last_seen = now;
            }
            if let Err(e) = self.store.touch_peer(&name, now) {
                tracing::warn!("cannot record last_seen of {name}: {e}");
            }
            tracing::info!(peer = %name, "offline");
            self.peer_event(&name, PeerChange::Offline);
        }
        if self.conns.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }

    /// Handles one request. `None` means the answer is deferred (a send waiting for acks)
    /// or not wanted (an ack without id).
    fn request(&mut self, conn: ConnId, id: Option<u64>, request: Request) -> Outcome {
        let answer = match request {
            // The connection's reader answers hello and never passes it on.
            Request::Hello(_) => Err(err(
                ErrorCode::BadRequest,
                "hello was already answered on this connection",
            )),
            Request::Register(r) => {
                // The answer goes out before the backlog it announces.
                let outcome = self.register(conn, r);
                let name = outcome.as_ref().ok().map(|r| r.name.clone());
                self.answer(conn, id, outcome.map(Reply::Registered));
                if let Some(name) = name {
                    self.push_backlog(conn, &name);
                }
                return Outcome::Answered;
            }
            Request::Send(s) => return self.send(conn, id, s),
            Request::Broadcast(b) => return self.broadcast(conn, id, b),
            Request::Ack(a) => {
                let r = self.ack(conn, a);
                if id.is_none() {
                    if let Err(e) = r {
                        tracing::debug!(conn, "ack refused: {}", e.message);
                    }
                    return Outcome::Unanswered;
                }
                r.map(|()| Reply::Done(Done {}))
            }
            Request::ListPeers(l)
                if l.scope == Scope::Network || self.repo_across(conn, l.scope).is_some() =>
            {
                return self.list_network(conn, id, l);
            }
            Request::ListPeers(l) => self.list_peers(conn, &l).map(Reply::Peers),
            Request::Whoami => self.whoami(conn).map(|p| Reply::Peer(Box::new(p))),
            Request::SetSummary(s) => self.set_summary(conn, s).map(|()| Reply::Done(Done {})),
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Log(q) => self.log(q).map(Reply::Log),
            Request::Subscribe(s) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.subscribed = true;
                    c.peer_events |= s.peers;
                }
                Ok(Reply::Done(Done {}))
            }
            Request::Shutdown(s) => {
                let reason = s.reason.unwrap_or_else(|| "asked to stop".into());
                tracing::info!(conn, "shutdown requested: {reason}");
                self.stopping.get_or_insert(reason);
                Ok(Reply::Done(Done {}))
            }
        };
        Outcome::Answer(answer)
    }
}

fn internal(e: StoreError) -> ErrorBody {
    tracing::error!("store: {e}");
    err(
        ErrorCode::Internal,
        format!(
            "the broker could not use its database ({e}); try again, and see the broker log if it persists"
        ),
    )
}

impl Core {
    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some((deadline, _)) = self.deadlines.front() {
            if *deadline > now {
                break;
            }
            let (_, id) = self.deadlines.pop_front().expect("front exists");
            self.finish_awaiting(&id);
        }
        if let Some(since) = self.idle_since
            && !self.limits.idle_timeout.is_zero()
            && now >= since + self.limits.idle_timeout
        {
            self.stopping
                .get_or_insert_with(|| "idle timeout: no connections".into());
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            self.sweep();
        }
        if !self.retry_backlog.is_empty() {
            let at = *self
                .retry_backlog_at
                .get_or_insert(now + Duration::from_secs(1));
            if now >= at {
                self.retry_backlog_at = None;
                let conns = std::mem::take(&mut self.retry_backlog);
                self.drains.extend(conns);
            }
        }
        self.flush_effects();
    }

    /// Tells every connection to close after what it was sent.
    fn close_all(&mut self) {
        let waiting: Vec<String> = self.awaiting.keys().cloned().collect();
        for id in waiting {
            self.finish_awaiting(&id);
        }
        self.flush_effects();
        for c in self.conns.values() {
            c.outq.send(Outbound::Close);
        }
    }
}
