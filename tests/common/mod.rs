//! Test support: a private claude-peers home per test, the real binary, real brokers, and
//! a raw socket client for frame-level tests.

#![allow(dead_code)]

pub mod agent;
pub mod claude;
pub mod codex;
pub mod gemini;
pub mod loopback;
pub mod mcp;
pub mod nats;
pub mod serve;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use claude_peers::client::{Client, ConnectOptions, Event};
use claude_peers::paths::Paths;
use claude_peers::protocol::{Delivery, ListPeers, Register, Send};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_claude-peers");

/// A fresh CLAUDE_PEERS_HOME. Dropping it stops whatever broker runs there.
pub struct Home {
    pub dir: tempfile::TempDir,
    pub paths: Paths,
}

impl Home {
    pub fn new() -> Self {
        // Under /tmp, short, so the socket path fits the OS limit.
        let dir = tempfile::Builder::new()
            .prefix("cp-")
            .tempdir_in("/tmp")
            .unwrap();
        Self::on(dir)
    }

    /// A home in `dir` (for a directory on a file system of the test's choosing).
    pub fn on(dir: tempfile::TempDir) -> Self {
        let paths = Paths::resolve(Some(&dir.path().join("h")), None).unwrap();
        Self { dir, paths }
    }

    pub fn root(&self) -> &Path {
        &self.paths.runtime_dir
    }

    /// peer-channel's sessions directory for this home's sessions (beside the home, not
    /// in the user's real `~/.peer-channel`).
    pub fn pc_dir(&self) -> PathBuf {
        self.dir.path().join("pc")
    }

    /// The real binary, with this home and nothing inherited from the caller's own
    /// claude-peers settings.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("CLAUDE_PEERS_") || k == "PEER_CHANNEL_SESSION_NAME" {
                cmd.env_remove(k);
            }
        }
        // Each `serve` a test starts stands for an agent session of its own: they all share
        // one parent (the test), which would make them one session (see `SessionKey`).
        static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let session = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cmd.env("CLAUDE_PEERS_HOME", self.root())
            .env("CLAUDE_PEERS_PEER_CHANNEL_DIR", self.pc_dir())
            .env("CLAUDE_PEERS_SESSION", format!("test-{session}"))
            // A broker a test forgets to stop goes away by itself.
            .env("CLAUDE_PEERS_IDLE_TIMEOUT", "20s")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the binary with `args` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs the binary with `args`, which must succeed; a failure shows the command, its
    /// directory, status, stdout and stderr.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`claude-peers {}` failed ({}) in {} with CLAUDE_PEERS_HOME={}\n--- stdout\n{}\n--- stderr\n{}",
            args.join(" "),
            out.status,
            std::env::current_dir().unwrap().display(),
            self.root().display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        out
    }

    /// Starts `claude-peers broker` in the foreground as our child and waits for it.
    pub fn broker(&self, args: &[&str]) -> Broker {
        self.broker_with_env(args, &[])
    }

    /// [`Home::broker`] with more environment (a log level, a preloaded library).
    pub fn broker_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Broker {
        let child = self
            .cmd()
            .arg("broker")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("broker.stderr"))
                    .unwrap(),
            ))
            .spawn()
            .unwrap();
        let b = Broker { child };
        wait_for(
            || UnixStream::connect(&self.paths.socket).is_ok(),
            "broker socket",
        );
        b
    }

    /// What the brokers of this home wrote to stderr (foreground) or the log (auto-started).
    pub fn broker_output(&self) -> String {
        let a = std::fs::read_to_string(self.dir.path().join("broker.stderr")).unwrap_or_default();
        let b = std::fs::read_to_string(&self.paths.log).unwrap_or_default();
        a + &b
    }

    pub fn connect_options(&self) -> ConnectOptions {
        let mut opts = ConnectOptions::new("test");
        opts.broker_exe = Some(PathBuf::from(BIN));
        opts.autostart = false;
        opts
    }

    /// A client connection to the running broker.
    pub async fn client(&self) -> Client {
        Client::connect(&self.paths, &self.connect_options())
            .await
            .unwrap()
    }

    /// A client registered as `name` from directory `cwd`, showing messages as they come.
    pub async fn peer(&self, name: &str, cwd: &str) -> (Client, String) {
        let c = self.client().await;
        let reg = c.call(register(name, cwd)).await.unwrap();
        (c, reg.name)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if self.paths.socket.exists() {
            let _ = self.cmd().arg("stop").output();
        }
    }
}

/// A send of `text` to one peer, as its own session would make it.
pub fn send(to: &str, text: &str) -> Send {
    Send {
        key: None,
        to: vec![to.into()],
        text: text.into(),
        in_reply_to: None,
        from: None,
    }
}

