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

mod args;
pub mod doctor;
mod log;
pub mod setup;
pub mod table;
mod top;

pub use args::{Cli, Command, ServeArgs};
pub use setup::SetupAgent;

use std::io::{Read, Write};

use anyhow::{Context, Result, bail};

use crate::client::{Client, ClientError, ConnectOptions, SEND_TRIES};
use crate::paths::Paths;
use crate::peer_channel::{self, Sessions};
use crate::protocol::*;

/// Connects to the broker, starting one if allowed and none runs.
async fn open(paths: &Paths, autostart: bool) -> Result<Client, ClientError> {
    let mut opts = ConnectOptions::new("claude-peers-cli");
    opts.autostart = autostart;
    Client::connect(paths, &opts).await
}

/// Connects to the broker, starting one if allowed and none runs; says so on stderr when
/// it did, so that a first `claude-peers peers` that finds nobody is not a mystery.
async fn connect(paths: &Paths, autostart: bool) -> Result<Client, ClientError> {
    let client = open(paths, autostart).await?;
    if client.started_broker() {
        let _ = writeln!(
            std::io::stderr(),
            "claude-peers: started the broker (pid {}, socket {}, log {})",
            client.broker().pid,
            paths.socket.display(),
            paths.log.display()
        );
    }
    Ok(client)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(&json_times(serde_json::to_value(value)?))?;
    outln!("{text}");
    Ok(())
}

/// The times a verb's JSON carries, in milliseconds on the wire, as RFC 3339 (UTC), as
/// scripts read times: `"sent_at": "2026-12-01T16:30:45.123Z"`.
fn json_times(mut value: serde_json::Value) -> serde_json::Value {
    const TIMES: &[&str] = &[
        "sent_at",
        "delivered_at",
        "first_seen",
        "last_seen",
        "started_at",
    ];
    match &mut value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                *v = match v.as_i64() {
                    Some(ms) if TIMES.contains(&k.as_str()) => {
                        crate::time::timestamp_rfc3339(ms).into()
                    }
                    _ => json_times(v.take()),
                };
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                *v = json_times(v.take());
            }
        }
        _ => {}
    }
    value
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
pub async fn run(
    command: Command,
    paths: Paths,
    pc: Option<Sessions>,
) -> Result<std::process::ExitCode> {
    let done = match command {
        Command::Status { json } => return status(&paths, json).await,
        Command::Peers { scope, all, json } => peers(&paths, pc.as_ref(), scope, all, json).await,
        Command::Send {
            to,
            message,
            from,
            in_reply_to,
            json,
        } => send(&paths, pc.as_ref(), to, message, from, in_reply_to, json).await,
        Command::Log {
            follow,
            limit,
            peer,
            json,
        } => log::run(&paths, follow, limit, peer, json).await,
        Command::Stop => stop(&paths).await,
        Command::Top => top::run(&paths).await,
        Command::Completions { shell } => completions(shell),
        Command::Man => man(),
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
        ("connections", format!("{} besides this one", s.connections)),
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

async fn peers(
    paths: &Paths,
    pc: Option<&Sessions>,
    scope: Scope,
    all: bool,
    json: bool,
) -> Result<()> {
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
    // peer-channel's sessions are on this machine, in no directory or repository we know.
    let theirs = match (pc, scope) {
        (Some(pc), Scope::Machine) => {
            let ours = peers.iter().filter(|p| p.online).map(|p| p.name.clone());
            pc.live(&ours.collect(), &paths.socket).await
        }
        _ => Vec::new(),
    };
    if json {
        let mut all: Vec<serde_json::Value> = Vec::with_capacity(peers.len() + theirs.len());
        for p in &peers {
            let mut v = serde_json::to_value(p)?;
            v["kind"] = "claude-peers".into();
            all.push(v);
        }
        all.extend(theirs.iter().map(|t| {
            serde_json::json!({
                "name": t.address(),
                "online": true,
                "kind": "peer-channel",
                "version": t.version,
            })
        }));
        return print_json(&all);
    }
    if peers.is_empty() && theirs.is_empty() {
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
        .chain(theirs.iter().map(|t| {
            vec![
                t.address(),
                "online".into(),
                "-".into(),
                "-".into(),
                format!(
                    "(peer-channel{})",
                    t.version
                        .as_deref()
                        .map(|v| format!(" {v}"))
                        .unwrap_or_default()
                ),
                "now".into(),
                "-".into(),
            ]
        }))
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
    pc: Option<&Sessions>,
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
    if to.starts_with(peer_channel::PREFIX) {
        let Some(pc) = pc else {
            bail!(
                "{to} is a peer-channel session, and peer-channel is turned off here (--peer-channel off or CLAUDE_PEERS_PEER_CHANNEL=off)"
            );
        };
        let id = pc
            .deliver(&to, &from, &text, in_reply_to.as_deref())
            .await
            .map_err(anyhow::Error::msg)?;
        let sent = Sent {
            message_id: id,
            sent_at: now_millis(),
            recipients: vec![RecipientState {
                name: to,
                state: DeliveryState::Delivered,
            }],
        };
        if json {
            return print_json(&sent);
        }
        outln!(
            "delivered to {} (peer-channel message {})",
            sent.recipients[0].name,
            sent.message_id
        );
        return Ok(());
    }
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

fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "claude-peers", &mut script);
    out!("{}", String::from_utf8_lossy(&script));
    Ok(())
}

fn man() -> Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    out!("{}", String::from_utf8_lossy(&page));
    Ok(())
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
