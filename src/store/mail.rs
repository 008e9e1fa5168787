//! Messages and their deliveries: storing, acks and their states, what is queued (read
//! row by row, damaged rows put aside), history, idempotency keys, retention.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, params};

use super::{Keyed, NewMessage, Pending, PendingRow, Store, StoreError, Swept};
use crate::protocol::{AckState, DeliveryState, LogEntry, Millis};

/// How long after a delivery was acked delivered a late receipt may still move it to
/// held or back to the queue (Claude Code tells of a drop up to seconds late).
pub const REOPEN_GRACE: Millis = 30_000;

/// Where a delivery moved from, when [`Store::mark`] moved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// It was queued: one fewer unread message for the recipient.
    FromQueued,
    /// It was held and is now delivered or denied, or it was delivered a moment ago and
    /// is held after all: the unread count does not change.
    FromHeld,
    /// It was held (or delivered a moment ago) and is queued again: one more unread
    /// message.
    Requeued,
}

/// The `deliveries.state` code of an acked state.
fn state_code(s: AckState) -> i64 {
    match s {
        AckState::Delivered => 1,
        AckState::Pushed => 2,
        AckState::Held => 3,
        AckState::Denied => 4,
        AckState::Returned => 0,
    }
}

/// The smallest UUIDv7 string of a message sent at `ms`: ids sort by time, so every
/// message sent earlier has a smaller id.
pub(super) fn id_floor(ms: Millis) -> String {
    let ms = ms.max(0) as u64;
    format!("{:08x}-{:04x}", (ms >> 16) & 0xffff_ffff, ms & 0xffff)
}

/// The state a `deliveries.state` code stands for.
fn delivery_state(code: i64) -> DeliveryState {
    match code {
        1 => DeliveryState::Delivered,
        2 => DeliveryState::Pushed,
        3 => DeliveryState::Held,
        4 => DeliveryState::Denied,
        5 => DeliveryState::Damaged,
        super::RELAYING => DeliveryState::Relaying,
        super::UNDELIVERABLE => DeliveryState::Undeliverable,
        super::QUEUED_THERE => DeliveryState::Queued,
        _ => DeliveryState::Queued,
    }
}

/// The time in a UUIDv7 id, in ms.
pub(super) fn id_millis(id: &str) -> Option<Millis> {
    let (secs, nanos) = uuid::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    Some(secs as Millis * 1000 + Millis::from(nanos) / 1_000_000)
}

/// Reads a row of the columns `id, sender, recipient, text, in_reply_to, sent_at, state,
/// delivered_at`. History is read leniently: a field that is not valid UTF-8 or has the
/// wrong type (a damaged row) is shown as well as it can be, with U+FFFD for bad bytes,
/// so one damaged row never hides the rest.
fn log_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogEntry> {
    Ok(LogEntry {
        id: lossy(r, 0)?,
        from: lossy(r, 1)?,
        to: lossy(r, 2)?,
        text: lossy(r, 3)?,
        in_reply_to: match r.get_ref(4)? {
            rusqlite::types::ValueRef::Null => None,
            _ => Some(lossy(r, 4)?),
        },
        sent_at: r.get(5).unwrap_or(0),
        state: delivery_state(r.get(6).unwrap_or(0)),
        delivered_at: r.get(7).unwrap_or(None),
    })
}

/// Column `i` as text, whatever it holds.
fn lossy(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<String> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Text(b) | ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(x) => x.to_string(),
        ValueRef::Null => String::new(),
    })
}

