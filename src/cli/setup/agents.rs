//! Which files each agent reads, and what `setup` puts in them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::remove_server;
use super::{EditKind, FileEdit, SERVER, add_hooks, add_server, hook_command, remove_hooks};
use crate::cli::SetupAgent;
use crate::serve::{claude_config_dir, claude_user_file};

/// The files to edit for `agent`, and what the user must still do by hand.
pub fn plan(agent: SetupAgent, exe: &Path) -> Result<(Vec<FileEdit>, Vec<&'static str>)> {
    let home = || -> Result<PathBuf> {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .context("cannot find your home directory: HOME is not set")
    };
    Ok(match agent {
        SetupAgent::Claude => claude(exe)?,
        SetupAgent::Codex => codex(exe, &codex_home(home()?)),
        SetupAgent::Gemini => gemini(exe, &home()?.join(".gemini")),
        SetupAgent::Cursor => cursor(exe, &home()?.join(".cursor")),
    })
}

/// Claude Code's hooks: mail as context of each prompt and at session start; a wait for
/// mail that wakes an idle session, started at session start and after each turn.
pub fn claude_hooks(exe: &Path) -> Vec<(&'static str, Value)> {
    let prompt = json!({"type": "command", "command": hook_command(exe, "prompt")});
    // A day, not the default 10 minutes, after which Claude Code ends a hook silently;
    // and our wording instead of "Stop hook blocking error".
    let wait = json!({
        "type": "command",
        "command": hook_command(exe, "wait"),
        "async": true,
        "asyncRewake": true,
        "timeout": 86400,
        "rewakeSummary": "Peer message",
        "rewakeMessage": "Mail from another session (claude-peers):"
    });
    vec![
        ("UserPromptSubmit", json!({"hooks": [prompt.clone()]})),
        ("SessionStart", json!({"hooks": [prompt, wait.clone()]})),
        ("Stop", json!({"hooks": [wait]})),
    ]
}

/// Claude Code: the user-scope server in `~/.claude.json` (as `claude mcp add --scope
/// user` writes it) and the hooks in `~/.claude/settings.json`.
fn claude(exe: &Path) -> Result<(Vec<FileEdit>, Vec<&'static str>)> {
    let config_dir =
        claude_config_dir().context("cannot find Claude Code's directory: HOME is not set")?;
    let user_file = claude_user_file().context("cannot find ~/.claude.json: HOME is not set")?;
    let entry = json!({"type": "stdio", "command": exe.display().to_string(), "args": ["serve"]});
    let hooks = claude_hooks(exe);
    Ok((
        vec![
            server_in_json(user_file, entry),
            FileEdit {
                path: config_dir.join("settings.json"),
                what: "the mail hooks",
                verb: "wrote",
                kind: EditKind::Json {
                    add: Box::new(move |v| add_hooks(v, hooks.clone())),
                    remove: Box::new(|v| {
                        remove_hooks(v);
                    }),
                },
            },
        ],
        vec![
            "new Claude Code sessions run claude-peers; allow its tools once, or add the permission rule mcp__claude-peers",
        ],
    ))
}

