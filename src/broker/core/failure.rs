//! When a batch cannot be saved: its answers become errors that say so (`disk_full` when
//! the disk is full), what it pushed is withheld and pushed again from the store, and the
//! mirrors of the store are read again.

use super::*;

impl Core {
    /// Without a transaction no request may run: each write would commit on its own, and
    /// the error answer ("nothing was saved, try again") would be false, so a retry would
    /// store the message twice. Requests are answered `internal`; connections still come
    /// and go (a peer that leaves is offline even if its `last_seen` cannot be written).
    pub(super) fn refuse_batch(&mut self, batch: &mut Vec<Command>, e: &StoreError) {
        let refusal = self.write_failed(e);
        for cmd in batch.drain(..) {
            match cmd {
                // What needs no write is served as usual: above all, `stop` still works
                // while the database fails.
                Command::Request { ref request, .. } if writes_nothing(request) => self.handle(cmd),
                Command::Request { conn, id, request } => {
                    // An ack without an id is never answered; unstored, it is simply
                    // delivered again later.
                    let unanswered = id.is_none() && matches!(*request, Request::Ack(_));
                    if self.conns.contains_key(&conn) && !unanswered {
                        self.answer(conn, id, Err(refusal.clone()));
                    }
                }
                // Refused: JetStream hands it over again (a nak).
                Command::Relayed { .. } => {}
                // Its row is removed by the next batch.
                Command::Published { seq } => self.published_retry.push(seq),
                // A network broadcast would store its message without a transaction: it
                // is refused as any send; a listing only reads.
                Command::Gathered { token, replies } => {
                    if let Some((conn, id, network::Gather::Broadcast(_))) =
                        self.gathers.get(&token).map(|(c, i, g)| (*c, *i, g))
                    {
                        self.gathers.remove(&token);
                        self.answer(conn, id, Err(refusal.clone()));
                    } else {
                        self.gathered(token, replies);
                    }
                }
                // Pushing from the store reads only; handled now (deferring it could keep
                // the core busy with it while the database refuses every batch).
                other => self.handle(other),
            }
        }
    }

    /// After a failed commit nothing of the batch is durable: answers become errors and
    /// deliveries and log events are withheld.
    pub(super) fn fail_effects(&mut self, e: &StoreError) {
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
    pub(super) fn write_failed(&self, e: &StoreError) -> ErrorBody {
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
    pub(super) fn failed_write(&mut self, e: StoreError) -> ErrorBody {
        tracing::error!("store: {e}");
        let refusal = self.write_failed(&e);
        self.batch_error.get_or_insert(e);
        refusal
    }

    /// Rebuilds the mirrors from the store after a failed commit.
    pub(super) fn reload(&mut self) {
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
}
