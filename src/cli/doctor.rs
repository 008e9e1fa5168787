//! `claude-peers doctor`: what a person needs to see when mail does not arrive. The
//! broker, Claude Code and how claude-peers is set up in it, and for each live session
//! the path its mail takes and why (asked of each `serve` over its session socket), and
//! the Claude Code sessions that do not run claude-peers.

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::client::ClientError;
use crate::paths::Paths;
use crate::protocol::StatusCall;

/// Claude Code's first version with the inbox `serve` writes to.
const INBOX_SINCE: (u32, u32, u32) = (2, 1, 224);

pub async fn run(paths: &Paths, json_out: bool) -> Result<()> {
    let broker = match super::connect(paths, false).await {
        Ok(c) => match c.call(StatusCall).await {
            Ok(s) => json!({"running": true, "pid": s.pid, "version": s.version,
                "socket": s.socket, "peers_online": s.peers_online, "queued": s.queued}),
            Err(e) => json!({"running": false, "error": e.to_string()}),
        },
        Err(ClientError::NotRunning { socket }) => {
            json!({"running": false, "socket": socket, "note": "started by the first session or command that needs it"})
        }
        Err(e) => json!({"running": false, "error": e.to_string()}),
    };
    let claude = claude_version();
    let setup = setup_state();
    let sessions = crate::hook::statuses(paths).await;
    let natives = crate::serve::native_sessions(sessions.iter().map(|s| s.host_pid));
    let report = json!({
        "broker": broker,
        "claude": claude,
        "setup": setup,
        "sessions": sessions,
        "claude_code_sessions_without_claude_peers": natives
            .iter()
            .map(|n| json!({"address": n.address, "pid": n.pid, "cwd": n.cwd}))
            .collect::<Vec<_>>(),
    });
    if json_out {
        return super::print_json(&report);
    }
    let b = &report["broker"];
    if b["running"] == true {
        outln!(
            "broker      running, pid {}, {} sessions online, {} unread",
            b["pid"],
            b["peers_online"],
            b["queued"]
        );
    } else if let Some(e) = b["error"].as_str() {
        outln!("broker      not reachable: {e}");
    } else {
        outln!("broker      not running (the first session or command that needs it starts it)");
    }
    match report["claude"]["version"].as_str() {
        Some(v) if report["claude"]["inbox"] == true => {
            outln!("claude      {v}: has the inbox, mail can start turns by itself")
        }
        Some(v) => outln!(
            "claude      {v}: older than 2.1.224, no inbox; mail arrives through the hooks or check_messages (update Claude Code)"
        ),
        None => outln!("claude      not found on PATH"),
    }
    outln!(
        "set up      {}",
        report["setup"]["summary"].as_str().unwrap_or("")
    );
    if sessions.is_empty() {
        outln!("sessions    none running claude-peers (start a Claude Code session)");
    }
    for s in &sessions {
        let name = if s.name.is_empty() {
            "(unregistered)"
        } else {
            &s.name
        };
        outln!(
            "session     {name}: {} ({}); {} unread; serve pid {}, host pid {}",
            s.route,
            s.why,
            s.unread,
            s.pid,
            s.host_pid
        );
    }
    for n in &natives {
        outln!(
            "claude only {} in {}: a Claude Code session without claude-peers (reachable by send_message to {})",
            n.address,
            n.cwd,
            n.address
        );
    }
    Ok(())
}

/// `claude --version`, and whether it has the inbox.
fn claude_version() -> Value {
    let out = std::process::Command::new("claude")
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
        return json!({"version": null});
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().next().unwrap_or("").to_string();
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    let inbox = parts.len() == 3 && (parts[0], parts[1], parts[2]) >= INBOX_SINCE;
    json!({"version": version, "inbox": inbox})
}

/// How claude-peers is set up in Claude Code: the plugin, `setup claude`, or by hand.
fn setup_state() -> Value {
    let read = |p: &Path| -> Value {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    let (Some(dir), Some(user_file)) = (
        crate::serve::claude_config_dir(),
        crate::serve::claude_user_file(),
    ) else {
        return json!({"summary": "cannot find Claude Code's directory (HOME is not set)"});
    };
    let settings = read(&dir.join("settings.json"));
    let user = read(&user_file);
    let plugin = settings["enabledPlugins"].as_object().is_some_and(|p| {
        p.iter()
            .any(|(k, v)| k.starts_with("claude-peers@") && v == true)
    });
    let server = user["mcpServers"].get("claude-peers").is_some();
    let hooks = settings["hooks"].to_string().contains(" hook wait");
    let summary = match (plugin, server, hooks) {
        (true, true, _) => {
            "the plugin and a user-scope server both: each session runs two; remove one (claude mcp remove --scope user claude-peers)"
        }
        (true, false, _) => "the plugin claude-peers (server and hooks)",
        (false, true, true) => {
            "the server and the hooks in your user settings (claude-peers setup claude)"
        }
        (false, true, false) => {
            "the server, without the hooks: fine with the inbox; for older Claude Code run claude-peers setup claude"
        }
        (false, false, _) => {
            "not set up in Claude Code: install the plugin or run claude-peers setup claude"
        }
    };
    json!({"plugin": plugin, "server": server, "hooks": hooks, "summary": summary})
}
