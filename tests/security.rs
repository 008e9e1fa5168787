//! The security claims of SECURITY.md, checked against the real binary: directories that
//! are not ours or are reached through a symlink are refused, a socket path too long for
//! the OS is a clear error, a socket served by another uid is not trusted, no process has a
//! network socket, and every file is private whatever the umask.
//!
//! Every command runs with a deadline, so a hang fails the test instead of stalling CI.
//! Tests that need a second uid run only as root and say so when skipped. (That the broker
//! refuses a client of another uid even with the permissions opened is in tests/broker.rs.)

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

fn is_root() -> bool {
    claude_peers::platform::current_uid() == 0
}

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
    if !is_root() {
        eprintln!("skipped: needs root to give a directory to another uid");
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
fn a_state_directory_that_is_a_symlink_is_refused() {
    // The XDG layout: socket in $XDG_RUNTIME_DIR/claude-peers, data in
    // $XDG_STATE_HOME/claude-peers. The data directory gets the same checks.
    let home = Home::new();
    let base = home.dir.path();
    let run = base.join("run");
    let state = base.join("state");
    let real = base.join("real");
    for d in [&run, &state, &real] {
        std::fs::create_dir(d).unwrap();
    }
    std::os::unix::fs::symlink(&real, state.join("claude-peers")).unwrap();
    let mut cmd = home.cmd();
    cmd.env_remove("CLAUDE_PEERS_HOME")
        .env("HOME", base)
        .env("XDG_RUNTIME_DIR", &run)
        .env("XDG_STATE_HOME", &state)
        .arg("broker");
    let line = refusal(&run_bounded(cmd, "broker"), "broker");
    assert!(
        line.contains(&format!(
            "{} is a symbolic link",
            state.join("claude-peers").display()
        )),
        "{line}"
    );
    assert_eq!(
        entries(&real),
        Vec::<String>::new(),
        "nothing behind the link"
    );
    assert!(!run.join("claude-peers/broker.sock").exists());
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

/// Socket inodes of the process's open file descriptors (`socket:[N]` links in /proc).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inodes listed in `/proc/<pid>/net/<table>` (the process's network namespace),
/// whose inode column is `column`.
fn table_inodes(pid: u32, table: &str, column: usize) -> HashSet<u64> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return HashSet::new(); // e.g. no IPv6 in this kernel
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(column)?.parse().ok())
        .collect()
}

/// Inodes of every TCP, UDP and raw IP socket in the namespace of `pid`.
fn inet_inodes(pid: u32) -> HashSet<u64> {
    [
        "tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6",
    ]
    .into_iter()
    .flat_map(|t| table_inodes(pid, t, 9))
    .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn the_broker_and_serve_have_no_network_sockets() {
    // The method first: our own TCP and UDP sockets must show up as network sockets.
    let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let me = std::process::id();
    let mine = socket_inodes(me);
    assert!(
        mine.intersection(&inet_inodes(me)).count() >= 2,
        "this check cannot see our own TCP/UDP sockets; it would prove nothing"
    );
    drop((tcp, udp));

    let home = Home::new();
    let broker = home.broker(&[]);
    let mut serve = KillOnDrop(
        home.cmd()
            .arg("serve")
            .env("CLAUDE_PEERS_NAME", "netcheck")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = serve.0.stdin.take().unwrap();
    stdin
        .write_all(
            concat!(
                r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{"experimental":{"claude/channel":{}}},"clientInfo":{"name":"t","version":"0"}}}"#,
                "\n",
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                "\n"
            )
            .as_bytes(),
        )
        .unwrap();
    // serve is connected and registered once the broker lists it online.
    let mut probe = Raw::greeted(&home.paths.socket);
    wait_for(
        || {
            let s = probe.call(r#"{"id":1,"op":"status"}"#);
            s.pointer("/result/peers_online").and_then(Value::as_u64) == Some(1)
        },
        "serve to register",
    );
    for (who, pid) in [("broker", broker.pid()), ("serve", serve.0.id())] {
        let sockets = socket_inodes(pid);
        let inet = inet_inodes(pid);
        let unix = table_inodes(pid, "unix", 6);
        assert!(!sockets.is_empty(), "{who} has no socket at all?");
        let network: Vec<_> = sockets.intersection(&inet).collect();
        assert!(
            network.is_empty(),
            "{who} has TCP/UDP/raw sockets: {network:?}"
        );
        let other: Vec<_> = sockets.difference(&unix).collect();
        assert!(other.is_empty(), "{who} has non-Unix sockets: {other:?}");
    }
    drop(stdin);
}

/// A child process killed and reaped when dropped, so a failing test leaves nothing behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_socket_path_too_long_for_the_os_is_a_clear_error() {
    let home = Home::new();
    let mut deep = home.dir.path().to_path_buf();
    for i in 0..20 {
        deep.push(format!("component-{i:02}"));
    }
    for args in [
        &["status"][..],
        &["broker"],
        &["peers"],
        &["send", "x", "hi"],
    ] {
        let line = refusal(&run_with_home(&home, &deep, args), &args.join(" "));
        assert!(
            line.contains("socket path")
                && line.contains("bytes; this OS allows")
                && line.contains("Set CLAUDE_PEERS_HOME to a shorter directory"),
            "{line}"
        );
    }
    assert!(!deep.join("broker.sock").exists());
}

