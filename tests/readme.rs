//! The README's commands, run, so that the README cannot drift from the program.
//!
//! Every line of a ```` ```sh ```` block whose command is `claude-peers` (after any
//! `VAR=value` assignments, or as the last command of a pipeline) runs in the README's
//! order against one private home, with a session named `api` online (the README's
//! examples write to it), and must succeed. Verbs that keep running are checked as their
//! kind allows: `log -f` must still be running after a second; `top`, `serve` and
//! `broker` must accept their arguments (`--help` is appended: they need a terminal, an
//! MCP client, or the home's one broker). Lines for other programs (`cargo`, `claude`,
//! `codex`, …) are not run here; CI runs `cargo` itself. A block that only illustrates
//! uses another info string (```` ```text ````).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The `sh` blocks' lines, in order, without their comments.
fn sh_lines(readme: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    for (n, line) in readme.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            in_sh = !in_sh && info.trim() == "sh";
            continue;
        }
        if in_sh {
            let code = strip_comment(line).trim().to_string();
            if !code.is_empty() {
                lines.push((n + 1, code));
            }
        }
    }
    lines
}

/// A line without its `# comment` (a `#` outside quotes, after a space or at the start).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// Programs whose lines are not run here: the toolchain (CI runs it), the agents, and
/// what needs a machine of its own.
const NOT_RUN: &[&str] = &[
    "cargo",
    "claude",
    "codex",
    "gemini",
    "cursor-agent",
    "git",
    "nats-server",
    "sudo",
];

/// The arguments of the `claude-peers` a line runs, if it runs one and nothing in
/// [`NOT_RUN`].
fn our_command(line: &str) -> Option<Vec<&str>> {
    let first = line
        .split_whitespace()
        .find(|w| !w.contains('=') || w.starts_with('-'))?;
    if NOT_RUN.contains(&first) {
        return None;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.trim_start_matches("<(") == "claude-peers")?;
    Some(
        words[at + 1..]
            .iter()
            .take_while(|w| !matches!(**w, "|" | "&&" | ">" | ";"))
            .map(|w| w.trim_end_matches(')'))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_commands_run() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let home = Home::new();
    let project = home.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The session the examples write to.
    home.run_ok(&["peers"]);
    let (_api, _) = home.peer("api", "/srv/api").await;

    let mut ran = 0;
    for (n, line) in sh_lines(&readme) {
        let Some(args) = our_command(&line) else {
            continue;
        };
        let verb = args
            .iter()
            .find(|a| !a.starts_with('-'))
            .copied()
            .unwrap_or("");
        let follows = verb == "log" && args.iter().any(|a| *a == "-f" || *a == "--follow");
        let script = if matches!(verb, "top" | "serve" | "broker") {
            format!("{line} --help")
        } else {
            line.clone()
        };
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &script])
            .current_dir(&project)
            .envs(home.cmd().get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env("PATH", &path)
            // setup writes an agent's files under HOME: a private one.
            .env("HOME", home.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if follows {
            std::thread::sleep(Duration::from_secs(1));
            let still = child.try_wait().unwrap().is_none();
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            assert!(
                still,
                "README.md:{n}: `{line}` ended at once:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        } else {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "README.md:{n}: `{line}` still runs after 20 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "README.md:{n}: `{line}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        ran += 1;
    }
    assert!(
        ran >= 10,
        "only {ran} README lines ran: are the blocks still ```sh?"
    );
    eprintln!("{ran} README commands ran");
}

#[test]
fn comments_and_commands_are_read_as_a_shell_would() {
    assert_eq!(
        strip_comment("claude-peers peers   # list"),
        "claude-peers peers   "
    );
    assert_eq!(
        strip_comment("claude-peers send api \"#1 is done\""),
        "claude-peers send api \"#1 is done\""
    );
    assert_eq!(
        our_command("echo hi | claude-peers send api -"),
        Some(vec!["send", "api", "-"])
    );
    assert_eq!(
        our_command("CLAUDE_PEERS_HOST=box claude-peers peers"),
        Some(vec!["peers"])
    );
    assert_eq!(our_command("cargo install --locked --path ."), None);
    assert_eq!(
        our_command("cargo install --path . && claude-peers peers"),
        None
    );
    assert_eq!(
        our_command("source <(claude-peers completions bash)"),
        Some(vec!["completions", "bash"])
    );
    assert_eq!(our_command("claude-peers man > x.1"), Some(vec!["man"]));
}
