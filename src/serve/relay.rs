//! The inbox relay: how mail reaches a Claude Code session that bypasses permissions
//! without getting around the hold it puts on other sessions' mail.
//!
//! Claude Code takes its own descendants' messages unasked, and `serve` is one. So for
//! such a session `serve` starts `claude-peers inbox-relay`, a process that is not its
//! descendant (started in the background by a shell that exits at once, so it is
//! re-parented away from Claude Code), and has it write each message. Claude Code then
//! treats the message as any other session's: it holds it, tells the relay `held`, and
//! shows its user a dialog; `delivered` or `denied` follows. The relay listens for those
//! receipts itself (Claude Code sends them only to the writing process) and passes them
//! back to `serve` over the session socket, where it registered with `relay`.
//!
//! The relay lives as long as that connection: when `serve` goes, so does the relay.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::inbox::{self, Inbound, Replies};
use crate::protocol::Delivery;

/// How long the relay waits, after the session took a message, for the `held` receipt
/// that comes at once when it holds it.
const HELD_WAIT: Duration = Duration::from_millis(300);

/// `serve` → relay: write this message into that session.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    pub delivery: Delivery,
    pub socket: PathBuf,
    pub session_id: String,
}

/// Relay → `serve`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The session took the message; `held` when it holds it for its user.
    Taken { id: String, held: bool },
    /// It did not.
    Failed { id: String, error: String },
    /// A receipt that came later (`delivered`, `denied`, `expired`, `dropped`).
    Receipt {
        message_id: String,
        status: String,
        reason: Option<String>,
    },
    /// A `SendMessage` answer to `peer`.
    Reply { peer: String, text: String },
}

/// Starts the relay for the session whose `serve` listens on `session_socket`, in the
/// background, detached from us (so not a descendant of the session's Claude Code).
pub fn spawn(session_socket: &Path) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("\"$0\" \"$@\" </dev/null >/dev/null 2>&1 &")
        .arg(exe)
        .arg("inbox-relay")
        .arg(session_socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "/bin/sh could not start the relay: {status}"
        )));
    }
    Ok(())
}

/// The relay process: registers with `serve`, then writes what it is given and passes
/// back what the session says.
pub async fn run(session_socket: &Path) -> std::io::Result<()> {
    let stream = UnixStream::connect(session_socket).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(b"{\"op\":\"relay\"}\n").await?;
    let (tx, mut inbound) = tokio::sync::mpsc::unbounded_channel::<Inbound>();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let replies = std::sync::Arc::new(Replies::default());
    let held = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    // What the session says on our reply sockets.
    {
        let out = out_tx.clone();
        let held = held.clone();
        tokio::spawn(async move {
            while let Some(ev) = inbound.recv().await {
                let ev = match ev {
                    Inbound::Receipt {
                        message_id,
                        status,
                        reason,
                    } => {
                        if status == "held" {
                            held.lock().expect("held lock").insert(message_id);
                            continue;
                        }
                        Event::Receipt {
                            message_id,
                            status,
                            reason,
                        }
                    }
                    Inbound::Reply { peer, text } => Event::Reply { peer, text },
                };
                let _ = out.send(ev);
            }
        });
    }
    // Everything back to `serve`, in order.
    tokio::spawn(async move {
        while let Some(ev) = out_rx.recv().await {
            let mut line = serde_json::to_string(&ev).expect("serializable");
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(job) = serde_json::from_str::<Job>(&line) else {
            continue;
        };
        let (out, tx, replies, held) = (out_tx.clone(), tx.clone(), replies.clone(), held.clone());
        tokio::spawn(async move {
            let id = job.delivery.id.clone();
            let ev = match write_job(&job, &replies, &tx).await {
                Ok(()) => {
                    tokio::time::sleep(HELD_WAIT).await;
                    let held = held.lock().expect("held lock").remove(&id);
                    Event::Taken { id, held }
                }
                Err(e) => Event::Failed {
                    id,
                    error: e.to_string(),
                },
            };
            let _ = out.send(ev);
        });
    }
    // `serve` is gone.
    replies.remove_all();
    Ok(())
}

async fn write_job(
    job: &Job,
    replies: &Replies,
    tx: &tokio::sync::mpsc::UnboundedSender<Inbound>,
) -> std::io::Result<()> {
    let dir = job
        .socket
        .parent()
        .ok_or_else(|| std::io::Error::other("the inbox socket has no directory"))?;
    let reply = replies.socket(dir, &job.delivery.from, tx)?;
    let line = inbox::message_line(&job.delivery, &job.session_id, &reply, None);
    inbox::write_line(&job.socket, &line).await
}