impl Store {
    /// Writes a message and a queued delivery for each recipient.
    pub fn insert_message(
        &self,
        m: &NewMessage<'_>,
        recipients: &[&str],
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO messages (id, sender, text, in_reply_to, sent_at, expires_at, key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                m.id,
                m.sender,
                m.text,
                m.in_reply_to,
                m.sent_at,
                m.expires_at,
                m.key
            ])?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO deliveries (message_id, recipient, state) VALUES (?1, ?2, 0)",
        )?;
        for r in recipients {
            stmt.execute(params![m.id, r])?;
        }
        Ok(())
    }

    /// The message stored under idempotency `key`, with its recipients' states now.
    pub fn message_by_key(&self, key: &str) -> Result<Option<Keyed>, StoreError> {
        let found: Option<(String, String, Millis)> = self
            .conn
            .prepare_cached("SELECT id, sender, sent_at FROM messages WHERE key = ?1")?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((id, sender, sent_at)) = found else {
            return Ok(None);
        };
        let recipients = self
            .conn
            .prepare_cached(
                "SELECT recipient, state FROM deliveries WHERE message_id = ?1 ORDER BY recipient",
            )?
            .query_map([&id], |r| Ok((r.get(0)?, delivery_state(r.get(1)?))))?
            .collect::<Result<_, _>>()?;
        Ok(Some(Keyed {
            id,
            sender,
            sent_at,
            recipients,
        }))
    }

    /// Marks one delivery acked. Returns false when there was nothing queued to mark
    /// (unknown id, another recipient's message, or already delivered).
    pub fn mark_delivered(
        &self,
        id: &str,
        recipient: &str,
        at: Millis,
    ) -> Result<bool, StoreError> {
        Ok(self.mark(id, recipient, AckState::Delivered, at)? == Some(Marked::FromQueued))
    }

    /// Moves one delivery to the state an ack confirms: from queued to delivered, pushed,
    /// held or denied; from held on to delivered or denied, or back to queued
    /// ([`AckState::Returned`]). `None` when there was nothing to move (unknown id,
    /// another recipient's message, or a state that does not move that way).
    pub fn mark(
        &self,
        id: &str,
        recipient: &str,
        to: AckState,
        at: Millis,
    ) -> Result<Option<Marked>, StoreError> {
        let update = |code: i64, from: i64| -> Result<bool, StoreError> {
            let n = self
                .conn
                .prepare_cached(
                    "UPDATE deliveries SET state = ?3, delivered_at = ?4
                     WHERE recipient = ?2 AND message_id = ?1 AND state = ?5",
                )?
                .execute(params![id, recipient, code, at, from])?;
            Ok(n == 1)
        };
        // A session may say late that it held or dropped what it seemed to take: a
        // delivery acked delivered within `REOPEN_GRACE` may still move to held or back
        // to the queue, never later.
        let reopen = |code: i64| -> Result<bool, StoreError> {
            let n = self
                .conn
                .prepare_cached(
                    "UPDATE deliveries SET state = ?3, delivered_at = ?4
                     WHERE recipient = ?2 AND message_id = ?1 AND state = 1
                       AND delivered_at >= ?5",
                )?
                .execute(params![
                    id,
                    recipient,
                    code,
                    if code == 0 { None } else { Some(at) },
                    at - REOPEN_GRACE
                ])?;
            Ok(n == 1)
        };
        if to == AckState::Returned {
            let n = self
                .conn
                .prepare_cached(
                    "UPDATE deliveries SET state = 0, delivered_at = NULL
                     WHERE recipient = ?2 AND message_id = ?1 AND state = 3",
                )?
                .execute(params![id, recipient])?;
            if n == 1 || reopen(0)? {
                return Ok(Some(Marked::Requeued));
            }
            return Ok(None);
        }
        let code = state_code(to);
        if update(code, 0)? {
            return Ok(Some(Marked::FromQueued));
        }
        if matches!(to, AckState::Delivered | AckState::Denied) && update(code, 3)? {
            return Ok(Some(Marked::FromHeld));
        }
        if to == AckState::Held && reopen(3)? {
            return Ok(Some(Marked::FromHeld));
        }
        Ok(None)
    }

    /// Up to `limit` queued messages for `recipient` with ids after `after`, oldest first.
    /// Read row by row: a row that cannot
    /// be read (text that is not UTF-8, a field of the wrong type: a damaged file or a
    /// foreign write) does not hold up the others; its raw message id is returned in
    /// [`Pending::damaged`], for [`Store::quarantine`].
    pub fn pending_for(
        &self,
        recipient: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Pending, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT CAST(d.message_id AS BLOB), m.id, m.sender, m.text, m.in_reply_to, m.sent_at
             FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE d.recipient = ?1 AND d.state = 0 AND d.message_id > ?2
             ORDER BY d.message_id LIMIT ?3",
        )?;
        let mut out = Pending::default();
        let mut rows = stmt.query(params![recipient, after.unwrap_or(""), limit])?;
        while let Some(r) = rows.next()? {
            let row = (|| {
                Ok::<_, rusqlite::Error>(PendingRow {
                    id: r.get(1)?,
                    sender: r.get(2)?,
                    text: r.get(3)?,
                    in_reply_to: r.get(4)?,
                    sent_at: r.get(5)?,
                })
            })();
            match row {
                Ok(row) => out.rows.push(row),
                Err(_) => out.damaged.push(r.get(0).unwrap_or_default()),
            }
        }
        Ok(out)
    }

    /// Puts aside a delivery whose stored message cannot be read (state 5): it is no
    /// longer pushed or counted unread, `status` counts it, and retention removes it like
    /// any other. `raw_id` is the message id's bytes as [`Store::pending_for`] gave them.
    /// Returns whether a queued delivery was moved.
    pub fn quarantine(&self, recipient: &str, raw_id: &[u8]) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE deliveries SET state = 5
                 WHERE recipient = ?1 AND state = 0 AND CAST(message_id AS BLOB) = ?2",
            )?
            .execute(params![recipient, raw_id])?;
        Ok(n > 0)
    }

    /// Number of deliveries put aside by [`Store::quarantine`].
    pub fn quarantined(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM deliveries WHERE state = 5", [], |r| {
                r.get(0)
            })?)
    }

    /// Number of queued deliveries per recipient.
    pub fn queued_counts(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT recipient, COUNT(*) FROM deliveries WHERE state = 0 GROUP BY recipient",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest `limit` deliveries, optionally only those from or to `peer`, and only
    /// those before `before` (a message id and recipient, in history's order: by id, then
    /// by recipient), newest first.
    pub fn log(
        &self,
        limit: u32,
        peer: Option<&str>,
        before: Option<(&str, &str)>,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let map = log_row;
        const COLS: &str = "m.id, m.sender, d.recipient, m.text, m.in_reply_to, m.sent_at, d.state, d.delivered_at";
        // Without a cursor, from past every id ('~' sorts after hex digits and '-').
        let (upto, after_recipient) = before.unwrap_or(("~", ""));
        Ok(match peer {
            None => {
                let sql = format!(
                    "SELECT {COLS} FROM messages m JOIN deliveries d ON d.message_id = m.id
                     WHERE m.id <= ?2 AND NOT (m.id = ?2 AND d.recipient <= ?3)
                     ORDER BY m.id DESC, d.recipient LIMIT ?1"
                );
                let mut stmt = self.conn.prepare_cached(&sql)?;
                stmt.query_map(params![limit, upto, after_recipient], map)?
                    .collect::<Result<_, _>>()?
            }
            Some(peer) => {
                // The newest `limit` messages the peer sent and the newest `limit` it was
                // sent, each read from its own index; the answer is among them (one more,
                // for the cursor's own message, part of which came before).
                let sql = format!(
                    "SELECT {COLS} FROM messages m JOIN deliveries d ON d.message_id = m.id
                     WHERE m.id IN (
                         SELECT id FROM (SELECT id FROM messages WHERE sender = ?1 AND id <= ?3
                                         ORDER BY id DESC LIMIT ?2 + 1)
                         UNION
                         SELECT message_id FROM (SELECT message_id FROM deliveries
                                                 WHERE recipient = ?1 AND message_id <= ?3
                                                 ORDER BY message_id DESC LIMIT ?2 + 1))
                       AND (m.sender = ?1 OR d.recipient = ?1)
                       AND NOT (m.id = ?3 AND d.recipient <= ?4)
                     ORDER BY m.id DESC, d.recipient LIMIT ?2"
                );
                let mut stmt = self.conn.prepare_cached(&sql)?;
                stmt.query_map(params![peer, limit, upto, after_recipient], map)?
                    .collect::<Result<_, _>>()?
            }
        })
    }

    /// One message to one recipient, as history.
    pub fn log_entry(&self, id: &str, recipient: &str) -> Result<Option<LogEntry>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT m.id, m.sender, d.recipient, m.text, m.in_reply_to, m.sent_at, d.state,
                        d.delivered_at
                 FROM deliveries d JOIN messages m ON m.id = d.message_id
                 WHERE d.recipient = ?2 AND d.message_id = ?1",
            )?
            .query_row([id, recipient], log_row)
            .optional()?)
    }

    /// Removes up to `batch` of the oldest messages sent before `sent_before` whose expiry
    /// has passed by `now` (delivered or not; both times on the store clock that stamped
    /// ids and expiries), and peers last seen before `peers_before` that have
    /// no queued mail, except those `keep` names. A sweep that removed `batch` messages
    /// may have left more: call it again, after serving whatever else is waiting.
    pub fn sweep(
        &self,
        now: Millis,
        sent_before: Millis,
        peers_before: Millis,
        keep: &dyn Fn(&str) -> bool,
        batch: u32,
    ) -> Result<Swept, StoreError> {
        let cutoff = id_floor(sent_before);
        let expired: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT id FROM messages WHERE id < ?1 AND expires_at <= ?2 ORDER BY id LIMIT ?3",
            )?
            .query_map(params![cutoff, now, batch], |r| r.get(0))?
            // An id that is not text (a damaged row) cannot bound the range; the range
            // between readable ids still covers it.
            .filter_map(Result::ok)
            .collect();
        let mut messages = 0;
        if let (Some(first), Some(last)) = (expired.first(), expired.last()) {
            let tx = self.conn.unchecked_transaction()?;
            tx.execute(
                "DELETE FROM deliveries WHERE message_id BETWEEN ?1 AND ?2 AND message_id IN
                   (SELECT id FROM messages WHERE id BETWEEN ?1 AND ?2 AND expires_at <= ?3)",
                params![first, last, now],
            )?;
            messages = tx.execute(
                "DELETE FROM messages WHERE id BETWEEN ?1 AND ?2 AND expires_at <= ?3",
                params![first, last, now],
            )? as u64;
            tx.commit()?;
        }
        let stale: Vec<String> = {
            let mut stmt = self.conn.prepare(
                "SELECT name FROM peers WHERE last_seen < ?1 AND NOT EXISTS
                   (SELECT 1 FROM deliveries d WHERE d.recipient = peers.name AND d.state = 0)",
            )?;
            stmt.query_map([peers_before], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut peers = 0;
        for name in stale.iter().filter(|n| !keep(n)) {
            peers += self
                .conn
                .execute("DELETE FROM peers WHERE name = ?1", [name])? as u64;
        }
        Ok(Swept { messages, peers })
    }

    /// The time in the newest message's id.
    pub fn newest_message_ms(&self) -> Result<Option<Millis>, StoreError> {
        let newest: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT CAST(id AS BLOB) FROM messages WHERE typeof(id) = 'text'
                 ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(newest.and_then(|id| id_millis(&String::from_utf8_lossy(&id))))
    }
}
