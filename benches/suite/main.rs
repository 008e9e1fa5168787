//! `cargo bench`: every figure of the broker, serve and hardening issues, measured on real
//! processes, printed as one table (figure, target, measured, met).
//!
//! `BENCH_ONLY=broker,serve,scale,store` runs a subset. Each group starts what it needs in
//! temp directories and stops it after.

mod broker;
mod raw;
mod scale;
mod serve;
mod store;
mod util;

use util::Row;

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
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |g: &str| only.is_empty() || only.split(',').any(|o| o.trim() == g);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<Row> = Vec::new();
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

    println!();
    println!(
        "claude-peers {} on {}",
        env!("CARGO_PKG_VERSION"),
        machine()
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
