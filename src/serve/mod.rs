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

mod inbox;
mod native;
mod relay;
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

use crate::client::{Client, ClientError, ConnectOptions, Event};
use crate::git::GitInfo;
use crate::names::PeerName;
use crate::paths::Paths;
use crate::platform;
use crate::protocol::{Ack, AckState, Delivery, Register};
pub use inbox::config_dir as claude_config_dir;
pub use inbox::user_file as claude_user_file;
use inbox::{Inbound, Inbox, Replies};
pub use native::Native;
pub use relay::run as run_relay;

/// How deliveries may reach the model, as the user set it (`--push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushMode {
    /// The native inbox when the session has one; else channel events when the client
    /// declared `claude/channel` or the host's command line enabled this server's
    /// channel; else polling.
    Auto,
    /// The native inbox, else polling.
    Inbox,
    /// Channel events (`always` is the older spelling). They cannot be confirmed, so the
    /// sender is told `pushed`, never `delivered`.
    #[value(alias = "always")]
    Channel,
    /// Mail waits for `check_messages`.
    #[value(alias = "poll")]
    Never,
}

/// The path this session's mail takes to the model, chosen at `initialize`.
#[derive(Debug, Clone)]
pub enum Route {
    /// Written into Claude Code's inbox: starts a turn in an idle session, joins a busy
    /// one; `delivered` once the session took it (or `held` while its user decides).
    Inbox(Arc<Inbox>),
    /// `notifications/claude/channel` events: shown only where the host enabled this
    /// server's channel, which a server cannot tell, so acked as `pushed`.
    Channel,
    /// Kept for `check_messages`; every tool result says when mail waits.
    Poll,
}

impl Route {
    /// The route for `mode`, given the host's inbox, whether the client declared the
    /// channel capability, and the host's command line.
    ///
    /// A Claude Code session that bypasses permissions holds inbox mail from senders that
    /// do not, for its user to approve; but `serve` is its own child, whose messages it
    /// takes unasked. So unless the user opted in (`bypass_inbox`), such a session gets no
    /// inbox route: claude-peers must not become a way around that hold. The same goes
    /// for a session whose settings hold or refuse other sessions' messages.
    pub fn choose(
        mode: PushMode,
        inbox: Option<Inbox>,
        declared_channel: bool,
        host_argv: &[String],
        bypass_inbox: bool,
    ) -> (Route, String, bool) {
        let had_inbox = inbox.is_some();
        let withheld = if bypass_inbox {
            None
        } else if bypasses_permissions(host_argv) {
            Some(
                "the session bypasses permissions and holds other sessions' mail, which its own server would get around (--bypass-inbox to use its inbox anyway)",
            )
        } else if inbound_restricted() {
            Some(
                "Claude Code's settings hold or refuse mail from other sessions (crossSessionInbound)",
            )
        } else {
            None
        };
        match (mode, inbox) {
            (PushMode::Auto | PushMode::Inbox, Some(inbox)) if withheld.is_some() => {
                let why = format!(
                    "Claude Code's inbox {}, written by a relay that is not the session's child, so that Claude Code holds each message for its user as it does other sessions' ({})",
                    inbox.socket().display(),
                    withheld.unwrap_or_default()
                );
                (Route::Inbox(Arc::new(inbox)), why, true)
            }
            (PushMode::Auto | PushMode::Inbox, Some(inbox)) => {
                let why = format!("Claude Code's inbox {}", inbox.socket().display());
                (Route::Inbox(Arc::new(inbox)), why, false)
            }
            (_, _) if withheld.is_some() => (
                Route::Poll,
                format!(
                    "{}; mail waits for the next prompt",
                    withheld.unwrap_or_default()
                ),
                true,
            ),
            (PushMode::Auto, None) if declared_channel => (
                Route::Channel,
                "no inbox; the client declared claude/channel".into(),
                false,
            ),
            (PushMode::Auto, None) if channel_requested(host_argv) => (
                Route::Channel,
                "no inbox; the host's command line enables this server's channel".into(),
                false,
            ),
            (PushMode::Channel, _) => (Route::Channel, "--push channel".into(), false),
            (PushMode::Never, _) => (Route::Poll, "--push never".into(), false),
            _ => (
                Route::Poll,
                if had_inbox {
                    "no inbox".into()
                } else {
                    "the host has no Claude Code inbox (another agent, Claude Code before 2.1.224, or a health check)".into()
                },
                false,
            ),
        }
    }

