//! The real Claude Code CLI against a stub of the Anthropic Messages API, so a test can
//! script what the "model" does and assert exactly what it was shown.
//!
//! - [`StubApi`]: a loopback HTTP/1.1 server speaking the Messages API as Claude Code
//!   uses it (streaming SSE and plain JSON, `count_tokens`), recording every request.
//!   Main-loop requests (those that carry `tools`) are answered from a queue of scripted
//!   [`Reply`]s; everything else gets the text "ok".
//! - [`ClaudeHome`]: a throwaway `HOME` for Claude Code with our MCP server configured,
//!   and the environment that points `claude` at the stub and keeps it offline.
//! - [`ClaudeHome::print`] runs `claude -p`; [`Interactive`] runs a session under tmux.
//!
//! Tests start with `require!("claude")` (and `require!("tmux")` for sessions), which skip
//! with a reason when the programs are not installed; `.ci/run` installs both.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::agent::{self, AgentHome, is_executable, write_json};
pub use super::agent::{SERVER, find_in_path};
pub use super::loopback::text_of;
use super::loopback::{Api, Exchange, head, items, sse_event, tail};
use super::{BIN, Home};

mod reply;
mod stub;
mod tmux;

pub use reply::*;
pub use stub::*;
#[allow(unused_imports)] // for the tests that run sessions
pub use tmux::*;

/// One request the stub received (see [`Request::is_main`]).
pub type Request = super::loopback::Request<Messages>;
/// A scripted answer to one main-loop request.
pub type Reply = super::loopback::Reply<Messages>;
/// The Anthropic Messages API on 127.0.0.1, scripted. Stops when dropped.
pub type StubApi = super::loopback::Server<Messages>;
/// What a session keeps of the stub, for its diagnostics.
type Recorded = Arc<super::loopback::State<Messages>>;

/// The Claude Code CLI: `claude` on `PATH`, or where its native installer puts it.
pub fn claude_bin() -> Option<PathBuf> {
    find_in_path("claude").or_else(|| {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        [".local/bin/claude", ".claude/local/claude"]
            .iter()
            .map(|p| home.join(p))
            .find(|p| is_executable(p))
    })
}

// ---------------------------------------------------------------------------------------
// Claude Code's home and environment
// ---------------------------------------------------------------------------------------

/// Any `sk-ant-` string passes the CLI's format check; the stub accepts everything.
pub const API_KEY: &str = "sk-ant-api03-stub0000000000000000000000000000000000000000-claudepeersAA";

/// A fresh claude-peers home, a stub of the Messages API, and a Claude Code home that
/// runs against both.
pub fn homes() -> (Home, StubApi, ClaudeHome) {
    agent::homes(ClaudeHome::new)
}

/// A throwaway `HOME` for Claude Code: onboarding done, the key approved, the project
/// directory trusted, our MCP server configured and allowed.
pub type ClaudeHome = AgentHome<Messages, Claude>;

/// What is Claude Code's own in its home.
pub struct Claude {
    /// `~/.claude.json`, written again after [`ClaudeHome::config`].
    config: Value,
    /// `--debug-file` of every run.
    debug_file: PathBuf,
}

impl ClaudeHome {
    /// A home whose `claude` talks to `api` and runs `claude-peers serve` against `peers`.
    pub fn new(peers: &Home, api: &StubApi) -> Self {
        let key_tail = &API_KEY[API_KEY.len() - 20..];
        let config = |project: &Path| {
            json!({
                // Skips the theme picker and the welcome screens.
                "hasCompletedOnboarding": true,
                // "Do you want to use this API key?": yes, for this key.
                "customApiKeyResponses": { "approved": [key_tail], "rejected": [] },
                // "Do you trust the files in this folder?": yes.
                "projects": { project.to_str().unwrap(): {
                    "hasTrustDialogAccepted": true,
                    "hasCompletedProjectOnboarding": true
                } },
                "mcpServers": { SERVER: {
                    "type": "stdio",
                    "command": BIN,
                    "args": ["serve"],
                    "env": {
                        "CLAUDE_PEERS_HOME": peers.root().to_str().unwrap(),
                        // As `Home::cmd`: a broker the test leaves behind goes away by itself.
                        "CLAUDE_PEERS_IDLE_TIMEOUT": "20s"
                    }
                } }
            })
        };
        // Claude Code keys projects by the canonical path, which `project` is.
        let me = Self::create("cc-", ".claude", api, |root, _, project| Claude {
            config: config(project),
            debug_file: root.join("claude-debug.log"),
        });
        // The default permission mode ("auto") sends an MCP call with no allow rule to
        // a classifier the stub cannot answer; allow ours, as "don't ask again" would.
        write_json(
            &me.home.join(".claude/settings.json"),
            &json!({ "permissions": { "allow": [format!("mcp__{SERVER}")] } }),
        );
        me.write_config();
        me
    }

