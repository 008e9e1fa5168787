//! What the benchmark modules share beyond the tests' support (`common`, which starts
//! homes, brokers and `serve` sessions for both): the table's rows and their targets,
//! percentiles, memory and CPU readings, and clients tuned for measuring.

use std::time::{Duration, Instant};

use claude_peers::client::{Client, ConnectOptions};
use claude_peers::paths::Paths;

pub use crate::common::{BIN, wakeups};
use crate::common::{Broker, Home};

/// What a figure must reach. It is both the table's "target" column and the check of the
/// figure, so the two cannot disagree.
#[derive(Clone, Copy)]
pub enum Target {
    /// Shown for comparison only.
    None,
    /// A time of at most this.
    AtMost(Duration),
    /// Resident memory of at most this many MB.
    Megabytes(f64),
    /// Exactly this count.
    Count(usize),
    /// A claim in words, which the figure says holds or not ([`Measured::Holds`]).
    Claim(&'static str),
    /// Ours at most this many times the floor's ([`Measured::Ratio`]).
    TimesFloorAtMost(f64),
    /// Ours at least this many times the floor's (a rate).
    TimesFloorAtLeast(f64),
}

/// A measured figure, in the unit its target checks.
pub enum Measured {
    Time(Duration),
    PerSecond(f64),
    Megabytes(f64),
    Count(usize),
    /// Whether a [`Target::Claim`] holds.
    Holds(bool),
    /// Ours divided by the floor's, with both figures in words.
    Ratio(f64, String),
    /// Words only (a breakdown): never checked.
    Text(String),
}

impl Target {
    fn text(self) -> String {
        match self {
            Target::None => "-".into(),
            // A round figure, as it was set: "2 ms", not "2000 us".
            Target::AtMost(d) if d.subsec_micros() % 1000 == 0 && d >= Duration::from_millis(1) => {
                format!("<= {} ms", d.as_millis())
            }
            Target::AtMost(d) => format!("<= {}", duration(d)),
            Target::Megabytes(mb) => format!("<= {mb:.0} MB"),
            Target::Count(n) => n.to_string(),
            Target::Claim(words) => words.into(),
            Target::TimesFloorAtMost(x) => format!("<= {x}x floor"),
            Target::TimesFloorAtLeast(x) => format!(">= {x}x floor"),
        }
    }

    /// Whether `m` meets it; `None` where there is nothing to check.
    fn met(self, m: &Measured) -> Option<bool> {
        match (self, m) {
            (Target::AtMost(t), Measured::Time(d)) => Some(*d <= t),
            (Target::Megabytes(t), Measured::Megabytes(mb)) => Some(*mb <= t),
            (Target::Count(t), Measured::Count(n)) => Some(*n == t),
            (Target::Claim(_), Measured::Holds(yes)) => Some(*yes),
            (Target::TimesFloorAtMost(t), Measured::Ratio(r, _)) => Some(*r <= t),
            (Target::TimesFloorAtLeast(t), Measured::Ratio(r, _)) => Some(*r >= t),
            (Target::None, _) => None,
            _ => panic!("a figure measured in another unit than its target checks"),
        }
    }
}

impl Measured {
    fn text(&self) -> String {
        match self {
            Measured::Time(d) => duration(*d),
            Measured::PerSecond(n) => format!("{}/s", thousands(*n)),
            Measured::Megabytes(mb) => format!("{mb:.1} MB"),
            Measured::Count(n) => n.to_string(),
            Measured::Holds(yes) => if *yes { "holds" } else { "does not hold" }.into(),
            Measured::Text(t) => t.clone(),
            Measured::Ratio(r, detail) => format!("{r:.2}x ({detail})"),
        }
    }
}

/// One line of the table.
pub struct Row {
    /// Which issue's figure: `broker`, `serve`, `scale`, `store`, `claude`.
    pub group: &'static str,
    pub figure: String,
    pub target: String,
    pub measured: String,
    /// Whether the target is met; `None` when there is no target.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(
        group: &'static str,
        figure: impl Into<String>,
        target: Target,
        measured: Measured,
    ) -> Self {
        Self {
            group,
            figure: figure.into(),
            target: target.text(),
            met: target.met(&measured),
            measured: measured.text(),
        }
    }

    /// Shows the figure as `text` (several numbers, of which the checked one is one).
    pub fn shown_as(mut self, text: impl Into<String>) -> Self {
        self.measured = text.into();
        self
    }
}

/// A time as the table shows it: microseconds below 10 ms, else milliseconds.
pub fn duration(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        us(d)
    } else {
        ms(d)
    }
}

pub fn thousands(n: f64) -> String {
    let digits = format!("{n:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A broker for figures: no send-rate limit and a long ack wait, so they measure
/// delivery rather than the limits; it logs only warnings.
pub fn broker(home: &Home) -> Broker {
    home.broker_with_env(
        &["--send-rate", "0", "--ack-wait", "30s"],
        &[("CLAUDE_PEERS_LOG", "warn")],
    )
}

/// A client connection to the broker of `paths`, never starting one.
pub async fn client(paths: &Paths) -> Client {
    let mut opts = ConnectOptions::new("bench");
    opts.autostart = false;
    opts.broker_exe = Some(BIN.into());
    Client::connect(paths, &opts).await.unwrap()
}

/// A client registered as `name`; `push` as a session that shows messages at once.
pub async fn peer(paths: &Paths, name: &str, push: bool) -> Client {
    let c = client(paths).await;
    let mut register = crate::common::register(name, &format!("/bench/{name}"));
    register.context.push = push;
    c.call(register).await.unwrap();
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

/// A line of `/proc/<pid>/status`, as written there (`1234 kB`).
pub fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or_else(String::new, |v| v.trim().to_string())
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
