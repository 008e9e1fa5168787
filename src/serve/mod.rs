//! `claude-peers serve`: the MCP stdio server Claude Code runs for one session.
//!
//! Thin by design: tool calls become broker requests ([`tools`]), and broker deliveries
//! become `notifications/claude/channel` events written to stdout, each acked only after
//! it was flushed. It owns no durable state: if it dies, unacked mail is delivered again to
//! the next session of the same name. If the broker dies, it reconnects (starting a new
//! broker), registers under the same name, and carries on.
//!
//! stdout carries JSON-RPC only; logs go to stderr.

mod tools;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rmcp::model::{CustomNotification, ServerNotification};
use rmcp::service::{Peer, RoleServer};
use rmcp::{ServiceExt, transport::stdio_pipes};
use tokio::sync::{Notify, watch};

use crate::client::{Client, ClientError, ConnectOptions, Event};
use crate::git::GitInfo;
use crate::names::PeerName;
use crate::paths::Paths;
use crate::platform;
use crate::protocol::{Ack, Delivery, Register};

/// When to push deliveries into the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushMode {
    /// When the client's initialize declared `experimental["claude/channel"]`.
    Auto,
    Always,
    Never,
}

impl std::str::FromStr for PushMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PushMode::Auto),
            "always" => Ok(PushMode::Always),
            "never" => Ok(PushMode::Never),
            _ => Err(format!("push must be auto, always or never, not {s:?}")),
        }
    }
}

/// How long a tool waits for the broker connection before failing.
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// One session's state, shared by the tools and the connection task.
pub struct Session {
    paths: Paths,
    /// What we register with; `name` becomes the assigned name after the first success.
    identity: Mutex<Register>,
    /// The live broker connection, `None` while (re)connecting.
    conn: watch::Sender<Option<Arc<Client>>>,
    /// Our assigned name, once registered.
    name: Mutex<Option<String>>,
    /// Deliveries are pushed as channel events (decided at initialize).
    push: AtomicBool,
    /// Set when `notifications/initialized` arrives; pushes wait for it.
    initialized: AtomicBool,
    initialized_signal: Notify,
    /// Mail waiting for `check_messages` (when not pushing), oldest first.
    unread: Mutex<VecDeque<Delivery>>,
    /// Ids already shown to the model in this process's life: a redelivery after a broker
    /// restart is acked again but never shown twice.
    seen: Mutex<SeenIds>,
    /// The MCP peer, for notifications.
    peer: Mutex<Option<Peer<RoleServer>>>,
    /// The broker executable to start when none runs (this binary).
    broker_exe: Option<std::path::PathBuf>,
    /// Why the last attempt to reach the broker failed, while it is not reachable; tool
    /// errors show it, since the cause (a refused directory, a bad database) is what the
    /// user must fix.
    last_error: Mutex<Option<String>>,
}

/// Message ids shown in this process's life. The broker's ids are UUIDs, kept as 16
/// bytes each rather than as a 36-character string on the heap, since the set only
/// grows; anything else is kept as text.
#[derive(Default)]
struct SeenIds {
    uuids: HashSet<u128>,
    other: HashSet<String>,
}

impl SeenIds {
    fn insert(&mut self, id: &str) {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.insert(u.as_u128()),
            Err(_) => self.other.insert(id.to_string()),
        };
    }

    fn contains(&self, id: &str) -> bool {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.contains(&u.as_u128()),
            Err(_) => self.other.contains(id),
        }
    }
}

/// The name this session asks for, and whether the user chose it.
pub fn wanted_name(flag: Option<&str>, cwd: &std::path::Path) -> Result<(PeerName, bool)> {
    let chosen = [
        flag.map(str::to_string),
        std::env::var("CLAUDE_PEERS_NAME").ok(),
        std::env::var("PEER_CHANNEL_SESSION_NAME").ok(),
    ]
    .into_iter()
    .flatten()
    .find(|v| !v.is_empty());
    if let Some(v) = chosen {
        let name = PeerName::new(&v).map_err(|e| anyhow::anyhow!("session name: {e}"))?;
        return Ok((name, true));
    }
    let base = cwd
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((PeerName::sanitize(&base), false))
}

