//! The command line: argument definitions and the verbs for people and scripts.
//!
//! Every verb is a client of the broker like any other. Tables for people, `--json` for
//! scripts; errors go to stderr in one line. Exit codes: 0 ok, 1 failure, 2 usage.

/// Writes a line to stdout like `println!`, but returns a write error (with `?`) instead
/// of panicking (see [`emit`]).
macro_rules! outln {
    ($($t:tt)*) => { $crate::cli::emit(format_args!("{}\n", format_args!($($t)*)))? };
}

/// Writes to stdout like `print!`, but returns a write error (see [`emit`]).
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::emit(format_args!($($t)*))? };
}

pub mod doctor;
pub mod setup;
pub use setup::SetupAgent;
pub mod table;

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::client::{Client, ClientError, ConnectOptions, Event, SEND_TRIES};
use crate::paths::Paths;
use crate::protocol::*;

#[derive(Debug, Parser)]
#[command(
    name = "claude-peers",
    version,
    about = "Let coding-agent sessions on this machine find each other and exchange messages.",
    long_about = None,
)]
pub struct Cli {
    /// Directory for the socket, lock, database and log [default: /run/user/<uid> and ~/.local/state, or ~/.claude-peers]. Empty is the default.
    #[arg(long, global = true, env = "CLAUDE_PEERS_HOME", value_name = "DIR", value_parser = path_or_default)]
    pub home: Option<PathBuf>,
    /// Database file [default: peers.db in the state directory]. Empty is the default.
    #[arg(long, global = true, env = "CLAUDE_PEERS_DB", value_name = "FILE", value_parser = path_or_default)]
    pub db: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the MCP channel server for one Claude Code session (stdio).
    Serve(ServeArgs),
    /// Why mail does or does not arrive: the broker, Claude Code and how claude-peers is
    /// set up in it, the path each live session's mail takes and why.
    Doctor {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Register the MCP server and the mail hooks with an agent (for people who do not
    /// use the plugin); --uninstall takes them out. Changed files are backed up first.
    Setup {
        #[arg(value_enum)]
        agent: SetupAgent,
        /// Remove what setup added.
        #[arg(long)]
        uninstall: bool,
        /// Show the files as they would be, and write nothing.
        #[arg(long)]
        print: bool,
    },
    /// Internal: write a session's mail into its Claude Code inbox from outside the
    /// session's process tree (started by `serve`; see src/serve/relay.rs).
    #[command(hide = true)]
    InboxRelay { session_socket: PathBuf },
    /// Run as an agent hook: `prompt` adds unread mail to the prompt (UserPromptSubmit,
    /// SessionStart); `wait` sleeps until mail arrives, then wakes the session with it
    /// (Stop/SessionStart with async and asyncRewake; exits 2 with the mail on stderr);
    /// `stop` returns the mail now as the reason the turn goes on (Codex's Stop, Gemini
    /// CLI's AfterAgent, Cursor's stop), once per batch.
    Hook {
        #[arg(value_enum)]
        kind: crate::hook::HookKind,
    },
    /// Run the broker in the foreground (clients start one on demand).
    Broker(crate::config::BrokerArgs),
    /// Show the broker: pid, version, uptime, socket, database, peers, queued mail.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List sessions.
    Peers {
        /// machine, directory or repo (as seen from the current directory).
        #[arg(long, default_value = "machine")]
        scope: Scope,
        /// Include offline peers.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Send a message to a peer ("-" reads it from stdin).
    Send {
        /// The recipient's name.
        to: String,
        /// The message text, or "-" for stdin.
        message: String,
        /// The name to send as.
        #[arg(long, value_name = "NAME", default_value = "cli")]
        from: String,
        /// Reply to this message id.
        #[arg(long, value_name = "ID")]
        in_reply_to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show message history; -f follows new messages as they happen.
    Log {
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many recent messages to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: u32,
        /// Only messages from or to this peer.
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ask the broker to shut down cleanly.
    #[command(alias = "kill-broker")]
    Stop,
}

/// A path argument; empty (as `CLAUDE_PEERS_HOME=` leaves it) means the default, as the
/// variable's absence does.
fn path_or_default(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

impl Cli {
    /// `--home`, unless empty.
    pub fn home(&self) -> Option<&std::path::Path> {
        self.home.as_deref().filter(|p| !p.as_os_str().is_empty())
    }

    /// `--db`, unless empty.
    pub fn db(&self) -> Option<&std::path::Path> {
        self.db.as_deref().filter(|p| !p.as_os_str().is_empty())
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// This session's name [default: CLAUDE_PEERS_NAME, PEER_CHANNEL_SESSION_NAME, or the directory name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// How mail reaches the model: auto (Claude Code's inbox when the session has one, else channel events when the host enabled this server's channel, else polling), inbox, channel (alias always), never.
    #[arg(long, env = "CLAUDE_PEERS_PUSH", default_value = "auto")]
    pub push: crate::serve::PushMode,
    /// Write mail into the inbox of a Claude Code session that bypasses permissions too. Such a session holds messages from other sessions for its user's approval, but takes its own server's unasked; by default its mail waits for check_messages instead.
    #[arg(long, env = "CLAUDE_PEERS_BYPASS_INBOX")]
    pub bypass_inbox: bool,
}

async fn connect(paths: &Paths, autostart: bool) -> Result<Client, ClientError> {
    let mut opts = ConnectOptions::new("claude-peers-cli");
    opts.autostart = autostart;
    Client::connect(paths, &opts).await
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    outln!("{text}");
    Ok(())
}

/// Writes to stdout and flushes; never panics. The error keeps its kind, so `main` can
/// end quietly when the reader went away (`claude-peers log | head`), as filters do
/// ([`is_closed_stdout`]), and report any other (a redirect to a full disk).
pub fn emit(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot write to standard output: {e}")))
}

/// Whether `e` is stdout's reader having gone away.
pub fn is_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs a client verb (everything but `serve` and `broker`), and says how the program
/// should exit.
pub async fn run(command: Command, paths: Paths) -> Result<std::process::ExitCode> {
    let done = match command {
        Command::Status { json } => return status(&paths, json).await,
        Command::Peers { scope, all, json } => peers(&paths, scope, all, json).await,
        Command::Send {
            to,
            message,
            from,
            in_reply_to,
            json,
        } => send(&paths, to, message, from, in_reply_to, json).await,
        Command::Log {
            follow,
            limit,
            peer,
            json,
        } => log(&paths, follow, limit, peer, json).await,
        Command::Stop => stop(&paths).await,
        Command::Doctor { json } => doctor::run(&paths, json).await,
        Command::Setup {
            agent,
            uninstall,
            print,
        } => setup::run(agent, uninstall, print),
        Command::Serve(_)
        | Command::Broker(_)
        | Command::Hook { .. }
        | Command::InboxRelay { .. } => {
            unreachable!("handled by main")
        }
    };
    done.map(|()| std::process::ExitCode::SUCCESS)
}

async fn status(paths: &Paths, json: bool) -> Result<std::process::ExitCode> {
    let client = match connect(paths, false).await {
        Ok(c) => c,
        Err(ClientError::NotRunning { socket }) => {
            // Sessions still run (each answers on its session socket) and wait for one.
            let waiting = crate::hook::statuses(paths).await.len();
            let stopped = paths.stopped.exists();
            if json {
                print_json(&serde_json::json!({
                    "running": false,
                    "socket": socket,
                    "stopped": stopped,
                    "sessions_waiting": waiting,
                }))?;
            } else {
                outln!("broker: not running (socket {})", socket.display());
                if waiting > 0 {
                    let why = if stopped {
                        "it was stopped with `claude-peers stop`; "
                    } else {
                        ""
                    };
                    outln!(
                        "sessions: {waiting} waiting for a broker ({why}the next command or new session that needs one starts it)"
                    );
                }
            }
            return Ok(std::process::ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let s = client.call(StatusCall).await?;
    if json {
        print_json(&s)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let rows = [
        ("broker", format!("running, pid {}", s.pid)),
        (
            "version",
            format!("{} (protocol {})", s.version, s.protocol),
        ),
        (
            "uptime",
            table::ago(s.started_at, now_millis()).replace(" ago", ""),
        ),
        ("socket", s.socket),
        ("database", s.database),
        (
            "peers",
            format!("{} online, {} offline", s.peers_online, s.peers_offline),
        ),
        ("queued", format!("{} unread messages", s.queued)),
        ("connections", s.connections.to_string()),
    ];
    let mut rows = rows.to_vec();
    if let Some(n) = &s.network {
        rows.push((
            "network",
            format!(
                "{} to {} as host {} (stream {}); {} waiting to be relayed",
                if n.connected {
                    "connected"
                } else {
                    "NOT connected"
                },
                n.url,
                n.host,
                n.stream,
                n.waiting
            ),
        ));
    }
    if s.quarantined > 0 {
        rows.push((
            "damaged",
            format!(
                "{} messages put aside: their stored rows cannot be read (ids in the broker log, {})",
                s.quarantined,
                paths.log.display()
            ),
        ));
    }
    for (k, v) in rows {
        outln!("{k:<12} {v}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Where the current directory is, for scoped requests: its path and git common dir.
fn here() -> (Option<String>, Option<String>) {
    let cwd = std::env::current_dir().ok();
    let git_common_dir = cwd
        .as_deref()
        .and_then(|d| crate::git::GitInfo::discover(d).common_dir);
    (cwd.map(|c| c.display().to_string()), git_common_dir)
}

async fn peers(paths: &Paths, scope: Scope, all: bool, json: bool) -> Result<()> {
    let client = connect(paths, true).await?;
    let (cwd, git_common_dir) = here();
    let peers = client
        .list_peers(ListPeers {
            scope,
            include_offline: all,
            cwd,
            git_common_dir,
            after: None,
        })
        .await?;
    if json {
        return print_json(&peers);
    }
    if peers.is_empty() {
        outln!(
            "no {}peers{}",
            if all { "" } else { "online " },
            if all {
                ""
            } else {
                " (--all shows offline ones too)"
            }
        );
        return Ok(());
    }
    let now = now_millis();
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                match (p.online, p.unreachable) {
                    (true, _) => "online",
                    (false, true) => "unreachable",
                    (false, false) => "offline",
                }
                .to_string(),
                table::short_path(&p.context.cwd),
                p.context.branch.clone().unwrap_or_else(|| "-".into()),
                if p.summary.is_empty() {
                    "-".into()
                } else {
                    table::clip(&p.summary, 48)
                },
                if p.online {
                    "now".into()
                } else {
                    table::ago(p.last_seen, now)
                },
                p.unread.to_string(),
            ]
        })
        .collect();
    out!(
        "{}",
        table::render(
            &[
                "NAME",
                "STATE",
                "DIRECTORY",
                "BRANCH",
                "SUMMARY",
                "LAST SEEN",
                "UNREAD"
            ],
            &rows
        )
    );
    Ok(())
}

async fn send(
    paths: &Paths,
    to: String,
    message: String,
    from: String,
    in_reply_to: Option<String>,
    json: bool,
) -> Result<()> {
    let text = if message == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the message from stdin")?;
        s.trim_end_matches('\n').to_string()
    } else {
        message
    };
    // One key for every try: a try whose answer was lost (the broker restarted) may have
    // stored the message, and the broker answers a retry with that message.
    let request = Send {
        to: vec![to],
        text,
        in_reply_to,
        from: Some(from),
        key: Some(uuid::Uuid::now_v7().to_string()),
    };
    let mut tries = 0;
    let sent = loop {
        tries += 1;
        let client = connect(paths, true).await?;
        match client.call(request.clone()).await {
            Err(ClientError::Disconnected) if tries < SEND_TRIES => continue,
            other => break other?,
        }
    };
    if json {
        return print_json(&sent);
    }
    for r in &sent.recipients {
        let how = match r.state {
            DeliveryState::Delivered => "delivered to",
            DeliveryState::Pushed => "pushed to (not yet read by)",
            DeliveryState::Queued => "queued for",
            DeliveryState::Held => "held for its user's approval by",
            DeliveryState::Denied => "declined by the user of",
            DeliveryState::Damaged => "stored damaged for",
            DeliveryState::Relaying => "relaying (stored here, on its way) to",
            DeliveryState::Undeliverable => "not delivered (no such session there) to",
        };
        outln!("{how} {} (message {})", r.name, sent.message_id);
    }
    Ok(())
}

fn print_entry(e: &LogEntry, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    let reply = e
        .in_reply_to
        .as_ref()
        .map(|r| format!(" (re {})", table::clip(r, 13)))
        .unwrap_or_default();
    outln!(
        "{}  {} -> {}  [{}]{}  {}",
        table::timestamp(e.sent_at),
        e.from,
        e.to,
        e.state.as_str(),
        reply,
        table::clip(&e.text, 100)
    );
    Ok(())
}

async fn log(
    paths: &Paths,
    follow: bool,
    limit: u32,
    peer: Option<String>,
    json: bool,
) -> Result<()> {
    let query = LogQuery {
        limit: Some(limit),
        peer: peer.clone(),
        before: None,
    };
    let mut client = connect(paths, true).await?;
    if !follow {
        let history = client.log(query).await?;
        if json {
            return print_json(&history);
        }
        for e in &history {
            print_entry(e, false)?;
        }
        if history.is_empty() {
            let _ = writeln!(std::io::stderr(), "no messages yet");
        }
        return Ok(());
    }
    // What was printed as sent, so history read again after a reconnect prints only
    // what is new.
    let mut seen = std::collections::HashSet::new();
    loop {
        // Subscribe first so nothing falls between the history and the live tail.
        client.call(SubscribeCall).await?;
        for e in client.log(query.clone()).await? {
            if seen.insert((e.id.clone(), e.to.clone())) {
                print_entry(&e, json)?;
            }
        }
        while let Some(event) = client.next_event().await {
            let ev = match event {
                Event::Log(ev) => ev,
                Event::Lagged(missed) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "claude-peers: {missed} events were missed because this reader fell behind; `claude-peers log` shows them"
                    );
                    continue;
                }
                Event::Deliver(_) | Event::Closed(_) => continue,
            };
            let e = ev.entry;
            if peer.as_ref().is_some_and(|p| *p != e.from && *p != e.to) {
                continue;
            }
            if ev.kind == LogEventKind::Sent && !seen.insert((e.id.clone(), e.to.clone())) {
                continue;
            }
            print_entry(&e, json)?;
        }
        let _ = writeln!(
            std::io::stderr(),
            "claude-peers: the broker went away; following again when it is back (Ctrl-C ends)"
        );
        client = reconnect(paths).await?;
    }
}

/// A connection to the broker after the last one was lost: after `claude-peers stop`, the
/// next broker someone starts (waiting asleep for its socket); otherwise one started now.
async fn reconnect(paths: &Paths) -> Result<Client> {
    let mut backoff = crate::client::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    loop {
        let stopped = paths.stopped.exists();
        if stopped {
            crate::platform::wait_until_exists(&paths.socket).await?;
        }
        match connect(paths, !stopped).await {
            Ok(c) => return Ok(c),
            Err(ClientError::NotRunning { .. }) | Err(ClientError::Disconnected) => {
                backoff.wait().await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn stop(paths: &Paths) -> Result<()> {
    // Sessions that lose their broker now wait for one instead of starting it again; the
    // next broker (started by a command or a new session that needs one) removes this.
    paths.prepare()?;
    crate::paths::private_file(&paths.stopped)
        .with_context(|| format!("cannot write {}", paths.stopped.display()))?;
    let mut client = match connect(paths, false).await {
        Ok(c) => c,
        Err(ClientError::NotRunning { .. }) => {
            outln!(
                "no broker is running; sessions will not start one until a command or a new session needs it"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let pid = client.broker().pid;
    client
        .call(Shutdown {
            reason: Some("claude-peers stop".into()),
        })
        .await?;
    // The broker closes every connection once it has finished, then removes its socket
    // and releases its lock; wait for all of that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while client.next_event().await.is_some() {}
        crate::client::wait_socket_gone(paths, deadline).await;
    })
    .await;
    if closed.is_err() || paths.socket.exists() {
        bail!(
            "the broker (pid {pid}) was asked to stop but is still running after 5s; see its log at {}",
            paths.log.display()
        );
    }
    outln!(
        "broker stopped (pid {pid}); sessions wait, asleep, until a command or a new session starts one"
    );
    Ok(())
}
