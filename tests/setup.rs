//! `claude-peers setup <agent>` for the agents other than Claude Code (whose own test runs
//! the real Claude Code, in tests/claude_code): the files written, kept and given back.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

/// `claude-peers setup <args>` for a user whose home is `user_home`.
fn setup(home: &Home, user_home: &Path, args: &[&str]) -> String {
    let out = home
        .cmd()
        .env("HOME", user_home)
        .env_remove("CODEX_HOME")
        .arg("setup")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "setup {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json_of(p: &Path) -> Value {
    serde_json::from_str(&read(p)).unwrap()
}

/// The files of one agent as a user had them before setup; `None` where there was none.
struct Before(Vec<(std::path::PathBuf, Option<String>)>);

impl Before {
    fn take(paths: &[std::path::PathBuf]) -> Self {
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

/// Runs the whole cycle for `agent`: `--print` writes nothing, setup writes, a second run
/// changes nothing, `--uninstall` gives back the files as they were.
fn cycle(agent: &str, home: &Home, user_home: &Path, files: &[std::path::PathBuf]) -> String {
    let before = Before::take(files);
    let printed = setup(home, user_home, &[agent, "--print"]);
    assert!(printed.contains("would become"), "{printed}");
    before.assert_restored();
    let said = setup(home, user_home, &[agent]);
    assert!(
        said.contains("registered the MCP server claude-peers"),
        "{said}"
    );
    assert!(said.contains("wrote the mail hooks"), "{said}");
    assert!(
        setup(home, user_home, &[agent]).contains("nothing to change"),
        "a second run changes nothing"
    );
    said
}

#[test]
fn setup_codex_keeps_the_users_config_and_gives_it_back() {
    let home = Home::new();
    let user = home.dir.path().join("user");
    let codex = user.join(".codex");
    std::fs::create_dir_all(&codex).unwrap();
    let config = codex.join("config.toml");
    let hooks = codex.join("hooks.json");
    std::fs::write(
        &config,
        "# my settings\nmodel = \"o3\"\n\n[mcp_servers.other]\ncommand = \"other-server\" # keep me\n",
    )
    .unwrap();
    let files = [config.clone(), hooks.clone()];
    let before = Before::take(&files);
    let said = cycle("codex", &home, &user, &files);
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

    setup(&home, &user, &["codex", "--uninstall"]);
    before.assert_restored();
}

#[test]
fn setup_gemini_trusts_the_server_and_hooks_both_turn_ends() {
    let home = Home::new();
    let user = home.dir.path().join("user");
    let gemini = user.join(".gemini");
    std::fs::create_dir_all(&gemini).unwrap();
    let settings = gemini.join("settings.json");
    let theirs = json!({
        "theme": "Dark",
        "mcpServers": {"other": {"command": "other-server"}},
        "hooks": {"AfterAgent": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]}
    });
    std::fs::write(
        &settings,
        serde_json::to_string_pretty(&theirs).unwrap() + "\n",
    )
    .unwrap();
    let files = [settings.clone()];
    let before = Before::take(&files);
    let said = cycle("gemini", &home, &user, &files);
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

    setup(&home, &user, &["gemini", "--uninstall"]);
    before.assert_restored();
}

#[test]
fn setup_cursor_adds_a_stop_hook_and_leaves_no_file_it_made() {
    let home = Home::new();
    let user = home.dir.path().join("user");
    let cursor = user.join(".cursor");
    std::fs::create_dir_all(&cursor).unwrap();
    let mcp = cursor.join("mcp.json");
    let hooks = cursor.join("hooks.json");
    let theirs = json!({"mcpServers": {"other": {"url": "http://localhost:9/mcp"}}});
    std::fs::write(&mcp, serde_json::to_string_pretty(&theirs).unwrap() + "\n").unwrap();
    let files = [mcp.clone(), hooks.clone()];
    let before = Before::take(&files);
    cycle("cursor", &home, &user, &files);

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

    setup(&home, &user, &["cursor", "--uninstall"]);
    before.assert_restored();
    assert!(!hooks.exists(), "the hooks file setup made is gone");
}

/// Where the user moved claude-peers (`CLAUDE_PEERS_HOME`), an agent that scrubs its
/// servers' environment is told so in its own configuration.
#[test]
fn setup_passes_a_moved_home_to_the_agent() {
    let home = Home::new();
    let user = home.dir.path().join("user");
    std::fs::create_dir_all(&user).unwrap();
    setup(&home, &user, &["codex"]);
    let text = read(&user.join(".codex/config.toml"));
    let root = home.root().display().to_string();
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
