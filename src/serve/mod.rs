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
mod peer_channel;
mod relay;
mod route;
mod state;
mod tools;
mod trim;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Result;
use rmcp::model::{CustomNotification, ServerNotification};

use rmcp::{ServiceExt, transport::stdio_pipes};
use tokio::sync::{Notify, watch};

use crate::client::{Backoff, Client, ClientError, ConnectOptions, Event};
use crate::git::GitInfo;
use crate::names::PeerName;
use crate::paths::Paths;
use crate::platform;
use crate::protocol::{
    Ack, AckState, Delivery, ErrorCode, PeerContext, Register, SessionKey, now_millis,
};
pub use direct::native_sessions;
pub use inbox::config_dir as claude_config_dir;
pub use inbox::user_file as claude_user_file;
use inbox::{Inbound, Replies};
pub use native::Native;
pub use relay::run as run_relay;
pub use route::{PushMode, Route, bypasses_permissions, channel_requested, inbound_restricted};
use state::State;

/// How long after `notifications/initialized` a session registers if no tool is called
/// first. `claude mcp list` ends its servers about 10 ms after `tools/list`.
const REGISTER_AFTER: Duration = Duration::from_millis(500);

/// How long a tool waits for the broker connection before failing.
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// Why tools fail while the broker is stopped.
const STOPPED: &str = "the broker was stopped with `claude-peers stop`; this session reconnects as soon as a new session or a claude-peers command (such as `claude-peers peers`) starts one";

/// One session, shared by the tools, the hook socket and the connection task: what it
/// knows is [`State`], behind one lock that is never held across an `await`; what others
/// wait for is a `watch` (or, for mail arriving, a `Notify`).
pub struct Session {
    paths: Paths,
    state: Mutex<State>,
    /// The live broker connection, `None` while (re)connecting.
    conn: watch::Sender<Option<Arc<Client>>>,
    /// Set by the first tool call or a while after `initialized`: only then does the
    /// session register, so a client that connects and leaves at once (a health check
    /// such as `claude mcp list`) leaves no peer behind.
    wanted: watch::Sender<bool>,
    /// Set when `notifications/initialized` arrives; pushes wait for it.
    initialized: watch::Sender<bool>,
    /// The relay's connection, once it registered: lines to write to it.
    relay: watch::Sender<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
    /// Woken when mail is added to `unread`, for a waiting hook (and when a newer wait
    /// replaces it).
    mail_arrived: Notify,
    /// Our reply sockets in Claude Code's socket directories.
    replies: Replies,
    /// Receipts and replies from the reply sockets.
    inbound: tokio::sync::mpsc::UnboundedSender<Inbound>,
    /// The broker executable to start when none runs (this binary).
    broker_exe: Option<std::path::PathBuf>,
    /// Why the name the user chose could not be used as given ([`wanted_name`]): told
    /// to the model in the instructions and with every tool result.
    pub name_problem: Option<String>,
    /// Gives memory back after a burst of work.
    trimmer: trim::Trimmer,
    /// peer-channel's sessions directory, and our name held there.
    pc: peer_channel::PcLink,
}

/// The name this session asks for, whether the user chose it, and, when the name the
/// user chose cannot be used as given, why (the session then takes it made valid, and
/// says so to the model, rather than exit: Claude Code shows an exited server only as
/// "connection closed").
pub fn wanted_name(flag: Option<&str>, cwd: &std::path::Path) -> (PeerName, bool, Option<String>) {
    let chosen = [
        flag.map(str::to_string),
        std::env::var("CLAUDE_PEERS_NAME").ok(),
        std::env::var("PEER_CHANNEL_SESSION_NAME").ok(),
    ]
    .into_iter()
    .flatten()
    .find(|v| !v.is_empty());
    if let Some(v) = chosen {
        return match PeerName::registrable(&v) {
            Ok(name) => (name, true, None),
            Err(e) => {
                let name = PeerName::sanitize(&v);
                let problem = format!(
                    "The session name this server was given (--name, CLAUDE_PEERS_NAME or PEER_CHANNEL_SESSION_NAME) cannot be used: {e}. This session goes by {name} instead; tell your user to fix the name in the MCP server's settings."
                );
                tracing::warn!("{problem}");
                (name, true, Some(problem))
            }
        };
    }
    let base = cwd
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    (PeerName::sanitize(&base), false, None)
}

/// The agent session we serve (see [`SessionKey`]): `CLAUDE_PEERS_SESSION` when set
/// (empty: none), else the agent process that started us, by pid and start time (so a
/// pid used again later is another process).
fn session_key(host: u32, shared_host: bool) -> Option<SessionKey> {
    let key = match std::env::var("CLAUDE_PEERS_SESSION") {
        Ok(k) if k.is_empty() => return None,
        Ok(k) => k,
        Err(_) if shared_host => return None,
        Err(_) => format!("process:{host}:{}", platform::stat_field(host, 22)?),
    };
    Some(SessionKey {
        key,
        started: now_millis(),
    })
}

