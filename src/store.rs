//! The durable store: peers, messages and their per-recipient delivery state, in SQLite.
//!
//! Only the broker's core thread opens it. WAL journal with `synchronous=NORMAL`: a
//! committed transaction survives the death of any process (it is in the WAL file), and
//! only an OS crash or power loss can take the last few commits. The schema version lives
//! in `PRAGMA user_version`; [`MIGRATIONS`] brings any older file up to date.
//!
//! A message has one row in `messages` and one row per recipient in `deliveries`, whose
//! `state` is 0 (queued: not yet acked by the recipient), 1 (delivered), 2 (pushed on a
//! path that cannot confirm, never pushed again), 3 (held by the recipient session for
//! its user's approval; moves on to delivered or denied, or back to queued) or 4 (denied
//! by the recipient's user) or 5 (damaged: its message could not be read, put aside by
//! [`Store::quarantine`]). Only state 0 is pushed again on the next registration and
//! counts as unread.
//!
//! The schema is lean on purpose: every index costs page writes per send, and page writes
//! are what a send costs. Message ids are UUIDv7 stamped by the store's clock
//! (`broker::clock`, anchored in `meta`), which never goes back, so id order is the order
//! messages were stored in, whatever the wall clock did: the primary
//! key serves history (`log`) and retention (an id range) without more indexes. Three
//! secondary indexes: the queued deliveries (redelivery on reconnect), and messages by
//! sender and deliveries by recipient, so one peer's history (`log --peer`) costs the
//! same in a store of a million messages as in an empty one.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::protocol::{AckState, DeliveryState, LogEntry, Millis};

/// Schema steps; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE peers (
    name TEXT PRIMARY KEY NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    cwd TEXT NOT NULL,
    git_root TEXT,
    git_common_dir TEXT,
    branch TEXT,
    tty TEXT,
    host TEXT,
    summary TEXT NOT NULL DEFAULT '',
    client_name TEXT,
    client_version TEXT,
    push INTEGER NOT NULL DEFAULT 0,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE messages (
    id TEXT PRIMARY KEY NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    in_reply_to TEXT,
    sent_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE deliveries (
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    delivered_at INTEGER,
    PRIMARY KEY (message_id, recipient)
) WITHOUT ROWID;
CREATE INDEX deliveries_queued ON deliveries(recipient, message_id) WHERE state = 0;
"#,
    r#"
CREATE INDEX messages_by_sender ON messages(sender, id);
CREATE INDEX deliveries_by_recipient ON deliveries(recipient, message_id);
"#,
    r#"
CREATE INDEX deliveries_damaged ON deliveries(recipient) WHERE state = 5;
"#,
    r#"
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE messages ADD COLUMN key TEXT;
CREATE INDEX messages_by_key ON messages(key) WHERE key IS NOT NULL;
"#,
];

/// WAL size (in pages) past which the checkpointer makes writers wait so the WAL can
/// start over: about 16 MiB.
const WAL_RESTART_PAGES: i64 = 4096;
/// Longest a restart checkpoint waits for its turn; it holds writers back while it waits.
/// A restart is needed even after a passive checkpoint copied every page: under steady
/// writing the WAL did not start over by itself (the broker bench's sustained run grew it
/// to 184 MB when restarts were skipped then, against 23-25 MB with them). A 10 ms wait
/// also held it at 24 MB in one run, and would shorten the stall writers see after a
/// burst; it wants more measurement before it replaces this.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database {path}: {cause}. Check that the file is yours and not damaged, or point CLAUDE_PEERS_DB elsewhere"
    )]
    Open {
        path: String,
        // Not `source`: the message already shows it, and a source would be shown twice.
        cause: rusqlite::Error,
    },
    #[error(
        "database {path}: {cause}. Check that the path is a file of yours (not a symlink or a directory), or point CLAUDE_PEERS_DB elsewhere"
    )]
    File { path: String, cause: std::io::Error },
    #[error(
        "database {path} is locked by another process (a sqlite3 shell, a backup, or a broker of another CLAUDE_PEERS_HOME using the same CLAUDE_PEERS_DB); stop that process and try again, or point CLAUDE_PEERS_DB elsewhere"
    )]
    Locked { path: String },
    #[error(
        "database {path} has schema version {found}, newer than this claude-peers knows ({known}); upgrade claude-peers"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    /// SQLite ended the transaction by itself after an error (it does after some).
    #[error("the database rolled the transaction back after an error")]
    RolledBack,
}

