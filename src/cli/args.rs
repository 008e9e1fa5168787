//! The command line's arguments: every verb and flag, with the help people read. The
//! same definitions give the shell completions and the man page.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::SetupAgent;
use crate::protocol::Scope;

/// `--version`: the release and the broker protocol it speaks.
pub static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (broker protocol {})",
        env!("CARGO_PKG_VERSION"),
        crate::protocol::PROTOCOL_VERSION
    )
});

#[derive(Debug, Parser)]
#[command(
    name = "claude-peers",
    version = VERSION.as_str(),
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
    /// Join peer-channel's sessions (~/.peer-channel/sessions, or CLAUDE_PEERS_PEER_CHANNEL_DIR): `serve` holds its name there and answers peer-channel's ping and deliver; `peers` lists peer-channel sessions as pc:<name>, `send pc:<name>` reaches them.
    #[arg(
        long,
        global = true,
        env = "CLAUDE_PEERS_PEER_CHANNEL",
        value_name = "WHEN",
        default_value = "on",
        ignore_case = true
    )]
    pub peer_channel: crate::peer_channel::Toggle,
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
        /// One JSON object instead of the report.
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
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// A live view: the sessions, the messages as they pass, and keys to send, filter and
    /// read a thread.
    Top,
    /// List sessions.
    Peers {
        /// machine, directory or repo (as seen from the current directory).
        #[arg(long, default_value = "machine")]
        scope: Scope,
        /// Include offline peers.
        #[arg(long)]
        all: bool,
        /// A JSON array instead of the table.
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
        /// Reply to this message id (a UUID, as `log` and the tools show it).
        #[arg(long, value_name = "ID", value_parser = message_id)]
        in_reply_to: Option<String>,
        /// The receipt as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show message history; -f follows new messages as they happen.
    Log {
        /// Keep running and print each new message as it is sent, and its receipts, until
        /// Ctrl-C; follows the broker through restarts.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many recent messages to show first (0: none, with -f only new ones).
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: u32,
        /// Only messages from or to this peer.
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
        /// One JSON object per message and recipient, times in RFC 3339 (with -f, one per
        /// line as they happen).
        #[arg(long)]
        json: bool,
    },
    /// Ask the broker to shut down cleanly.
    #[command(visible_alias = "kill-broker")]
    Stop,
    /// Print a completion script for a shell, e.g.
    /// `claude-peers completions bash > ~/.local/share/bash-completion/completions/claude-peers`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `claude-peers man | man -l -`.
    Man,
}

/// A path argument; empty (as `CLAUDE_PEERS_HOME=` leaves it) means the default, as the
/// variable's absence does.
/// A message id: a UUID, as the broker gives them.
fn message_id(s: &str) -> Result<String, String> {
    if crate::protocol::is_message_id(s) {
        Ok(s.to_string())
    } else {
        Err("not a message id: ids are lowercase UUIDs like 019ad3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d, as `claude-peers log --json` shows them".to_string())
    }
}

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
