//! `claude-peers setup claude`: registers `serve` and the mail hooks with Claude Code for
//! people who do not use the plugin, and takes them out again with `--uninstall`.
//!
//! It edits two files: `~/.claude.json` (`mcpServers.claude-peers`, the user-scope MCP
//! server, as `claude mcp add --scope user` would) and `~/.claude/settings.json` (the
//! hooks). Every other key is kept as it was; each file changed is first copied to
//! `<file>.claude-peers.bak`; files are replaced whole (write, then rename), so an
//! interrupted run leaves either the old or the new file.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::serve::{claude_config_dir, claude_user_file};

/// The MCP server's name in Claude Code's configuration.
const SERVER: &str = "claude-peers";

/// What a hook entry of ours runs, to find it again.
fn is_ours(command: &str) -> bool {
    command.contains("claude-peers") && command.contains(" hook ")
}

/// Registers (or with `uninstall`, removes) the server and hooks. Returns what it did,
/// a line per change.
pub fn claude(uninstall: bool) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot tell where this claude-peers is")?;
    let config_dir =
        claude_config_dir().context("cannot find Claude Code's directory: HOME is not set")?;
    let user_file = claude_user_file().context("cannot find ~/.claude.json: HOME is not set")?;
    let settings_file = config_dir.join("settings.json");
    let mut done = Vec::new();

    let mut user = read_json(&user_file)?;
    let before = user.clone();
    if uninstall {
        remove_server(&mut user);
    } else {
        add_server(&mut user, &exe);
    }
    if user != before {
        write_json(&user_file, &user)?;
        done.push(format!(
            "{} the MCP server {SERVER} in {}",
            if uninstall { "removed" } else { "registered" },
            user_file.display()
        ));
    }

    let mut settings = read_json(&settings_file)?;
    let before = settings.clone();
    remove_hooks(&mut settings);
    if !uninstall {
        add_hooks(&mut settings, &exe);
    }
    if settings != before {
        write_json(&settings_file, &settings)?;
        done.push(format!(
            "{} the mail hooks in {}",
            if uninstall { "removed" } else { "wrote" },
            settings_file.display()
        ));
    }
    Ok(done)
}

fn add_server(user: &mut Value, exe: &Path) {
    let entry = json!({"type": "stdio", "command": exe.display().to_string(), "args": ["serve"]});
    object_at(user, "mcpServers").insert(SERVER.into(), entry);
}

fn remove_server(user: &mut Value) {
    if let Some(s) = user.get_mut("mcpServers").and_then(Value::as_object_mut) {
        s.remove(SERVER);
    }
}

/// Our hooks: mail as context of each prompt and at session start; a wait for mail that
/// wakes an idle session, started at session start and after each turn.
fn our_hooks(exe: &Path) -> Vec<(&'static str, Value)> {
    let cmd = |kind: &str| format!("\"{}\" hook {kind}", exe.display());
    let prompt = json!({"type": "command", "command": cmd("prompt")});
    // A day, not the default 10 minutes, after which Claude Code ends a hook silently;
    // and our wording instead of "Stop hook blocking error".
    let wait = json!({
        "type": "command",
        "command": cmd("wait"),
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

fn add_hooks(settings: &mut Value, exe: &Path) {
    let hooks = object_at(settings, "hooks");
    for (event, group) in our_hooks(exe) {
        let groups = hooks.entry(event).or_insert_with(|| json!([]));
        if let Some(list) = groups.as_array_mut() {
            list.push(group);
        }
    }
}

/// Takes out every hook of ours, and the groups and events it leaves empty.
fn remove_hooks(settings: &mut Value) -> bool {
    let Some(hooks) = settings.get_mut("hooks").and_then(Value::as_object_mut) else {
        return false;
    };
    let mut changed = false;
    for groups in hooks.values_mut() {
        let Some(list) = groups.as_array_mut() else {
            continue;
        };
        for group in list.iter_mut() {
            if let Some(inner) = group.get_mut("hooks").and_then(Value::as_array_mut) {
                let before = inner.len();
                inner.retain(|h| !h["command"].as_str().is_some_and(is_ours));
                changed |= inner.len() != before;
            }
        }
        list.retain(|g| g["hooks"].as_array().is_none_or(|h| !h.is_empty()));
    }
    hooks.retain(|_, groups| groups.as_array().is_none_or(|l| !l.is_empty()));
    if hooks.is_empty() {
        settings.as_object_mut().map(|s| s.remove("hooks"));
    }
    changed
}

/// The object under `key`, made if missing.
fn object_at<'a>(v: &'a mut Value, key: &str) -> &'a mut serde_json::Map<String, Value> {
    let obj = v
        .as_object_mut()
        .expect("checked to be an object when read");
    let slot = obj.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

/// A JSON object file, or an empty object when it does not exist.
fn read_json(path: &Path) -> Result<Value> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let v: Value = serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not valid JSON; fix it by hand first", path.display())
            })?;
            if !v.is_object() {
                bail!(
                    "{} is not a JSON object; fix it by hand first",
                    path.display()
                );
            }
            Ok(v)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Replaces `path` with `v`, keeping a copy of the old file and its mode.
fn write_json(path: &Path, v: &Value) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777);
    if path.exists() {
        let backup = path.with_file_name(format!(
            "{}.claude-peers.bak",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::copy(path, &backup)
            .with_context(|| format!("cannot back up {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("claude-peers.tmp");
    let mut text = serde_json::to_string_pretty(v).expect("a JSON value");
    text.push('\n');
    // Created private (these files hold history and account data), then given the old
    // file's mode.
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode.unwrap_or(0o600)))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_added_once_and_removed_without_touching_others() {
        let exe = Path::new("/bin/claude-peers");
        let mut s = json!({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]}, "model": "x"});
        remove_hooks(&mut s);
        add_hooks(&mut s, exe);
        remove_hooks(&mut s);
        add_hooks(&mut s, exe);
        assert_eq!(s["hooks"]["Stop"].as_array().unwrap().len(), 2);
        assert_eq!(s["hooks"]["UserPromptSubmit"].as_array().unwrap().len(), 1);
        assert_eq!(s["hooks"]["Stop"][1]["hooks"][0]["asyncRewake"], true);
        assert!(remove_hooks(&mut s));
        assert_eq!(
            s,
            json!({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]}, "model": "x"})
        );
        assert!(!remove_hooks(&mut s));
    }
}
