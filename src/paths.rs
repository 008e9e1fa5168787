//! Where claude-peers keeps its socket, lock, database and log, and the checks that keep
//! those places private.
//!
//! Resolution order: `CLAUDE_PEERS_HOME` holds everything; otherwise, where the system
//! gives this user a private runtime directory (`/run/user/<uid>`, ours and 0700), the
//! socket and lock go to `/run/user/<uid>/claude-peers` and the database and log to
//! `~/.local/state/claude-peers`; elsewhere everything goes to `~/.claude-peers`.
//! `CLAUDE_PEERS_DB` moves the database alone.
//!
//! The default depends on nothing but the uid and `HOME`, on purpose: agents start their
//! MCP servers with a scrubbed environment (Codex passes only `HOME`, `LANG`, `PATH`,
//! `SHELL` and `TERM`), and a session that found another runtime directory would start
//! another broker on another database, without a word. So `XDG_RUNTIME_DIR` and
//! `XDG_STATE_HOME` are not consulted.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::platform;

/// The files of one claude-peers installation.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Holds the socket and the lock; private (0700).
    pub runtime_dir: PathBuf,
    /// Holds the database and the broker log; private (0700).
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub lock: PathBuf,
    /// Left by `claude-peers stop`, removed by the next broker: while it is there,
    /// sessions that lost their broker wait for one instead of starting it.
    pub stopped: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
}

/// Why a directory or path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("cannot find a home for claude-peers: set CLAUDE_PEERS_HOME or HOME")]
    NoHome,
    #[error(
        "{0} is a symbolic link; claude-peers refuses to keep its socket or data behind one. Point CLAUDE_PEERS_HOME at a real directory"
    )]
    Symlink(PathBuf),
    #[error("{0} exists but is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "{path} belongs to uid {owner}, not to you (uid {me}); claude-peers only uses directories you own. Remove it or set CLAUDE_PEERS_HOME"
    )]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "socket path {path} is {len} bytes; this OS allows {max}. Set CLAUDE_PEERS_HOME to a shorter directory"
    )]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// The runtime and state directories without `CLAUDE_PEERS_HOME`: under `run_user` (the
/// system's runtime directory for this user) when it is a real directory of ours that
/// no one else may enter, else both in `~/.claude-peers`.
fn default_dirs(user_home: &Path, run_user: &Path) -> (PathBuf, PathBuf) {
    let private = fs::symlink_metadata(run_user)
        .is_ok_and(|m| m.is_dir() && m.uid() == platform::current_uid() && m.mode() & 0o077 == 0);
    if private {
        (
            run_user.join("claude-peers"),
            user_home.join(".local/state/claude-peers"),
        )
    } else {
        let dir = user_home.join(".claude-peers");
        (dir.clone(), dir)
    }
}

impl Paths {
    /// Resolves the paths from the environment (`CLAUDE_PEERS_HOME`, `CLAUDE_PEERS_DB`,
    /// `HOME`), with explicit overrides taking precedence.
    pub fn resolve(home: Option<&Path>, db: Option<&Path>) -> Result<Self, PathError> {
        let env_path = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let (runtime_dir, state_dir) = if let Some(home) = home
            .map(Path::to_path_buf)
            .or_else(|| env_path("CLAUDE_PEERS_HOME"))
        {
            (home.clone(), home)
        } else {
            let user_home = env_path("HOME").ok_or(PathError::NoHome)?;
            let run_user = Path::new("/run/user").join(platform::current_uid().to_string());
            default_dirs(&user_home, &run_user)
        };
        let db = db
            .map(Path::to_path_buf)
            .or_else(|| env_path("CLAUDE_PEERS_DB"));
        Ok(Self::in_dirs(runtime_dir, state_dir, db))
    }

    /// The files in these directories; the database in `state_dir` unless given.
    fn in_dirs(runtime_dir: PathBuf, state_dir: PathBuf, db: Option<PathBuf>) -> Self {
        let db = db.unwrap_or_else(|| state_dir.join("peers.db"));
        Self {
            socket: runtime_dir.join("broker.sock"),
            lock: runtime_dir.join("broker.lock"),
            stopped: runtime_dir.join("stopped"),
            log: state_dir.join("broker.log"),
            db,
            runtime_dir,
            state_dir,
        }
    }

