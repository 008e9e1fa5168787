//! `claude-peers setup claude`: registers `serve` and the mail hooks with Claude Code for
//! people who do not use the plugin, and takes them out again with `--uninstall`.
//!
//! It edits two files: `~/.claude.json` (`mcpServers.claude-peers`, the user-scope MCP
//! server, as `claude mcp add --scope user` would) and `~/.claude/settings.json` (the
//! hooks). Every other key is kept as it was; each file changed is first copied to
//! `<file>.claude-peers.bak`; files are replaced whole (write, then rename), so an
//! interrupted run leaves either the old or the new file.

//! `claude-peers setup <agent>`: registers `serve` and the mail hooks with an agent
//! (Claude Code without the plugin, Codex, Gemini CLI, Cursor), and takes them out again
//! with `--uninstall`; `--print` shows the files as they would be, and writes nothing.
//!
//! Each agent is a few files (`claude.rs`, `codex.rs`, `gemini.rs`, `cursor.rs` say which
//! and what goes in them). Every other key in them is kept as it was, comments and order
//! too in TOML; each file changed is first copied to `<file>.claude-peers.bak`; files are
//! replaced whole (write, then rename), so an interrupted run leaves either the old or
//! the new file. Running it twice changes nothing the second time.

mod agents;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub use agents::plan;

/// The MCP server's name in every agent's configuration.
const SERVER: &str = "claude-peers";

/// What a hook entry of ours runs, to find it again.
fn is_ours(command: &str) -> bool {
    command.contains("claude-peers") && command.contains(" hook ")
}

/// The agents `setup` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SetupAgent {
    /// Claude Code: ~/.claude.json and ~/.claude/settings.json.
    Claude,
    /// Codex: ~/.codex/config.toml and ~/.codex/hooks.json ($CODEX_HOME if set).
    Codex,
    /// Gemini CLI: ~/.gemini/settings.json.
    Gemini,
    /// Cursor: ~/.cursor/mcp.json and ~/.cursor/hooks.json.
    Cursor,
}

impl SetupAgent {
    /// The agent's name, as people say it.
    pub fn name(self) -> &'static str {
        match self {
            SetupAgent::Claude => "Claude Code",
            SetupAgent::Codex => "Codex",
            SetupAgent::Gemini => "Gemini CLI",
            SetupAgent::Cursor => "Cursor",
        }
    }
}

/// `setup <agent>`: edits (or with `print`, shows) the agent's files, and says what the
/// user must still do.
pub fn run(agent: SetupAgent, uninstall: bool, print: bool) -> Result<()> {
    let exe = std::env::current_exe().context("cannot tell where this claude-peers is")?;
    let name = agent.name();
    let (edits, notes) = plan(agent, &exe)?;
    let changes = apply(&edits, uninstall, print)?;
    if changes.is_empty() {
        let state = if uninstall {
            "not set up in"
        } else {
            "already set up in"
        };
        outln!("nothing to change: claude-peers is {state} {name}");
        return Ok(());
    }
    for c in &changes {
        if print {
            let what: Vec<&str> = c.parts.iter().map(|p| p.what).collect();
            outln!(
                "{} would become ({}):\n{}",
                c.path.display(),
                what.join(", "),
                c.text.trim_end()
            );
            continue;
        }
        for part in &c.parts {
            let verb = if uninstall { "removed" } else { part.verb };
            outln!("{verb} {} in {}", part.what, c.path.display());
        }
    }
    if !uninstall && !print {
        for note in notes {
            outln!("{note}");
        }
    }
    Ok(())
}

/// One part of ours in a file: where, and how to put it in or take it out. Parts of one
/// file (Gemini CLI keeps server and hooks in one) are applied together, and the file is
/// written once.
pub struct FileEdit {
    pub path: PathBuf,
    /// What our part is, for the report ("the MCP server claude-peers", "the mail hooks").
    pub what: &'static str,
    /// What putting it in is called ("registered", "wrote").
    pub verb: &'static str,
    pub kind: EditKind,
}

/// How a file is read and changed.
pub enum EditKind {
    /// A JSON object; `add` puts our part in, `remove` takes it out (and must leave a file
    /// without our part unchanged).
    Json {
        add: Box<dyn Fn(&mut Value)>,
        remove: Box<dyn Fn(&mut Value)>,
    },
    /// A TOML document, edited in place so the user's comments and layout stay.
    Toml {
        add: Box<dyn Fn(&mut toml_edit::DocumentMut)>,
        remove: Box<dyn Fn(&mut toml_edit::DocumentMut)>,
    },
}

/// What `setup` did (or, printing, would do) to one file.
pub struct Change<'a> {
    pub path: PathBuf,
    /// The parts of ours that changed in it.
    pub parts: Vec<&'a FileEdit>,
    /// The file's new text.
    pub text: String,
}

/// A file's content while its parts are applied.
enum Doc {
    Json(Value),
    Toml(toml_edit::DocumentMut),
}

