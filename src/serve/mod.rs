//! `claude-peers serve`: the MCP stdio server Claude Code runs for one session.
//!
//! Thin by design: tool calls become broker requests ([`tools`]), and broker deliveries
//! reach the model by the best path the host has ([`Route`]): Claude Code's native inbox
//! ([`inbox`]), channel events where the user asked for them, or `check_messages` and the
//! unread notice. Each delivery is acked with what the path can vouch for. It owns no
//! durable state: if it dies, unacked mail is delivered again to the next session of the
//! same name. If the broker dies, it reconnects (starting a new broker), registers under
//! the same name, and carries on.
//!
//! stdout carries JSON-RPC only; logs go to stderr.

mod direct;
mod hooks;
mod inbox;
mod native;
mod paced;
mod relay;
mod route;
mod tools;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rmcp::model::{CustomNotification, ServerNotification};
use rmcp::service::{Peer, RoleServer};
use rmcp::{ServiceExt, transport::stdio_pipes};
use tokio::sync::{Notify, watch};

use crate::client::{Backoff, Client, ClientError, ConnectOptions, Event};
use crate::git::GitInfo;
use crate::names::PeerName;
use crate::paths::Paths;
use crate::platform;
use crate::protocol::{Ack, AckState, Delivery, PeerContext, Register};
pub use direct::native_sessions;
pub use inbox::config_dir as claude_config_dir;
pub use inbox::user_file as claude_user_file;
use inbox::{Inbound, Inbox, Replies};
pub use native::Native;
use paced::InFlight;
pub use relay::run as run_relay;
pub use route::{PushMode, Route, bypasses_permissions, channel_requested, inbound_restricted};

/// How long after `notifications/initialized` a session registers if no tool is called
/// first. `claude mcp list` ends its servers about 10 ms after `tools/list`.
const REGISTER_AFTER: Duration = Duration::from_millis(500);

/// How long a tool waits for the broker connection before failing.
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// Why tools fail while the broker is stopped.
const STOPPED: &str = "the broker was stopped with `claude-peers stop`; this session reconnects as soon as a new session or a claude-peers command (such as `claude-peers peers`) starts one";

/// One session's state, shared by the tools and the connection task.
pub struct Session {
    paths: Paths,
    /// What we register with; `name` becomes the assigned name after the first success.
    identity: Mutex<Register>,
    /// The live broker connection, `None` while (re)connecting.
    conn: watch::Sender<Option<Arc<Client>>>,
    /// Our assigned name, once registered.
    name: Mutex<Option<String>>,
    /// How deliveries reach the model (decided at initialize), and why.
    route: Mutex<Route>,
    route_why: Mutex<String>,
    /// Our reply sockets in Claude Code's socket directories.
    replies: Replies,
    /// Receipts and replies from the reply sockets.
    inbound: tokio::sync::mpsc::UnboundedSender<Inbound>,
    inbound_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Inbound>>>,
    /// Messages written to the inbox and not yet settled by a receipt, for a receipt that
    /// gives one back (`expired`): id → the delivery.
    in_inbox: Mutex<HashMap<String, InFlight>>,
    /// Per sender, the queue its mail is written to the inbox from, in order and paced.
    #[allow(clippy::type_complexity)]
    outboxes:
        Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<(Arc<Inbox>, Delivery, u32)>>>,
    /// Ids a `held` receipt arrived for.
    held: Mutex<HashSet<String>>,
    /// The newest message id from each sender, to thread a reply made through the inbox.
    last_from: Mutex<HashMap<String, String>>,
    /// Our hook socket, once bound (removed at exit).
    hook_socket: Mutex<Option<PathBuf>>,
    /// Set by the first tool call or a while after `initialized`: only then does the
    /// session register, so a client that connects and leaves at once (a health check
    /// such as `claude mcp list`) leaves no peer behind.
    wanted: Notify,
    wanted_flag: AtomicBool,
    /// Set when `notifications/initialized` arrives; pushes wait for it.
    initialized: AtomicBool,
    initialized_signal: Notify,
    /// Mail waiting for `check_messages` or a hook, oldest first.
    unread: Mutex<VecDeque<Delivery>>,
    /// Inbox messages acked delivered in the last [`RECENT`]: a late receipt (Claude Code
    /// tells of a drop seconds after) may still hold them or send them back.
    recent: Mutex<VecDeque<(tokio::time::Instant, Delivery, u32)>>,
    /// The inbox sockets of the Claude Code sessions without claude-peers we wrote to:
    /// address (`cc:<name>`) → socket.
    native_sockets: Mutex<HashMap<String, PathBuf>>,
    /// Ids lent to a hook and not yet shown or given back: a redelivery meanwhile is not
    /// kept a second time.
    lent: Mutex<HashSet<String>>,
    /// Woken when mail is added to `unread`, for a waiting hook (and when a newer wait
    /// replaces it).
    mail_arrived: Notify,
    /// Mail may start a turn by itself (through `hook wait`): not where the inbox was
    /// withheld for the user's hold.
    may_wake: AtomicBool,
    /// Inbox writes go through the relay ([`relay`]), so that Claude Code holds them.
    use_relay: AtomicBool,
    /// The relay's connection, once it registered: lines to write to it.
    relay_tx: Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
    relay_ready: Notify,
    /// Messages given to the relay, waiting for its word: id → whether it was held.
    relay_pending: Mutex<HashMap<String, tokio::sync::oneshot::Sender<Result<bool, String>>>>,
    /// How many `hook wait`s have come; only the newest waits.
    hook_waits: std::sync::atomic::AtomicU64,
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