    /// Creates the private directories if needed and checks that they are safe to use:
    /// real directories (not symlinks), owned by us, not open to others. Also checks that
    /// the socket path fits the OS limit.
    pub fn prepare(&self) -> Result<(), PathError> {
        secure_dir(&self.runtime_dir)?;
        if self.state_dir != self.runtime_dir {
            secure_dir(&self.state_dir)?;
        }
        if let Some(parent) = self.db.parent()
            && !parent.as_os_str().is_empty()
            && !parent.exists()
        {
            // Directories we make for the database are as private as the database.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| PathError::Create {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        self.check_socket_len()
    }

    /// Fails when the socket path is longer than the OS accepts.
    pub fn check_socket_len(&self) -> Result<(), PathError> {
        let len = self.socket.as_os_str().len();
        if len > platform::MAX_SOCKET_PATH {
            return Err(PathError::SocketPathTooLong {
                path: self.socket.clone(),
                len,
                max: platform::MAX_SOCKET_PATH,
            });
        }
        Ok(())
    }
}

/// Creates `dir` with mode 0700 if missing (its parents with default modes), then refuses
/// it if it is a symlink, not a directory, or owned by someone else. A directory of ours
/// that is open to others is closed to 0700.
pub fn secure_dir(dir: &Path) -> Result<(), PathError> {
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent).map_err(|source| PathError::Create {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PathError::Create {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|source| PathError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(PathError::Symlink(dir.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(PathError::NotADirectory(dir.to_path_buf()));
    }
    let me = platform::current_uid();
    if meta.uid() != me {
        return Err(PathError::ForeignOwner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "directory was open to other users; setting it to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            PathError::Create {
                path: dir.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Opens `path` to read and write, creating it 0600 if it is missing, never through a
/// symlink (the lock files, the stop marker).
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_depends_on_the_uid_and_home_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let run = tmp.path().join("run-user");
        // No runtime directory of the system's: all in ~/.claude-peers.
        let (runtime, state) = default_dirs(&home, &run);
        assert_eq!(
            (runtime.as_path(), state.as_path()),
            (
                home.join(".claude-peers").as_path(),
                home.join(".claude-peers").as_path()
            )
        );
        // One others may enter is not used either.
        fs::DirBuilder::new().mode(0o755).create(&run).unwrap();
        fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(default_dirs(&home, &run).0, home.join(".claude-peers"));
        // A private one of ours is.
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
        let (runtime, state) = default_dirs(&home, &run);
        assert_eq!(runtime, run.join("claude-peers"));
        assert_eq!(state, home.join(".local/state/claude-peers"));

        // The state directory, apart from the runtime one, gets the same checks: one that
        // is a symbolic link is refused, and nothing is made behind it.
        let real = tmp.path().join("real");
        fs::create_dir_all(&real).unwrap();
        fs::create_dir_all(state.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&real, &state).unwrap();
        let paths = Paths::in_dirs(runtime, state.clone(), None);
        assert!(matches!(paths.prepare(), Err(PathError::Symlink(p)) if p == state));
        assert_eq!(fs::read_dir(&real).unwrap().count(), 0);
    }

    #[test]
    fn home_holds_everything() {
        let p = Paths::resolve(Some(Path::new("/x/home")), None).unwrap();
        assert_eq!(p.socket, Path::new("/x/home/broker.sock"));
        assert_eq!(p.db, Path::new("/x/home/peers.db"));
        let p =
            Paths::resolve(Some(Path::new("/x/home")), Some(Path::new("/y/db.sqlite"))).unwrap();
        assert_eq!(p.db, Path::new("/y/db.sqlite"));
    }

    #[test]
    fn refuses_symlinks_and_fixes_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        secure_dir(&real).unwrap();
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o777, 0o700);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(secure_dir(&link), Err(PathError::Symlink(_))));
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        secure_dir(&real).unwrap();
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o777, 0o700);
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            secure_dir(&file),
            Err(PathError::NotADirectory(_))
        ));
    }

    #[test]
    fn long_socket_path_is_a_clear_error() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(200)));
        let p = Paths::resolve(Some(&long), None).unwrap();
        let err = p.check_socket_len().unwrap_err();
        assert!(err.to_string().contains("CLAUDE_PEERS_HOME"), "{err}");
    }
}
