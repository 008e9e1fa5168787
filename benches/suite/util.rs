//! What the benchmark modules share: the binary, real brokers in temp homes, clients,
//! percentiles, memory readings, and the table they fill.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_peers::client::{Client, ConnectOptions};
use claude_peers::paths::Paths;
use claude_peers::protocol::Register;

pub const BIN: &str = env!("CARGO_BIN_EXE_claude-peers");

/// One line of the table.
pub struct Row {
    /// Which issue's figure: `broker`, `serve`, `scale`, `store`.
    pub group: &'static str,
    pub figure: String,
    pub target: &'static str,
    pub measured: String,
    /// Whether the target is met; `None` when there is no target.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(
        group: &'static str,
        figure: impl Into<String>,
        target: &'static str,
        measured: impl Into<String>,
        met: Option<bool>,
    ) -> Self {
        Self {
            group,
            figure: figure.into(),
            target,
            measured: measured.into(),
            met,
        }
    }
}

/// A temp directory under /tmp (short, so socket paths fit) holding one claude-peers home.
pub fn temp_home(prefix: &str) -> (tempfile::TempDir, Paths) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let paths = Paths::resolve(Some(&dir.path().join("h")), None).unwrap();
    (dir, paths)
}

/// A real `claude-peers broker` process (release build) in a temp home, killed on drop.
pub struct Broker {
    child: Child,
    pub paths: Paths,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// A broker in a new home, with no send-rate limit and a long ack wait, so the
    /// figures measure delivery rather than the limits.
    pub fn start() -> Self {
        let (dir, paths) = temp_home("cpb-");
        let mut b = Self::start_in(paths);
        b._dir = Some(dir);
        b
    }

    /// A broker for an existing home (and its database).
    pub fn start_in(paths: Paths) -> Self {
        let child = Command::new(BIN)
            .args(["broker", "--send-rate", "0", "--ack-wait", "5s"])
            .env("CLAUDE_PEERS_HOME", &paths.runtime_dir)
            .env("CLAUDE_PEERS_DB", &paths.db)
            .env("CLAUDE_PEERS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        wait_socket(&paths.socket);
        Self {
            child,
            paths,
            _dir: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client connection to the broker of `paths`, never starting one.
pub async fn client(paths: &Paths) -> Client {
    let mut opts = ConnectOptions::new("bench");
    opts.autostart = false;
    opts.broker_exe = Some(PathBuf::from(BIN));
    Client::connect(paths, &opts).await.unwrap()
}

/// A client registered as `name`; `push` as a session that shows messages at once.
pub async fn peer(paths: &Paths, name: &str, push: bool) -> Client {
    let c = client(paths).await;
    c.call(Register {
        name: name.into(),
        context: claude_peers::protocol::PeerContext {
            cwd: format!("/bench/{name}"),
            push,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    c
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The p50 of `times`, which it sorts.
pub fn p50(times: &mut [Duration]) -> Duration {
    times.sort();
    percentile(times, 0.5)
}

pub fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Resident memory of a process, in MB (0 when it is gone).
pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU time a process has run so far, all its threads, from the scheduler's own
/// nanosecond counts (zero when it is gone).
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}

/// Times `n` runs of `f` after `warm` unmeasured ones.
pub async fn time_calls<F, Fut>(warm: usize, n: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..warm {
        f().await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        times.push(t.elapsed());
    }
    times
}
