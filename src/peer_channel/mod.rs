//! peer-channel interop: sessions of peer-channel (the Node system claude-peers replaces)
//! and ours are one network.
//!
//! peer-channel is peer-to-peer. A session named `alice` owns `alice.sock` in
//! `~/.peer-channel/sessions/` and claims the name with the lock directory `alice.lock/`
//! (proper-lockfile's convention: made with `mkdir`, its mtime refreshed every 5 s by its
//! owner, stale after 10 s). Each of our `serve`s claims its name there too and answers
//! `ping` and `deliver` on its socket (`serve/peer_channel.rs`), so a name is never held
//! twice and peer-channel's sessions and scripts reach ours. Ours reach theirs as
//! `pc:<name>`: [`Sessions::live`] lists them, [`Sessions::deliver`] writes to one.
//!
//! Everything here is as strict as our own sockets: names are validated before they
//! touch a path, the directory is ours and private, sockets and locks are never
//! symlinks, every connection's peer is our uid, and lines are bounded ([`rpc::MAX_LINE`]).

pub mod rpc;

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::names::PeerName;
use crate::paths::PathError;

/// A lock directory older than this is abandoned; anyone may reclaim it.
pub const STALE: Duration = Duration::from_secs(10);
/// How often the owner of a name refreshes its lock's mtime.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long a `ping` may take before its session counts as not running.
pub const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a `deliver` may take.
pub const DELIVER_TIMEOUT: Duration = Duration::from_secs(5);
/// The prefix of a peer-channel session's address, in listings and as a recipient.
pub const PREFIX: &str = "pc:";
/// What our `ping` answers as `server`, beside `broker` (its socket), so the sessions of
/// our own broker are never listed as peer-channel's. (Those of another claude-peers
/// installation, another `CLAUDE_PEERS_HOME`, are reached as peer-channel sessions.)
pub const SERVER: &str = "claude-peers";
/// The protocol version our `ping` answers.
pub const PROTOCOL: u32 = 1;

/// `--peer-channel`: whether to join peer-channel's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Toggle {
    #[default]
    #[value(alias = "true", alias = "1", alias = "yes")]
    On,
    #[value(alias = "false", alias = "0", alias = "no")]
    Off,
}

/// peer-channel's sessions directory.
#[derive(Debug, Clone)]
pub struct Sessions {
    dir: PathBuf,
}

/// A peer-channel session that answered `ping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Its name (the address is `pc:<name>`).
    pub name: String,
    /// The version it answered, if any.
    pub version: Option<String>,
}

/// Who holds a name's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Nobody, or a stale lock.
    Free,
    /// A `serve` of our broker (its socket answers as claude-peers, with our broker's
    /// socket), holding the lock with this identity: taken over by the `serve` the
    /// broker gave the name to.
    Ours(FileId),
    /// Maybe a holder that died: the lock is not stale yet, but its socket refuses
    /// connections. (Or a peer-channel session restarting, its old socket not yet
    /// replaced: so the lock is still left alone until it is stale.)
    Silent,
    /// A peer-channel session, or someone starting up.
    Theirs,
}

impl Live {
    /// The address to send to: `pc:<name>`.
    pub fn address(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }
}