/// `$CODEX_HOME`, else `~/.codex`.
fn codex_home(home: PathBuf) -> PathBuf {
    std::env::var_os("CODEX_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".codex"))
}

/// Codex: `[mcp_servers.claude-peers]` in `config.toml`, and hooks in `hooks.json` (the
/// same form as Claude Code's). Codex shows the model no MCP notifications, so mail comes
/// with each prompt and, when it arrives during a turn, as the reason the turn goes on.
fn codex(exe: &Path, dir: &Path) -> (Vec<FileEdit>, Vec<&'static str>) {
    let exe_text = exe.display().to_string();
    let env = passed_env();
    let server = FileEdit {
        path: dir.join("config.toml"),
        what: "the MCP server claude-peers",
        verb: "registered",
        kind: EditKind::Toml {
            add: Box::new(move |doc| {
                let mut t = toml_edit::Table::new();
                t["command"] = toml_edit::value(exe_text.as_str());
                let mut args = toml_edit::Array::new();
                args.push("serve");
                t["args"] = toml_edit::value(args);
                if !env.is_empty() {
                    let mut e = toml_edit::InlineTable::new();
                    for (k, v) in &env {
                        e.insert(k, v.as_str().unwrap_or_default().into());
                    }
                    t["env"] = toml_edit::value(e);
                }
                let servers = doc.entry("mcp_servers").or_insert_with(|| {
                    let mut t = toml_edit::Table::new();
                    t.set_implicit(true);
                    toml_edit::Item::Table(t)
                });
                if let Some(servers) = servers.as_table_like_mut() {
                    servers.insert(SERVER, toml_edit::Item::Table(t));
                }
            }),
            remove: Box::new(|doc| {
                if let Some(servers) = doc
                    .get_mut("mcp_servers")
                    .and_then(|s| s.as_table_like_mut())
                {
                    servers.remove(SERVER);
                    if servers.is_empty() {
                        doc.remove("mcp_servers");
                    }
                }
            }),
        },
    };
    let prompt = json!({"type": "command", "command": hook_command(exe, "prompt")});
    let stop = json!({"type": "command", "command": hook_command(exe, "stop")});
    let hooks = vec![
        ("UserPromptSubmit", json!({"hooks": [prompt.clone()]})),
        ("SessionStart", json!({"hooks": [prompt]})),
        ("Stop", json!({"hooks": [stop]})),
    ];
    (
        vec![server, hooks_in_json(dir.join("hooks.json"), hooks)],
        vec![
            "Codex asks you to review new hooks once: start codex and approve them (\"Hooks need review\"); until then it skips them.",
        ],
    )
}

/// Gemini CLI: the server (trusted, so its tools run without a prompt) and the hooks in
/// `~/.gemini/settings.json`: mail before each turn (BeforeAgent) and, when it arrives
/// during one, as the reason it goes on (AfterAgent).
fn gemini(exe: &Path, dir: &Path) -> (Vec<FileEdit>, Vec<&'static str>) {
    let mut entry = json!({"command": exe.display().to_string(), "args": ["serve"], "trust": true});
    let env = passed_env();
    if !env.is_empty() {
        entry["env"] = json!(env.into_iter().collect::<serde_json::Map<_, _>>());
    }
    let prompt = json!({"type": "command", "command": hook_command(exe, "prompt")});
    let stop = json!({"type": "command", "command": hook_command(exe, "stop")});
    let hooks = vec![
        ("BeforeAgent", json!({"hooks": [prompt]})),
        ("AfterAgent", json!({"hooks": [stop]})),
    ];
    let path = dir.join("settings.json");
    (
        vec![
            server_in_json(path.clone(), entry),
            hooks_in_json(path, hooks),
        ],
        vec![
            "Gemini CLI runs MCP servers only in trusted folders: trust each project folder when it asks (or list it in ~/.gemini/trustedFolders.json).",
        ],
    )
}

/// Cursor: the server in `~/.cursor/mcp.json`, and a `stop` hook in `~/.cursor/hooks.json`
/// whose mail Cursor submits as the next message.
fn cursor(exe: &Path, dir: &Path) -> (Vec<FileEdit>, Vec<&'static str>) {
    let mut entry = json!({"command": exe.display().to_string(), "args": ["serve"]});
    let env = passed_env();
    if !env.is_empty() {
        entry["env"] = json!(env.into_iter().collect::<serde_json::Map<_, _>>());
    }
    let stop = json!({"command": hook_command(exe, "stop")});
    // Cursor's hooks file carries a format version beside the hooks.
    let hooks = FileEdit {
        path: dir.join("hooks.json"),
        what: "the mail hooks",
        verb: "wrote",
        kind: EditKind::Json {
            add: Box::new(move |v| {
                let file = v.as_object_mut().expect("an object");
                file.entry("version").or_insert(json!(1));
                add_hooks(v, vec![("stop", stop.clone())]);
            }),
            remove: Box::new(|v| {
                if remove_hooks(v) && v.get("hooks").is_none() {
                    let file = v.as_object_mut().expect("an object");
                    if file.len() == 1 && file.contains_key("version") {
                        file.clear();
                    }
                }
            }),
        },
    };
    (
        vec![server_in_json(dir.join("mcp.json"), entry), hooks],
        Vec::new(),
    )
}

fn server_in_json(path: PathBuf, entry: Value) -> FileEdit {
    FileEdit {
        path,
        what: "the MCP server claude-peers",
        verb: "registered",
        kind: EditKind::Json {
            add: Box::new(move |v| add_server(v, entry.clone())),
            remove: Box::new(remove_server),
        },
    }
}

fn hooks_in_json(path: PathBuf, hooks: Vec<(&'static str, Value)>) -> FileEdit {
    FileEdit {
        path,
        what: "the mail hooks",
        verb: "wrote",
        kind: EditKind::Json {
            add: Box::new(move |v| add_hooks(v, hooks.clone())),
            remove: Box::new(|v| {
                remove_hooks(v);
            }),
        },
    }
}

/// The claude-peers variables set where `setup` runs that move its files: an agent that
/// scrubs its servers' environment must be given them, or its sessions would reach
/// another broker.
fn passed_env() -> Vec<(String, Value)> {
    ["CLAUDE_PEERS_HOME", "CLAUDE_PEERS_DB"]
        .into_iter()
        .filter_map(|k| {
            let v = std::env::var(k).ok().filter(|v| !v.is_empty())?;
            Some((k.to_string(), Value::String(v)))
        })
        .collect()
}
