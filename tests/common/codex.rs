//! The real OpenAI Codex CLI (`codex exec`) against a stub of the OpenAI Responses API, so
//! a test can script what the "model" does and assert exactly what it was shown.
//!
//! - [`ResponsesApi`]: a loopback HTTP/1.1 server answering `POST /v1/responses` with SSE
//!   (`response.created`, `response.output_item.added`/`.done`, `response.completed`) from
//!   a queue of scripted [`Reply`]s (function calls and text), recording every request.
//!   With the queue empty it answers the text "ok", which ends the turn.
//! - [`CodexHome`]: a throwaway `HOME` whose `~/.codex/config.toml` points Codex at the
//!   stub and runs `claude-peers serve` against a test's [`Home`]; optionally hooks.
//! - [`CodexHome::exec`] runs one `codex exec` turn with a deadline.
//!
//! Facts this rests on (codex-cli 0.171.0): our tools are offered as one
//! `{"type":"namespace","name":"mcp__claude_peers","tools":[…]}` entry of `tools`; the
//! model calls one with a `function_call` item carrying that `namespace`; the result comes
//! back as a `function_call_output` whose `output` is "Wall time: …\nOutput:\n" and the
//! tool's `structuredContent` as compact JSON (a string), or, for a tool without
//! structured content, a list of `input_text` items (the header, then each text block).
//! A tool without annotations (or not read-only and not `openWorldHint: false`) is refused
//! with "MCP tool call requires approval, but approval policy is never".
//!
//! Tests start with `require!("codex")`, which skips them when `codex` is not on `PATH`.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

pub use super::agent::SERVER;
use super::agent::{self, AgentHome, find_in_path, write_json};
use super::loopback::{Api, Exchange, items, sse_event};
use super::{BIN, Broker, Home};

mod stub;

pub use stub::*;

/// One request the stub received (see [`Request::is_responses`]).
pub type Request = super::loopback::Request<Responses>;
/// A scripted answer to one `/v1/responses` request.
pub type Reply = super::loopback::Reply<Responses>;
/// The OpenAI Responses API on 127.0.0.1, scripted. Stops when dropped.
pub type ResponsesApi = super::loopback::Server<Responses>;

/// The namespace Codex gives our server's tools (`-` becomes `_`).
pub const NAMESPACE: &str = "mcp__claude_peers";
/// What Codex says when it refuses a tool call for lack of approval.
pub const REFUSED: &str = "requires approval";

// ---------------------------------------------------------------------------------------
// Codex's home
// ---------------------------------------------------------------------------------------

/// Codex reads the key from the variable the provider's `env_key` names; any value does.
pub const API_KEY: &str = "sk-stub-claude-peers";

/// A fresh claude-peers home with its broker running, a stub of the Responses API, and a
/// Codex home that runs against both, its server named `name`.
pub fn homes(name: &str) -> (Home, Broker, ResponsesApi, CodexHome) {
    agent::homes_with_broker(|peers, api| CodexHome::new(peers, api, name))
}

/// A throwaway `HOME` for Codex: `~/.codex/config.toml` with the stub as the model
/// provider and our MCP server, and `~/.codex/hooks.json` if a test sets hooks.
pub type CodexHome = AgentHome<Responses, Codex>;

/// What is Codex's own in its home.
pub struct Codex {
    /// Our server's `command` and `args`.
    server: (String, Vec<String>),
    /// Our server's `env` table.
    server_env: BTreeMap<String, String>,
    /// `~/.codex/hooks.json`, if any; then `exec` bypasses hook trust.
    hooks: Option<Value>,
}

impl CodexHome {
    pub fn new(peers: &Home, api: &ResponsesApi, name: &str) -> Self {
        let server_env = BTreeMap::from([
            (
                "CLAUDE_PEERS_HOME".into(),
                peers.root().display().to_string(),
            ),
            ("CLAUDE_PEERS_NAME".into(), name.into()),
            // As `Home::cmd`: a broker the test leaves behind goes away by itself.
            ("CLAUDE_PEERS_IDLE_TIMEOUT".into(), "20s".into()),
        ]);
        let me = Self::create("cx-", ".codex", api, |_, _, _| Codex {
            server: (BIN.into(), vec!["serve".into()]),
            server_env,
            hooks: None,
        });
        me.write_config();
        me
    }