impl Sessions {
    /// The directory, unless turned off: `CLAUDE_PEERS_PEER_CHANNEL_DIR`, else
    /// `~/.peer-channel/sessions`.
    pub fn resolve(toggle: Toggle) -> Option<Self> {
        if toggle == Toggle::Off {
            return None;
        }
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let dir = match env("CLAUDE_PEERS_PEER_CHANNEL_DIR") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(env("HOME")?).join(".peer-channel/sessions"),
        };
        Some(Self { dir })
    }

    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory if needed (0700) and refuses it unless it is ours and private.
    pub fn prepare(&self) -> Result<(), PathError> {
        crate::paths::secure_dir(&self.dir)
    }

    pub fn socket(&self, name: &PeerName) -> PathBuf {
        self.dir.join(format!("{}.sock", name.as_str()))
    }

    fn lock(&self, name: &PeerName) -> PathBuf {
        self.dir.join(format!("{}.lock", name.as_str()))
    }

    /// Refuses the directory unless it is a real directory of ours that no one else may
    /// enter (read only: [`Sessions::prepare`] is what makes or mends it).
    pub fn check(&self) -> Result<(), String> {
        let meta = std::fs::symlink_metadata(&self.dir)
            .map_err(|e| format!("peer-channel's directory {}: {e}", self.dir.display()))?;
        if !meta.is_dir()
            || meta.uid() != crate::platform::current_uid()
            || meta.mode() & 0o077 != 0
        {
            return Err(format!(
                "peer-channel's directory {} is not a private directory of yours (a symbolic link, another user's, or open to others); not trusted",
                self.dir.display()
            ));
        }
        Ok(())
    }

    /// The names with a `.sock` in the directory (valid names only; nothing is opened or
    /// removed). Whether each is a socket of ours, [`rpc::call`] checks before it connects.
    fn names(&self) -> Vec<PeerName> {
        if let Err(e) = self.check() {
            if self.dir.exists() {
                tracing::warn!("{e}");
            }
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<PeerName> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name();
                PeerName::new(file.to_str()?.strip_suffix(".sock")?).ok()
            })
            .collect();
        names.sort();
        names
    }

    /// The live peer-channel sessions: every socket that answers `ping` in time and is not
    /// one of ours (a `serve` of the broker at `broker`, or a name in `ours`). Stale
    /// sockets are passed over, never removed.
    pub async fn live(&self, ours: &HashSet<String>, broker: &Path) -> Vec<Live> {
        let pings = self
            .names()
            .into_iter()
            .filter(|n| !ours.contains(n.as_str()))
            .map(|name| async move {
                let answer = self.ping(&name).await.ok()?;
                if is_ours(&answer, broker) {
                    return None;
                }
                Some(Live {
                    version: answer
                        .get("version")
                        .and_then(Value::as_str)
                        .map(|v| v.chars().take(40).collect()),
                    // By its socket's name: the one a send reaches it by.
                    name: name.to_string(),
                })
            });
        futures_util::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn ping(&self, name: &PeerName) -> Result<Value, rpc::CallError> {
        rpc::call(&self.socket(name), "ping", json!({}), PING_TIMEOUT).await
    }

    /// Delivers a message to the peer-channel session `address` (`pc:<name>` or the name),
    /// on a connection of its own; answers the message id it gave.
    pub async fn deliver(
        &self,
        address: &str,
        from: &str,
        text: &str,
        in_reply_to: Option<&str>,
    ) -> Result<String, String> {
        let bare = address.strip_prefix(PREFIX).unwrap_or(address);
        let name = PeerName::new(bare).map_err(|e| format!("{address}: {e}"))?;
        self.check()
            .map_err(|e| format!("cannot send to {address}: {e}"))?;
        let socket = self.socket(&name);
        let mut params = json!({ "from": from, "text": text });
        if let Some(r) = in_reply_to {
            params["in_reply_to"] = json!(r);
        }
        let mut result = rpc::call(&socket, "deliver", params.clone(), DELIVER_TIMEOUT).await;
        if let Err(rpc::CallError::Rpc {
            code: rpc::INVALID_PARAMS,
            ..
        }) = result
        {
            // A version that calls the text `message` and refuses `text`.
            let text = params["text"].take();
            let p = params.as_object_mut().expect("an object");
            p.remove("text");
            p.insert("message".into(), text);
            result = rpc::call(&socket, "deliver", params, DELIVER_TIMEOUT).await;
        }
        let who = format!("{PREFIX}{bare} (a peer-channel session)");
        let result = result.map_err(|e| match e {
            rpc::CallError::NotRunning => format!(
                "{who} is not running: {e}. Nothing was sent: peer-channel keeps no mail for sessions that are not running. Send again when it is back (list_peers shows it then), or to a claude-peers session, whose mail waits"
            ),
            rpc::CallError::NotOurs(_) | rpc::CallError::ForeignPeer(_) => {
                format!("{who}: {e}. Nothing was sent")
            }
            rpc::CallError::Rpc { .. } => format!("{who} refused the message: {e}"),
            // The request may have been written and taken before the answer was lost.
            _ => format!(
                "{who} did not answer as expected: {e}. It may have the message: check with its user before sending again"
            ),
        })?;
        ["message_id", "message"]
            .iter()
            .find_map(|k| result.get(*k).and_then(Value::as_str))
            .map(str::to_string)
            .ok_or_else(|| {
                format!("{who} answered without a message_id ({result}); it may have the message")
            })
    }

    /// Who holds `name`'s lock now, for the broker at `broker`.
    pub async fn holder(&self, name: &PeerName, broker: &Path) -> Holder {
        match std::fs::symlink_metadata(self.lock(name)) {
            Err(_) => Holder::Free,
            Ok(m) if m.is_dir() && is_stale(&m) => Holder::Free,
            Ok(m) => match self.ping(name).await {
                Ok(a) if is_ours(&a, broker) => Holder::Ours(FileId::of(&m)),
                // Refused: the socket is there and nobody listens. (No socket at all is a
                // session starting up: it makes its lock first.)
                Err(rpc::CallError::NotRunning) if self.socket(name).exists() => Holder::Silent,
                _ => Holder::Theirs,
            },
        }
    }

    /// Claims `name` by the lock convention: a new lock directory, or a stale one
    /// reclaimed. With `take_over`, a fresh lock is taken too, if it is still that one
    /// (the broker gave us the name, and the lock's holder is an older `serve` of ours,
    /// replaced: [`Holder::Ours`]). Then removes a socket left there (ours or the lock's
    /// last holder's), for ours to be bound in its place.
    pub fn claim(&self, name: &PeerName, take_over: Option<FileId>) -> io::Result<Claim> {
        let lock = self.lock(name);
        let made = match make_lock(&lock) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(&lock)?;
                if !meta.is_dir() {
                    return Err(io::Error::other(format!(
                        "{} is not a lock directory; remove it",
                        lock.display()
                    )));
                }
                if !(take_over == Some(FileId::of(&meta)) || is_stale(&meta)) {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("a peer-channel session holds the name {name}"),
                    ));
                }
                std::fs::remove_dir_all(&lock).or_else(not_found_ok)?;
                make_lock(&lock)
            }
            other => other,
        };
        let id = made?;
        let socket = self.socket(name);
        std::fs::remove_file(&socket).or_else(not_found_ok)?;
        Ok(Claim {
            name: name.clone(),
            lock,
            id,
            socket,
            socket_id: None,
        })
    }
}