impl Session {
    pub fn new(paths: Paths, name_flag: Option<&str>) -> Result<Arc<Self>> {
        let cwd = std::env::current_dir()?;
        let (name, explicit) = wanted_name(name_flag, &cwd)?;
        let git = GitInfo::discover(&cwd);
        let identity = Register {
            name: name.to_string(),
            explicit,
            cwd: cwd.display().to_string(),
            git_root: git.root,
            git_common_dir: git.common_dir,
            branch: git.branch,
            tty: platform::tty_name(),
            pid: std::process::id(),
            host: Some(platform::host_name()),
            // Filled from git by the connection task, off the start-up path.
            summary: None,
            client_name: None,
            client_version: None,
            push: false,
        };
        Ok(Arc::new(Self {
            paths,
            identity: Mutex::new(identity),
            conn: watch::channel(None).0,
            name: Mutex::new(None),
            push: AtomicBool::new(false),
            initialized: AtomicBool::new(false),
            initialized_signal: Notify::new(),
            unread: Mutex::new(VecDeque::new()),
            seen: Mutex::new(SeenIds::default()),
            peer: Mutex::new(None),
            broker_exe: std::env::current_exe().ok(),
            last_error: Mutex::new(None),
        }))
    }

    /// The broker connection, waiting up to [`BROKER_WAIT`] for one.
    pub async fn client(&self) -> Result<Arc<Client>, String> {
        let mut rx = self.conn.subscribe();
        let ready = tokio::time::timeout(BROKER_WAIT, rx.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(c)) => Ok(c.clone().expect("waited for Some")),
            _ => match self.last_error.lock().expect("last_error lock").as_deref() {
                Some(e) => Err(format!(
                    "the claude-peers broker is not reachable (waited {}s): {e}",
                    BROKER_WAIT.as_secs()
                )),
                None => Err(format!(
                    "the claude-peers broker is not reachable (waited {}s); it is being started or restarted, try again in a moment. Its log: {}",
                    BROKER_WAIT.as_secs(),
                    self.paths.log.display()
                )),
            },
        }
    }

    /// Remembers a summary set by the model, so a re-registration keeps it.
    pub fn remember_summary(&self, summary: &str) {
        self.identity.lock().expect("identity lock").summary = Some(summary.to_string());
    }

    pub fn name(&self) -> Option<String> {
        self.name.lock().expect("name lock").clone()
    }

    pub fn unread_count(&self) -> usize {
        self.unread.lock().expect("unread lock").len()
    }

    /// Takes every unread message, marking them seen, and acks them.
    pub fn take_unread(&self) -> Vec<Delivery> {
        let taken: Vec<Delivery> = self.unread.lock().expect("unread lock").drain(..).collect();
        if !taken.is_empty() {
            let mut seen = self.seen.lock().expect("seen lock");
            for d in &taken {
                seen.insert(&d.id);
            }
            self.ack(taken.iter().map(|d| d.id.clone()).collect());
        }
        taken
    }

    /// Keeps the broker connection alive: connect (starting a broker if needed), register,
    /// handle deliveries; on loss, back off and do it again under the same name.
    async fn connection_loop(self: Arc<Self>) {
        let (cwd, git) = {
            let id = self.identity.lock().expect("identity lock");
            let git = GitInfo {
                root: id.git_root.clone(),
                common_dir: id.git_common_dir.clone(),
                branch: id.branch.clone(),
            };
            (std::path::PathBuf::from(&id.cwd), git)
        };
        let summary = tokio::task::spawn_blocking(move || crate::git::default_summary(&cwd, &git))
            .await
            .ok()
            .flatten();
        {
            let mut id = self.identity.lock().expect("identity lock");
            if id.summary.is_none() {
                id.summary = summary;
            }
        }
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.connect_once().await {
                Ok(mut events) => {
                    backoff = Duration::from_millis(20);
                    *self.last_error.lock().expect("last_error lock") = None;
                    while let Some(ev) = events.recv().await {
                        if let Event::Deliver(d) = ev {
                            self.deliver(d).await;
                        }
                    }
                    self.conn.send_replace(None);
                    tracing::warn!("lost the broker connection; reconnecting");
                }
                Err(e) => {
                    tracing::warn!("cannot reach the broker: {e}");
                    *self.last_error.lock().expect("last_error lock") = Some(e.to_string());
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn connect_once(
        &self,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ClientError> {
        let mut opts = ConnectOptions::new("claude-peers-serve");
        opts.broker_exe = self.broker_exe.clone();
        let mut client = Client::connect(&self.paths, &opts).await?;
        let events = client.take_events();
        let request = self.identity.lock().expect("identity lock").clone();
        let reg = client.call(request).await?;
        {
            // Keep our name across reconnects: ask for exactly it from now on.
            let mut id = self.identity.lock().expect("identity lock");
            id.name = reg.name.clone();
            id.explicit = true;
        }
        tracing::info!(name = %reg.name, queued = reg.queued, "registered");
        *self.name.lock().expect("name lock") = Some(reg.name);
        self.conn.send_replace(Some(Arc::new(client)));
        Ok(events)
    }

    /// Shows one delivery to the model (push) or keeps it for `check_messages`.
    async fn deliver(&self, d: Delivery) {
        let already = self.seen.lock().expect("seen lock").contains(&d.id);
        if already {
            self.ack(vec![d.id]);
            return;
        }
        if !self.push.load(Ordering::Relaxed) {
            let mut unread = self.unread.lock().expect("unread lock");
            if !unread.iter().any(|u| u.id == d.id) {
                unread.push_back(d);
            }
            return;
        }
        while !self.initialized.load(Ordering::Acquire) {
            self.initialized_signal.notified().await;
        }
        let Some(peer) = self.peer.lock().expect("peer lock").clone() else {
            return;
        };
        let notification = ServerNotification::CustomNotification(CustomNotification::new(
            "notifications/claude/channel",
            Some(tools::channel_params(&d)),
        ));
        // Returns once the line is written and flushed to stdout.
        match peer.send_notification(notification).await {
            Ok(()) => {
                self.seen.lock().expect("seen lock").insert(&d.id);
                self.ack(vec![d.id]);
            }
            Err(e) => tracing::warn!("could not write a channel event: {e}"),
        }
    }

    /// Tells the broker these messages reached the model. Without a connection the acks
    /// are lost, and the broker delivers the messages again: `seen` keeps them from being
    /// shown twice.
    fn ack(&self, ids: Vec<String>) {
        if let Some(c) = self.conn.borrow().clone() {
            let _ = c.notify(Ack::delivered(ids));
        }
    }
}

/// Runs the MCP server on stdio until stdin closes or the parent process dies.
pub async fn run(paths: Paths, name: Option<&str>, push: PushMode) -> Result<()> {
    let session = Session::new(paths, name)?;
    let server = tools::PeersServer::new(session.clone(), push);
    let parent = platform::parent_pid();
    tokio::spawn(async move {
        // Claude Code may die without closing our stdin; do not outlive it, whether or
        // not the MCP handshake has happened.
        platform::parent_exited(parent).await;
        tracing::info!("parent process exited; stopping");
        std::process::exit(0);
    });
    // Non-blocking pipes on the reactor when stdin/stdout are pipes (as under Claude Code):
    // no hand-off to tokio's blocking pool for every line read or written.
    let service = server.serve(stdio_pipes()).await?;
    *session.peer.lock().expect("peer lock") = Some(service.peer().clone());
    tokio::spawn(session.clone().connection_loop());
    let reason = service.waiting().await;
    tracing::info!("MCP session ended: {reason:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SeenIds;

    #[test]
    fn seen_ids_hold_uuids_and_other_text() {
        let mut seen = SeenIds::default();
        let id = "019b76da-a87b-7c3e-9a41-5d2f0b6e8c17";
        assert!(!seen.contains(id));
        seen.insert(id);
        seen.insert("not-a-uuid");
        assert!(seen.contains(id) && seen.contains("not-a-uuid"));
        assert!(!seen.contains("019b76da-a87b-7c3e-9a41-5d2f0b6e8c18"));
        assert_eq!((seen.uuids.len(), seen.other.len()), (1, 1));
    }
}