    /// How `whoami` names it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Inbox(_) => "inbox",
            Route::Channel => "channel",
            Route::Poll => "poll",
        }
    }
}

/// Whether a Claude Code command line, or its settings, make the session bypass
/// permission prompts.
pub fn bypasses_permissions(argv: &[String]) -> bool {
    let on_command_line = argv.iter().enumerate().any(|(i, a)| {
        a == "--dangerously-skip-permissions"
            || a == "--permission-mode=bypassPermissions"
            || (a == "--permission-mode"
                && argv.get(i + 1).map(String::as_str) == Some("bypassPermissions"))
    });
    on_command_line
        || claude_settings()
            .iter()
            .any(|v| setting(v, &["permissions", "defaultMode"]) == Some("bypassPermissions"))
}

/// Whether Claude Code's settings hold or refuse messages from other sessions
/// (`crossSessionInbound`). It takes its own children's messages even then, so writing
/// into its inbox would get around the user's choice.
pub fn inbound_restricted() -> bool {
    claude_settings().iter().any(|v| {
        matches!(
            setting(v, &["crossSessionInbound"]),
            Some(m) if m != "accept"
        )
    })
}

fn setting<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Claude Code's settings files that exist: managed, the user's, and the project's
/// (shared and local) for our working directory.
fn claude_settings() -> Vec<serde_json::Value> {
    let mut files = vec![std::path::PathBuf::from(
        "/etc/claude-code/managed-settings.json",
    )];
    if let Some(dir) = inbox::config_dir() {
        files.push(dir.join("settings.json"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        files.push(cwd.join(".claude/settings.json"));
        files.push(cwd.join(".claude/settings.local.json"));
    }
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|t| serde_json::from_slice(&t).ok())
        .collect()
}

/// Whether a host command line (Claude Code's) enabled a channel named like this server:
/// `--channels` or `--dangerously-load-development-channels` followed by entries such as
/// `server:claude-peers` or `plugin:claude-peers@marketplace`.
pub fn channel_requested(argv: &[String]) -> bool {
    const FLAGS: [&str; 2] = ["--channels", "--dangerously-load-development-channels"];
    let mut in_list = false;
    for arg in argv {
        if let Some((flag, value)) = arg.split_once('=')
            && FLAGS.contains(&flag)
        {
            in_list = false;
            if value.contains("claude-peers") {
                return true;
            }
            continue;
        }
        if FLAGS.contains(&arg.as_str()) {
            in_list = true;
            continue;
        }
        if arg.starts_with('-') {
            in_list = false;
            continue;
        }
        if in_list && arg.contains("claude-peers") {
            return true;
        }
    }
    false
}

/// How long after `notifications/initialized` a session registers if no tool is called
/// first. `claude mcp list` ends its servers about 10 ms after `tools/list`.
const REGISTER_AFTER: Duration = Duration::from_millis(500);

/// The live Claude Code sessions that do not run claude-peers, except the hosts in
/// `hosts` (for `doctor`).
pub fn native_sessions(hosts: impl Iterator<Item = u32>) -> Vec<Native> {
    native::list(|| hosts.collect())
}

/// A message between us and a Claude Code session without claude-peers, which the
/// broker never sees: a fresh id, sent now.
fn local_delivery(from: String, to: String, text: String, in_reply_to: Option<String>) -> Delivery {
    Delivery {
        id: uuid::Uuid::now_v7().to_string(),
        from,
        to,
        text,
        in_reply_to,
        sent_at: crate::protocol::now_millis(),
        from_cwd: None,
        from_repo: None,
        from_branch: None,
        from_summary: None,
    }
}

/// The hosts not to list as native sessions: ours, and those of these `serve` pids.
fn native_skip(peer_pids: impl Iterator<Item = u32>) -> HashSet<u32> {
    let mut skip: HashSet<u32> = peer_pids.filter_map(platform::parent_of).collect();
    skip.insert(platform::parent_pid());
    skip
}

/// How long after writing into the inbox a message waits for a receipt (`held`,
/// `dropped`) before it counts as delivered. The session sends one at once, while it
/// reads the line.
const RECEIPT_WINDOW: Duration = Duration::from_millis(100);
/// How long an inbox message acked delivered is kept for a late receipt (under the
/// store's grace, `store::REOPEN_GRACE`).
const RECENT: Duration = Duration::from_secs(20);

/// How many times a message the session dropped for its rate is written, and the pause
/// before each new write (times the attempt): the session takes one message a sender
/// every 2 s past a burst of 30.
const MAX_INBOX_WRITES: u32 = 8;
const INBOX_RETRY: Duration = Duration::from_millis(2500);

/// A message on its way into the inbox: queued or waiting to be written again, or
/// written (`written`) and waiting for the receipt window or the user's answer.
struct InFlight {
    d: Delivery,
    attempt: u32,
    written: bool,
}

/// The pace of one sender's mail into the inbox: a token bucket under Claude Code's own
/// limit (measured with 2.1.332: a burst of 30 from one sender, then one every 2 s; past
/// it, messages are dropped).
struct SenderPace {
    tokens: f64,
    burst: f64,
    at: tokio::time::Instant,
}

impl SenderPace {
    /// The burst, unless `CLAUDE_PEERS_INBOX_BURST` says otherwise (should Claude Code's
    /// limit change).
    const BURST: f64 = 25.0;
    /// One message per this long, after the burst.
    const EVERY: Duration = Duration::from_millis(2200);

    fn new() -> Self {
        let burst = std::env::var("CLAUDE_PEERS_INBOX_BURST")
            .ok()
            .and_then(|b| b.parse::<u32>().ok())
            .filter(|b| *b > 0)
            .map_or(Self::BURST, f64::from);
        Self {
            tokens: burst,
            burst,
            at: tokio::time::Instant::now(),
        }
    }

    /// Returns when the next message may go.
    async fn wait(&mut self) {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() / Self::EVERY.as_secs_f64();
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            let short = (1.0 - self.tokens) * Self::EVERY.as_secs_f64();
            tokio::time::sleep(Duration::from_secs_f64(short)).await;
            self.tokens = 1.0;
            self.at = tokio::time::Instant::now();
        }
        self.tokens -= 1.0;
    }
}

