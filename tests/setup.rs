//! `claude-peers setup <agent>` for the agents other than Claude Code (whose own test runs
//! the real Claude Code, in tests/claude_code): the files written, kept and given back.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};

/// A user of the agents, with claude-peers installed: its claude-peers home and `HOME`.
struct User {
    peers: Home,
    home: PathBuf,
}

impl User {
    fn new() -> Self {
        let peers = Home::new();
        let home = peers.dir.path().join("user");
        std::fs::create_dir_all(&home).unwrap();
        Self { peers, home }
    }

    /// `~/<name>`, made.
    fn config_dir(&self, name: &str) -> PathBuf {
        let dir = self.home.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `claude-peers setup <args>`, which must succeed; what it said.
    fn setup(&self, args: &[&str]) -> String {
        let out = self
            .peers
            .cmd()
            .env("HOME", &self.home)
            .env_remove("CODEX_HOME")
            .arg("setup")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "setup {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The whole cycle for `agent`, whose files are `files`: `--print` writes nothing,
    /// setup writes (`check` sees what it said and the files), a second run changes
    /// nothing, `--uninstall` gives back the files as they were (a file that was not there
    /// is not there).
    fn cycle(&self, agent: &str, files: &[PathBuf], check: impl FnOnce(&str)) {
        let before = Before::take(files);
        let printed = self.setup(&[agent, "--print"]);
        assert!(printed.contains("would become"), "{printed}");
        before.assert_restored();
        let said = self.setup(&[agent]);
        assert!(
            said.contains("registered the MCP server claude-peers"),
            "{said}"
        );
        assert!(said.contains("wrote the mail hooks"), "{said}");
        // `--print` showed each file as it is now, and the backup of each is the user's.
        for (p, text) in &before.0 {
            let now = read(p);
            assert!(
                printed.contains(now.trim_end()),
                "{} printed otherwise: {printed}",
                p.display()
            );
            if let Some(text) = text {
                let backup = p.with_file_name(format!(
                    "{}.claude-peers.bak",
                    p.file_name().unwrap().to_string_lossy()
                ));
                assert_eq!(
                    &read(&backup),
                    text,
                    "{} is not the user's",
                    backup.display()
                );
            }
        }
        assert!(
            self.setup(&[agent]).contains("nothing to change"),
            "a second run changes nothing"
        );
        check(&said);
        self.setup(&[agent, "--uninstall"]);
        before.assert_restored();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json_of(p: &Path) -> Value {
    serde_json::from_str(&read(p)).unwrap()
}

/// Writes `v` as an agent's JSON file, as a user would have it.
fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap() + "\n").unwrap();
}

/// The files of one agent as a user had them before setup; `None` where there was none.
struct Before(Vec<(PathBuf, Option<String>)>);

impl Before {
    fn take(paths: &[PathBuf]) -> Self {
        Self(
            paths
                .iter()
                .map(|p| (p.clone(), std::fs::read_to_string(p).ok()))
                .collect(),
        )
    }

    /// Every file is as it was (and one that was not there is not there).
    fn assert_restored(&self) {
        for (p, text) in &self.0 {
            assert_eq!(
                &std::fs::read_to_string(p).ok(),
                text,
                "{} not restored",
                p.display()
            );
        }
    }
}

#[test]
fn setup_codex_keeps_the_users_config_and_gives_it_back() {
    let user = User::new();
    let codex = user.config_dir(".codex");
    let config = codex.join("config.toml");
    let hooks = codex.join("hooks.json");
    std::fs::write(
        &config,
        "# my settings\nmodel = \"o3\"\n\n[mcp_servers.other]\ncommand = \"other-server\" # keep me\n",
    )
    .unwrap();
    user.cycle("codex", &[config.clone(), hooks.clone()], |said| {
        assert!(said.contains("Hooks need review"), "{said}");
        let text = read(&config);
        assert!(text.starts_with("# my settings\nmodel = \"o3\""), "{text}");
        assert!(
            text.contains("command = \"other-server\" # keep me"),
            "{text}"
        );
        let doc: toml_value::Doc = text.parse().unwrap();
        let ours = &doc.0["mcp_servers"]["claude-peers"];
        assert_eq!(ours["command"].as_str(), Some(BIN));
        assert_eq!(ours["args"][0].as_str(), Some("serve"));
        let h = json_of(&hooks);
        for (event, kind) in [
            ("UserPromptSubmit", "prompt"),
            ("SessionStart", "prompt"),
            ("Stop", "stop"),
        ] {
            let cmd = h["hooks"][event][0]["hooks"][0]["command"]
                .as_str()
                .unwrap();
            assert!(cmd.ends_with(&format!("hook {kind}")), "{event}: {cmd}");
        }
        assert!(codex.join("config.toml.claude-peers.bak").exists());
    });
}

#[test]
fn setup_gemini_trusts_the_server_and_hooks_both_turn_ends() {
    let user = User::new();
    let settings = user.config_dir(".gemini").join("settings.json");
    write_json(
        &settings,
        &json!({
            "theme": "Dark",
            "mcpServers": {"other": {"command": "other-server"}},
            "hooks": {"AfterAgent": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]}
        }),
    );
    user.cycle("gemini", std::slice::from_ref(&settings), |said| {
        assert!(said.contains("trusted folders"), "{said}");
        let s = json_of(&settings);
        assert_eq!(s["theme"], "Dark");
        assert_eq!(s["mcpServers"]["other"]["command"], "other-server");
        assert_eq!(s["mcpServers"]["claude-peers"]["trust"], true);
        assert_eq!(s["mcpServers"]["claude-peers"]["command"], BIN);
        let before_agent = s["hooks"]["BeforeAgent"][0]["hooks"][0]["command"]
            .as_str()
            .unwrap();
        assert!(before_agent.ends_with("hook prompt"), "{before_agent}");
        let after = s["hooks"]["AfterAgent"].as_array().unwrap();
        assert_eq!(after.len(), 2, "theirs and ours: {s}");
        assert!(
            after[1]["hooks"][0]["command"]
                .as_str()
                .unwrap()
                .ends_with("hook stop")
        );
    });
}

#[test]
fn setup_cursor_adds_a_stop_hook_and_leaves_no_file_it_made() {
    let user = User::new();
    let cursor = user.config_dir(".cursor");
    let (mcp, hooks) = (cursor.join("mcp.json"), cursor.join("hooks.json"));
    write_json(
        &mcp,
        &json!({"mcpServers": {"other": {"url": "http://localhost:9/mcp"}}}),
    );
    user.cycle("cursor", &[mcp.clone(), hooks.clone()], |_| {
        assert_eq!(
            json_of(&mcp)["mcpServers"]["claude-peers"]["args"],
            json!(["serve"])
        );
        let h = json_of(&hooks);
        assert_eq!(h["version"], 1);
        assert!(
            h["hooks"]["stop"][0]["command"]
                .as_str()
                .unwrap()
                .ends_with("hook stop")
        );
    });
    assert!(!hooks.exists(), "the hooks file setup made is gone");
}

/// Where the user moved claude-peers (`CLAUDE_PEERS_HOME`), an agent that scrubs its
/// servers' environment is told so in its own configuration.
#[test]
fn setup_passes_a_moved_home_to_the_agent() {
    let user = User::new();
    user.setup(&["codex"]);
    let text = read(&user.home.join(".codex/config.toml"));
    let root = user.peers.root().display().to_string();
    assert!(
        text.contains(&format!("CLAUDE_PEERS_HOME = \"{root}\"")),
        "{text}"
    );
}

/// Just enough TOML reading for the assertions: the parsed document as JSON-like values.
mod toml_value {
    pub struct Doc(pub serde_json::Value);

    impl std::str::FromStr for Doc {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let doc: toml_edit::DocumentMut = s.parse().map_err(|e| format!("{e}"))?;
            Ok(Doc(to_json(doc.as_item())))
        }
    }

    fn to_json(item: &toml_edit::Item) -> serde_json::Value {
        use serde_json::Value;
        match item {
            toml_edit::Item::Value(v) => value(v),
            toml_edit::Item::Table(t) => {
                Value::Object(t.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
            }
            _ => Value::Null,
        }
    }

    fn value(v: &toml_edit::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            toml_edit::Value::String(s) => Value::String(s.value().clone()),
            toml_edit::Value::Array(a) => Value::Array(a.iter().map(value).collect()),
            toml_edit::Value::InlineTable(t) => {
                Value::Object(t.iter().map(|(k, v)| (k.to_string(), value(v))).collect())
            }
            other => Value::String(other.to_string()),
        }
    }
}