#[cfg(target_os = "linux")]
#[test]
fn the_longest_socket_path_linux_allows_works_and_one_byte_more_is_refused() {
    // sun_path is 108 bytes on Linux, one of them the terminating NUL.
    const SUN_PATH_MAX: usize = 107;
    let socket_name = "/broker.sock".len();
    let tmp = short_tempdir();
    let base = tmp.path().to_path_buf();
    let pad = |n: usize| {
        let room = n - socket_name - base.as_os_str().len() - 1;
        base.join("p".repeat(room))
    };
    let fits = pad(SUN_PATH_MAX);
    let too_long = pad(SUN_PATH_MAX + 1);
    let home = home_at(tmp, &fits);
    assert_eq!(home.paths.socket.as_os_str().len(), SUN_PATH_MAX);

    let o = run_with_home(&home, &fits, &["peers"]);
    assert!(
        o.status.success(),
        "a {SUN_PATH_MAX}-byte socket path should work: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(run_with_home(&home, &fits, &["status"]).status.success());

    for args in [&["status"][..], &["broker"]] {
        let line = refusal(&run_with_home(&home, &too_long, args), &args.join(" "));
        assert!(
            line.contains(&format!(
                "is {} bytes; this OS allows {SUN_PATH_MAX}",
                SUN_PATH_MAX + 1
            )),
            "{line}"
        );
    }
}

/// Reads stdout lines of a child on a thread, so the test can wait for one with a deadline.
fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn serve_names_an_unusable_home_in_its_tool_errors() {
    let home = Home::new();
    let deep = home.dir.path().join("d".repeat(150));
    let mut serve = KillOnDrop(
        home.cmd()
            .env("CLAUDE_PEERS_HOME", &deep)
            .env("CLAUDE_PEERS_NAME", "deep")
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(serve.0.stdout.take().unwrap());
    let mut stdin = serve.0.stdin.take().unwrap();
    for line in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#,
    ] {
        writeln!(stdin, "{line}").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("serve answered the tool call within 20s");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 2 {
            break v;
        }
    };
    assert_eq!(answer.pointer("/result/isError"), Some(&Value::Bool(true)));
    let text = answer
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        text.contains("bytes; this OS allows") && text.contains("CLAUDE_PEERS_HOME"),
        "the tool error should say what is wrong and what to do: {text}"
    );
}

/// When this test binary is re-run as another uid, this "test" is the impostor broker: it
/// listens on the socket named in the environment, says READY, and answers every
/// connection with a plausible hello reply.
#[test]
fn foreign_listener_helper() {
    let Ok(socket) = std::env::var("CP_FOREIGN_LISTEN") else {
        return;
    };
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    listener.set_nonblocking(true).unwrap();
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.write_all(
                    b"{\"id\":1,\"result\":{\"protocol\":1,\"broker_version\":\"0.1.0\",\"pid\":1}}\n",
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn a_socket_served_by_another_uid_is_not_trusted() {
    if !is_root() {
        eprintln!("skipped: needs root to listen as another uid");
        return;
    }
    let home = Home::new();
    // Let the other uid in long enough to plant its socket where our broker's would be.
    std::fs::create_dir(home.root()).unwrap();
    for p in [home.dir.path(), home.root()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let exe = home.dir.path().join("impostor");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut impostor = KillOnDrop({
        use std::os::unix::process::CommandExt;
        Command::new(&exe)
            .args([
                "--exact",
                "foreign_listener_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CP_FOREIGN_LISTEN", &home.paths.socket)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let lines = lines_of(impostor.0.stdout.take().unwrap());
    let ready = Instant::now() + Duration::from_secs(20);
    // With --nocapture the harness's own "test … " text shares the line.
    while !lines
        .recv_timeout(ready.saturating_duration_since(Instant::now()))
        .expect("the impostor to listen within 20s")
        .ends_with("READY")
    {}
    assert_eq!(
        std::fs::symlink_metadata(&home.paths.socket).unwrap().uid(),
        NOBODY
    );
    // Ours and private again; the planted socket stays (root reaches it regardless).
    std::fs::set_permissions(home.root(), std::fs::Permissions::from_mode(0o700)).unwrap();
    for args in [&["status"][..], &["peers"], &["send", "x", "hi"]] {
        let line = refusal(&run_with_home(&home, home.root(), args), &args.join(" "));
        assert!(
            line.contains(&format!("is served by uid {NOBODY}, not by you")),
            "{line}"
        );
    }
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
    for name in [
        "broker.sock",
        "broker.lock",
        "broker.log",
        "peers.db",
        "peers.db-wal",
        "peers.db-shm",
        "peers.db.broker",
    ] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    let mut extra: Vec<String> = entries(dir);
    extra.retain(|n| {
        ![
            "broker.sock",
            "broker.lock",
            "broker.log",
            "peers.db",
            "peers.db-wal",
            "peers.db-shm",
            "peers.db.broker",
        ]
        .contains(&n.as_str())
    });
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
