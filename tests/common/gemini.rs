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
//! Tests start with `require!("gemini")`, which skips them when `gemini` is not on `PATH`.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

pub use super::agent::SERVER;
use super::agent::{self, AgentHome, find_in_path, write_json};
pub use super::claude::Block;
use super::loopback::{Api, Exchange, items, tail, text_of};
use super::{BIN, Broker, Home};

mod stub;

pub use stub::*;

/// One request the stub received (see [`Request::is_main`]).
pub type Request = super::loopback::Request<Generate>;
/// A scripted answer to one turn: its parts (text, function calls).
pub type Reply = super::loopback::Reply<Generate>;
/// The Gemini API on 127.0.0.1, scripted. Stops when dropped.
pub type GeminiApi = super::loopback::Server<Generate>;

/// The model the settings pin: with "auto" every turn first asks a classifier model.
pub const MODEL: &str = "gemini-2.5-flash";

/// The name Gemini gives our server's tool `tool`: `mcp_claude-peers_<tool>`.
pub fn mcp_tool(tool: &str) -> String {
    format!("mcp_{SERVER}_{tool}")
}

// ---------------------------------------------------------------------------------------
// Gemini's home and environment
// ---------------------------------------------------------------------------------------

/// Any string will do: the stub takes every key.
pub const API_KEY: &str = "stub-gemini-key";

/// A fresh claude-peers home with its broker running, a stub of the Gemini API, and a
/// Gemini home that runs against both, with our server named `name`.
pub fn homes(name: &str) -> (Home, Broker, GeminiApi, GeminiHome) {
    agent::homes_with_broker(|peers, api| GeminiHome::new(peers, api, name))
}

/// A throwaway `HOME` for the Gemini CLI: API-key auth, the model pinned, no update check
/// or usage statistics, our MCP server configured and trusted, the project folder trusted.
/// What is its own is `~/.gemini/settings.json`; the project directory is in
/// `~/.gemini/trustedFolders.json`.
pub type GeminiHome = AgentHome<Generate, Value>;

impl GeminiHome {
    pub fn new(peers: &Home, api: &GeminiApi, name: &str) -> Self {
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
        let me = Self::create("gm-", ".gemini", api, |_, _, _| settings);
        // Without this `gemini -p` refuses to run ("not running in a trusted directory"),
        // and would not start a stdio MCP server.
        std::fs::write(
            me.home.join(".gemini/trustedFolders.json"),
            json!({ me.project.to_str().unwrap(): "TRUST_FOLDER" }).to_string(),
        )
        .unwrap();
        me.write_settings();
        me
    }

    /// Changes `~/.gemini/settings.json`.
    pub fn settings(&mut self, f: impl FnOnce(&mut Value)) {
        f(&mut self.own);
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

    fn write_settings(&self) {
        write_json(&self.home.join(".gemini/settings.json"), &self.own);
    }

    /// The whole environment `gemini` runs with (see [`AgentHome::vars_with`]: a test
    /// run with GEMINI_* or GOOGLE_* set behaves the same).
    pub fn vars(&self) -> BTreeMap<String, String> {
        self.vars_with([
            ("GOOGLE_GEMINI_BASE_URL", self.base_url.as_str()),
            ("GEMINI_API_KEY", API_KEY),
        ])
    }

    /// `gemini` with [`Self::vars`], in the project directory.
    pub fn command(&self) -> Command {
        let gemini = find_in_path("gemini").expect("gemini is installed");
        self.command_with(gemini, self.vars())
    }

    /// `gemini -p <prompt>`: one turn, failing after 90 s.
    pub fn print(&self, prompt: &str) -> Output {
        self.run(&["-p", prompt], Duration::from_secs(90))
    }

    /// `gemini <args>`, killed (and the test failed) after `timeout`.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Output {
        agent::run(self.command(), "gemini", args, timeout, |o| {
            self.diagnostics(o)
        })
    }

    /// What to print when a test fails: `gemini`'s output and the stub's requests.
    pub fn diagnostics(&self, out: &Output) -> String {
        self.report(out)
    }
}