impl StoreError {
    /// The write failed because the file system holding the database is full
    /// (`SQLITE_FULL`, or `ENOSPC` from a file of ours).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sql(e) | StoreError::Open { cause: e, .. } => {
                e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            StoreError::File { cause, .. } => cause.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    /// An error from opening the database at `path`: `Locked` when another process holds
    /// a lock on it, `Open` otherwise.
    fn opening(path: &str, e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Locked {
                    path: path.to_string(),
                }
            }
            _ => StoreError::Open {
                path: path.to_string(),
                cause: e,
            },
        }
    }
}

/// A peer's stored record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerRow {
    pub name: String,
    pub pid: u32,
    pub cwd: String,
    pub git_root: Option<String>,
    pub git_common_dir: Option<String>,
    pub branch: Option<String>,
    pub tty: Option<String>,
    pub host: Option<String>,
    pub summary: String,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    pub push: bool,
    pub first_seen: Millis,
    pub last_seen: Millis,
}

/// A stored message waiting for one recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub id: String,
    pub sender: String,
    pub text: String,
    pub in_reply_to: Option<String>,
    pub sent_at: Millis,
}

/// A message found by its idempotency key ([`Store::message_by_key`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Keyed {
    pub id: String,
    pub sender: String,
    pub sent_at: Millis,
    pub recipients: Vec<(String, DeliveryState)>,
}

/// What [`Store::pending_for`] found.
#[derive(Debug, Default)]
pub struct Pending {
    /// The readable messages, oldest first.
    pub rows: Vec<PendingRow>,
    /// The raw ids of those that could not be read.
    pub damaged: Vec<Vec<u8>>,
}

/// Where the store's clock stood at a moment of the boot clock (see
/// `broker::clock`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClockAnchor {
    /// The boot the reading was taken in; `None` where the OS does not say.
    pub boot_id: Option<String>,
    /// The boot clock then, in ms.
    pub boot_at: Millis,
    /// The store's time then.
    pub at: Millis,
}

/// A new message to write.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub id: &'a str,
    pub sender: &'a str,
    pub text: &'a str,
    pub in_reply_to: Option<&'a str>,
    pub sent_at: Millis,
    pub expires_at: Millis,
    /// The sender's idempotency key, if it gave one.
    pub key: Option<&'a str>,
}

/// What a retention sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub messages: u64,
    pub peers: u64,
}

pub struct Store {
    conn: Connection,
    /// Tells the checkpointer, if one runs, that a commit added to the WAL.
    wrote: Option<std::sync::mpsc::SyncSender<()>>,
    /// Rows changed by this connection up to the last commit: a commit that changed
    /// nothing (a batch of listings) wrote nothing to the WAL.
    changed: std::cell::Cell<u64>,
}

