//! The real Gemini CLI (`gemini -p`) against a stub of the Gemini API, so a test can script
//! what the "model" does and assert exactly what it was shown.
//!
//! - [`GeminiApi`]: a loopback HTTP/1.1 server speaking the Gemini API as the CLI uses it
//!   with `GOOGLE_GEMINI_BASE_URL`: `POST /v1beta/models/<model>:streamGenerateContent?alt=sse`
//!   for every turn of the agent loop (one SSE event holding the whole answer), and plain
//!   `:generateContent` for side calls that want JSON (the model router's classifier when
//!   the model is "auto"). Requests that offer tools are answered from a queue of scripted
//!   [`Reply`]s (function calls and text); with the queue empty, and for side calls, the
//!   answer is the text "ok" (or, for a JSON side call, a value of the asked-for schema).
//!   `:countTokens` is answered too; every request is recorded.
//! - [`GeminiHome`]: a throwaway `HOME` whose `~/.gemini/settings.json` selects API-key auth,
//!   pins the model, turns off update checks and usage statistics, and runs
//!   `claude-peers serve` against a test's [`Home`] (trusted); the project directory is in
//!   `~/.gemini/trustedFolders.json`. Optionally hooks.
//! - [`GeminiHome::print`] runs one `gemini -p` turn with a deadline.
//!
//! Facts this rests on (Gemini CLI 0.61.0): our tools are offered as
//! `tools[0].functionDeclarations[]` named `mcp_claude-peers_<tool>`, each with our input
//! schema as `parametersJsonSchema` (plus a `wait_for_previous` boolean the CLI adds); the
//! CLI checks the model's arguments against it before calling us. A call comes back as a
//! `functionResponse` whose `response.output` is our text content (not `structuredContent`)
//! inside `<untrusted_context>`, or `response.error` for a tool error. Without `trust: true`
//! `gemini -p` does not offer our tools at all; in a folder not trusted it refuses to run.
//!
//! Tests start with [`require_gemini!`], which skips them when `gemini` is not on `PATH`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

pub use super::claude::Block;
use super::claude::{find_in_path, text_of};
use super::{BIN, Home};

mod stub;

pub use stub::*;

/// The name of our MCP server in Gemini's settings: tools are `mcp_claude-peers_<tool>`.
pub const SERVER: &str = "claude-peers";
/// The model the settings pin: with "auto" every turn first asks a classifier model.
pub const MODEL: &str = "gemini-2.5-flash";

/// Skips the test (returns from it) when `gemini` is not on `PATH`.
#[macro_export]
macro_rules! require_gemini {
    () => {
        if $crate::common::gemini::gemini_bin().is_none() {
            eprintln!("skipped: gemini (Gemini CLI) is not on PATH; .ci/run installs it");
            return;
        }
    };
}

pub fn gemini_bin() -> Option<PathBuf> {
    find_in_path("gemini")
}

/// The name Gemini gives our server's tool `tool`.
pub fn mcp_tool(tool: &str) -> String {
    format!("mcp_{SERVER}_{tool}")
}

// ---------------------------------------------------------------------------------------
// Gemini's home and environment
// ---------------------------------------------------------------------------------------

/// Any string will do: the stub takes every key.
pub const API_KEY: &str = "stub-gemini-key";

/// A fresh claude-peers home, a stub of the Gemini API, and a Gemini home that runs
/// against both, with our server named `name`.
pub fn homes(name: &str) -> (Home, GeminiApi, GeminiHome) {
    let peers = Home::new();
    let api = GeminiApi::start();
    let gm = GeminiHome::new(&peers, &api, name);
    (peers, api, gm)
}

/// A throwaway `HOME` for the Gemini CLI: API-key auth, the model pinned, no update check
/// or usage statistics, our MCP server configured and trusted, the project folder trusted.
pub struct GeminiHome {
    pub dir: tempfile::TempDir,
    /// `HOME`.
    pub home: PathBuf,
    /// The directory `gemini` runs in (in `trustedFolders.json`).
    pub project: PathBuf,
    pub base_url: String,
    stub: Arc<State>,
    /// `~/.gemini/settings.json`.
    settings: Value,
    /// Extra environment for `gemini`.
    env: BTreeMap<String, String>,
}

