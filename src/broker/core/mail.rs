//! Mail: sends and broadcasts (with idempotency keys), pushing deliveries to online
//! recipients in id order while their queues have room, backlogs a page at a time, acks
//! and the sends that wait for them, log events and history.

use std::collections::HashSet;
use std::time::Instant;

use super::{ConnId, Core, Outcome, err, internal};
use crate::protocol::*;
use crate::store::{Marked, NewMessage};

/// What a `send` or `broadcast` asks to store, besides its sender and recipients.
pub(super) struct Draft {
    pub(super) text: String,
    pub(super) in_reply_to: Option<String>,
    pub(super) key: Option<String>,
}

/// A send whose answer waits for the recipients' acks, until `deadline`.
pub(super) struct AwaitingAcks {
    pub(super) conn: ConnId,
    pub(super) request_id: Option<u64>,
    pub(super) reply: Sent,
    /// Recipients pushed to but not yet acked.
    pub(super) unacked: HashSet<String>,
}

/// Queued messages read from the store at a time when pushing a backlog.
const BACKLOG_PAGE: u32 = 64;

impl Core {
    /// Pushes the queued mail of `name` to its connection, oldest first, after what was
    /// pushed there already, a page at a time and while its queue has room. What does not
    /// fit stays in the store; `Drained` goes on with it.
    pub(super) fn push_backlog(&mut self, conn: ConnId, name: &str) {
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
    pub(super) fn set_pushed_upto(&mut self, conn: ConnId, id: String) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let before = c.pushed_upto.replace(id);
            self.pushed_before.entry(conn).or_insert(before);
        }
    }

    /// Holds back deliveries to `conn` until its queue has room (`drained`).
    pub(super) fn hold(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.holding = true;
            self.want_room(conn);
        }
    }

    /// Asks to hear (`Drained`) when `conn`'s queue has room.
    pub(super) fn want_room(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            c.outq.want_room();
            self.room_wanted.push(conn);
        }
    }

    /// Whether a new delivery may be queued for `conn` now: it is not behind on its
    /// backlog, and its queue has room. If not, the core asks to hear when it has.
    pub(super) fn may_push(&mut self, conn: ConnId) -> bool {
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
    pub(super) fn quarantine(&mut self, name: &str, damaged: &[Vec<u8>]) {
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
    pub(super) fn drained(&mut self, conn: ConnId) {
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
    pub(super) fn delivery(
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
            from_cwd: sender.map(|p| p.context.cwd.clone()),
            from_repo: sender.and_then(|p| p.context.git_root.clone()),
            from_branch: sender.and_then(|p| p.context.branch.clone()),
            from_summary: sender.map(|p| p.summary.clone()).filter(|s| !s.is_empty()),
            from,
        }
    }

    /// Pushes message `m`, just stored, to its recipient `to` on connection `to_conn`.
    pub(super) fn push_new(&mut self, to_conn: ConnId, to: &str, m: &NewMessage<'_>) {
        let d = self.delivery(
            m.id.to_string(),
            m.sender.to_string(),
            to,
            m.text.to_string(),
            m.in_reply_to.map(str::to_string),
            m.sent_at,
        );
        self.emit(to_conn, ServerFrame::deliver(d));
        self.set_pushed_upto(to_conn, m.id.to_string());
    }

    pub(super) fn check_mailboxes(&self, recipients: &[String]) -> Result<(), ErrorBody> {
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

    pub(super) fn send(&mut self, conn: ConnId, id: Option<u64>, s: Send) -> Outcome {
        let draft = Draft {
            text: s.text,
            in_reply_to: s.in_reply_to,
            key: s.key,
        };
        let to = s.to;
        self.submit(conn, id, s.from, draft, move |core, _| {
            let mut recipients: Vec<String> = Vec::with_capacity(to.len());
            for name in to {
                let name = core.recipient(&name)?;
                if !recipients.contains(&name) {
                    recipients.push(name);
                }
            }
            Ok(recipients)
        })
    }

    pub(super) fn broadcast(&mut self, conn: ConnId, id: Option<u64>, b: Broadcast) -> Outcome {
        if b.scope == Scope::Network || self.repo_across(conn, b.scope).is_some() {
            return self.broadcast_network(conn, id, b);
        }
        let draft = Draft {
            text: b.text,
            in_reply_to: b.in_reply_to,
            key: b.key,
        };
        let (scope, cwd, git_common_dir) = (b.scope, b.cwd, b.git_common_dir);
        self.submit(conn, id, b.from, draft, move |core, from| {
            let filter = core.scope_filter(conn, scope, cwd.as_ref(), git_common_dir.as_ref())?;
            let mut recipients: Vec<String> = core
                .online
                .keys()
                .filter(|n| **n != from && core.peers.get(*n).is_some_and(&filter))
                .cloned()
                .collect();
            if recipients.is_empty() {
                return Err(err(
                    ErrorCode::NoRecipients,
                    format!("no other peer is online in scope {scope:?}"),
                ));
            }
            if recipients.len() > core.limits.broadcast_limit {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "{} peers are in scope; a broadcast reaches at most {}. Narrow the scope",
                        recipients.len(),
                        core.limits.broadcast_limit
                    ),
                ));
            }
            recipients.sort();
            Ok(recipients)
        })
    }

    /// A send or broadcast: the sender is checked, a key it already used is answered with
    /// that message, else `recipients` says who gets it (or why no one can), and it is
    /// stored and delivered.
    pub(super) fn submit(
        &mut self,
        conn: ConnId,
        id: Option<u64>,
        from: Option<String>,
        draft: Draft,
        recipients: impl FnOnce(&Self, &str) -> Result<Vec<String>, ErrorBody>,
    ) -> Outcome {
        let from = match self.sender_name(conn, from) {
            Ok(from) => from,
            Err(e) => return Outcome::Answer(Err(e)),
        };
        if let Some(k) = &draft.key {
            match self.sent_before(&from, k) {
                Ok(Some(first)) => return Outcome::Answer(Ok(Reply::Sent(first))),
                Ok(None) => {}
                Err(e) => return Outcome::Answer(Err(e)),
            }
        }
        match recipients(self, &from) {
            Ok(recipients) => self.deliver_new(conn, id, from, recipients, draft),
            Err(e) => Outcome::Answer(Err(e)),
        }
    }

    /// The answer to a send that `from` already made under idempotency `key`, if it did:
    /// the same message id, and its recipients' states as they are now.
    pub(super) fn sent_before(&self, from: &str, key: &str) -> Result<Option<Sent>, ErrorBody> {
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
    pub(super) fn deliver_new(
        &mut self,
        conn: ConnId,
        request_id: Option<u64>,
        from: String,
        recipients: Vec<String>,
        draft: Draft,
    ) -> Outcome {
        let Draft {
            text,
            in_reply_to,
            key,
        } = draft;
        // Mail to another machine's session is relayed (its mailbox is checked there).
        let (remote, local): (Vec<&String>, Vec<&String>) =
            recipients.iter().partition(|r| r.contains('@'));
        let local: Vec<String> = local.into_iter().cloned().collect();
        if let Err(e) = self.check_mailboxes(&local) {
            return Outcome::Answer(Err(e));
        }
        let remote: Vec<&str> = remote.into_iter().map(String::as_str).collect();
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
            return Outcome::Answer(Err(self.failed_write(e)));
        }
        if !remote.is_empty()
            && let Err(e) = self.relay_out(&new, &remote)
        {
            return Outcome::Answer(Err(self.failed_write(e)));
        }
        let mut states = Vec::with_capacity(recipients.len());
        let mut unacked = HashSet::new();
        for r in &recipients {
            let state = match self.online.get(r).copied() {
                _ if remote.contains(&r.as_str()) => DeliveryState::Relaying,
                // A recipient that reads too slowly gets it later, from the store
                // (`drained`), in order after what waits before it.
                Some(to_conn) if !self.may_push(to_conn) => DeliveryState::Queued,
                Some(to_conn) => {
                    self.push_new(to_conn, r, &new);
                    if self.conns[&to_conn].push {
                        unacked.insert(r.clone());
                        DeliveryState::Pushed
                    } else {
                        DeliveryState::Queued
                    }
                }
                None => DeliveryState::Queued,
            };
            if state != DeliveryState::Relaying {
                *self.queued.entry(r.clone()).or_default() += 1;
            }
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
                state: if state == DeliveryState::Relaying {
                    state
                } else {
                    DeliveryState::Queued
                },
                delivered_at: None,
            });
        }
        let reply = Sent {
            message_id: id.clone(),
            sent_at,
            recipients: states,
        };
        if unacked.is_empty() || self.limits.ack_wait.is_zero() {
            return Outcome::Answer(Ok(Reply::Sent(reply)));
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
        Outcome::Deferred
    }

    /// Tells the subscribers that asked that session `name` came, went or changed.
    pub(super) fn peer_event(&mut self, name: &str, change: PeerChange) {
        let name = name.to_string();
        self.push_to_subscribers(
            |c| c.peer_events,
            || ServerFrame::peer(PeerEvent { name, change }),
        );
    }

    pub(super) fn log_event(&mut self, kind: LogEventKind, entry: impl FnOnce() -> LogEntry) {
        self.push_to_subscribers(
            |c| c.subscribed,
            || {
                ServerFrame::event(LogEvent {
                    kind,
                    entry: entry(),
                })
            },
        );
    }

    /// Pushes one frame, made only if someone wants it, to the subscribers `wants`. A
    /// subscriber that reads too slowly misses frames, and is told how many
    /// (`lagged`) before the next one it gets.
    fn push_to_subscribers(
        &mut self,
        wants: impl Fn(&super::Conn) -> bool,
        frame: impl FnOnce() -> ServerFrame<Reply>,
    ) {
        let subscribers: Vec<ConnId> = (self.conns.iter())
            .filter(|(_, c)| wants(c))
            .map(|(id, _)| *id)
            .collect();
        if subscribers.is_empty() {
            return;
        }
        let frame = frame();
        for s in subscribers {
            let c = self.conns.get_mut(&s).expect("a subscriber is connected");
            if !c.outq.has_room_for_push() {
                c.missed += 1;
                self.want_room(s);
                continue;
            }
            let missed = std::mem::take(&mut c.missed);
            if missed > 0 {
                self.emit(s, ServerFrame::lagged(missed));
            }
            self.emit(s, frame.clone());
        }
    }

    pub(super) fn ack(&mut self, conn: ConnId, a: Ack) -> Result<(), ErrorBody> {
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
            let subscribed = self.conns.values().any(|c| c.subscribed);
            if subscribed || self.network.is_some() {
                let entry = self.store.log_entry(&id, &name).map_err(internal)?;
                if let Some(entry) = entry {
                    // Mail from another machine: its sender's broker hears what became of it.
                    if entry.from.contains('@') {
                        self.receipt(&id, &entry.from, &name, a.state.into())
                            .map_err(|e| self.failed_write(e))?;
                    }
                    if subscribed {
                        self.log_event(LogEventKind::Delivered, || entry);
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers a waiting send with the states as they are now.
    pub(super) fn finish_awaiting(&mut self, id: &str) {
        let Some(mut w) = self.awaiting.remove(id) else {
            return;
        };
        for r in &mut w.reply.recipients {
            if w.unacked.contains(&r.name) && !self.online.contains_key(&r.name) {
                r.state = DeliveryState::Queued;
            }
        }
        // A send stored by an earlier batch: its answer stands whatever becomes of this one.
        let settled = !self.awaiting_in_batch.iter().any(|b| b == id);
        self.answer_as(w.conn, w.request_id, Ok(Reply::Sent(w.reply)), settled);
    }

    pub(super) fn log(&self, q: LogQuery) -> Result<LogReply, ErrorBody> {
        // 0 asks for none (`log -f -n 0`: only what comes next); the peer is checked even so.
        let limit = q.limit.unwrap_or(LOG_DEFAULT).min(LOG_MAX);
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
        if let Some(p) = &q.peer
            && messages.is_empty()
            && !self.peers.contains_key(p)
            && self
                .store
                .log(1, Some(p), None)
                .map_err(internal)?
                .is_empty()
        {
            // Nobody of that name, nor mail from or to it (`cli`, a --from name): a typo.
            return Err(self.unknown_peer(p));
        }
        messages.reverse();
        Ok(LogReply { messages, next })
    }
}
