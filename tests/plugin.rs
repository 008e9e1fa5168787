//! The Claude Code plugin (`plugin/`) and this repository as its marketplace
//! (`.claude-plugin/marketplace.json`): installed with the real `claude plugin` commands
//! into a throwaway `HOME`, its MCP server answers the model and its hooks are
//! registered; `plugin/bin/claude-peers-run` finds the binary, or says how to install it.
//! The Claude Code test is skipped when `claude` is not installed; `.ci/run` installs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::BIN;
use common::claude::{ClaudeHome, Reply, homes};
use serde_json::{Value, json};

/// The repository: the marketplace's root.
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The marketplace's name (`.claude-plugin/marketplace.json`).
const MARKETPLACE: &str = "claude-peers";
/// The plugin's name (`plugin/.claude-plugin/plugin.json`).
const PLUGIN: &str = "claude-peers";
/// The MCP server's name in `plugin/.mcp.json`.
const SERVER: &str = "peers";
/// What `claude-peers-run` tells a user who has no binary.
const INSTALL: &str =
    "cargo install --locked --git https://github.com/claude-peers/claude-peers claude-peers";

/// Claude Code's prefix for the plugin server's tools, also the permission rule that
/// allows them all: `mcp__plugin_claude-peers_peers`.
fn prefix() -> String {
    format!("mcp__plugin_{PLUGIN}_{SERVER}")
}

/// The full name Claude Code gives the plugin server's tool `tool`.
fn plugin_tool(tool: &str) -> String {
    format!("{}__{tool}", prefix())
}

