//! How mail reaches the model: the user's `--push`, and the route chosen at
//! `initialize` from what the host is (its inbox, its command line, its settings).

use std::sync::Arc;

use super::inbox::Inbox;
use super::*;

/// How deliveries may reach the model, as the user set it (`--push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushMode {
    /// The native inbox when the session has one; else channel events when the client
    /// declared `claude/channel` or the host's command line enabled this server's
    /// channel; else polling.
    Auto,
    /// The native inbox, else polling.
    Inbox,
    /// Channel events (`always` is the older spelling), where the client declared
    /// `claude/channel` or the host's command line enables this server's channel; else
    /// polling (another agent never shows them). They cannot be confirmed, so the sender
    /// is told `pushed`, never `delivered`.
    #[value(alias = "always")]
    Channel,
    /// Mail waits for `check_messages`.
    #[value(alias = "poll")]
    Never,
}

/// The path this session's mail takes to the model, chosen at `initialize`.
#[derive(Debug, Clone)]
pub enum Route {
    /// Written into Claude Code's inbox: starts a turn in an idle session, joins a busy
    /// one; `delivered` once the session took it (or `held` while its user decides).
    Inbox(Arc<Inbox>),
    /// `notifications/claude/channel` events: shown only where the host enabled this
    /// server's channel, which a server cannot tell, so acked as `pushed`.
    Channel,
    /// Kept for `check_messages`; every tool result says when mail waits.
    Poll,
}

impl Route {
    /// The route for `mode`, given the host's inbox, whether the client declared the
    /// channel capability, and the host's command line.
    ///
    /// A Claude Code session that bypasses permissions holds inbox mail from senders that
    /// do not, for its user to approve; but `serve` is its own child, whose messages it
    /// takes unasked. So unless the user opted in (`bypass_inbox`), such a session gets no
    /// inbox route: claude-peers must not become a way around that hold. The same goes
    /// for a session whose settings hold or refuse other sessions' messages.
    pub fn choose(
        mode: PushMode,
        inbox: Option<Inbox>,
        declared_channel: bool,
        host_argv: &[String],
        bypass_inbox: bool,
    ) -> (Route, String, bool) {
        let had_inbox = inbox.is_some();
        let withheld = if bypass_inbox {
            None
        } else if bypasses_permissions(host_argv) {
            Some(
                "the session bypasses permissions and holds other sessions' mail, which its own server would get around (--bypass-inbox to use its inbox anyway)",
            )
        } else if inbound_restricted() {
            Some(
                "Claude Code's settings hold or refuse mail from other sessions (crossSessionInbound)",
            )
        } else {
            None
        };
        match (mode, inbox) {
            (PushMode::Auto | PushMode::Inbox, Some(inbox)) if withheld.is_some() => {
                let why = format!(
                    "Claude Code's inbox {}, written by a relay that is not the session's child, so that Claude Code holds each message for its user as it does other sessions' ({})",
                    inbox.socket().display(),
                    withheld.unwrap_or_default()
                );
                (Route::Inbox(Arc::new(inbox)), why, true)
            }
            (PushMode::Auto | PushMode::Inbox, Some(inbox)) => {
                let why = format!("Claude Code's inbox {}", inbox.socket().display());
                (Route::Inbox(Arc::new(inbox)), why, false)
            }
            (_, _) if withheld.is_some() => (
                Route::Poll,
                format!(
                    "{}; mail waits for the next prompt",
                    withheld.unwrap_or_default()
                ),
                true,
            ),
            (PushMode::Auto, None) if declared_channel => (
                Route::Channel,
                "no inbox; the client declared claude/channel".into(),
                false,
            ),
            (PushMode::Auto, None) if channel_requested(host_argv) => (
                Route::Channel,
                "no inbox; the host's command line enables this server's channel".into(),
                false,
            ),
            (PushMode::Channel, _) if declared_channel || channel_requested(host_argv) => {
                (Route::Channel, "--push channel".into(), false)
            }
            // Events the client cannot show would be lost: the agent's model never sees
            // them, and nothing says so.
            (PushMode::Channel, _) => (
                Route::Poll,
                "--push channel, but the client did not declare claude/channel and its command line enables no channel, so events would be lost; mail waits for check_messages".into(),
                false,
            ),
            (PushMode::Never, _) => (Route::Poll, "--push never".into(), false),
            _ => (
                Route::Poll,
                if had_inbox {
                    "no inbox".into()
                } else {
                    "the host has no Claude Code inbox (another agent, Claude Code before 2.1.224, or a health check)".into()
                },
                false,
            ),
        }
    }