    /// Changes `~/.claude.json` (e.g. `c["mcpServers"]["claude-peers"]["env"]["X"] = ..`).
    pub fn config(&mut self, f: impl FnOnce(&mut Value)) {
        f(&mut self.own.config);
        self.write_config();
    }

    /// Takes our MCP server out of `~/.claude.json`: a user who has not set claude-peers
    /// up (or whose Claude Code runs without it).
    pub fn without_our_server(&mut self) {
        self.config(|c| {
            c["mcpServers"].as_object_mut().unwrap().remove(SERVER);
        });
    }

    /// Sets a variable in our MCP server's environment (e.g. `CLAUDE_PEERS_NAME`).
    pub fn server_env(&mut self, key: &str, value: &str) {
        self.config(|c| c["mcpServers"][SERVER]["env"][key] = json!(value));
    }

    fn write_config(&self) {
        write_json(&self.home.join(".claude.json"), &self.own.config);
    }

    /// `--debug-file` of every run.
    pub fn debug_file(&self) -> &Path {
        &self.own.debug_file
    }

    /// The whole environment `claude` runs with (nothing else is inherited, so a test
    /// run from inside Claude Code, or with ANTHROPIC_* set, behaves the same).
    pub fn vars(&self) -> BTreeMap<String, String> {
        let own = [
            // Where Claude Code sends every model call.
            ("ANTHROPIC_BASE_URL", self.base_url.as_str()),
            ("ANTHROPIC_API_KEY", API_KEY),
            // No update check or self-update at start.
            ("DISABLE_AUTOUPDATER", "1"),
            // Without it Claude Code also calls api.anthropic.com directly (bootstrap, fast
            // mode status, the MCP registry, event logging): with no network those fail
            // after a DNS lookup, with a network they would leave the machine.
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            // Interactive sessions otherwise install the official plugin marketplace at
            // start: a download from downloads.claude.ai, then `git clone` from github.com
            // over HTTPS and SSH. Not covered by the variable above.
            ("CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL", "1"),
        ];
        self.vars_with(own)
    }

    /// `claude` with [`Self::vars`], in the project directory, logging to the debug file.
    pub fn command(&self) -> Command {
        let claude = claude_bin().expect("claude is installed");
        let mut cmd = self.command_with(claude, self.vars());
        cmd.arg("--debug-file").arg(self.debug_file());
        cmd
    }

    /// `claude -p <prompt>` for a turn whose scripted model calls our `whoami` (the replies
    /// already pushed): checks that the model was shown its answer, naming `name`, and
    /// that the turn ended cleanly with every scripted reply used.
    pub fn print_shows_whoami(&self, api: &StubApi, prompt: &str, name: &str) -> Output {
        let out = self.print(prompt);
        let needle = format!("\"name\":\"{name}\"");
        let shown = api.wait_for(
            |r| r.is_main() && r.tool_results().iter().any(|t| t.contains(&needle)),
            Duration::from_secs(5),
        );
        assert!(
            shown.is_some(),
            "the model was never shown whoami's answer\nstdout: {}\nstderr: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        assert!(out.status.success(), "{out:?}\n{}", self.diagnostics());
        // After the tool's result the queue is empty: the stub's default answer ends the turn.
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "{}",
            self.diagnostics()
        );
        assert_eq!(api.pending(), 0, "{}", self.diagnostics());
        out
    }

    /// `claude -p <prompt>`: one turn, failing after 90 s.
    pub fn print(&self, prompt: &str) -> Output {
        self.print_with(&["-p", prompt], Duration::from_secs(90))
    }

    /// `claude <args>`, killed (and the test failed) after `timeout`.
    pub fn print_with(&self, args: &[&str], timeout: Duration) -> Output {
        agent::run(self.command(), "claude", args, timeout, |out| {
            agent::output_text(out) + &self.diagnostics()
        })
    }

    /// The last `lines` lines of the `--debug-file` log.
    pub fn debug_tail(&self, lines: usize) -> String {
        debug_tail(self.debug_file(), lines)
    }

    /// What to print when a test fails: the stub's requests and the debug log's tail.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- stub requests ---\n{}{}",
            self.requests(),
            self.debug_tail(60)
        )
    }
}

fn debug_tail(file: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(file).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    format!(
        "--- claude debug log {} (last {lines} of {} lines) ---\n{}",
        file.display(),
        all.len(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

/// `screen` with each run of blank lines shown as one.
fn squeeze_blank_lines(screen: &str) -> String {
    let mut out = String::new();
    let mut blank = false;
    for l in screen.lines() {
        let b = l.trim().is_empty();
        if !(b && blank) {
            out.push_str(l);
            out.push('\n');
        }
        blank = b;
    }
    out
}

fn kill(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}