pub fn register(name: &str, cwd: &str) -> Register {
    Register {
        name: name.into(),
        context: claude_peers::protocol::PeerContext {
            cwd: cwd.into(),
            pid: std::process::id(),
            push: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A broker we started; killed when dropped.
pub struct Broker {
    pub child: Child,
}

impl Broker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the broker to exit by itself and returns whether it exited cleanly.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("broker still running after {within:?}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a root-only test can run; if not, says it is skipped and why (`to ...`).
pub fn root_or_skip(to: &str) -> bool {
    let root = claude_peers::platform::current_uid() == 0;
    if !root {
        eprintln!("skipped: needs root {to}");
    }
    root
}

/// The history of `peer` (at most `limit` messages, newest first).
pub async fn history(c: &Client, peer: &str, limit: u32) -> claude_peers::protocol::LogReply {
    c.call(claude_peers::protocol::LogQuery {
        before: None,
        limit: Some(limit),
        peer: Some(peer.into()),
    })
    .await
    .unwrap()
}

/// `kill -9 pid`.
pub fn kill9(pid: u32) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

/// Runs `cmd` with its output captured, and kills it (SIGKILL) if it has not exited
/// within `within`: `Ok` with the output of a process that exited, `Err` with what a
/// killed one had written, for the caller's failure message.
pub fn run_within(mut cmd: Command, within: Duration) -> Result<Output, Output> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(within) {
        Ok(out) => Ok(out.unwrap()),
        Err(_) => {
            // It may have exited just now: then there is nothing to kill.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
            Err(rx.recv().unwrap().unwrap())
        }
    }
}

/// Polls `cond` for up to 10 s.
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The next delivery on `c`, failing after 5 s.
pub async fn next_delivery(c: &mut Client) -> Delivery {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.next_event()).await {
            Ok(Some(Event::Deliver(d))) => return d,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("connection closed while waiting for a delivery"),
            Err(_) => panic!("no delivery within 5s"),
        }
    }
}

/// Waits until the broker no longer lists `name` as online (it has seen the connection
/// close), failing after 10 s.
pub async fn wait_offline(c: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let peers = c.call(ListPeers::default()).await.unwrap().peers;
        if !peers.iter().any(|p| p.name == name) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} still online after 10s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts that nothing is delivered on `c` for `quiet`.
pub async fn assert_no_delivery(c: &mut Client, quiet: Duration) {
    if let Ok(Some(Event::Deliver(d))) = tokio::time::timeout(quiet, c.next_event()).await {
        panic!("unexpected delivery: {d:?}");
    }
}

/// A frame-level client on a plain blocking socket.
pub struct Raw {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    pub fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    /// Connects and says hello.
    pub fn greeted(socket: &Path) -> Self {
        let mut r = Self::connect(socket);
        let v = r.call(&format!(
            r#"{{"id":0,"op":"hello","protocol":{},"client":"raw","version":"0"}}"#,
            claude_peers::protocol::PROTOCOL_VERSION
        ));
        assert!(v.get("result").is_some(), "hello failed: {v}");
        r
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Writes `bytes`, ignoring a broker that closes the connection while we write (as it
    /// does after refusing an oversized frame or a foreign uid).
    pub fn send_bytes_until_closed(&mut self, bytes: &[u8]) {
        match self.stream.write_all(bytes) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            other => other.unwrap(),
        }
    }

    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    /// The next frame, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    pub fn call(&mut self, line: &str) -> Value {
        self.send(line);
        self.recv().expect("an answer")
    }

    pub fn stream_set_read_timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// The next frame if one comes within the read timeout: `None` at a timeout,
    /// `Some(Err(()))` at end of stream.
    pub fn try_recv(&mut self) -> Option<Result<Value, ()>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Some(Err(())),
            Ok(_) => Some(Ok(serde_json::from_str(&line).unwrap())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(_) => Some(Err(())),
        }
    }
}

/// The names of the peers in a `list_peers` answer.
pub fn peer_names(listed: &Value) -> Vec<&str> {
    let peers = listed["peers"].as_array().into_iter().flatten();
    peers.filter_map(|p| p["name"].as_str()).collect()
}

/// The `error.code` of a frame, if it is an error.
pub fn error_code(v: &Value) -> Option<&str> {
    v.pointer("/error/code").and_then(Value::as_str)
}

/// How many times the threads of process `pid` have been put on a CPU so far (the
/// scheduler's count in `schedstat`): per message, the wake-ups it took; while idle,
/// whether anything wakes it.
pub fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}
