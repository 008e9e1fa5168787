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

use std::path::Path;

use rusqlite::Connection;

use crate::protocol::{DeliveryState, Millis, PeerContext};

mod mail;
mod outbox;
mod peers;
#[cfg(test)]
mod tests;

pub use mail::{Marked, REOPEN_GRACE};
pub use outbox::{OutboxRow, QUEUED_THERE, RELAYING, UNDELIVERABLE};

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
    // What waits to be published to NATS (mail to other machines, receipts for theirs),
    // written in the transaction of the change it tells of, removed once JetStream has it.
    r#"
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    payload BLOB NOT NULL
);
"#,
    r#"
ALTER TABLE peers ADD COLUMN git_remote TEXT;
ALTER TABLE deliveries ADD COLUMN remote_at INTEGER;
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
    pub context: PeerContext,
    pub summary: String,
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
        use std::sync::mpsc::TryRecvError;
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
                    // Sleep through the gathering, not wait on the channel: a waiting
                    // thread is woken by every commit's notice (issue 16 measured 2 of
                    // the broker's 8 wake-ups per message there, ~30 us each on this VM);
                    // a sleeping one leaves the one notice pending and the rest are
                    // dropped without a syscall.
                    std::thread::sleep(gather);
                    match woken.try_recv() {
                        Ok(()) | Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => return,
                    }
                    if stopping.load(Ordering::Relaxed) {
                        return;
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
        // Prepared once: parsing the statement again was a visible part of every batch.
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(())
    }

    pub fn commit(&self) -> Result<(), StoreError> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
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
}