    fn remove(&mut self, id: &str) {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.remove(&u.as_u128()),
            Err(_) => self.other.remove(id),
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
        let name = PeerName::registrable(&v).map_err(|e| anyhow::anyhow!("session name: {e}"))?;
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
            // Filled from git by the connection task, off the start-up path.
            summary: None,
            context: PeerContext {
                cwd: cwd.display().to_string(),
                git_root: git.root,
                git_common_dir: git.common_dir,
                branch: git.branch,
                tty: platform::tty_name(),
                pid: std::process::id(),
                host: Some(platform::host_name()),
                client_name: None,
                client_version: None,
                push: false,
            },
        };
        let (inbound, inbound_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            paths,
            identity: Mutex::new(identity),
            conn: watch::channel(None).0,
            name: Mutex::new(None),
            route: Mutex::new(Route::Poll),
            route_why: Mutex::new("the client has not initialized yet".into()),
            replies: Replies::default(),
            inbound,
            inbound_rx: Mutex::new(Some(inbound_rx)),
            in_inbox: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            outboxes: Mutex::new(HashMap::new()),
            last_from: Mutex::new(HashMap::new()),
            hook_socket: Mutex::new(None),
            wanted: Notify::new(),
            wanted_flag: AtomicBool::new(false),
            initialized: AtomicBool::new(false),
            initialized_signal: Notify::new(),
            unread: Mutex::new(VecDeque::new()),
            recent: Mutex::new(VecDeque::new()),
            native_sockets: Mutex::new(HashMap::new()),
            lent: Mutex::new(HashSet::new()),
            mail_arrived: Notify::new(),
            may_wake: AtomicBool::new(true),
            use_relay: AtomicBool::new(false),
            relay_tx: Mutex::new(None),
            relay_ready: Notify::new(),
            relay_pending: Mutex::new(HashMap::new()),
            hook_waits: std::sync::atomic::AtomicU64::new(0),
            seen: Mutex::new(SeenIds::default()),
            peer: Mutex::new(None),
            broker_exe: std::env::current_exe().ok(),
            last_error: Mutex::new(None),
        }))
    }

    /// The broker connection, waiting up to [`BROKER_WAIT`] for one.
    pub async fn client(&self) -> Result<Arc<Client>, String> {
        self.want_registration();
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

    /// A connection other than `old` (which was lost), once there is one.
    pub async fn client_after(&self, old: &Arc<Client>) -> Result<Arc<Client>, String> {
        let mut rx = self.conn.subscribe();
        let fresh = |c: &Option<Arc<Client>>| c.as_ref().is_some_and(|c| !Arc::ptr_eq(c, old));
        let found = match tokio::time::timeout(BROKER_WAIT, rx.wait_for(fresh)).await {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        };
        match found {
            Some(c) => Ok(c),
            None => self.client().await,
        }
    }

    /// Settles how mail reaches this session, once its host has said who it is
    /// (`initialize`): the route, why, and whether the user holds other sessions' mail.
    pub(crate) fn set_route(&self, route: Route, why: String, held_back: bool, host: u32) {
        *self.route_why.lock().expect("route lock") = why;
        // Where the user's hold applies, mail is written by the relay (Claude Code holds
        // it), or waits for the next prompt; it never starts a turn by itself otherwise.
        self.may_wake.store(!held_back, Ordering::Release);
        let relay = held_back && matches!(route, Route::Inbox(_));
        *self.route.lock().expect("route lock") = route;
        self.use_relay.store(relay, Ordering::Release);
        if relay {
            let socket = crate::hook::socket_path(&self.paths, host);
            if let Err(e) = relay::spawn(&socket) {
                tracing::warn!("cannot start the inbox relay: {e}");
            }
        }
    }

    /// What the host said of itself, for the peer record.
    pub(crate) fn set_client(&self, push: bool, name: &str, version: &str) {
        let mut id = self.identity.lock().expect("identity lock");
        id.context.push = push;
        id.context.client_name = Some(name.to_string());
        id.context.client_version = Some(version.to_string());
    }

    /// The MCP handshake is complete.
    pub(crate) fn mark_initialized(&self) {
        self.initialized.store(true, Ordering::Release);
        self.initialized_signal.notify_one();
    }

    /// Lets the connection task register (once).
    fn want_registration(&self) {
        if !self.wanted_flag.swap(true, Ordering::AcqRel) {
            self.wanted.notify_one();
        }
    }

    pub fn route(&self) -> Route {
        self.route.lock().expect("route lock").clone()
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
        self.want_registration();
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
                root: id.context.git_root.clone(),
                common_dir: id.context.git_common_dir.clone(),
                branch: id.context.branch.clone(),
            };
            (std::path::PathBuf::from(&id.context.cwd), git)
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
        if !self.wanted_flag.load(Ordering::Acquire) {
            self.wanted.notified().await;
        }
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        let mut connected_before = false;
        loop {
            // After `claude-peers stop`, a session that had a broker waits, asleep, for
            // someone who needs one to start it, instead of starting it again itself.
            // (A session starting up needs one, and starts it.)
            let stopped = connected_before && self.paths.stopped.exists();
            if stopped {
                *self.last_error.lock().expect("last_error lock") = Some(STOPPED.to_string());
                tracing::info!("the broker was stopped; waiting for one to start");
                if let Err(e) = crate::platform::wait_until_exists(&self.paths.socket).await {
                    tracing::warn!("cannot watch for the broker's socket: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            match self.connect_once(!stopped).await {
                Ok(mut events) => {
                    connected_before = true;
                    backoff.reset();
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
            backoff.wait().await;
        }
    }

    async fn connect_once(
        &self,
        autostart: bool,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ClientError> {
        let mut opts = ConnectOptions::new("claude-peers-serve");
        opts.broker_exe = self.broker_exe.clone();
        opts.autostart = autostart;
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

    /// Shows one delivery to the model by the session's route, or keeps it for
    /// `check_messages`.
    async fn deliver(self: &Arc<Self>, d: Delivery) {
        if self
            .in_inbox
            .lock()
            .expect("in_inbox lock")
            .contains_key(&d.id)
            || self.lent.lock().expect("lent lock").contains(&d.id)
        {
            // In flight to the inbox, or lent to a hook: acked when that settles.
            return;
        }
        let already = self.seen.lock().expect("seen lock").contains(&d.id);
        if already {
            // Acked again as what it was (its first ack may have been lost with the
            // connection): a held message is still held, a channel event still unconfirmed.
            let state = if self.held.lock().expect("held lock").contains(&d.id) {
                AckState::Held
            } else if matches!(self.route(), Route::Channel) {
                AckState::Pushed
            } else {
                AckState::Delivered
            };
            self.ack_as(vec![d.id], state);
            return;
        }
        let waiting = self
            .unread
            .lock()
            .expect("unread lock")
            .iter()
            .any(|u| u.id == d.id);
        if waiting {
            // Kept for check_messages after the inbox did not take it: shown there only.
            return;
        }
        match self.route() {
            Route::Poll => self.keep_unread(d),
            Route::Channel => self.push_channel(d).await,
            Route::Inbox(inbox) => self.to_inbox(inbox, d, 1),
        }
    }

    fn keep_unread(&self, d: Delivery) {
        {
            let mut unread = self.unread.lock().expect("unread lock");
            if unread.iter().any(|u| u.id == d.id) {
                return;
            }
            unread.push_back(d);
        }
        self.mail_arrived.notify_waiters();
    }

    /// Tells the broker these messages reached the model. Without a connection the acks
    /// are lost, and the broker delivers the messages again: `seen` keeps them from being
    /// shown twice.
    fn ack(&self, ids: Vec<String>) {
        self.ack_as(ids, AckState::Delivered);
    }

    fn ack_as(&self, ids: Vec<String>, state: AckState) {
        if let Some(c) = self.conn.borrow().clone() {
            let _ = c.notify(Ack { ids, state });
        }
    }

    /// Removes what this process made outside its own memory (the inbox's reply
    /// sockets), before it exits.
    fn clean_up(&self) {
        self.replies.remove_all();
        if let Some(p) = self.hook_socket.lock().expect("hook_socket lock").take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs the MCP server on stdio until stdin closes, the parent process dies, or a signal
/// ends it.
pub async fn run(
    paths: Paths,
    name: Option<&str>,
    push: PushMode,
    bypass_inbox: bool,
) -> Result<()> {
    let session = Session::new(paths, name)?;
    let server = tools::PeersServer::new(session.clone(), push, bypass_inbox);
    let parent = platform::parent_pid();
    let inbound = session.inbound_rx.lock().expect("inbound lock").take();
    if let Some(mut inbound) = inbound {
        let session = session.clone();
        tokio::spawn(async move {
            while let Some(ev) = inbound.recv().await {
                session.on_inbound(ev).await;
            }
        });
    }
    // Non-blocking pipes on the reactor when stdin/stdout are pipes (as under Claude Code):
    // no hand-off to tokio's blocking pool for every line read or written.
    tokio::spawn(
        session
            .clone()
            .serve_hooks(crate::hook::socket_path(&session.paths, parent)),
    );
    let mcp = async {
        let service = server.serve(stdio_pipes()).await?;
        *session.peer.lock().expect("peer lock") = Some(service.peer().clone());
        tokio::spawn(session.clone().connection_loop());
        let reason = service.waiting().await;
        tracing::info!("MCP session ended: {reason:?}");
        Ok::<(), anyhow::Error>(())
    };
    // The session ends when the host closes stdin, or — whether or not the MCP handshake
    // has happened — when the host dies without closing it, or signals us (Claude Code
    // ends its servers with SIGINT: `-p`, `claude mcp list`).
    let outcome = tokio::select! {
        r = mcp => r,
        () = platform::parent_exited(parent) => {
            tracing::info!("parent process exited; stopping");
            Ok(())
        }
        () = stop_signal() => {
            tracing::info!("signalled; stopping");
            Ok(())
        }
    };
    session.clean_up();
    outcome
}

/// SIGINT or SIGTERM (never, if they cannot be watched).
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{SeenIds, channel_requested};

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn bypass_mode_is_read_from_the_command_line() {
        assert!(super::bypasses_permissions(&argv(
            "claude --dangerously-skip-permissions"
        )));
        assert!(super::bypasses_permissions(&argv(
            "claude --permission-mode bypassPermissions"
        )));
        assert!(super::bypasses_permissions(&argv(
            "claude --permission-mode=bypassPermissions"
        )));
        assert!(!super::bypasses_permissions(&argv(
            "claude --permission-mode acceptEdits"
        )));
    }

    #[test]
    fn a_channel_is_requested_only_by_name() {
        assert!(channel_requested(&argv(
            "claude --dangerously-load-development-channels server:claude-peers"
        )));
        assert!(channel_requested(&argv(
            "claude --channels plugin:x@m plugin:claude-peers@claude-peers --verbose"
        )));
        assert!(channel_requested(&argv(
            "claude --channels=server:claude-peers"
        )));
        assert!(!channel_requested(&argv("claude --channels server:other")));
        assert!(!channel_requested(&argv(
            "claude --channels server:other -p claude-peers"
        )));
        assert!(!channel_requested(&argv("claude -p hello")));
    }

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
