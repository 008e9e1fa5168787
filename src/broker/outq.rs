//! A connection's outgoing queue, bounded in bytes: what keeps a client that reads slowly,
//! or not at all, from growing the broker's memory.
//!
//! The core and the connection's reader put encoded frames in; the writer task takes them
//! out. The queue counts the bytes not yet written and the requests not yet answered, and
//! each side acts on the count:
//! - the reader stops reading requests while the queue is over [`READ_PAUSE_BYTES`] or
//!   [`MAX_UNANSWERED`] requests wait for their answers, so answers are bounded by the
//!   requests let in;
//! - the core holds back what the client did not ask for (deliveries and log events)
//!   while the queue is over [`PUSH_LIMIT_BYTES`]: mail stays in the store, events are
//!   counted as missed. It asks to be told when there is room again ([`Outq::want_room`]);
//! - the writer, once the queue is down to [`ROOM_BYTES`], tells the core (a
//!   `Drained` command), which pushes the held-back mail and tells a subscriber how many
//!   events it missed.

use std::cell::Cell;

use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Past this many queued bytes, deliveries and events are held back.
pub const PUSH_LIMIT_BYTES: usize = 1 << 20;
/// Past this many queued bytes, the reader reads no more requests.
pub const READ_PAUSE_BYTES: usize = 1 << 20;
/// The most requests read and not yet answered on one connection.
pub const MAX_UNANSWERED: usize = 256;
/// At or under this many queued bytes there is room again.
pub const ROOM_BYTES: usize = 64 * 1024;

/// One encoded frame (newline included), or the end.
#[derive(Debug)]
pub enum Outbound {
    /// The answer to a request.
    Answer(Vec<u8>),
    /// A frame the client did not ask for: a delivery, a log event, a lag notice.
    Push(Vec<u8>),
    /// Write what came before, then close the connection.
    Close,
}

/// The queue's counters, shared (one thread) by the core, the reader and the writer.
#[derive(Debug)]
pub struct Outq {
    tx: UnboundedSender<Outbound>,
    /// Bytes put in and not yet written.
    bytes: Cell<usize>,
    /// Requests read that wait for their answer to be written.
    unanswered: Cell<usize>,
    /// The core held something back and waits to hear of room.
    wants_room: Cell<bool>,
    /// Woken when the writer wrote something, or stopped.
    wrote: Notify,
    /// The writer has stopped (the client is gone, or the connection was closed): nothing
    /// will be written any more, so no one should wait for it.
    closed: Cell<bool>,
    /// Woken once, when the writer stops.
    stopped: Notify,
}

impl Outq {
    pub fn new() -> (Self, UnboundedReceiver<Outbound>) {
        let (tx, rx) = unbounded_channel();
        let q = Self {
            tx,
            bytes: Cell::new(0),
            unanswered: Cell::new(0),
            wants_room: Cell::new(false),
            wrote: Notify::new(),
            closed: Cell::new(false),
            stopped: Notify::new(),
        };
        (q, rx)
    }

    /// Counts bytes that are on their way in (the core counts a batch's frames as it
    /// makes them, and hands them over after the commit).
    pub fn reserve(&self, n: usize) {
        self.bytes.set(self.bytes.get() + n);
    }

    /// Uncounts bytes [`Outq::reserve`]d for frames that will not be sent after all.
    pub fn unreserve(&self, n: usize) {
        self.bytes.set(self.bytes.get().saturating_sub(n));
    }

    /// Hands a frame to the writer; its bytes must have been reserved. False when the
    /// writer is gone (the connection is closing).
    pub fn send(&self, out: Outbound) -> bool {
        self.tx.send(out).is_ok()
    }

    /// Reserves and sends in one step (the reader's own answers).
    pub fn send_now(&self, out: Outbound) -> bool {
        if let Outbound::Answer(b) | Outbound::Push(b) = &out {
            self.reserve(b.len());
        }
        self.send(out)
    }

    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    /// Whether a delivery or event may be queued now.
    pub fn has_room_for_push(&self) -> bool {
        self.bytes.get() <= PUSH_LIMIT_BYTES
    }

    /// The core held something back: it will get `Drained` once there is room.
    pub fn want_room(&self) {
        self.wants_room.set(true);
    }

    /// Clears the core's wish to hear of room, returning whether it was set.
    pub fn take_wants_room(&self) -> bool {
        self.wants_room.replace(false)
    }

    /// The reader let in a request that will be answered.
    pub fn request_in(&self) {
        self.unanswered.set(self.unanswered.get() + 1);
    }

    /// A request let in will not be answered after all (an ack without id).
    pub fn request_out(&self) {
        self.unanswered.set(self.unanswered.get().saturating_sub(1));
    }

    pub fn unanswered(&self) -> usize {
        self.unanswered.get()
    }

    /// Whether the reader should wait before reading another request.
    pub fn reader_must_wait(&self) -> bool {
        self.bytes.get() > READ_PAUSE_BYTES || self.unanswered.get() >= MAX_UNANSWERED
    }

    /// Waits until `until` holds, looking again each time the writer writes something.
    /// Returns false, at once, when the writer has stopped: then the connection is over.
    pub async fn wait_for_writer(&self, until: impl Fn(&Self) -> bool) -> bool {
        loop {
            let wrote = self.wrote.notified();
            if self.closed.get() {
                return false;
            }
            if until(self) {
                return true;
            }
            wrote.await;
        }
    }

    /// Returns once the writer has stopped.
    pub async fn writer_gone(&self) {
        loop {
            let stopped = self.stopped.notified();
            if self.closed.get() {
                return;
            }
            stopped.await;
        }
    }

    /// The writer stopped: wakes whoever waits for it.
    pub fn writer_stopped(&self) {
        self.closed.set(true);
        self.wrote.notify_waiters();
        self.stopped.notify_waiters();
    }

    /// The writer wrote `bytes` bytes holding `answers` answers. Returns true when the core
    /// waits to hear of room and there is room now (the flag is cleared).
    pub fn written(&self, bytes: usize, answers: usize) -> bool {
        self.bytes.set(self.bytes.get().saturating_sub(bytes));
        self.unanswered
            .set(self.unanswered.get().saturating_sub(answers));
        self.wrote.notify_waiters();
        self.bytes.get() <= ROOM_BYTES && self.wants_room.replace(false)
    }
}
