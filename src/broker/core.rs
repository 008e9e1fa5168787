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
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::mpsc::UnboundedReceiver;

use super::clock::StoreClock;
use super::outq::{Outbound, Outq, ROOM_BYTES};
use crate::config::Limits;
use crate::names::PeerName;
use crate::protocol::*;
use crate::store::{Marked, NewMessage, PeerRow, Store, StoreError};
use crate::wire;

/// Identifies one accepted connection for the life of the broker.
pub type ConnId = u64;

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
    /// The client shows deliveries as they come and acks them.
    push: bool,
    /// Gets the live log.
    subscribed: bool,
    /// The id of the last message delivered on this connection: mail is pushed in id
    /// order, so what is queued after it has not been pushed here yet.
    pushed_upto: Option<String>,
    /// Deliveries are held back (the queue was full, or the backlog is being pushed a
    /// page at a time): new mail stays in the store until `Drained` pushes it.
    holding: bool,
    /// Log events dropped since the last one written, for the lag notice.
    missed: u64,
}

/// What a `send` or `broadcast` asks to store, besides its sender and recipients.
struct Draft {
    text: String,
    in_reply_to: Option<String>,
    key: Option<String>,
}

/// A send whose answer waits for the recipients' acks, until `deadline`.
struct AwaitingAcks {
    conn: ConnId,
    request_id: Option<u64>,
    reply: Sent,
    /// Recipients pushed to but not yet acked.
    unacked: HashSet<String>,
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
}

/// A peer's record as a listing writes it, kept for the next listing: between two
/// listings most peers have not changed, and escaping their strings again was most of a
/// listing's cost. It is used only while everything it was written from still holds, so
/// no change to a peer has to remember to clear it.
struct CachedRecord {
    row: PeerRow,
    online: bool,
    unread: u64,
    json: Box<RawValue>,
}

/// Queued messages read from the store at a time when pushing a backlog.
const BACKLOG_PAGE: u32 = 64;

const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Most messages one retention sweep removes before the core serves requests again.
const SWEEP_BATCH: u32 = 5000;
/// Most commands handled in one transaction.
const MAX_BATCH: usize = 1024;