impl Doc {
    fn text(&self) -> String {
        match self {
            Doc::Json(v) => {
                let mut text = serde_json::to_string_pretty(v).expect("a JSON value");
                text.push('\n');
                text
            }
            Doc::Toml(doc) => doc.to_string(),
        }
    }
}

/// Applies `edits`: each file whose text changes is written once, with all its parts
/// (after a backup of the user's file), unless `print`. Returns the changes.
pub fn apply(edits: &[FileEdit], uninstall: bool, print: bool) -> Result<Vec<Change<'_>>> {
    let mut changes: Vec<Change> = Vec::new();
    for (i, first) in edits.iter().enumerate() {
        if edits[..i].iter().any(|e| e.path == first.path) {
            continue;
        }
        let path = &first.path;
        let old = read_text(path)?;
        let mut doc = match first.kind {
            EditKind::Json { .. } => Doc::Json(parse_json(path, old.as_deref())?),
            EditKind::Toml { .. } => {
                Doc::Toml(old.as_deref().unwrap_or("").parse().with_context(|| {
                    format!("{} is not valid TOML; fix it by hand first", path.display())
                })?)
            }
        };
        let mut parts = Vec::new();
        for edit in edits[i..].iter().filter(|e| e.path == *path) {
            let before = doc.text();
            match (&edit.kind, &mut doc) {
                (EditKind::Json { add, remove }, Doc::Json(v)) => {
                    remove(v);
                    if !uninstall {
                        add(v);
                    }
                }
                (EditKind::Toml { add, remove }, Doc::Toml(d)) => {
                    remove(d);
                    if !uninstall {
                        add(d);
                    }
                }
                _ => unreachable!("the parts of one file are in one format"),
            }
            if doc.text() != before {
                parts.push(edit);
            }
        }
        if parts.is_empty() {
            continue;
        }
        let text = doc.text();
        // A file that held nothing but ours goes, as before setup made it.
        let empty = matches!(text.trim(), "" | "{}");
        if !print {
            if uninstall && empty {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            } else {
                write_text(path, &text)?;
            }
        }
        changes.push(Change {
            path: path.clone(),
            parts,
            text,
        });
    }
    Ok(changes)
}

/// `entry` as our server in `mcpServers` (the key Claude Code, Gemini CLI and Cursor use).
fn add_server(config: &mut Value, entry: Value) {
    object_at(config, "mcpServers").insert(SERVER.into(), entry);
}

fn remove_server(config: &mut Value) {
    if let Some(s) = config.get_mut("mcpServers").and_then(Value::as_object_mut) {
        s.remove(SERVER);
        if s.is_empty() {
            config.as_object_mut().map(|c| c.remove("mcpServers"));
        }
    }
}

/// The command line of one of our hooks.
fn hook_command(exe: &Path, kind: &str) -> String {
    format!("\"{}\" hook {kind}", exe.display())
}

/// Adds `groups` (event → one group of hooks, in the nested form Claude Code, Codex and
/// Gemini CLI share, or one entry in Cursor's flat form) under `hooks`.
fn add_hooks(settings: &mut Value, groups: Vec<(&'static str, Value)>) {
    let hooks = object_at(settings, "hooks");
    for (event, group) in groups {
        let list = hooks.entry(event).or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.push(group);
        }
    }
}

/// Takes out every hook of ours, and the groups and events it leaves empty; in both the
/// nested form (`{"hooks": [{"command": ..}]}`) and Cursor's flat one (`{"command": ..}`).
fn remove_hooks(settings: &mut Value) -> bool {
    let Some(hooks) = settings.get_mut("hooks").and_then(Value::as_object_mut) else {
        return false;
    };
    let mut changed = false;
    let ours = |h: &Value| h["command"].as_str().is_some_and(is_ours);
    for groups in hooks.values_mut() {
        let Some(list) = groups.as_array_mut() else {
            continue;
        };
        let before = list.len();
        list.retain(|entry| !ours(entry));
        changed |= list.len() != before;
        for group in list.iter_mut() {
            if let Some(inner) = group.get_mut("hooks").and_then(Value::as_array_mut) {
                let before = inner.len();
                inner.retain(|h| !ours(h));
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

/// A file's text; `None` when it does not exist.
fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A JSON object file's value, or an empty object when there is no file.
fn parse_json(path: &Path, text: Option<&str>) -> Result<Value> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok(json!({}));
    };
    let v: Value = serde_json::from_str(text)
        .with_context(|| format!("{} is not valid JSON; fix it by hand first", path.display()))?;
    if !v.is_object() {
        bail!(
            "{} is not a JSON object; fix it by hand first",
            path.display()
        );
    }
    Ok(v)
}

/// Replaces `path` with `text`, keeping a copy of the old file and its mode.
fn write_text(path: &Path, text: &str) -> Result<()> {
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
        add_hooks(&mut s, agents::claude_hooks(exe));
        remove_hooks(&mut s);
        add_hooks(&mut s, agents::claude_hooks(exe));
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
