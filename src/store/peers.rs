//! Peers, and the store clock's anchor in `meta`.

use rusqlite::{OptionalExtension, params};

use super::{ClockAnchor, PeerRow, Store, StoreError};
use crate::protocol::{Millis, PeerContext};

impl Store {
    pub fn load_peers(&self) -> Result<Vec<PeerRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, pid, cwd, git_root, git_common_dir, branch, tty, host, summary,
                    client_name, client_version, push, first_seen, last_seen, git_remote
             FROM peers",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(PeerRow {
                name: r.get(0)?,
                context: PeerContext {
                    pid: r.get(1)?,
                    cwd: r.get(2)?,
                    git_root: r.get(3)?,
                    git_common_dir: r.get(4)?,
                    branch: r.get(5)?,
                    git_remote: r.get(14)?,
                    tty: r.get(6)?,
                    host: r.get(7)?,
                    client_name: r.get(9)?,
                    client_version: r.get(10)?,
                    push: r.get(11)?,
                },
                summary: r.get(8)?,
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
                    summary, client_name, client_version, push, first_seen, last_seen, git_remote)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT(name) DO UPDATE SET pid = ?2, cwd = ?3, git_root = ?4,
                    git_common_dir = ?5, branch = ?6, tty = ?7, host = ?8, summary = ?9,
                    client_name = ?10, client_version = ?11, push = ?12, last_seen = ?14,
                    git_remote = ?15",
            )?
            .execute(params![
                p.name,
                p.context.pid,
                p.context.cwd,
                p.context.git_root,
                p.context.git_common_dir,
                p.context.branch,
                p.context.tty,
                p.context.host,
                p.summary,
                p.context.client_name,
                p.context.client_version,
                p.context.push,
                p.first_seen,
                p.last_seen,
                p.context.git_remote
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
}