/// Whether a command only reads (from memory, or from the store in autocommit). A batch
/// of only such commands runs outside a write transaction.
fn reads_only(cmd: &Command) -> bool {
    match cmd {
        Command::Request { request, .. } => matches!(
            **request,
            Request::ListPeers(_)
                | Request::Whoami
                | Request::Status
                | Request::Log(_)
                | Request::Subscribe
        ),
        _ => false,
    }
}

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
        if let Err(e) = outcome {
            tracing::error!("commit failed: {e}; answering this batch with errors");
            self.store.rollback();
            self.fail_effects(&e);
            self.reload();
        }
        self.flush_effects();
    }

    /// Without a transaction no request may run: each write would commit on its own, and
    /// the error answer ("nothing was saved, try again") would be false, so a retry would
    /// store the message twice. Requests are answered `internal`; connections still come
    /// and go (a peer that leaves is offline even if its `last_seen` cannot be written).
    fn refuse_batch(&mut self, batch: &mut Vec<Command>, e: &StoreError) {
        let refusal = self.write_failed(e);
        for cmd in batch.drain(..) {
            match cmd {
                Command::Request { conn, id, request } => {
                    // An ack without an id is never answered; unstored, it is simply
                    // delivered again later.
                    let unanswered = id.is_none() && matches!(*request, Request::Ack(_));
                    if self.conns.contains_key(&conn) && !unanswered {
                        self.answer(conn, id, Err(refusal.clone()));
                    }
                }
                // After the failure: the queue is looked at again in the next batch.
                Command::Drained { conn } => self.drains.push(conn),
                other => self.handle(other),
            }
        }
    }

    /// After a failed commit nothing of the batch is durable: answers become errors and
    /// deliveries and log events are withheld.
    fn fail_effects(&mut self, e: &StoreError) {
        let refusal = self.write_failed(e);
        let effects = std::mem::take(&mut self.effects);
        for (conn, effect) in effects {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            match effect {
                Effect::Answer {
                    id,
                    ok: true,
                    settled: false,
                    bytes,
                } => {
                    c.outq.unreserve(bytes.len());
                    self.emit(conn, ServerFrame::error(id, refusal.clone()));
                }
                kept @ Effect::Answer { .. } => self.effects.push((conn, kept)),
                Effect::Push { bytes, lagged } => {
                    c.outq.unreserve(bytes.len());
                    c.missed += lagged;
                }
            }
        }
        // Sends of this batch were not stored: their waits end here (their answers are
        // errors above). Waits from earlier, committed batches go on.
        for id in std::mem::take(&mut self.awaiting_in_batch) {
            if let Some(w) = self.awaiting.remove(&id) {
                self.emit(w.conn, ServerFrame::error(w.request_id, refusal.clone()));
            }
        }
        self.deadlines
            .retain(|(_, id)| self.awaiting.contains_key(id));
        // Registrations of this batch were not stored, and were answered with errors.
        for conn in std::mem::take(&mut self.registered_in_batch) {
            if let Some(name) = self.conns.get_mut(&conn).and_then(|c| c.name.take())
                && self.online.get(&name) == Some(&conn)
            {
                self.online.remove(&name);
            }
        }
        // What was pushed in the batch was withheld: those connections are pushed again
        // from the store, from where they were.
        for (conn, before) in std::mem::take(&mut self.pushed_before) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.pushed_upto = before;
                if c.name.is_some() {
                    self.hold(conn);
                }
            }
        }
    }

    /// The answer to a request whose writes could not be saved: `disk_full` naming the
    /// directory when the file system is full, `internal` otherwise. Either way nothing
    /// of it was saved, so trying again cannot store anything twice.
    fn write_failed(&self, e: &StoreError) -> ErrorBody {
        if e.is_disk_full() {
            let dir = std::path::Path::new(&self.info.database)
                .parent()
                .map_or_else(|| ".".to_string(), |d| d.display().to_string());
            return err(
                ErrorCode::DiskFull,
                format!(
                    "the file system holding {dir} is full, so the broker could not write its database; nothing was saved. Free some space there and try again (the broker carries on by itself)"
                ),
            );
        }
        err(
            ErrorCode::Internal,
            format!("the broker could not write its database ({e}); nothing was saved, try again"),
        )
    }

    /// A write of this batch failed: the batch will be rolled back, and the request is
    /// answered as [`Core::write_failed`] says.
    fn failed_write(&mut self, e: StoreError) -> ErrorBody {
        tracing::error!("store: {e}");
        let refusal = self.write_failed(&e);
        self.batch_error.get_or_insert(e);
        refusal
    }

    /// Rebuilds the mirrors from the store after a failed commit.
    fn reload(&mut self) {
        if let Ok(peers) = self.store.load_peers() {
            self.peers = peers.into_iter().map(|p| (p.name.clone(), p)).collect();
        }
        if let Ok(q) = self.store.queued_counts() {
            self.queued = q;
        }
        if let Ok(n) = self.store.quarantined() {
            self.quarantined = n;
        }
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
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let mut bytes = Vec::new();
        wire::encode(&frame, &mut bytes);
        c.outq.reserve(bytes.len());
        let effect = if frame.result.is_some() || frame.error.is_some() {
            Effect::Answer {
                id: frame.id,
                ok: frame.error.is_none(),
                settled: false,
                bytes,
            }
        } else {
            Effect::Push {
                bytes,
                lagged: frame.lagged.map_or(0, |l| l.missed),
            }
        };
        self.effects.push((conn, effect));
    }

    fn answer(&mut self, conn: ConnId, id: Option<u64>, outcome: Result<Reply, ErrorBody>) {
        let frame = match outcome {
            Ok(reply) => ServerFrame::result(id, reply),
            Err(e) => ServerFrame::error(id, e),
        };
        self.emit(conn, frame);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connected { conn, outq } => {
                self.conns.insert(
                    conn,
                    Conn {
                        outq,
                        name: None,
                        push: false,
                        subscribed: false,
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
            Command::Request { conn, id, request } => {
                if !self.conns.contains_key(&conn) {
                    return;
                }
                if let Some(outcome) = self.request(conn, id, *request) {
                    self.answer(conn, id, outcome);
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
        }
        if self.conns.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }

    /// Handles one request. `None` means the answer is deferred (a send waiting for acks)
    /// or not wanted (an ack without id).
    fn request(
        &mut self,
        conn: ConnId,
        id: Option<u64>,
        request: Request,
    ) -> Option<Result<Reply, ErrorBody>> {
        let outcome = match request {
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
                return None;
            }
            Request::Send(s) => return self.send(conn, id, s),
            Request::Broadcast(b) => return self.broadcast(conn, id, b),
            Request::Ack(a) => {
                let r = self.ack(conn, a);
                if id.is_none() {
                    if let Err(e) = r {
                        tracing::debug!(conn, "ack refused: {}", e.message);
                    }
                    return None;
                }
                r.map(|()| Reply::Done(Done {}))
            }
            Request::ListPeers(l) => self.list_peers(conn, &l).map(Reply::Peers),
            Request::Whoami => self.whoami(conn).map(|p| Reply::Peer(Box::new(p))),
            Request::SetSummary(s) => self.set_summary(conn, s).map(|()| Reply::Done(Done {})),
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Log(q) => self.log(q).map(Reply::Log),
            Request::Subscribe => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.subscribed = true;
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
        Some(outcome)
    }

    fn registered_name(&self, conn: ConnId) -> Option<&str> {
        self.conns.get(&conn).and_then(|c| c.name.as_deref())
    }

    fn register(&mut self, conn: ConnId, r: Register) -> Result<Registered, ErrorBody> {
        if let Some(name) = self.registered_name(conn) {
            return Err(err(
                ErrorCode::BadRequest,
                format!("this connection is already registered as {name}"),
            ));
        }
        let wanted = PeerName::new(&r.name).map_err(|e| err(ErrorCode::BadName, e.to_string()))?;
        // The wanted name, or the first free or reclaimable `name-N`.
        let mut n = 1;
        let (name, reclaimed) = loop {
            let candidate = if n == 1 {
                wanted.clone()
            } else {
                wanted.with_suffix(n)
            };
            let key = candidate.as_str();
            if !self.online.contains_key(key) {
                match self.peers.get(key) {
                    None => break (candidate, false),
                    Some(p) if (r.explicit && n == 1) || p.cwd == r.cwd => break (candidate, true),
                    Some(_) => {}
                }
            }
            n += 1;
        };
        let now = now_millis();
        let name = name.to_string();
        let previous = self.peers.get(&name);
        let row = PeerRow {
            name: name.clone(),
            pid: r.pid,
            cwd: r.cwd,
            git_root: r.git_root,
            git_common_dir: r.git_common_dir,
            branch: r.branch,
            tty: r.tty,
            host: r.host,
            summary: r
                .summary
                .or_else(|| previous.map(|p| p.summary.clone()))
                .unwrap_or_default(),
            client_name: r.client_name,
            client_version: r.client_version,
            push: r.push,
            first_seen: previous.map_or(now, |p| p.first_seen),
            last_seen: now,
        };
        self.store
            .upsert_peer(&row)
            .map_err(|e| self.failed_write(e))?;
        self.peers.insert(name.clone(), row);
        self.online.insert(name.clone(), conn);
        self.registered_in_batch.push(conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.name = Some(name.clone());
            c.push = r.push;
        }
        let queued = self.unread(&name);
        tracing::info!(peer = %name, reclaimed, queued, "online");
        Ok(Registered {
            name,
            reclaimed,
            queued,
        })
    }
}

/// Selects peers in a scope.
type PeerFilter = Box<dyn Fn(&PeerRow) -> bool>;

/// A listing's paging cursor: where the last peer of a page sorts (online ones first,
/// then by name).
fn peer_cursor(online: bool, name: &str) -> String {
    format!("{}:{name}", u8::from(online))
}

fn parse_peer_cursor(cursor: &str) -> Result<(bool, &str), ErrorBody> {
    match cursor.split_once(':') {
        Some(("1", name)) => Ok((true, name)),
        Some(("0", name)) => Ok((false, name)),
        _ => Err(err(
            ErrorCode::BadRequest,
            "after is not a cursor this broker gave; pass the `next` of the page before",
        )),
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
    /// Pushes the queued mail of `name` to its connection, oldest first, after what was
    /// pushed there already, a page at a time and while its queue has room. What does not
    /// fit stays in the store; `Drained` goes on with it.
    fn push_backlog(&mut self, conn: ConnId, name: &str) {
        loop {
            let Some(c) = self.conns.get(&conn) else {
                return;
            };
            let after = c.pushed_upto.clone();
            let pending = match self.store.pending_for(name, after.as_deref(), BACKLOG_PAGE) {
                Ok(p) => p,
                Err(e) => {
                    // Still holding: new mail must not overtake what could not be read.
                    tracing::error!(
                        peer = name,
                        "cannot read queued mail: {e}; trying again in a second"
                    );
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.holding = true;
                    }
                    self.retry_backlog.push(conn);
                    return;
                }
            };
            let more = pending.rows.len() + pending.damaged.len() == BACKLOG_PAGE as usize;
            self.quarantine(name, &pending.damaged);
            for m in pending.rows {
                if !self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.outq.has_room_for_push())
                {
                    // No room: the rest when the writer has caught up.
                    self.hold(conn);
                    return;
                }
                let id = m.id.clone();
                let d = self.delivery(m.id, m.sender, name, m.text, m.in_reply_to, m.sent_at);
                self.emit(conn, ServerFrame::deliver(d));
                self.set_pushed_upto(conn, id);
            }
            if !more {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.holding = false;
                }
                return;
            }
        }
    }

    /// Records that mail up to `id` was pushed on `conn`, keeping what it was before this
    /// batch, to put back if the batch fails.
    fn set_pushed_upto(&mut self, conn: ConnId, id: String) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let before = c.pushed_upto.replace(id);
            self.pushed_before.entry(conn).or_insert(before);
        }
    }

    /// Holds back deliveries to `conn` until its queue has room (`drained`).
    fn hold(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.holding = true;
            self.want_room(conn);
        }
    }

    /// Asks to hear (`Drained`) when `conn`'s queue has room.
    fn want_room(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            c.outq.want_room();
            self.room_wanted.push(conn);
        }
    }

    /// Whether a new delivery may be queued for `conn` now: it is not behind on its
    /// backlog, and its queue has room. If not, the core asks to hear when it has.
    fn may_push(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        if c.holding || !c.outq.has_room_for_push() {
            self.hold(conn);
            return false;
        }
        true
    }

    /// Puts aside the damaged rows `pending_for` found for `name`.
    fn quarantine(&mut self, name: &str, damaged: &[Vec<u8>]) {
        for raw in damaged {
            let id = String::from_utf8_lossy(raw);
            match self.store.quarantine(name, raw) {
                Ok(true) => {
                    tracing::warn!(
                        peer = name,
                        message = %id,
                        "put aside a queued message whose stored row cannot be read (damaged); its other mail is delivered. `claude-peers status` counts such messages"
                    );
                    self.quarantined += 1;
                    if let Some(q) = self.queued.get_mut(name) {
                        *q = q.saturating_sub(1);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(peer = name, message = %id, "cannot put aside a damaged message: {e}");
                }
            }
        }
    }

    /// The writer of `conn` caught up after the core held something back: push the mail
    /// that waited, and tell a subscriber what it missed.
    fn drained(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let missed = std::mem::take(&mut c.missed);
        let backlog = if c.holding { c.name.clone() } else { None };
        if missed > 0 {
            self.emit(conn, ServerFrame::lagged(missed));
        }
        if let Some(name) = backlog {
            self.push_backlog(conn, &name);
        }
    }

    /// A delivery frame's message, with what we know of the sender now.
    fn delivery(
        &self,
        id: String,
        from: String,
        to: &str,
        text: String,
        in_reply_to: Option<String>,
        sent_at: Millis,
    ) -> Delivery {
        let sender = self.peers.get(&from);
        Delivery {
            id,
            to: to.to_string(),
            text,
            in_reply_to,
            sent_at,
            from_cwd: sender.map(|p| p.cwd.clone()),
            from_repo: sender.and_then(|p| p.git_root.clone()),
            from_branch: sender.and_then(|p| p.branch.clone()),
            from_summary: sender.map(|p| p.summary.clone()).filter(|s| !s.is_empty()),
            from,
        }
    }

    /// The sender name of a send from `conn`: its registered name, else the `from` it
    /// gave, else `cli`.
    fn sender_name(&self, conn: ConnId, from: Option<String>) -> Result<String, ErrorBody> {
        if let Some(name) = self.registered_name(conn) {
            return Ok(name.to_string());
        }
        let name = from.unwrap_or_else(|| "cli".to_string());
        // A session's name is its own: sending as it would borrow its identity and context.
        if self.peers.contains_key(&name) {
            return Err(err(
                ErrorCode::BadName,
                format!("{name} is the name of a session; send as another name (--from)"),
            ));
        }
        Ok(name)
    }

    fn check_mailboxes(&self, recipients: &[String]) -> Result<(), ErrorBody> {
        for r in recipients {
            let queued = self.unread(r);
            if queued >= self.limits.mailbox_limit {
                return Err(err(
                    ErrorCode::MailboxFull,
                    format!(
                        "{r} has {queued} unread messages, the most a mailbox holds; wait for {r} to read them, then send again"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An unknown-peer refusal naming the closest known names.
    fn unknown_peer(&self, name: &str) -> ErrorBody {
        let mut scored: Vec<(f64, &String)> = self
            .peers
            .keys()
            .map(|k| (strsim::jaro_winkler(name, k), k))
            .filter(|(s, _)| *s > 0.7)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let candidates: Vec<String> = scored.into_iter().take(3).map(|(_, k)| k.clone()).collect();
        let hint = if candidates.is_empty() {
            "run `claude-peers peers --all` (or list_peers) to see who exists".to_string()
        } else {
            format!("did you mean {}?", candidates.join(", "))
        };
        ErrorBody {
            code: ErrorCode::UnknownPeer,
            message: format!("no peer is named {name:?}; {hint}"),
            candidates,
        }
    }

    fn send(&mut self, conn: ConnId, id: Option<u64>, s: Send) -> Option<Result<Reply, ErrorBody>> {
        let prepared = (|| {
            let from = self.sender_name(conn, s.from)?;
            if let Some(k) = &s.key
                && let Some(first) = self.sent_before(&from, k)?
            {
                return Ok(Err(first));
            }
            let mut recipients: Vec<String> = Vec::with_capacity(s.to.len());
            for to in s.to {
                if !self.peers.contains_key(&to) {
                    return Err(self.unknown_peer(&to));
                }
                if !recipients.contains(&to) {
                    recipients.push(to);
                }
            }
            Ok(Ok((from, recipients)))
        })();
        match prepared {
            Ok(Ok((from, recipients))) => {
                let draft = Draft {
                    text: s.text,
                    in_reply_to: s.in_reply_to,
                    key: s.key,
                };
                self.deliver_new(conn, id, from, recipients, draft)
            }
            Ok(Err(first)) => Some(Ok(Reply::Sent(first))),
            Err(e) => Some(Err(e)),
        }
    }

    fn broadcast(
        &mut self,
        conn: ConnId,
        id: Option<u64>,
        b: Broadcast,
    ) -> Option<Result<Reply, ErrorBody>> {
        let prepared = (|| {
            let from = self.sender_name(conn, b.from)?;
            if let Some(k) = &b.key
                && let Some(first) = self.sent_before(&from, k)?
            {
                return Ok(Err(first));
            }
            let filter =
                self.scope_filter(conn, b.scope, b.cwd.as_ref(), b.git_common_dir.as_ref())?;
            let mut recipients: Vec<String> = self
                .online
                .keys()
                .filter(|n| **n != from && self.peers.get(*n).is_some_and(&filter))
                .cloned()
                .collect();
            if recipients.is_empty() {
                return Err(err(
                    ErrorCode::NoRecipients,
                    format!("no other peer is online in scope {:?}", b.scope),
                ));
            }
            if recipients.len() > self.limits.broadcast_limit {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "{} peers are in scope; a broadcast reaches at most {}. Narrow the scope",
                        recipients.len(),
                        self.limits.broadcast_limit
                    ),
                ));
            }
            recipients.sort();
            Ok(Ok((from, recipients)))
        })();
        match prepared {
            Ok(Ok((from, recipients))) => {
                let draft = Draft {
                    text: b.text,
                    in_reply_to: b.in_reply_to,
                    key: b.key,
                };
                self.deliver_new(conn, id, from, recipients, draft)
            }
            Ok(Err(first)) => Some(Ok(Reply::Sent(first))),
            Err(e) => Some(Err(e)),
        }
    }

    /// The answer to a send that `from` already made under idempotency `key`, if it did:
    /// the same message id, and its recipients' states as they are now.
    fn sent_before(&self, from: &str, key: &str) -> Result<Option<Sent>, ErrorBody> {
        let Some(k) = self.store.message_by_key(key).map_err(internal)? else {
            return Ok(None);
        };
        if k.sender != from {
            return Err(err(
                ErrorCode::BadRequest,
                "this key was used by another sender; choose a new key for each message",
            ));
        }
        Ok(Some(Sent {
            message_id: k.id,
            sent_at: k.sent_at,
            recipients: k
                .recipients
                .into_iter()
                .map(|(name, state)| RecipientState { name, state })
                .collect(),
        }))
    }

    /// Stores a new message for checked recipients and pushes it to those online. The
    /// answer waits for acks from recipients that show messages as they arrive.
    fn deliver_new(
        &mut self,
        conn: ConnId,
        request_id: Option<u64>,
        from: String,
        recipients: Vec<String>,
        draft: Draft,
    ) -> Option<Result<Reply, ErrorBody>> {
        let Draft {
            text,
            in_reply_to,
            key,
        } = draft;
        if let Err(e) = self.check_mailboxes(&recipients) {
            return Some(Err(e));
        }
        // Ordered and expired by the store's clock, which the wall clock cannot move;
        // `sent_at` is the wall time people see.
        let (id, stamped) = self.clock.new_id();
        let sent_at = now_millis();
        let expires_at = stamped.saturating_add(self.limits.retention.as_millis() as Millis);
        let refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
        let new = NewMessage {
            id: &id,
            sender: &from,
            text: &text,
            in_reply_to: in_reply_to.as_deref(),
            sent_at,
            expires_at,
            key: key.as_deref(),
        };
        if let Err(e) = self.store.insert_message(&new, &refs) {
            return Some(Err(self.failed_write(e)));
        }
        let mut states = Vec::with_capacity(recipients.len());
        let mut unacked = HashSet::new();
        for r in &recipients {
            *self.queued.entry(r.clone()).or_default() += 1;
            let state = match self.online.get(r).copied() {
                // A recipient that reads too slowly gets it later, from the store
                // (`drained`), in order after what waits before it.
                Some(to_conn) if !self.may_push(to_conn) => DeliveryState::Queued,
                Some(to_conn) => {
                    let d = self.delivery(
                        id.clone(),
                        from.clone(),
                        r,
                        text.clone(),
                        in_reply_to.clone(),
                        sent_at,
                    );
                    self.emit(to_conn, ServerFrame::deliver(d));
                    self.set_pushed_upto(to_conn, id.clone());
                    if self.conns[&to_conn].push {
                        unacked.insert(r.clone());
                        DeliveryState::Pushed
                    } else {
                        DeliveryState::Queued
                    }
                }
                None => DeliveryState::Queued,
            };
            states.push(RecipientState {
                name: r.clone(),
                state,
            });
            self.log_event(LogEventKind::Sent, || LogEntry {
                id: id.clone(),
                from: from.clone(),
                to: r.clone(),
                text: text.clone(),
                in_reply_to: in_reply_to.clone(),
                sent_at,
                state: DeliveryState::Queued,
                delivered_at: None,
            });
        }
        let reply = Sent {
            message_id: id.clone(),
            sent_at,
            recipients: states,
        };
        if unacked.is_empty() || self.limits.ack_wait.is_zero() {
            return Some(Ok(Reply::Sent(reply)));
        }
        self.deadlines
            .push_back((Instant::now() + self.limits.ack_wait, id.clone()));
        self.awaiting_in_batch.push(id.clone());
        self.awaiting.insert(
            id,
            AwaitingAcks {
                conn,
                request_id,
                reply,
                unacked,
            },
        );
        None
    }

    fn log_event(&mut self, kind: LogEventKind, entry: impl FnOnce() -> LogEntry) {
        let subscribers: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.subscribed)
            .map(|(id, _)| *id)
            .collect();
        if subscribers.is_empty() {
            return;
        }
        let event = LogEvent {
            kind,
            entry: entry(),
        };
        for s in subscribers {
            let c = self.conns.get_mut(&s).expect("a subscriber is connected");
            if !c.outq.has_room_for_push() {
                // A subscriber that reads too slowly misses events, and is told so.
                c.missed += 1;
                self.want_room(s);
                continue;
            }
            let missed = std::mem::take(&mut c.missed);
            if missed > 0 {
                self.emit(s, ServerFrame::lagged(missed));
            }
            self.emit(s, ServerFrame::event(event.clone()));
        }
    }

    fn ack(&mut self, conn: ConnId, a: Ack) -> Result<(), ErrorBody> {
        let Some(name) = self.registered_name(conn).map(str::to_string) else {
            return Err(err(
                ErrorCode::NotRegistered,
                "only a registered peer can ack; send register first",
            ));
        };
        let now = now_millis();
        for id in a.ids {
            let marked = self
                .store
                .mark(&id, &name, a.state, now)
                .map_err(|e| self.failed_write(e))?;
            match marked {
                None => continue,
                Some(Marked::FromQueued) => {
                    if let Some(q) = self.queued.get_mut(&name) {
                        *q = q.saturating_sub(1);
                    }
                }
                Some(Marked::FromHeld) => {}
                Some(Marked::Requeued) => *self.queued.entry(name.clone()).or_default() += 1,
            }
            let done = self.awaiting.get_mut(&id).is_some_and(|w| {
                if w.unacked.remove(&name)
                    && let Some(r) = w.reply.recipients.iter_mut().find(|r| r.name == name)
                {
                    r.state = a.state.into();
                }
                w.unacked.is_empty()
            });
            if done {
                self.finish_awaiting(&id);
            }
            if self.conns.values().any(|c| c.subscribed) {
                let entry = self.store.log_entry(&id, &name).map_err(internal)?;
                if let Some(entry) = entry {
                    self.log_event(LogEventKind::Delivered, || entry);
                }
            }
        }
        Ok(())
    }

    /// Answers a waiting send with the states as they are now.
    fn finish_awaiting(&mut self, id: &str) {
        let Some(mut w) = self.awaiting.remove(id) else {
            return;
        };
        for r in &mut w.reply.recipients {
            if w.unacked.contains(&r.name) && !self.online.contains_key(&r.name) {
                r.state = DeliveryState::Queued;
            }
        }
        self.answer(w.conn, w.request_id, Ok(Reply::Sent(w.reply)));
        // A send stored by an earlier batch: its answer stands whatever becomes of this one.
        if !self.awaiting_in_batch.iter().any(|b| b == id)
            && let Some((_, Effect::Answer { settled, .. })) = self.effects.last_mut()
        {
            *settled = true;
        }
    }

    /// A predicate for peers in `scope` as seen from `conn` (or from the `cwd` and
    /// `git_common_dir` it gave, for a connection that did not register).
    fn scope_filter(
        &self,
        conn: ConnId,
        scope: Scope,
        cwd: Option<&String>,
        git_common_dir: Option<&String>,
    ) -> Result<PeerFilter, ErrorBody> {
        let me = self.registered_name(conn).and_then(|n| self.peers.get(n));
        match scope {
            Scope::Machine => Ok(Box::new(|_| true)),
            Scope::Directory => {
                let cwd = me
                    .map(|p| p.cwd.clone())
                    .or_else(|| cwd.cloned())
                    .ok_or_else(|| err(ErrorCode::BadRequest, "scope directory needs a cwd"))?;
                Ok(Box::new(move |p| p.cwd == cwd))
            }
            Scope::Repo => {
                let common = me
                    .map(|p| p.git_common_dir.clone())
                    .unwrap_or_else(|| git_common_dir.cloned())
                    .ok_or_else(|| {
                        err(
                            ErrorCode::BadRequest,
                            "scope repo needs a git repository, and this session is not in one; use scope directory or machine",
                        )
                    })?;
                Ok(Box::new(move |p| {
                    p.git_common_dir.as_deref() == Some(common.as_str())
                }))
            }
        }
    }

    /// Messages for `name` not acked yet.
    fn unread(&self, name: &str) -> u64 {
        self.queued.get(name).copied().unwrap_or(0)
    }

    fn peer_ref<'a>(&self, p: &'a PeerRow, online: bool) -> PeerInfoRef<'a> {
        PeerInfoRef {
            name: &p.name,
            online,
            pid: p.pid,
            cwd: &p.cwd,
            git_root: p.git_root.as_deref(),
            git_common_dir: p.git_common_dir.as_deref(),
            branch: p.branch.as_deref(),
            tty: p.tty.as_deref(),
            host: p.host.as_deref(),
            summary: &p.summary,
            client_name: p.client_name.as_deref(),
            client_version: p.client_version.as_deref(),
            push: p.push,
            first_seen: p.first_seen,
            last_seen: p.last_seen,
            unread: self.unread(&p.name),
        }
    }

    /// The peers in scope, online ones first, then by name; each peer's record is written
    /// from the cache ([`CachedRecord`]), and serialized again only if it changed.
    fn list_peers(&self, conn: ConnId, l: &ListPeers) -> Result<Box<RawValue>, ErrorBody> {
        let filter = self.scope_filter(conn, l.scope, l.cwd.as_ref(), l.git_common_dir.as_ref())?;
        let me = self.registered_name(conn);
        let mut rows: Vec<(bool, &PeerRow)> = self
            .peers
            .values()
            .filter(|p| Some(p.name.as_str()) != me)
            .map(|p| (self.online.contains_key(&p.name), p))
            .filter(|&(online, p)| (l.include_offline || online) && filter(p))
            .collect();
        rows.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        if let Some(after) = &l.after {
            let (online, name) = parse_peer_cursor(after)?;
            rows.retain(|&(o, p)| (!o, p.name.as_str()) > (!online, name));
        }
        let mut cache = self.records.borrow_mut();
        // One page: the records that fit MAX_PAGE_BYTES (at least one; a record is far
        // smaller), and where the next page starts.
        let mut bytes = 0;
        let mut cut = None;
        let mut next = None;
        for (i, &(online, p)) in rows.iter().enumerate() {
            let unread = self.unread(&p.name);
            let fresh = cache
                .get(&p.name)
                .is_some_and(|c| c.online == online && c.unread == unread && c.row == *p);
            if !fresh {
                // Our own records always serialize (string keys only).
                let json = serde_json::value::to_raw_value(&self.peer_ref(p, online))
                    .expect("a peer record serializes");
                let record = CachedRecord {
                    row: p.clone(),
                    online,
                    unread,
                    json,
                };
                cache.insert(p.name.clone(), record);
            }
            bytes += cache[&p.name].json.get().len() + 1;
            if bytes > MAX_PAGE_BYTES && i > 0 {
                cut = Some(i);
                break;
            }
        }
        if let Some(i) = cut {
            let (online, last) = rows[i - 1];
            next = Some(peer_cursor(online, &last.name));
            rows.truncate(i);
        }
        let list = PeerListRef {
            peers: rows
                .iter()
                .map(|(_, p)| &*cache[&p.name].json)
                .collect::<Vec<&RawValue>>(),
            next,
        };
        let answer = serde_json::value::to_raw_value(&list).expect("a peer list serializes");
        // Peers forgotten since (retention) leave the cache too.
        if cache.len() > self.peers.len() {
            cache.retain(|name, _| self.peers.contains_key(name));
        }
        Ok(answer)
    }

    fn whoami(&self, conn: ConnId) -> Result<PeerInfo, ErrorBody> {
        self.registered_name(conn)
            .and_then(|n| self.peers.get(n))
            .map(|p| {
                self.peer_ref(p, self.online.contains_key(&p.name))
                    .to_owned()
            })
            .ok_or_else(|| {
                err(
                    ErrorCode::NotRegistered,
                    "this connection has not registered a name",
                )
            })
    }

    fn set_summary(&mut self, conn: ConnId, s: SetSummary) -> Result<(), ErrorBody> {
        let Some(name) = self.registered_name(conn).map(str::to_string) else {
            return Err(err(
                ErrorCode::NotRegistered,
                "only a registered peer has a summary; send register first",
            ));
        };
        self.store
            .set_summary(&name, &s.summary)
            .map_err(|e| self.failed_write(e))?;
        if let Some(p) = self.peers.get_mut(&name) {
            p.summary = s.summary;
        }
        Ok(())
    }

    fn status(&self) -> Status {
        let online = self.online.len() as u64;
        Status {
            pid: self.info.pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: self.info.protocol,
            started_at: self.info.started_at,
            uptime_ms: self.info.started.elapsed().as_millis() as u64,
            socket: self.info.socket.clone(),
            database: self.info.database.clone(),
            peers_online: online,
            peers_offline: (self.peers.len() as u64).saturating_sub(online),
            queued: self.queued.values().sum(),
            connections: self.conns.len() as u64,
            quarantined: self.quarantined,
        }
    }

    fn log(&self, q: LogQuery) -> Result<LogReply, ErrorBody> {
        let limit = q.limit.unwrap_or(LOG_DEFAULT).clamp(1, LOG_MAX);
        let before = match &q.before {
            None => None,
            Some(c) => Some(c.split_once(':').ok_or_else(|| {
                err(
                    ErrorCode::BadRequest,
                    "before is not a cursor this broker gave; pass the `next` of the page before",
                )
            })?),
        };
        let mut messages = self
            .store
            .log(limit, q.peer.as_deref(), before)
            .map_err(internal)?;
        // Newest first: keep those that fit one page, and say where the older ones start.
        let mut bytes = 0;
        let mut next = None;
        for (i, e) in messages.iter().enumerate() {
            bytes += serde_json::to_vec(e).map_or(0, |v| v.len()) + 1;
            if bytes > MAX_PAGE_BYTES && i > 0 {
                let last = &messages[i - 1];
                next = Some(format!("{}:{}", last.id, last.to));
                messages.truncate(i);
                break;
            }
        }
        messages.reverse();
        Ok(LogReply { messages, next })
    }

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

    fn sweep(&mut self) {
        let now = now_millis();
        for name in self.online.keys() {
            if let Some(p) = self.peers.get_mut(name) {
                p.last_seen = now;
            }
            let _ = self.store.touch_peer(name, now);
        }
        let retention = self.limits.retention.as_millis() as Millis;
        // Mail by the store's clock (a wall clock that jumped must not expire it early);
        // peers by wall time, as `last_seen` is.
        let store_now = self.clock.now();
        let online = &self.online;
        match self.store.sweep(
            store_now,
            store_now.saturating_sub(retention),
            now.saturating_sub(retention),
            &|n| online.contains_key(n),
            SWEEP_BATCH,
        ) {
            Ok(swept) => {
                if swept.messages == u64::from(SWEEP_BATCH) {
                    // More may have expired: go on after serving what waits.
                    self.next_sweep = Instant::now() + Duration::from_millis(10);
                }
                if swept.messages > 0 || swept.peers > 0 {
                    tracing::info!(
                        messages = swept.messages,
                        peers = swept.peers,
                        "retention sweep"
                    );
                    self.reload();
                } else {
                    tracing::debug!("retention sweep: nothing expired");
                }
            }
            Err(e) => tracing::error!("retention sweep failed: {e}"),
        }
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