impl Session {
    pub fn new(
        paths: Paths,
        name_flag: Option<&str>,
        pc: Option<crate::peer_channel::Sessions>,
    ) -> Result<Arc<Self>> {
        let cwd = std::env::current_dir()?;
        let (name, explicit, name_problem) = wanted_name(name_flag, &cwd);
        let git = GitInfo::discover(&cwd);
        // Codex's app-server (`codex app-server`, measured with 0.171) runs the servers of
        // every window and thread: one process, many sessions.
        let shared_host = platform::command_line(platform::parent_pid())
            .is_some_and(|argv| argv.iter().any(|a| a == "app-server"));
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
                git_remote: git.remote,
                tty: platform::tty_name(),
                pid: std::process::id(),
                host: Some(platform::host_name()),
                client_name: None,
                client_version: None,
                push: false,
            },
            session: session_key(platform::parent_pid(), shared_host),
        };
        let (inbound, inbound_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            paths,
            state: Mutex::new(State {
                shared_host,
                ..State::new(identity, inbound_rx)
            }),
            conn: watch::channel(None).0,
            wanted: watch::channel(false).0,
            initialized: watch::channel(false).0,
            relay: watch::channel(None).0,
            mail_arrived: Notify::new(),
            replies: Replies::default(),
            inbound,
            broker_exe: std::env::current_exe().ok(),
            name_problem,
            trimmer: trim::Trimmer::default(),
            pc: peer_channel::PcLink::new(pc),
        }))
    }

    /// The session's state. Callers take what they need and let go before any `await`
    /// (and before calling another method that takes it).
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while it was held leaves nothing half-done that matters more
        // than carrying on: every change under the lock is a single collection update.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The broker connection, waiting up to [`BROKER_WAIT`] for one.
    pub async fn client(&self) -> Result<Arc<Client>, String> {
        self.want_registration();
        let mut rx = self.conn.subscribe();
        let ready = tokio::time::timeout(BROKER_WAIT, rx.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(c)) => Ok(c.clone().expect("waited for Some")),
            _ => match self.last_error() {
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
        let relay = held_back && matches!(route, Route::Inbox(_));
        {
            let mut st = self.state();
            st.route_why = why;
            st.route = route;
            // Where the user's hold applies, mail is written by the relay (Claude Code
            // holds it), or waits for the next prompt; it never starts a turn by itself
            // otherwise.
            st.may_wake = !held_back;
            st.use_relay = relay;
        }
        if relay {
            let socket = crate::hook::socket_path(&self.paths, host);
            if let Err(e) = relay::spawn(&socket) {
                tracing::warn!("cannot start the inbox relay: {e}");
            }
        }
    }

    /// What the host said of itself, for the peer record.
    pub(crate) fn set_client(&self, push: bool, name: &str, version: &str) {
        let context = &mut self.state().identity.context;
        context.push = push;
        context.client_name = Some(name.to_string());
        context.client_version = Some(version.to_string());
    }

    /// The MCP handshake is complete.
    pub(crate) fn mark_initialized(&self) {
        self.initialized.send_replace(true);
    }

    /// Lets the connection task register (once).
    fn want_registration(&self) {
        self.wanted
            .send_if_modified(|wanted| !std::mem::replace(wanted, true));
    }

    pub fn route(&self) -> Route {
        self.state().route.clone()
    }

    /// Remembers a summary set by the model, so a re-registration keeps it.
    pub fn remember_summary(&self, summary: &str) {
        self.state().identity.summary = Some(summary.to_string());
    }

    /// Our assigned name, once registered.
    pub fn name(&self) -> Option<String> {
        self.state().name().map(str::to_string)
    }

    /// The name we are or will ask to be.
    fn name_or_wanted(&self) -> String {
        self.state().identity.name.clone()
    }

    /// Why the broker could not be reached, while it cannot.
    fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    pub fn unread_count(&self) -> usize {
        self.state().unread.len()
    }

    /// Takes every unread message, marking them seen, and acks them.
    pub fn take_unread(&self) -> Vec<Delivery> {
        self.want_registration();
        let taken: Vec<Delivery> = {
            let mut st = self.state();
            let taken: Vec<Delivery> = st.unread.drain(..).collect();
            for d in &taken {
                st.seen.insert(&d.id);
            }
            taken
        };
        if !taken.is_empty() {
            self.ack(taken.iter().map(|d| d.id.clone()).collect());
        }
        taken
    }

    /// Keeps the broker connection alive: connect (starting a broker if needed), register,
    /// handle deliveries; on loss, back off and do it again under the same name.
    async fn connection_loop(self: Arc<Self>) {
        let (cwd, git) = {
            let st = self.state();
            let id = &st.identity;
            let git = GitInfo {
                root: id.context.git_root.clone(),
                common_dir: id.context.git_common_dir.clone(),
                branch: id.context.branch.clone(),
                remote: id.context.git_remote.clone(),
            };
            (std::path::PathBuf::from(&id.context.cwd), git)
        };
        let summary = tokio::task::spawn_blocking(move || crate::git::default_summary(&cwd, &git))
            .await
            .ok()
            .flatten();
        {
            let id = &mut self.state().identity;
            if id.summary.is_none() {
                id.summary = summary;
            }
        }
        let _ = self.wanted.subscribe().wait_for(|wanted| *wanted).await;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        let mut connected_before = false;
        loop {
            // After `claude-peers stop`, a session that had a broker waits, asleep, for
            // someone who needs one to start it, instead of starting it again itself.
            // (A session starting up needs one, and starts it.)
            let stopped = connected_before && self.paths.stopped.exists();
            if stopped {
                self.state().last_error = Some(STOPPED.to_string());
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
                    self.state().last_error = None;
                    let mut replaced = None;
                    while let Some(ev) = events.recv().await {
                        match ev {
                            Event::Deliver(d) => self.deliver(d).await,
                            Event::Closed(e) if e.code == ErrorCode::Replaced => {
                                replaced = Some(e.message);
                            }
                            _ => {}
                        }
                    }
                    self.conn.send_replace(None);
                    if let Some(why) = replaced {
                        self.step_aside(why);
                        let _ = self.wanted.subscribe().wait_for(|wanted| *wanted).await;
                        continue;
                    }
                    tracing::warn!("lost the broker connection; reconnecting");
                }
                Err(e) => {
                    tracing::warn!("cannot reach the broker: {e}");
                    self.state().last_error = Some(e.to_string());
                }
            }
            backoff.wait().await;
        }
    }

    async fn connect_once(
        self: &Arc<Self>,
        autostart: bool,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ClientError> {
        let mut opts = ConnectOptions::new("claude-peers-serve");
        opts.broker_exe = self.broker_exe.clone();
        opts.autostart = autostart;
        let mut client = Client::connect(&self.paths, &opts).await?;
        let events = client.take_events();
        let mut request = self.state().identity.clone();
        request.name = self.pc_free_name(&request.name).await;
        let reg = client.call(request).await?;
        tracing::info!(name = %reg.name, queued = reg.queued, "registered");
        self.state().registered(reg.name.clone());
        self.conn.send_replace(Some(Arc::new(client)));
        // Off the path of the backlog's deliveries, which wait for this to return.
        let (session, name) = (self.clone(), reg.name);
        tokio::spawn(async move { session.pc_claim(&name).await });
        Ok(events)
    }

    /// One piece of work for the [`trim::Trimmer`] (a tool call).
    pub(crate) fn note_work(&self) {
        self.trimmer.note();
    }

    /// Shows one delivery to the model by the session's route, or keeps it for
    /// `check_messages`.
    async fn deliver(self: &Arc<Self>, d: Delivery) {
        self.trimmer.note();
        let route = {
            let st = self.state();
            if st.in_inbox.contains_key(&d.id) || st.lent.contains(&d.id) {
                // In flight to the inbox, or lent to a hook: acked when that settles.
                return;
            }
            if st.unread.iter().any(|u| u.id == d.id) {
                // Kept for check_messages after the inbox did not take it: shown there only.
                return;
            }
            if st.seen.contains(&d.id) {
                // Acked again as what it was (its first ack may have been lost with the
                // connection): a held message is still held, a channel event still
                // unconfirmed.
                let state = if st.held.contains(&d.id) {
                    AckState::Held
                } else if matches!(st.route, Route::Channel) {
                    AckState::Pushed
                } else {
                    AckState::Delivered
                };
                drop(st);
                self.ack_as(vec![d.id], state);
                return;
            }
            st.route.clone()
        };
        match route {
            Route::Poll => self.keep_unread(d),
            Route::Channel => self.push_channel(d).await,
            Route::Inbox(inbox) => self.to_inbox(inbox, d, 1),
        }
    }

    fn keep_unread(&self, d: Delivery) {
        {
            let unread = &mut self.state().unread;
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

    /// A newer process of our agent session took our name (and with it the name's mail).
    /// We let it: no mail of that name stays here, and we register again, under another
    /// name, only when our tools are used again (an older `serve` being replaced is
    /// usually about to be ended by its host).
    fn step_aside(&self, why: String) {
        tracing::info!("{why}; stepping aside");
        {
            let mut st = self.state();
            st.registered = false;
            st.unread.clear();
            st.last_error = Some(why);
        }
        self.pc.release();
        self.wanted.send_replace(false);
    }

    /// Removes what this process made outside its own memory (the inbox's reply
    /// sockets), before it exits.
    fn clean_up(&self) {
        self.replies.remove_all();
        self.pc.close();
        let sockets = std::mem::take(&mut self.state().hook_sockets);
        for (path, inode) in sockets {
            // Not a newer serve's socket in its place.
            let ours = std::fs::metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == inode);
            if ours {
                let _ = std::fs::remove_file(path);
            }
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
    pc: Option<crate::peer_channel::Sessions>,
) -> Result<()> {
    let session = Session::new(paths, name, pc)?;
    let server = tools::PeersServer::new(session.clone(), push, bypass_inbox);
    let parent = platform::parent_pid();
    let inbound = session.state().inbound_rx.take();
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
    {
        let session = session.clone();
        tokio::spawn(async move { session.trimmer.run().await });
    }
    let mcp = async {
        let service = server.serve(stdio_pipes()).await?;
        session.state().peer = Some(service.peer().clone());
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