    /// How `whoami` names it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Inbox(_) => "inbox",
            Route::Channel => "channel",
            Route::Poll => "poll",
        }
    }
}

/// Whether a Claude Code command line, or its settings, make the session bypass
/// permission prompts.
pub fn bypasses_permissions(argv: &[String]) -> bool {
    let on_command_line = argv.iter().enumerate().any(|(i, a)| {
        a == "--dangerously-skip-permissions"
            || a == "--permission-mode=bypassPermissions"
            || (a == "--permission-mode"
                && argv.get(i + 1).map(String::as_str) == Some("bypassPermissions"))
    });
    on_command_line
        || claude_settings()
            .iter()
            .any(|v| setting(v, &["permissions", "defaultMode"]) == Some("bypassPermissions"))
}

/// Whether Claude Code's settings hold or refuse messages from other sessions
/// (`crossSessionInbound`). It takes its own children's messages even then, so writing
/// into its inbox would get around the user's choice.
pub fn inbound_restricted() -> bool {
    claude_settings().iter().any(|v| {
        matches!(
            setting(v, &["crossSessionInbound"]),
            Some(m) if m != "accept"
        )
    })
}

fn setting<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Claude Code's settings files that exist: managed, the user's, and the project's
/// (shared and local) for our working directory.
fn claude_settings() -> Vec<serde_json::Value> {
    let mut files = vec![std::path::PathBuf::from(
        "/etc/claude-code/managed-settings.json",
    )];
    if let Some(dir) = inbox::config_dir() {
        files.push(dir.join("settings.json"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        files.push(cwd.join(".claude/settings.json"));
        files.push(cwd.join(".claude/settings.local.json"));
    }
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|t| serde_json::from_slice(&t).ok())
        .collect()
}

/// Whether a host command line (Claude Code's) enabled a channel named like this server:
/// `--channels` or `--dangerously-load-development-channels` followed by entries such as
/// `server:claude-peers` or `plugin:claude-peers@marketplace`.
pub fn channel_requested(argv: &[String]) -> bool {
    const FLAGS: [&str; 2] = ["--channels", "--dangerously-load-development-channels"];
    let mut in_list = false;
    for arg in argv {
        if let Some((flag, value)) = arg.split_once('=')
            && FLAGS.contains(&flag)
        {
            in_list = false;
            if value.contains("claude-peers") {
                return true;
            }
            continue;
        }
        if FLAGS.contains(&arg.as_str()) {
            in_list = true;
            continue;
        }
        if arg.starts_with('-') {
            in_list = false;
            continue;
        }
        if in_list && arg.contains("claude-peers") {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn bypass_mode_is_read_from_the_command_line() {
        assert!(super::bypasses_permissions(&argv(
            "claude --dangerously-skip-permissions"
        )));
        assert!(super::bypasses_permissions(&argv(
            "claude --permission-mode bypassPermissions"
        )));
        assert!(super::bypasses_permissions(&argv(
            "claude --permission-mode=bypassPermissions"
        )));
        assert!(!super::bypasses_permissions(&argv(
            "claude --permission-mode acceptEdits"
        )));
    }

    #[test]
    fn a_channel_is_requested_only_by_name() {
        assert!(channel_requested(&argv(
            "claude --dangerously-load-development-channels server:claude-peers"
        )));
        assert!(channel_requested(&argv(
            "claude --channels plugin:x@m plugin:claude-peers@claude-peers --verbose"
        )));
        assert!(channel_requested(&argv(
            "claude --channels=server:claude-peers"
        )));
        assert!(!channel_requested(&argv("claude --channels server:other")));
        assert!(!channel_requested(&argv(
            "claude --channels server:other -p claude-peers"
        )));
        assert!(!channel_requested(&argv("claude -p hello")));
    }
}