/// `common::claude::call_mcp_tool` for the plugin's server: `ToolSearch` loads the
/// deferred tool, then the model calls it.
fn call_plugin_tool(tool: &str, input: Value) -> [Reply; 2] {
    let name = plugin_tool(tool);
    let (a, b) = (name.clone(), name.clone());
    [
        Reply::tool("ToolSearch", json!({ "query": format!("select:{name}") }))
            .only_if(move |r| !r.has_tool(&a)),
        Reply::tool(name, input).only_if(move |r| r.has_tool(&b)),
    ]
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn plugin_dir() -> PathBuf {
    Path::new(REPO).join("plugin")
}

fn runner() -> PathBuf {
    plugin_dir().join("bin/claude-peers-run")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The manifests agree with each other and with the crate: the names the other tests
/// and the README use, the crate's version, the server started through the runner, and
/// the hooks on the events they are meant for.
#[test]
fn manifests_name_the_plugin_its_server_and_hooks() {
    let market = read_json(&Path::new(REPO).join(".claude-plugin/marketplace.json"));
    assert_eq!(market["name"], MARKETPLACE);
    assert!(market["owner"]["name"].is_string(), "{market:#}");
    let plugins = market["plugins"].as_array().expect("plugins is a list");
    assert_eq!(plugins.len(), 1, "{market:#}");
    assert_eq!(plugins[0]["name"], PLUGIN);
    assert_eq!(plugins[0]["source"], "./plugin");

    let manifest = read_json(&plugin_dir().join(".claude-plugin/plugin.json"));
    assert_eq!(manifest["name"], PLUGIN);
    assert_eq!(manifest["version"], env!("CARGO_PKG_VERSION"));

    let mcp = read_json(&plugin_dir().join(".mcp.json"));
    let servers = mcp["mcpServers"].as_object().expect("mcpServers");
    assert_eq!(servers.len(), 1, "{mcp:#}");
    assert_eq!(
        mcp["mcpServers"][SERVER],
        json!({ "command": "${CLAUDE_PLUGIN_ROOT}/bin/claude-peers-run", "args": ["serve"] })
    );

    let hooks = read_json(&plugin_dir().join("hooks/hooks.json"));
    let mut seen = Vec::new();
    for (event, groups) in hooks["hooks"].as_object().expect("hooks") {
        for group in groups.as_array().expect("a list of matcher groups") {
            for h in group["hooks"].as_array().expect("hooks of a group") {
                assert_eq!(h["type"], "command", "{h}");
                let command = h["command"].as_str().expect("command");
                let args = command
                    .strip_prefix("\"${CLAUDE_PLUGIN_ROOT}/bin/claude-peers-run\" ")
                    .unwrap_or_else(|| panic!("{event} runs {command:?}, not the runner"));
                let rewake = h["asyncRewake"] == true;
                assert_eq!(h["async"] == true, rewake, "async iff asyncRewake: {h}");
                seen.push(format!("{event}: {args}{}", if rewake { " &" } else { "" }));
            }
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "SessionStart: hook prompt",
            "SessionStart: hook wait &",
            "Stop: hook wait &",
            "UserPromptSubmit: hook prompt",
        ]
    );
}

/// `claude-peers-run` with `args`, nothing inherited: `PATH` empty unless given, `HOME`
/// an empty directory, in that directory.
fn run_runner(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(runner())
        .env_clear()
        .env("PATH", "")
        .env("HOME", home)
        .envs(env.iter().copied())
        .current_dir(home)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("plugin/bin/claude-peers-run runs")
}

/// Without a binary the runner prints one line saying how to install it and fails, except
/// for hooks, which must never block a prompt; with one (`CLAUDE_PEERS_BIN`, `PATH`,
/// `~/.cargo/bin`, in that order) it runs it with its arguments.
#[test]
fn runner_finds_the_binary_or_says_how_to_install_it() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    let out = run_runner(home, &[], &["serve"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(INSTALL), "{err:?}");

    for hook in ["prompt", "wait"] {
        let out = run_runner(home, &[], &["hook", hook]);
        assert_eq!(out.status.code(), Some(0), "hook {hook}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert_eq!(text(&out.stderr), err, "hook {hook}");
    }

    let out = run_runner(
        home,
        &[("CLAUDE_PEERS_BIN", "/nonexistent/claude-peers")],
        &["--version"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains("CLAUDE_PEERS_BIN") && err.contains(INSTALL),
        "{err:?}"
    );

    let version = format!(
        "claude-peers {} (broker protocol {})\n",
        env!("CARGO_PKG_VERSION"),
        claude_peers::protocol::PROTOCOL_VERSION
    );
    let found = |env: &[(&str, &str)], how: &str| {
        let out = run_runner(home, env, &["--version"]);
        assert!(out.status.success(), "{how}: {out:?}");
        assert_eq!(text(&out.stdout), version, "{how}");
    };
    found(&[("CLAUDE_PEERS_BIN", BIN)], "CLAUDE_PEERS_BIN");
    let bin_dir = Path::new(BIN).parent().unwrap().to_str().unwrap();
    found(&[("PATH", bin_dir)], "PATH");
    std::fs::create_dir_all(home.join(".cargo/bin")).unwrap();
    std::os::unix::fs::symlink(BIN, home.join(".cargo/bin/claude-peers")).unwrap();
    found(&[], "~/.cargo/bin");
}

/// A binary older than the plugin's hooks fails `hook` with a usage error (exit 2), which
/// would block the prompt: the runner says to update it and lets the prompt through. Other
/// commands run as they are, their exit status passed on.
#[test]
fn runner_lets_prompts_through_a_binary_without_hooks() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let old = home.join("old-claude-peers");
    std::fs::write(
        &old,
        "#!/bin/sh\necho \"error: unrecognized subcommand '$1'\" >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = [("CLAUDE_PEERS_BIN", old.to_str().unwrap())];

    for hook in ["prompt", "wait"] {
        let out = run_runner(home, &env, &["hook", hook]);
        assert_eq!(out.status.code(), Some(0), "hook {hook}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(
            err.contains("no `hook` command") && err.contains(INSTALL),
            "{err:?}"
        );
    }
    let out = run_runner(home, &env, &["serve"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        text(&out.stderr),
        "error: unrecognized subcommand 'serve'\n"
    );
}

/// `claude` with `cc`'s environment; panics unless it succeeds.
fn claude(cc: &ClaudeHome, args: &[&str]) -> String {
    let out = cc
        .command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "claude {args:?} failed: {out:?}\nstdout: {}\nstderr: {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        cc.debug_tail(40)
    );
    text(&out.stdout)
}

/// The repository added as a marketplace and the plugin installed from it with the real
/// `claude plugin` commands, into a Claude Code home with no claude-peers server of its
/// own: `claude -p` runs the plugin's server (through the runner, which
/// `CLAUDE_PEERS_BIN` points at this build), the model calls its `whoami` and is shown the
/// answer, and the session registered in the peers home the environment names. The
/// plugin's hooks run on their events; what they do is not this test's business.
#[test]
fn installed_plugin_serves_the_model() {
    require!("claude");
    let (peers, api, mut cc) = homes();
    cc.config(|c| {
        c.as_object_mut().unwrap().remove("mcpServers");
    });
    std::fs::write(
        cc.home.join(".claude/settings.json"),
        json!({ "permissions": { "allow": [prefix()] } }).to_string(),
    )
    .unwrap();
    // Reaches `serve` through Claude Code's environment: nothing in `.mcp.json` passes it.
    cc.env("CLAUDE_PEERS_BIN", BIN);
    cc.env("CLAUDE_PEERS_HOME", peers.root().to_str().unwrap());
    cc.env("CLAUDE_PEERS_NAME", "plugin-alice");
    cc.env("CLAUDE_PEERS_IDLE_TIMEOUT", "20s");

    claude(&cc, &["plugin", "marketplace", "add", REPO]);
    let id = format!("{PLUGIN}@{MARKETPLACE}");
    claude(&cc, &["plugin", "install", &id]);
    let list: Value = serde_json::from_str(&claude(&cc, &["plugin", "list", "--json"]))
        .expect("plugin list --json is JSON");
    let installed = list
        .as_array()
        .and_then(|l| l.iter().find(|p| p["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not installed: {list:#}"));
    assert_eq!(installed["enabled"], true, "{installed:#}");
    assert!(installed["mcpServers"][SERVER].is_object(), "{installed:#}");

    api.push_all(call_plugin_tool("whoami", json!({})));
    cc.print_shows_whoami(&api, "Who am I among the peers?", "plugin-alice");

    let listed = peers.run(&["peers", "--all"]);
    assert!(
        text(&listed.stdout).contains("plugin-alice"),
        "the session is not in CLAUDE_PEERS_HOME's broker: {listed:?}"
    );

    // Each hook ran, through the runner, on its event (Claude Code logs each one it starts,
    // whatever it then does).
    let log = std::fs::read_to_string(cc.debug_file()).unwrap_or_default();
    for (event, args) in [
        ("SessionStart:startup", "hook prompt"),
        ("SessionStart:startup", "hook wait"),
        ("UserPromptSubmit", "hook prompt"),
        ("Stop", "hook wait"),
    ] {
        let (started, runs) = (
            format!("Hooks: {event} ["),
            format!("/bin/claude-peers-run\" {args}] (plugin {id})"),
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&started) && l.contains(&runs)),
            "the plugin's hook {event} → {args} did not run\n{}",
            cc.debug_tail(80)
        );
    }
}