    /// Sets a variable in our MCP server's `env` table.
    pub fn server_env(&mut self, key: &str, value: &str) {
        self.own.server_env.insert(key.into(), value.into());
        self.write_config();
    }

    /// Runs `command args` as our MCP server instead of `claude-peers serve` (a wrapper
    /// that records what Codex gives it, then execs the binary).
    pub fn server_command(&mut self, command: &str, args: &[&str]) {
        self.own.server = (command.into(), args.iter().map(|a| a.to_string()).collect());
        self.write_config();
    }

    /// Writes `~/.codex/hooks.json` (`{"hooks": {"Stop": [{"hooks": [...]}], …}}`).
    pub fn hooks(&mut self, hooks: Value) {
        write_json(&self.home.join(".codex/hooks.json"), &hooks);
        self.own.hooks = Some(hooks);
    }

    /// `~/.codex/config.toml`.
    pub fn config_toml(&self) -> String {
        // A JSON string is a TOML basic string.
        let q = |s: &str| Value::from(s).to_string();
        let (command, args) = &self.own.server;
        let args: Vec<String> = args.iter().map(|a| q(a)).collect();
        let env: String = self
            .own
            .server_env
            .iter()
            .map(|(k, v)| format!("{} = {}\n", q(k), q(v)))
            .collect();
        format!(
            r#"# Written by tests/common/codex.rs.
model = "gpt-5"
model_provider = "stub"
check_for_update_on_startup = false

[model_providers.stub]
name = "stub"
base_url = {base_url}
env_key = "OPENAI_API_KEY"
wire_api = "responses"

# Keep Codex on loopback: with these on it looks up github.com, api.github.com and
# chatgpt.com at start.
[features]
plugins = false
remote_plugin = false
apps = false

[analytics]
enabled = false

[feedback]
enabled = false

[mcp_servers.{server}]
command = {command}
args = [{args}]

[mcp_servers.{server}.env]
{env}"#,
            base_url = q(&self.base_url),
            server = q(SERVER),
            command = q(command),
            args = args.join(", "),
        )
    }

    fn write_config(&self) {
        std::fs::write(self.home.join(".codex/config.toml"), self.config_toml()).unwrap();
    }

    /// The whole environment `codex` runs with (see [`AgentHome::vars_with`]: a test
    /// run from inside Codex, or with OPENAI_* or CODEX_HOME set, behaves the same).
    pub fn vars(&self) -> BTreeMap<String, String> {
        self.vars_with([("OPENAI_API_KEY", API_KEY)])
    }

    /// `codex` with [`Self::vars`], in the project directory, stdin closed (else `exec`
    /// waits for more prompt on it).
    pub fn command(&self) -> Command {
        let codex = find_in_path("codex").expect("codex is installed");
        self.command_with(codex, self.vars())
    }

    /// `codex exec <prompt>`: one turn, failing after 90 s. Unknown config keys are an
    /// error; hooks run without being trusted first when the test set some.
    pub fn exec(&self, prompt: &str) -> Output {
        let mut args = vec![
            "exec",
            "--strict-config",
            "--skip-git-repo-check",
            "--color",
            "never",
        ];
        if self.own.hooks.is_some() {
            args.push("--dangerously-bypass-hook-trust");
        }
        args.push(prompt);
        self.exec_with(&args, Duration::from_secs(90))
    }

    /// `codex <args>`, which must exit successfully within `timeout`.
    pub fn exec_with(&self, args: &[&str], timeout: Duration) -> Output {
        let out = agent::run(self.command(), "codex", args, timeout, |o| {
            self.diagnostics(o)
        });
        assert!(
            out.status.success(),
            "codex {args:?} failed\n{}",
            self.diagnostics(&out)
        );
        out
    }

    /// What to print when a test fails: Codex's output and the stub's requests.
    pub fn diagnostics(&self, out: &Output) -> String {
        self.report(out)
    }
}