/// Whether a `ping` answer is that of a `serve` of the broker at `broker`.
fn is_ours(answer: &Value, broker: &Path) -> bool {
    answer.get("server").and_then(Value::as_str) == Some(SERVER)
        && answer.get("broker").and_then(Value::as_str) == broker.to_str()
}

fn not_found_ok(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// `mkdir` (atomic: exactly one of racing claimers succeeds); answers the new
/// directory's identity.
fn make_lock(lock: &Path) -> io::Result<FileId> {
    std::fs::DirBuilder::new().mode(0o700).create(lock)?;
    Ok(FileId::of(&std::fs::symlink_metadata(lock)?))
}

/// Which file a path names: its inode, and when it was made where the file system says.
/// (An inode alone is not enough: one removed and made again at once often gets the same
/// number back.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    ino: u64,
    born: Option<SystemTime>,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            ino: meta.ino(),
            born: meta.created().ok(),
        }
    }

    fn at(path: &Path) -> Option<Self> {
        std::fs::symlink_metadata(path).ok().map(|m| Self::of(&m))
    }
}

fn is_stale(meta: &std::fs::Metadata) -> bool {
    meta.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age > STALE)
}

/// A name held in peer-channel's directory: its lock directory (by [`FileId`], so a lock
/// someone reclaimed is never touched) and the socket bound for it.
#[derive(Debug)]
pub struct Claim {
    pub name: PeerName,
    lock: PathBuf,
    id: FileId,
    pub socket: PathBuf,
    socket_id: Option<FileId>,
}

impl Claim {
    /// Notes the socket bound at [`Claim::socket`], to be removed on release.
    pub fn bound(&mut self) {
        self.socket_id = FileId::at(&self.socket);
    }

    /// Whether the lock is still ours.
    pub fn held(&self) -> bool {
        std::fs::symlink_metadata(&self.lock).is_ok_and(|m| m.is_dir() && FileId::of(&m) == self.id)
    }

    /// Refreshes the lock's mtime; false when it is no longer ours (reclaimed after we
    /// missed refreshes, or taken over by a newer `serve` of our session).
    pub fn refresh(&self) -> bool {
        if !self.held() {
            return false;
        }
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &self.lock,
            &now,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok()
    }

    /// Gives the name back: removes our socket and our lock, each only if it is still
    /// the one we made.
    pub fn release(&self) {
        if self.socket_id.is_some() && FileId::at(&self.socket) == self.socket_id {
            let _ = std::fs::remove_file(&self.socket);
        }
        if self.held() {
            let _ = std::fs::remove_dir_all(&self.lock);
        }
    }
}