/// How long a send to a native Claude Code session waits for a `held` receipt.
const NATIVE_HOLD_WAIT: Duration = Duration::from_millis(150);

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
        id.push = push;
        id.client_name = Some(name.to_string());
        id.client_version = Some(version.to_string());
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
        if !self.wanted_flag.load(Ordering::Acquire) {
            self.wanted.notified().await;
        }
        let mut backoff = Duration::from_millis(20);
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

    /// Serves the hooks of this session (`claude-peers hook prompt|wait`) on
    /// `hooks/<host pid>.sock`: lends them the unread mail, which their `shown` settles
    /// and their going away gives back.
    async fn serve_hooks(self: Arc<Self>, path: PathBuf) {
        let listener = match path
            .parent()
            .map(crate::paths::secure_dir)
            .transpose()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|_| {
                // Another live `serve` of the same host (two servers in one agent) keeps
                // its socket: its hooks keep working, ours are not served.
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another serve of this host answers there",
                    ));
                }
                let _ = std::fs::remove_file(&path);
                tokio::net::UnixListener::bind(&path)
            }) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("no socket for hooks at {}: {e}", path.display());
                return;
            }
        };
        *self.hook_socket.lock().expect("hook_socket lock") = Some(path);
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("the hook socket could not accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if platform::peer_uid(&stream).ok() != Some(platform::current_uid()) {
                tracing::warn!("refused a hook connection from another uid");
                continue;
            }
            tokio::spawn(self.clone().lend_to_hook(stream));
        }
    }

    /// One hook's connection: its request, the lent mail, and `shown` or going away.
    async fn lend_to_hook(self: Arc<Self>, stream: tokio::net::UnixStream) {
        use crate::hook::{HookReply, HookRequest};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        if !matches!(stream.read_line(&mut line).await, Ok(n) if n > 0) {
            return;
        }
        let lent = match serde_json::from_str::<HookRequest>(&line) {
            Ok(HookRequest::Relay) => {
                self.serve_relay(stream).await;
                return;
            }
            Ok(HookRequest::Status) => {
                let parent = platform::parent_pid();
                let status = crate::hook::SessionStatus {
                    name: self.name().unwrap_or_default(),
                    pid: std::process::id(),
                    host_pid: parent,
                    host: platform::command_line(parent).unwrap_or_default(),
                    route: self.route().as_str().into(),
                    why: self.route_why.lock().expect("route lock").clone(),
                    unread: self.unread_count(),
                };
                let mut text = serde_json::to_string(&status).expect("serializable");
                text.push('\n');
                let _ = stream.get_mut().write_all(text.as_bytes()).await;
                return;
            }
            Ok(HookRequest::Take) => self.lend(),
            Ok(HookRequest::Wait) => {
                // Until mail arrives, the hook goes away (its host ended it), or a newer
                // wait replaces this one: the host starts one after every turn and does
                // not end the older ones.
                let me = self.hook_waits.fetch_add(1, Ordering::AcqRel) + 1;
                self.mail_arrived.notify_waiters();
                let mut probe = String::new();
                loop {
                    let arrived = self.mail_arrived.notified();
                    tokio::pin!(arrived);
                    // Registered before looking, so what happens in between still wakes us.
                    arrived.as_mut().enable();
                    if self.hook_waits.load(Ordering::Acquire) != me {
                        return;
                    }
                    // A session whose inbox was withheld (it bypasses permissions, or its
                    // settings hold other sessions' mail) is not woken by mail either: it
                    // sees its mail when its user next prompts.
                    let lent = if self.may_wake.load(Ordering::Acquire) {
                        self.lend()
                    } else {
                        Vec::new()
                    };
                    if !lent.is_empty() {
                        break lent;
                    }
                    tokio::select! {
                        _ = arrived => {}
                        _ = stream.read_line(&mut probe) => return,
                    }
                }
            }
            _ => return,
        };
        self.want_registration();
        let name = self.name().unwrap_or_default();
        let reply = HookReply {
            name,
            messages: lent,
        };
        let mut text = serde_json::to_string(&reply).expect("serializable");
        text.push('\n');
        let lent = reply.messages;
        if stream.get_mut().write_all(text.as_bytes()).await.is_err() {
            self.give_back(lent);
            return;
        }
        line.clear();
        match stream.read_line(&mut line).await {
            Ok(n) if n > 0 && matches!(serde_json::from_str(&line), Ok(HookRequest::Shown)) => {
                self.shown_by_hook(lent);
            }
            _ => self.give_back(lent),
        }
    }

    /// The inbox relay's connection: jobs out, events in, until either side goes.
    async fn serve_relay(self: Arc<Self>, stream: tokio::io::BufReader<tokio::net::UnixStream>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (read, mut write) = stream.into_inner().into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if write.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        *self.relay_tx.lock().expect("relay lock") = Some(tx);
        self.relay_ready.notify_waiters();
        tracing::info!("the inbox relay is connected");
        let mut lines = tokio::io::BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(ev) = serde_json::from_str::<relay::Event>(&line) else {
                continue;
            };
            match ev {
                relay::Event::Taken { id, held } => self.relay_done(&id, Ok(held)),
                relay::Event::Failed { id, error } => self.relay_done(&id, Err(error)),
                relay::Event::Receipt {
                    message_id,
                    status,
                    reason,
                } => {
                    self.on_inbound(Inbound::Receipt {
                        message_id,
                        status,
                        reason,
                    })
                    .await
                }
                relay::Event::Reply { peer, text } => {
                    self.on_inbound(Inbound::Reply { peer, text }).await
                }
            }
        }
        tracing::warn!("the inbox relay went away");
        *self.relay_tx.lock().expect("relay lock") = None;
        let pending: Vec<_> = self
            .relay_pending
            .lock()
            .expect("relay lock")
            .drain()
            .collect();
        for (_, done) in pending {
            let _ = done.send(Err("the inbox relay went away".into()));
        }
    }

    fn relay_done(&self, id: &str, result: Result<bool, String>) {
        if let Some(done) = self.relay_pending.lock().expect("relay lock").remove(id) {
            let _ = done.send(result);
        }
    }

    /// Has the relay write `d` into the inbox; whether the session holds it.
    async fn relay_write(&self, inbox: &Inbox, d: &Delivery) -> Result<bool, String> {
        let (socket, session_id) = inbox.target().await.map_err(|e| e.to_string())?;
        let wait = async {
            loop {
                let ready = self.relay_ready.notified();
                tokio::pin!(ready);
                ready.as_mut().enable();
                if let Some(tx) = self.relay_tx.lock().expect("relay lock").clone() {
                    return tx;
                }
                ready.await;
            }
        };
        let tx = tokio::time::timeout(BROKER_WAIT, wait)
            .await
            .map_err(|_| "the inbox relay did not start".to_string())?;
        let (done, result) = tokio::sync::oneshot::channel();
        self.relay_pending
            .lock()
            .expect("relay lock")
            .insert(d.id.clone(), done);
        let job = relay::Job {
            delivery: d.clone(),
            socket,
            session_id,
        };
        let mut line = serde_json::to_string(&job).expect("serializable");
        line.push('\n');
        tx.send(line)
            .map_err(|_| "the inbox relay went away".to_string())?;
        result
            .await
            .map_err(|_| "the inbox relay went away".to_string())?
    }

    /// Every unread message, for a hook to show.
    fn lend(&self) -> Vec<Delivery> {
        let lent: Vec<Delivery> = self.unread.lock().expect("unread lock").drain(..).collect();
        let mut out = self.lent.lock().expect("lent lock");
        out.extend(lent.iter().map(|d| d.id.clone()));
        lent
    }

    /// Lent mail a hook showed: seen, and acked.
    fn shown_by_hook(&self, lent: Vec<Delivery>) {
        let ids: Vec<String> = lent.into_iter().map(|d| d.id).collect();
        {
            let mut seen = self.seen.lock().expect("seen lock");
            let mut out = self.lent.lock().expect("lent lock");
            for id in &ids {
                seen.insert(id);
                out.remove(id);
            }
        }
        self.ack(ids);
    }

    /// Lent mail a hook did not show, back at the front of the queue.
    fn give_back(&self, lent: Vec<Delivery>) {
        if lent.is_empty() {
            return;
        }
        {
            let mut unread = self.unread.lock().expect("unread lock");
            let mut out = self.lent.lock().expect("lent lock");
            for d in lent.into_iter().rev() {
                out.remove(&d.id);
                unread.push_front(d);
            }
        }
        self.mail_arrived.notify_waiters();
    }

    /// A channel event, acked as `pushed`: nothing tells whether the host shows it.
    async fn push_channel(&self, d: Delivery) {
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
                self.ack_as(vec![d.id], AckState::Pushed);
            }
            Err(e) => tracing::warn!("could not write a channel event: {e}"),
        }
    }

    /// Queues a message for the inbox behind the others from its sender. Each sender's
    /// mail is written in order by a task of its own, paced below the rate Claude Code
    /// takes from one sender ([`SenderPace`]): past it, the session drops messages and
    /// says so only seconds later, after we would have counted them delivered.
    fn to_inbox(self: &Arc<Self>, inbox: Arc<Inbox>, d: Delivery, attempt: u32) {
        // In flight from here: a redelivery meanwhile is not queued again.
        self.in_inbox.lock().expect("in_inbox lock").insert(
            d.id.clone(),
            InFlight {
                d: d.clone(),
                attempt,
                written: false,
            },
        );
        let mut outboxes = self.outboxes.lock().expect("outboxes lock");
        let tx = outboxes.entry(d.from.clone()).or_insert_with(|| {
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(Arc<Inbox>, Delivery, u32)>();
            let me = self.clone();
            tokio::spawn(async move {
                let mut pace = SenderPace::new();
                while let Some((inbox, d, attempt)) = rx.recv().await {
                    pace.wait().await;
                    me.write_inbox(&inbox, d, attempt).await;
                }
            });
            tx
        });
        let _ = tx.send((inbox, d, attempt));
    }

    /// Into Claude Code's inbox. The session answers nothing on the connection; what it
    /// does with the message it tells by a receipt, at once, on another connection:
    /// `held` (for its user), or `dropped` (past its per-sender rate, or its queue is
    /// full). So the message is settled a moment after the write ([`RECEIPT_WINDOW`]):
    /// `delivered` if no receipt said otherwise. A dropped message is written again
    /// later; one the inbox cannot take waits for `check_messages` or a hook instead.
    /// `attempt` counts the writes of this message so far.
    async fn write_inbox(self: &Arc<Self>, inbox: &Inbox, d: Delivery, attempt: u32) {
        let id = d.id.clone();
        // In flight from here: a redelivery meanwhile is not written again, and a receipt
        // that comes before the write returns finds it.
        self.seen.lock().expect("seen lock").insert(&id);
        self.last_from
            .lock()
            .expect("last_from lock")
            .insert(d.from.clone(), id.clone());
        self.in_inbox.lock().expect("in_inbox lock").insert(
            id.clone(),
            InFlight {
                d: d.clone(),
                attempt,
                written: false,
            },
        );
        let relay = self.use_relay.load(Ordering::Acquire);
        let written = if relay {
            match self.relay_write(inbox, &d).await {
                Ok(true) => {
                    self.held.lock().expect("held lock").insert(id.clone());
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(e) => Err(std::io::Error::other(e)),
            }
        } else {
            // An answer from a Claude Code session without claude-peers is signed with
            // that session's own address: the model's SendMessage reply then goes to it,
            // not back to us.
            let native = self
                .native_sockets
                .lock()
                .expect("native lock")
                .get(&d.from)
                .cloned();
            let reply = match native {
                Some(socket) => Ok(socket),
                None => self.replies.socket(inbox.dir(), &d.from, &self.inbound),
            };
            match reply {
                Ok(reply) => inbox.write(&d, &reply).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            tracing::warn!(%id, "the inbox did not take a message, keeping it for check_messages: {e}");
            self.in_inbox.lock().expect("in_inbox lock").remove(&id);
            self.seen.lock().expect("seen lock").remove(&id);
            self.keep_unread(d);
            return;
        }
        match self.in_inbox.lock().expect("in_inbox lock").get_mut(&id) {
            // Still this write's: now it waits for the receipt window.
            Some(f) if f.attempt == attempt => f.written = true,
            // A receipt already settled it (or it is waiting to be written again).
            _ => return,
        }
        // The relay already waited for the session's word.
        let window = if relay {
            Duration::ZERO
        } else {
            RECEIPT_WINDOW
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            me.settle(&id, attempt);
        });
    }

    /// After the receipt window of write `attempt`: `held` if the session said so (it
    /// stays in flight for the user's answer), else `delivered`; nothing if a receipt
    /// settled it meanwhile or it is waiting to be written again.
    fn settle(&self, id: &str, attempt: u32) {
        let current = matches!(
            self.in_inbox.lock().expect("in_inbox lock").get(id),
            Some(f) if f.written && f.attempt == attempt
        );
        if !current {
            return;
        }
        if self.held.lock().expect("held lock").contains(id) {
            self.ack_as(vec![id.to_string()], AckState::Held);
            return;
        }
        if let Some(f) = self.in_inbox.lock().expect("in_inbox lock").remove(id) {
            let now = tokio::time::Instant::now();
            let mut recent = self.recent.lock().expect("recent lock");
            while recent
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > RECENT || recent.len() >= 512)
            {
                recent.pop_front();
            }
            recent.push_back((now, f.d, f.attempt));
        }
        self.ack(vec![id.to_string()]);
    }

    /// A message acked delivered a moment ago, taken back for a late receipt.
    fn take_recent(&self, id: &str) -> Option<(Delivery, u32)> {
        let mut recent = self.recent.lock().expect("recent lock");
        let at = recent.iter().position(|(_, d, _)| d.id == id)?;
        recent.remove(at).map(|(_, d, attempt)| (d, attempt))
    }

    /// A message the session dropped or let go unshown: written again after a pause
    /// while it was for its rate or a full queue, else kept for `check_messages` and the
    /// hooks. It is queued again at the broker if it had been acked as held.
    fn retry_or_keep(self: &Arc<Self>, id: &str, reason: Option<&str>) {
        let in_flight = self
            .in_inbox
            .lock()
            .expect("in_inbox lock")
            .remove(id)
            .map(|f| (f.d, f.attempt, false));
        // Or acked delivered a moment ago, and dropped after all.
        let Some((d, attempt, was_delivered)) =
            in_flight.or_else(|| self.take_recent(id).map(|(d, a)| (d, a, true)))
        else {
            return;
        };
        let was_held = self.held.lock().expect("held lock").remove(id);
        if was_held || was_delivered {
            self.ack_as(vec![id.to_string()], AckState::Returned);
        }
        let transient = matches!(reason, Some("rate-limited" | "queue-full"));
        if let (true, Route::Inbox(inbox)) = (transient && attempt < MAX_INBOX_WRITES, self.route())
        {
            tracing::info!(%id, attempt, "the session dropped a message; writing it again later");
            // Still in flight while it waits: a redelivery is not written meanwhile.
            self.in_inbox.lock().expect("in_inbox lock").insert(
                id.to_string(),
                InFlight {
                    d: d.clone(),
                    attempt,
                    written: false,
                },
            );
            let me = self.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(INBOX_RETRY * attempt.max(1)).await;
                me.in_inbox.lock().expect("in_inbox lock").remove(&id);
                me.to_inbox(inbox, d, attempt + 1);
            });
            return;
        }
        self.seen.lock().expect("seen lock").remove(id);
        self.keep_unread(d);
    }

    /// The live Claude Code sessions that do not run claude-peers: all but our own host
    /// and the hosts of `peer_pids` (our peers' `serve` processes).
    pub fn natives(&self, peer_pids: impl Iterator<Item = u32>) -> Vec<Native> {
        native::list(|| native_skip(peer_pids))
    }

    /// Sends to a Claude Code session that does not run claude-peers (`cc:<name>`),
    /// straight into its inbox; `skip` are the hosts of our own peers. Answers the
    /// message id and `delivered` (the session took it) or `held` (its user must approve
    /// it, as for any session of another permission mode).
    pub async fn send_native(
        &self,
        address: &str,
        text: String,
        in_reply_to: Option<String>,
        peer_pids: impl Iterator<Item = u32>,
    ) -> Result<(String, &'static str), String> {
        let target =
            native::find(address, native::list(|| native_skip(peer_pids))).ok_or_else(|| {
                format!(
                    "no live Claude Code session is {address}; list_peers shows those there are"
                )
            })?;
        let dir = target
            .socket
            .parent()
            .ok_or_else(|| format!("{address} has no inbox"))?;
        let me = self
            .name()
            .unwrap_or_else(|| self.identity.lock().expect("identity lock").name.clone());
        let d = local_delivery(me, address.to_string(), text, in_reply_to);
        // Its replies come back to this socket, as from `address`.
        let reply = self
            .replies
            .socket(dir, address, &self.inbound)
            .map_err(|e| format!("cannot listen for {address}'s answers: {e}"))?;
        let host_argv = platform::command_line(platform::parent_pid()).unwrap_or_default();
        let mode = if bypasses_permissions(&host_argv) {
            "bypass"
        } else {
            "prompting"
        };
        let line = inbox::message_line(&d, &target.session_id, &reply, Some(mode));
        inbox::write_line(&target.socket, &line)
            .await
            .map_err(|e| format!("{address} did not take the message: {e}"))?;
        self.last_from
            .lock()
            .expect("last_from lock")
            .insert(address.to_string(), d.id.clone());
        self.native_sockets
            .lock()
            .expect("native lock")
            .insert(address.to_string(), target.socket.clone());
        // A session that holds it says so at once, on another connection.
        tokio::time::sleep(NATIVE_HOLD_WAIT).await;
        let held = self.held.lock().expect("held lock").remove(&d.id);
        Ok((d.id, if held { "held" } else { "delivered" }))
    }

    /// A receipt or a reply from one of the inbox's reply sockets.
    async fn on_inbound(self: &Arc<Self>, ev: Inbound) {
        match ev {
            Inbound::Receipt {
                message_id,
                status,
                reason,
            } => {
                tracing::info!(id = %message_id, %status, ?reason, "inbox receipt");
                match status.as_str() {
                    "held" => {
                        self.held
                            .lock()
                            .expect("held lock")
                            .insert(message_id.clone());
                        // Acked delivered a moment ago: held after all, in flight again
                        // until its user answers.
                        if let Some((d, attempt)) = self.take_recent(&message_id) {
                            self.in_inbox.lock().expect("in_inbox lock").insert(
                                message_id.clone(),
                                InFlight {
                                    d,
                                    attempt,
                                    written: true,
                                },
                            );
                            self.ack_as(vec![message_id], AckState::Held);
                        }
                    }
                    "delivered" | "denied" => {
                        let known = self
                            .in_inbox
                            .lock()
                            .expect("in_inbox lock")
                            .remove(&message_id)
                            .is_some();
                        self.held.lock().expect("held lock").remove(&message_id);
                        if known {
                            let state = if status == "denied" {
                                AckState::Denied
                            } else {
                                AckState::Delivered
                            };
                            self.ack_as(vec![message_id], state);
                        }
                    }
                    "expired" | "dropped" => self.retry_or_keep(&message_id, reason.as_deref()),
                    _ => {}
                }
            }
            Inbound::Reply { peer, text } => {
                let in_reply_to = self
                    .last_from
                    .lock()
                    .expect("last_from lock")
                    .get(&peer)
                    .cloned();
                if peer.starts_with("cc:") {
                    // A Claude Code session without claude-peers answered us: shown to our
                    // model by our own path (not through the broker, which does not know it).
                    let me = self.name().unwrap_or_default();
                    self.deliver(local_delivery(peer, me, text, in_reply_to))
                        .await;
                    return;
                }
                let sent = match self.client().await {
                    Ok(c) => c
                        .call(crate::protocol::Send {
                            key: None,
                            to: vec![peer.clone()],
                            text,
                            in_reply_to,
                            from: None,
                        })
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(s) => {
                        tracing::info!(to = %peer, id = %s.message_id, "relayed a reply from the inbox")
                    }
                    Err(e) => {
                        tracing::warn!(to = %peer, "could not relay a reply from the inbox: {e}")
                    }
                }
            }
        }
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