impl GeminiHome {
    pub fn new(peers: &Home, api: &GeminiApi, name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gm-")
            .tempdir_in("/tmp")
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        let home = root.join("home");
        let project = root.join("project");
        std::fs::create_dir_all(home.join(".gemini")).unwrap();
        std::fs::create_dir_all(&project).unwrap();
        // Without this `gemini -p` refuses to run ("not running in a trusted directory"),
        // and would not start a stdio MCP server.
        std::fs::write(
            home.join(".gemini/trustedFolders.json"),
            json!({ project.to_str().unwrap(): "TRUST_FOLDER" }).to_string(),
        )
        .unwrap();
        let settings = json!({
            "security": { "auth": { "selectedType": "gemini-api-key" } },
            // "auto" asks a classifier model (a JSON side call) before every turn.
            "model": { "name": MODEL },
            "general": { "enableAutoUpdate": false, "enableAutoUpdateNotification": false },
            // Usage statistics go to play.googleapis.com.
            "privacy": { "usageStatisticsEnabled": false },
            "telemetry": { "enabled": false },
            "mcpServers": { SERVER: {
                "command": BIN,
                "args": ["serve"],
                "env": {
                    "CLAUDE_PEERS_HOME": peers.root().to_str().unwrap(),
                    "CLAUDE_PEERS_NAME": name,
                    // As `Home::cmd`: a broker the test leaves behind goes away by itself.
                    "CLAUDE_PEERS_IDLE_TIMEOUT": "20s"
                },
                // Untrusted, `gemini -p` leaves our tools out of the request.
                "trust": true
            } }
        });
        let me = Self {
            dir,
            home,
            project,
            base_url: api.base_url(),
            stub: api.state.clone(),
            settings,
            env: BTreeMap::new(),
        };
        me.write_settings();
        me
    }

    /// Changes `~/.gemini/settings.json`.
    pub fn settings(&mut self, f: impl FnOnce(&mut Value)) {
        f(&mut self.settings);
        self.write_settings();
    }

    /// Sets a variable in our MCP server's `env`.
    pub fn server_env(&mut self, key: &str, value: &str) {
        self.settings(|s| s["mcpServers"][SERVER]["env"][key] = json!(value));
    }

    /// Runs `command args` as our MCP server instead of `claude-peers serve`.
    pub fn server_command(&mut self, command: &str, args: &[&str]) {
        self.settings(|s| {
            s["mcpServers"][SERVER]["command"] = json!(command);
            s["mcpServers"][SERVER]["args"] = json!(args);
        });
    }

    /// Adds a command hook for `event` (`BeforeAgent`, `AfterAgent`, `SessionStart`, …):
    /// `hooks.<event> = [{"hooks": [{"type": "command", "command": …}]}]`. Gemini runs it
    /// with `bash -c` in the project directory, the event's JSON on stdin.
    pub fn hook(&mut self, event: &str, command: &str) {
        self.settings(|s| {
            let mut groups = s["hooks"][event].as_array().cloned().unwrap_or_default();
            groups.push(json!({ "hooks": [{ "type": "command", "command": command }] }));
            s["hooks"][event] = Value::Array(groups);
        });
    }

    /// Sets a variable in `gemini`'s own environment.
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.insert(key.into(), value.into());
    }

    fn write_settings(&self) {
        std::fs::write(
            self.home.join(".gemini/settings.json"),
            serde_json::to_string_pretty(&self.settings).unwrap(),
        )
        .unwrap();
    }

    /// The whole environment `gemini` runs with (nothing else is inherited, so a test run
    /// with GEMINI_* or GOOGLE_* set behaves the same).
    pub fn vars(&self) -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        let path = std::env::var("PATH").unwrap_or("/usr/bin:/bin".into());
        v.insert("PATH".into(), path);
        for k in ["LANG", "LC_ALL", "TMPDIR"] {
            if let Ok(x) = std::env::var(k) {
                v.insert(k.into(), x);
            }
        }
        v.insert("HOME".into(), self.home.to_str().unwrap().into());
        v.insert("GOOGLE_GEMINI_BASE_URL".into(), self.base_url.clone());
        v.insert("GEMINI_API_KEY".into(), API_KEY.into());
        v.extend(self.env.clone());
        v
    }

    /// `gemini` with [`Self::vars`], in the project directory.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(gemini_bin().expect("gemini is installed"));
        cmd.env_clear()
            .envs(self.vars())
            .current_dir(&self.project)
            .stdin(Stdio::null());
        cmd
    }

    /// `gemini -p <prompt>`: one turn, failing after 90 s.
    pub fn print(&self, prompt: &str) -> Output {
        self.run(&["-p", prompt], Duration::from_secs(90))
    }

    /// `gemini <args>`, killed (and the test failed) after `timeout`.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        super::run_within(cmd, timeout).unwrap_or_else(|out| {
            panic!(
                "gemini {args:?} still running after {timeout:?}; killed\n{}",
                self.diagnostics(&out)
            )
        })
    }

    /// What to print when a test fails: `gemini`'s output and the stub's requests.
    pub fn diagnostics(&self, out: &Output) -> String {
        format!(
            "{}\n--- gemini stdout\n{}\n--- gemini stderr\n{}\n--- stub requests\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            summary(&self.stub)
        )
    }
}
