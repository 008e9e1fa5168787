//! The security claims of SECURITY.md, checked against the real binary: directories that
//! are not ours or are reached through a symlink are refused, a socket path too long for
//! the OS is a clear error, a socket served by another uid is not trusted, no process has a
//! network socket, and every file is private whatever the umask.
//!
//! Every command runs with a deadline, so a hang fails the test instead of stalling CI.
//! Tests that need a second uid run only as root and say so when skipped. (That the broker
//! refuses a client of another uid even with the permissions opened is in
//! tests/broker/process.rs.)

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use claude_peers::paths::Paths;
use common::*;
use serde_json::Value;

/// The unprivileged uid (and gid) the root-only tests hand things to.
const NOBODY: u32 = 65534;

/// Runs `cmd` to completion and returns its output; kills it and fails after 20 s.
fn run_bounded(mut cmd: Command, what: &str) -> Output {
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` still running after 20s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// Runs the binary with `args` and the given `CLAUDE_PEERS_HOME`.
fn run_with_home(home: &Home, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = home.cmd();
    cmd.env("CLAUDE_PEERS_HOME", dir).args(args);
    run_bounded(cmd, &args.join(" "))
}

/// Asserts `o` is a refusal: exit code 1 and exactly one line on stderr, the CLI's error
/// line. Returns that line.
fn refusal(o: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).trim_end().to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "`{what}` should fail with exit code 1; stdout: {} stderr: {stderr}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "`{what}` should explain itself in one line, got: {stderr}"
    );
    assert!(
        stderr.starts_with("claude-peers: error: "),
        "`{what}`: {stderr}"
    );
    stderr
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A [`Home`] whose runtime directory is `dir` (inside `tmp`, which it owns).
fn home_at(tmp: tempfile::TempDir, dir: &Path) -> Home {
    Home {
        paths: Paths::resolve(Some(dir), None).unwrap(),
        dir: tmp,
    }
}

fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cp-")
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
fn a_runtime_directory_owned_by_another_user_is_refused() {
    if !root_or_skip("to give a directory to another uid") {
        return;
    }
    let home = Home::new();
    let foreign = home.dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(NOBODY), Some(NOBODY)).unwrap();
    // Wide open: being able to write there must not make it acceptable.
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o777)).unwrap();
    for args in [&["status"][..], &["broker"], &["peers"]] {
        let line = refusal(&run_with_home(&home, &foreign, args), &args.join(" "));
        assert!(
            line.contains(&format!("belongs to uid {NOBODY}"))
                && line.contains("CLAUDE_PEERS_HOME"),
            "{line}"
        );
    }
    // Refused before anything was touched: nothing created inside, mode and owner as they were.
    assert_eq!(entries(&foreign), Vec::<String>::new());
    assert_eq!(mode(&foreign), 0o777);
    assert_eq!(std::fs::metadata(&foreign).unwrap().uid(), NOBODY);
}

#[test]
fn a_runtime_directory_that_is_a_symlink_is_refused() {
    let home = Home::new();
    let real = home.dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = home.dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for args in [&["status"][..], &["broker"], &["peers"]] {
        let line = refusal(&run_with_home(&home, &link, args), &args.join(" "));
        assert!(
            line.contains(&format!("{} is a symbolic link", link.display())),
            "{line}"
        );
        assert!(line.contains("CLAUDE_PEERS_HOME"), "{line}");
    }
    assert_eq!(
        entries(&real),
        Vec::<String>::new(),
        "nothing behind the link"
    );
}

#[test]
fn a_symlink_above_the_runtime_directory_is_followed() {
    // Only the directory itself is checked: a symlink higher up (as /tmp is on macOS, or
    // /var/run on Linux) is the system's layout, not something another user controls.
    let tmp = short_tempdir();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let home = home_at(tmp, &link.join("h"));
    let o = run_bounded(
        {
            let mut c = home.cmd();
            c.arg("peers");
            c
        },
        "peers",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let socket = std::fs::symlink_metadata(real.join("h/broker.sock")).unwrap();
    assert!(socket.file_type().is_socket());
    assert_eq!(mode(&real.join("h")), 0o700);
}

/// Runs the binary under umask 000, so any file it does not explicitly make private
/// comes out world-readable.
fn run_umask_000(home: &Home, args: &[&str]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 000 && exec \"$0\" \"$@\"", BIN])
        .args(args);
    for (k, v) in home.cmd().get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    run_bounded(cmd, &args.join(" "))
}

#[test]
fn every_file_is_private_whatever_the_umask() {
    let home = Home::new();
    // The CLI creates the directory and starts the broker, both under umask 000.
    let o = run_umask_000(&home, &["peers"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = home.root();
    assert_eq!(mode(dir), 0o700, "runtime directory");
    let socket = dir.join("broker.sock");
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    // Written while the broker runs: the WAL and its index exist.
    let ours = [
        "broker.sock",
        "broker.lock",
        "broker.log",
        "peers.db",
        "peers.db-wal",
        "peers.db-shm",
        "peers.db.broker",
    ];
    for name in ours {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    let mut extra: Vec<String> = entries(dir);
    extra.retain(|n| !ours.contains(&n.as_str()));
    assert!(extra.is_empty(), "unexpected files: {extra:?}");
}

#[test]
fn an_open_directory_and_database_of_ours_are_closed() {
    let home = Home::new();
    let dir = home.root();
    std::fs::create_dir(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    // An empty file is a valid new SQLite database.
    let db = dir.join("peers.db");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = run_with_home(&home, dir, &["peers"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mode(dir), 0o700, "runtime directory");
    assert_eq!(mode(&db), 0o600, "database");
}

#[test]
fn a_directory_made_for_claude_peers_db_is_private() {
    let home = Home::new();
    let db_dir: PathBuf = home.dir.path().join("data");
    let mut cmd = home.cmd();
    cmd.env("CLAUDE_PEERS_DB", db_dir.join("peers.db"))
        .arg("peers");
    let o = run_bounded(cmd, "peers");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mode(&db_dir.join("peers.db")), 0o600, "database");
    assert_eq!(mode(&db_dir), 0o700, "directory made for the database");
}

mod sockets;