/// The thread that copies the WAL back into the database; see
/// [`Store::spawn_checkpointer`].
pub struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    /// Stops the thread and waits for it (at most one checkpoint).
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.wake.try_send(());
        let _ = self.thread.join();
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let open_err = |e| StoreError::opening(&shown, e);
        // Mail is private: the file is created 0600 before SQLite opens it (the WAL files
        // SQLite derives from it take its mode), never through a symlink, and one that
        // exists is closed to 0600.
        let file_err = |cause| StoreError::File {
            path: shown.clone(),
            cause,
        };
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(path)
                .map_err(file_err)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(file_err)?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        // Deleted mail does not linger in free pages, where writing zeros costs no extra I/O.
        conn.pragma_update(None, "secure_delete", "FAST")
            .map_err(open_err)?;
        // A locked database is an error after a short wait, never a hang.
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(open_err)?;
        // Checkpoints (which fsync) run on their own thread, see
        // [`Store::spawn_checkpointer`]: a commit is then a few writes to the WAL, never a
        // wait for the disk.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(open_err)?;
        // A WAL that a burst of writes grew is cut back to this size when it starts over.
        conn.pragma_update(None, "journal_size_limit", WAL_RESTART_PAGES * 4096)
            .map_err(open_err)?;
        let mut store = Self {
            conn,
            wrote: None,
            changed: std::cell::Cell::new(0),
        };
        store.migrate(&shown)?;
        // In WAL mode reading works while another process holds the write lock, and the
        // broker would only find out at its first write, stalling every batch. Take the
        // write lock once now, so such a database is an error at start.
        store
            .conn
            .execute_batch("BEGIN IMMEDIATE; COMMIT")
            .map_err(open_err)?;
        Ok(store)
    }

    /// Starts the thread that copies the WAL back into the database. It sleeps until a
    /// commit tells it the WAL grew (an idle broker wakes no thread), lets writes gather for
    /// 50 ms, then runs a passive checkpoint, which never blocks the writer. When steady
    /// writing has kept those from finishing and the WAL has passed [`WAL_RESTART_PAGES`],
    /// it runs a restart checkpoint, which briefly holds writers so the WAL can start over
    /// small.
    pub fn spawn_checkpointer(&mut self, path: &Path) -> Result<Checkpointer, StoreError> {
        use std::sync::atomic::Ordering;
        use std::sync::mpsc::RecvTimeoutError;
        let conn = Connection::open(path)
            .map_err(|e| StoreError::opening(&path.display().to_string(), e))?;
        conn.busy_timeout(RESTART_WAIT)?;
        // One pending wake is enough: commits while one is pending add nothing.
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let gather = std::time::Duration::from_millis(50);
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() && !stopping.load(Ordering::Relaxed) {
                    let until = std::time::Instant::now() + gather;
                    loop {
                        let left = until.saturating_duration_since(std::time::Instant::now());
                        match woken.recv_timeout(left) {
                            Ok(()) if !stopping.load(Ordering::Relaxed) => {}
                            Err(RecvTimeoutError::Timeout) => break,
                            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    let checkpoint = |mode: &str| {
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                            r.get::<_, i64>(1)
                        })
                    };
                    match checkpoint("PASSIVE") {
                        Ok(pages) if pages > WAL_RESTART_PAGES => {
                            if let Err(e) = checkpoint("RESTART") {
                                tracing::warn!("checkpoint failed: {e}");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("checkpoint failed: {e}"),
                    }
                }
            })
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                cause: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        self.wrote = Some(wake.clone());
        Ok(Checkpointer { wake, stop, thread })
    }

    fn migrate(&mut self, shown: &str) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| StoreError::opening(shown, e))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: shown.to_string(),
                found: version,
                known,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Starts a write transaction. The core groups everything it handles in one wake-up
    /// into one transaction, so many sends share one commit.
    pub fn begin(&self) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    pub fn commit(&self) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        let changed = self.conn.total_changes();
        if changed != self.changed.replace(changed)
            && let Some(wrote) = &self.wrote
        {
            // Full means a wake is already pending, which covers this commit too.
            let _ = wrote.try_send(());
        }
        Ok(())
    }

    /// Whether a transaction is open (`begin` and not yet committed or rolled back, by
    /// us or by SQLite).
    pub fn in_transaction(&self) -> bool {
        !self.conn.is_autocommit()
    }

    pub fn rollback(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    pub fn load_peers(&self) -> Result<Vec<PeerRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, pid, cwd, git_root, git_common_dir, branch, tty, host, summary,
                    client_name, client_version, push, first_seen, last_seen FROM peers",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(PeerRow {
                name: r.get(0)?,
                pid: r.get(1)?,
                cwd: r.get(2)?,
                git_root: r.get(3)?,
                git_common_dir: r.get(4)?,
                branch: r.get(5)?,
                tty: r.get(6)?,
                host: r.get(7)?,
                summary: r.get(8)?,
                client_name: r.get(9)?,
                client_version: r.get(10)?,
                push: r.get(11)?,
                first_seen: r.get(12)?,
                last_seen: r.get(13)?,
            })
        })?;
        // A peer row that cannot be read (a damaged file) is skipped, not fatal: the
        // broker must start, and the peer comes back when its session registers.
        Ok(rows
            .filter_map(|r| {
                r.map_err(|e| tracing::warn!("skipping a damaged peer row: {e}"))
                    .ok()
            })
            .collect())
    }

    pub fn upsert_peer(&self, p: &PeerRow) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO peers (name, pid, cwd, git_root, git_common_dir, branch, tty, host,
                    summary, client_name, client_version, push, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT(name) DO UPDATE SET pid = ?2, cwd = ?3, git_root = ?4,
                    git_common_dir = ?5, branch = ?6, tty = ?7, host = ?8, summary = ?9,
                    client_name = ?10, client_version = ?11, push = ?12, last_seen = ?14",
            )?
            .execute(params![
                p.name,
                p.pid,
                p.cwd,
                p.git_root,
                p.git_common_dir,
                p.branch,
                p.tty,
                p.host,
                p.summary,
                p.client_name,
                p.client_version,
                p.push,
                p.first_seen,
                p.last_seen
            ])?;
        Ok(())
    }

    pub fn touch_peer(&self, name: &str, last_seen: Millis) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE peers SET last_seen = ?2 WHERE name = ?1")?
            .execute(params![name, last_seen])?;
        Ok(())
    }

    pub fn set_summary(&self, name: &str, summary: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE peers SET summary = ?2 WHERE name = ?1")?
            .execute(params![name, summary])?;
        Ok(())
    }

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

    /// The store clock's anchor, if one was saved.
    pub fn clock_anchor(&self) -> Result<Option<ClockAnchor>, StoreError> {
        let get = |key: &str| -> Result<Option<rusqlite::types::Value>, StoreError> {
            Ok(self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        };
        use rusqlite::types::Value;
        let (Some(Value::Integer(boot_at)), Some(Value::Integer(at))) =
            (get("clock_boot_at")?, get("clock_at")?)
        else {
            return Ok(None);
        };
        let boot_id = match get("clock_boot_id")? {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        };
        Ok(Some(ClockAnchor {
            boot_id,
            boot_at,
            at,
        }))
    }

    pub fn set_clock_anchor(&self, a: &ClockAnchor) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut put = tx.prepare("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        put.execute(params!["clock_boot_id", a.boot_id])?;
        put.execute(params!["clock_boot_at", a.boot_at])?;
        put.execute(params!["clock_at", a.at])?;
        drop(put);
        tx.commit()?;
        Ok(())
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
}

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
fn id_floor(ms: Millis) -> String {
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
        _ => DeliveryState::Queued,
    }
}

