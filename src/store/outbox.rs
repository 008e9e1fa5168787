//! The NATS outbox: publications (mail to sessions on other machines, receipts for mail
//! from them) written in the same transaction as the change they tell of, and removed
//! once JetStream acknowledged them. A send answered with success is relayed even if NATS
//! was down then, or the broker died before it could publish.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

/// `deliveries.state` of mail to another machine's session that its broker has not yet
/// confirmed.
pub const RELAYING: i64 = 6;
/// `deliveries.state` of mail another machine's broker had no session for.
pub const UNDELIVERABLE: i64 = 7;
/// `deliveries.state` of mail stored by another machine's broker and not yet read there
/// (not 0: this machine's queued mail is counted and redelivered by state 0).
pub const QUEUED_THERE: i64 = 8;

/// One publication waiting for JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub subject: String,
    /// JetStream's deduplication id (`Nats-Msg-Id`).
    pub msg_id: String,
    pub payload: Vec<u8>,
}

impl Store {
    /// Adds a publication; returns it with its sequence number.
    pub fn outbox_push(
        &self,
        subject: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> Result<OutboxRow, StoreError> {
        self.conn
            .prepare_cached("INSERT INTO outbox (subject, msg_id, payload) VALUES (?1, ?2, ?3)")?
            .execute(params![subject, msg_id, payload])?;
        Ok(OutboxRow {
            seq: self.conn.last_insert_rowid(),
            subject: subject.to_string(),
            msg_id: msg_id.to_string(),
            payload: payload.to_vec(),
        })
    }

    /// Every publication still waiting, oldest first.
    pub fn outbox_all(&self) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, subject, msg_id, payload FROM outbox ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok(OutboxRow {
                seq: r.get(0)?,
                subject: r.get(1)?,
                msg_id: r.get(2)?,
                payload: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// JetStream has publication `seq`.
    pub fn outbox_done(&self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
            .execute([seq])?;
        Ok(())
    }

    /// How many publications wait.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT count(*) FROM outbox")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Whether message `id` is stored (mail relayed twice is stored once).
    pub fn has_message(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM messages WHERE id = ?1")?
            .query_row([id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Sets the state of a delivery to another machine's session, as its broker reported
    /// it at `at` (its clock): `code` a `deliveries.state`, `acked` whether it is an ack's
    /// (then `delivered_at` is `at`). A report older than the last one applied is passed
    /// over (receipts may come again, or out of order). False when nothing changed.
    pub fn set_delivery_state(
        &self,
        id: &str,
        recipient: &str,
        code: i64,
        at: i64,
        acked: bool,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE deliveries SET state = ?3, remote_at = ?4,
                    delivered_at = CASE WHEN ?5 THEN ?4 ELSE delivered_at END
                 WHERE message_id = ?1 AND recipient = ?2
                   AND (remote_at IS NULL OR remote_at <= ?4)",
            )?
            .execute(params![id, recipient, code, at, acked])?;
        Ok(n > 0)
    }

    /// Marks a delivery to another machine's session as on its way there.
    pub fn set_relaying(&self, id: &str, recipient: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE deliveries SET state = ?3 WHERE message_id = ?1 AND recipient = ?2",
            )?
            .execute(params![id, recipient, RELAYING])?;
        Ok(())
    }
}
