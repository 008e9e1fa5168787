//! `cargo bench`: every figure of the broker, serve and hardening issues, measured on real
//! processes, printed as one table (figure, target, measured, met).
//!
//! `BENCH_ONLY=broker,serve,scale,store,hooks,network,claude` runs a subset. Each group starts
//! what it needs in temp directories and stops it after.

mod broker;
mod claude;
mod floor;
mod hooks;
mod network;
// The tests' support: homes, brokers, `serve` sessions, the Claude Code harness.
#[path = "../../tests/common/mod.rs"]
mod common;
mod ratios;
mod raw;
mod scale;
mod serve;
mod store;
mod util;

use std::time::{Duration, Instant};

use claude_peers::protocol::{PeerInfo, PeerList};
use util::Row;

/// A fixed piece of CPU work, timed: encoding and decoding a listing of 200 peers, 50
/// times. The same build measures slower when the VM's host is busy (steal time, shared
/// caches), and this says by how much, so runs can be compared.
fn yardstick() -> Duration {
    let list = PeerList {
        next: None,
        peers: (0..200)
            .map(|i| PeerInfo {
                name: format!("session-{i}"),
                online: i % 3 != 0,
                summary: format!("working on \"part {i}\" of the parser"),
                first_seen: 1_767_000_000_000,
                last_seen: 1_767_000_000_000 + i64::from(i),
                unread: u64::from(i % 4),
                unreachable: false,
                context: claude_peers::protocol::PeerContext {
                    pid: 10_000 + i,
                    cwd: format!("/home/user/src/project-{}/worktree-{i}", i % 7),
                    git_root: Some(format!("/home/user/src/project-{}", i % 7)),
                    git_common_dir: Some(format!("/home/user/src/project-{}/.git", i % 7)),
                    branch: Some(format!("feature/{i}")),
                    git_remote: None,
                    tty: None,
                    host: Some("laptop".into()),
                    client_name: Some("claude-code".into()),
                    client_version: Some("2.1.0".into()),
                    push: true,
                },
            })
            .collect(),
    };
    let t = Instant::now();
    for _ in 0..50 {
        let text = serde_json::to_string(std::hint::black_box(&list)).unwrap();
        let back: PeerList = serde_json::from_str(&text).unwrap();
        std::hint::black_box(back);
    }
    t.elapsed()
}

/// CPU time the hypervisor has taken from this VM so far (`steal` in /proc/stat).
fn steal() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

fn main() {
    // The floor's processes are this binary, run again in a role.
    if floor::role() {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |g: &str| only.is_empty() || only.split(',').any(|o| o.trim() == g);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<Row> = Vec::new();
    let yard_before = yardstick();
    let steal_before = steal();
    if wanted("floor") {
        rt.block_on(ratios::run(&mut rows));
    }
    if wanted("broker") {
        rt.block_on(broker::run(&mut rows));
    }
    if wanted("serve") {
        rt.block_on(serve::run(&mut rows));
    }
    if wanted("scale") {
        rt.block_on(scale::run(&mut rows));
    }
    if wanted("store") {
        rt.block_on(store::run(&mut rows));
    }
    if wanted("hooks") {
        rt.block_on(hooks::run(&mut rows));
    }
    if wanted("network") {
        rt.block_on(network::run(&mut rows));
    }
    if wanted("claude") {
        rt.block_on(claude::run(&mut rows));
    }

    let yard_after = yardstick();
    let stolen = steal().saturating_sub(steal_before);

    println!();
    println!(
        "claude-peers {} on {}",
        env!("CARGO_PKG_VERSION"),
        machine()
    );
    println!(
        "machine speed: yardstick {} before, {} after (lower is faster); {:.1} s of CPU stolen by the host during the run",
        util::ms(yard_before),
        util::ms(yard_after),
        stolen.as_secs_f64()
    );
    println!();
    println!(
        "| {:<7} | {:<58} | {:<18} | {:<24} | {:<4} |",
        "group", "figure", "target", "measured", "met"
    );
    println!(
        "|{:-<9}|{:-<60}|{:-<20}|{:-<26}|{:-<6}|",
        "", "", "", "", ""
    );
    for r in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "| {:<7} | {:<58} | {:<18} | {:<24} | {:<4} |",
            r.group, r.figure, r.target, r.measured, met
        );
    }
}