/// The time in a UUIDv7 id, in ms.
fn id_millis(id: &str) -> Option<Millis> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn id_floor_orders_like_uuid_v7() {
        let at = 1_700_000_000_123;
        let earlier = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            (at / 1000 - 1) as u64,
            0,
        ))
        .to_string();
        let later = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            (at / 1000 + 1) as u64,
            0,
        ))
        .to_string();
        assert!(earlier < id_floor(at), "{earlier} < {}", id_floor(at));
        assert!(later > id_floor(at), "{later} > {}", id_floor(at));
    }

    fn msg<'a>(id: &'a str, text: &'a str, sent_at: Millis) -> NewMessage<'a> {
        NewMessage {
            key: None,
            id,
            sender: "a",
            text,
            in_reply_to: None,
            sent_at,
            expires_at: sent_at + 1000,
        }
    }

    #[test]
    fn delivery_state_moves_once() {
        let (_d, s) = store();
        s.insert_message(&msg("m1", "hi", 10), &["b", "c"]).unwrap();
        assert_eq!(s.pending_for("b", None, 100).unwrap().rows.len(), 1);
        assert_eq!(s.queued_counts().unwrap()["c"], 1);
        assert!(s.mark_delivered("m1", "b", 11).unwrap());
        assert!(
            !s.mark_delivered("m1", "b", 12).unwrap(),
            "second ack changes nothing"
        );
        assert!(!s.mark_delivered("m1", "x", 12).unwrap(), "not x's message");
        assert!(s.pending_for("b", None, 100).unwrap().rows.is_empty());
        assert_eq!(s.pending_for("c", None, 100).unwrap().rows[0].text, "hi");
        let log = s.log(10, None, None).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            log.iter()
                .filter(|e| e.state == DeliveryState::Delivered)
                .count(),
            1
        );
        assert_eq!(s.log(10, Some("c"), None).unwrap().len(), 1);
        assert_eq!(s.log(10, Some("a"), None).unwrap().len(), 2);
    }

    #[test]
    fn held_moves_on_to_delivered_and_pushed_stays() {
        let (_d, s) = store();
        s.insert_message(&msg("m1", "hi", 10), &["b", "c"]).unwrap();
        let held = s.mark("m1", "b", AckState::Held, 11).unwrap();
        assert_eq!(held, Some(Marked::FromQueued));
        assert_eq!(s.mark("m1", "b", AckState::Held, 12).unwrap(), None);
        assert_eq!(s.mark("m1", "b", AckState::Pushed, 12).unwrap(), None);
        assert!(
            s.pending_for("b", None, 100).unwrap().rows.is_empty(),
            "held is not pushed again"
        );
        assert_eq!(
            s.log_entry("m1", "b").unwrap().unwrap().state,
            DeliveryState::Held
        );
        let on = s.mark("m1", "b", AckState::Delivered, 13).unwrap();
        assert_eq!(on, Some(Marked::FromHeld));
        assert_eq!(
            s.log_entry("m1", "b").unwrap().unwrap().state,
            DeliveryState::Delivered
        );
        assert_eq!(s.mark("m1", "b", AckState::Delivered, 14).unwrap(), None);

        let pushed = s.mark("m1", "c", AckState::Pushed, 11).unwrap();
        assert_eq!(pushed, Some(Marked::FromQueued));
        assert!(
            s.pending_for("c", None, 100).unwrap().rows.is_empty(),
            "pushed is not pushed again"
        );
        assert_eq!(s.mark("m1", "c", AckState::Delivered, 12).unwrap(), None);
        assert_eq!(
            s.log_entry("m1", "c").unwrap().unwrap().state,
            DeliveryState::Pushed
        );
        assert!(s.queued_counts().unwrap().is_empty());

        // Held, then let go unshown: queued again; held, then declined: denied for good.
        s.insert_message(&msg("m2", "again", 20), &["b"]).unwrap();
        s.mark("m2", "b", AckState::Held, 21).unwrap();
        let back = s.mark("m2", "b", AckState::Returned, 22).unwrap();
        assert_eq!(back, Some(Marked::Requeued));
        assert_eq!(s.pending_for("b", None, 100).unwrap().rows[0].id, "m2");
        assert_eq!(s.mark("m2", "b", AckState::Returned, 23).unwrap(), None);
        s.mark("m2", "b", AckState::Held, 24).unwrap();
        let no = s.mark("m2", "b", AckState::Denied, 25).unwrap();
        assert_eq!(no, Some(Marked::FromHeld));
        assert_eq!(
            s.log_entry("m2", "b").unwrap().unwrap().state,
            DeliveryState::Denied
        );
        assert_eq!(s.mark("m2", "b", AckState::Delivered, 26).unwrap(), None);
        assert!(s.pending_for("b", None, 100).unwrap().rows.is_empty());

        // Delivered, then a late word from the session: held, or dropped (queued again),
        // within the grace; after it, delivered is final.
        s.insert_message(&msg("m3", "late", 30), &["b"]).unwrap();
        s.mark("m3", "b", AckState::Delivered, 1_000).unwrap();
        let held = s.mark("m3", "b", AckState::Held, 2_000).unwrap();
        assert_eq!(held, Some(Marked::FromHeld));
        s.mark("m3", "b", AckState::Delivered, 3_000).unwrap();
        let back = s.mark("m3", "b", AckState::Returned, 4_000).unwrap();
        assert_eq!(back, Some(Marked::Requeued));
        assert_eq!(s.pending_for("b", None, 100).unwrap().rows[0].id, "m3");
        s.mark("m3", "b", AckState::Delivered, 5_000).unwrap();
        let too_late = 5_000 + REOPEN_GRACE + 1;
        assert_eq!(
            s.mark("m3", "b", AckState::Returned, too_late).unwrap(),
            None
        );
        assert_eq!(s.mark("m3", "b", AckState::Held, too_late).unwrap(), None);
        assert_eq!(
            s.log_entry("m3", "b").unwrap().unwrap().state,
            DeliveryState::Delivered
        );
    }

    #[test]
    fn sweep_expires_mail_and_forgets_idle_peers() {
        let (_d, s) = store();
        for name in ["old", "busy", "online"] {
            s.upsert_peer(&PeerRow {
                name: name.into(),
                cwd: "/".into(),
                first_seen: 0,
                last_seen: 0,
                ..Default::default()
            })
            .unwrap();
        }
        let old_id = format!("{}-7000-8000-000000000001", id_floor(0));
        let fresh_id = format!("{}-7000-8000-000000000002", id_floor(5000));
        s.insert_message(&msg(&old_id, "expired", 0), &["old"])
            .unwrap();
        s.insert_message(&msg(&fresh_id, "fresh", 5000), &["busy"])
            .unwrap();
        let swept = s.sweep(2000, 2000, 100, &|n| n == "online", 1000).unwrap();
        assert_eq!(
            swept,
            Swept {
                messages: 1,
                peers: 1
            }
        );
        let names: Vec<_> = s
            .load_peers()
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(names.contains(&"busy".to_string()) && names.contains(&"online".to_string()));
        assert_eq!(s.pending_for("busy", None, 100).unwrap().rows.len(), 1);
    }

    #[test]
    fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        Store::open(&path)
            .unwrap()
            .insert_message(&msg("m1", "x", 1), &["b"])
            .unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(s.log_entry("m1", "b").unwrap().unwrap().text, "x");
        s.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { .. })));
    }
}
