//! Claude Code sessions on this machine that do not run claude-peers ("native"
//! sessions): listed beside our peers, and reachable through their own inbox.
//!
//! Each live Claude Code session keeps a record in `~/.claude/sessions/<pid>.json`. A
//! record counts only while its process is alive and is the same process (its start
//! time, `procStart`, matches the kernel's), so a reused pid is never taken for it. Their
//! address is `cc:<name>` (or `cc:<pid>` where the name is not a plain one or not unique),
//! so they never collide with our peers' names.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

/// A live Claude Code session, as its record shows it.
#[derive(Debug, Clone)]
pub struct Native {
    pub pid: u32,
    /// `cc:<name>` or `cc:<pid>`.
    pub address: String,
    pub session_id: String,
    pub cwd: String,
    /// `idle`, `busy`, `waiting`, when the record says.
    pub status: Option<String>,
    pub socket: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    pid: u32,
    session_id: String,
    #[serde(default)]
    cwd: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<String>,
    messaging_socket_path: Option<String>,
    #[serde(default)]
    proc_start: Option<String>,
}

/// The start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field
/// 22), as Claude Code writes it in `procStart`.
fn start_time(pid: u32) -> Option<String> {
    crate::platform::stat_field(pid, 22)
}

fn alive(r: &Record) -> bool {
    match &r.proc_start {
        Some(start) => start_time(r.pid).as_deref() == Some(start.as_str()),
        None => crate::platform::process_exists(r.pid),
    }
}

fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The live native sessions, except those whose pid is in `skip` (the hosts of our own
/// peers, and our own host), sorted by address.
pub fn list(skip: impl FnOnce() -> HashSet<u32>) -> Vec<Native> {
    let Some(dir) = super::inbox::config_dir().map(|d| d.join("sessions")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let records: Vec<Record> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .filter(|r: &Record| r.messaging_socket_path.is_some())
        .collect();
    if records.is_empty() {
        // The hosts to skip cost a /proc read per peer: only when there is something
        // to skip them from.
        return Vec::new();
    }
    let skip = skip();
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| !skip.contains(&r.pid))
        .filter(alive)
        .collect();
    let mut out: Vec<Native> = records
        .iter()
        .map(|r| {
            let name = r.name.as_deref().filter(|n| plain(n));
            let unique = name.is_some_and(|n| {
                records
                    .iter()
                    .filter(|o| o.name.as_deref() == Some(n))
                    .count()
                    == 1
            });
            let address = match name {
                Some(n) if unique => format!("cc:{n}"),
                _ => format!("cc:{}", r.pid),
            };
            Native {
                pid: r.pid,
                address,
                session_id: r.session_id.clone(),
                cwd: r.cwd.clone(),
                status: r.status.clone(),
                socket: PathBuf::from(r.messaging_socket_path.clone().unwrap_or_default()),
            }
        })
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

/// The native session `address` names (`cc:<name>` or `cc:<pid>`), among `list`.
pub fn find(address: &str, list: Vec<Native>) -> Option<Native> {
    let key = address.strip_prefix("cc:")?;
    list.into_iter()
        .find(|n| n.address == address || n.pid.to_string() == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_read() {
        let me = std::process::id();
        let t = start_time(me).expect("a start time");
        assert!(t.parse::<u64>().is_ok(), "{t}");
        assert_eq!(start_time(me), Some(t));
    }

    #[test]
    fn plain_names_only() {
        assert!(plain("proj-d5"));
        assert!(!plain("my project"));
        assert!(!plain(""));
    }
}
