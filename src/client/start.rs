//! Starting a broker on demand: detached, its output appended to its log (rotated past
//! 8 MiB), and what to say when it does not come up (its last error line, or a full disk).

use super::*;

/// Starts `claude-peers broker` detached from us, its output appended to the log file.
pub(super) fn spawn_broker(
    paths: &Paths,
    exe: Option<&std::path::Path>,
) -> Result<std::process::Child, ClientError> {
    let fail = |reason: String| ClientError::StartFailed {
        reason,
        log: paths.log.clone(),
    };
    let exe = match exe {
        Some(exe) => exe.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| fail(format!("cannot find our own executable: {e}")))?,
    };
    let log =
        open_log(paths).map_err(|e| fail(format!("cannot open {}: {e}", paths.log.display())))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("broker")
        .env("CLAUDE_PEERS_HOME", &paths.runtime_dir)
        .env("CLAUDE_PEERS_DB", &paths.db)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| fail(e.to_string()))?)
        .stderr(log);
    if paths.state_dir != paths.runtime_dir {
        // The split XDG layout cannot be expressed by CLAUDE_PEERS_HOME alone.
        cmd.env_remove("CLAUDE_PEERS_HOME");
    }
    platform::detach(&mut cmd);
    cmd.spawn()
        .map_err(|e| fail(format!("cannot run the broker: {e}")))
}

/// The last error a broker wrote to its log from byte `from` on (from the start if the
/// log was rotated meanwhile), without the `claude-peers: error: ` prefix.
pub(super) fn broker_error(paths: &Paths, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(&paths.log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(if from <= len { from } else { 0 }))
        .ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("claude-peers: error: "))
        .map(str::to_string)
}

/// Why a broker cannot start, when one of its directories sits on a full file system.
pub(super) fn full_disk(paths: &Paths) -> Option<String> {
    /// Less than this free is too little for SQLite's journal and the log.
    const ENOUGH: u64 = 256 * 1024;
    let db_dir = paths.db.parent().unwrap_or(&paths.state_dir);
    [db_dir, &paths.state_dir, &paths.runtime_dir]
        .into_iter()
        .find_map(|dir| {
            let free = platform::free_bytes(dir).ok()?;
            (free < ENOUGH).then(|| {
                format!(
                    "the file system holding {} is full ({} KiB free), so the broker cannot write its database or log there; free some space and try again",
                    dir.display(),
                    free / 1024
                )
            })
        })
}

/// The broker log, opened for appending; rotated once it passes 8 MiB.
pub(super) fn open_log(paths: &Paths) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::metadata(&paths.log).is_ok_and(|m| m.len() > 8 << 20) {
        let _ = std::fs::rename(&paths.log, paths.log.with_extension("log.1"));
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.log)
}

/// Waits (on another thread) for a broker we started, so it never lingers as a zombie.
pub(super) fn reap(child: Option<std::process::Child>) {
    if let Some(mut child) = child {
        std::thread::spawn(move || child.wait());
    }
}

/// Waits until the broker's socket is gone (a stopping broker removes it last), or the
/// deadline passes.
pub async fn wait_socket_gone(paths: &Paths, deadline: Instant) {
    while Instant::now() < deadline && paths.socket.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
