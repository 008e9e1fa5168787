//! The real Claude Code CLI running our MCP server, against a scripted stub of the
//! Messages API (`common/claude.rs`): what the model is shown, end to end. Skipped when
//! `claude` (or, for sessions, `tmux`) is not installed; `.ci/run` installs both.

mod common;

use std::time::Duration;

use common::Home;
use common::claude::{Block, ClaudeHome, Gate, Interactive, Reply, StubApi, call_mcp_tool};
use serde_json::json;

/// `claude -p`: the model loads `whoami` through ToolSearch, calls it, and the next
/// request shows it our answer, which names this session.
#[test]
fn print_mode_shows_the_model_whoami() {
    require_claude!();
    let peers = Home::new();
    let api = StubApi::start();
    let mut cc = ClaudeHome::new(&peers, &api);
    cc.server_env("CLAUDE_PEERS_NAME", "stub-alice");
    api.push_all(call_mcp_tool("whoami", json!({})));

    let out = cc.print("Who am I among the peers?");

    let shown = api.wait_for(
        |r| {
            r.is_main()
                && r.tool_results()
                    .iter()
                    .any(|t| t.contains("\"name\":\"stub-alice\""))
        },
        Duration::from_secs(5),
    );
    assert!(
        shown.is_some(),
        "the model was never shown whoami's answer\nstdout: {}\nstderr: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cc.diagnostics()
    );
    assert!(out.status.success(), "{out:?}\n{}", cc.diagnostics());
    // After the tool's result the queue is empty: the stub's default answer ends the turn.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(api.pending(), 0, "{}", cc.diagnostics());
}

/// An interactive session under tmux: a typed prompt reaches the stub, the turn shows as
/// busy while the stub holds its answer, then the answer is drawn and the prompt is idle.
#[test]
fn interactive_session_draws_the_answer() {
    require_claude!();
    require_tmux!();
    let peers = Home::new();
    let api = StubApi::start();
    let cc = ClaudeHome::new(&peers, &api);
    let gate = Gate::new();
    api.push(
        Reply::when_shown(
            "ping from the test",
            vec![Block::Text("pong from the stub".into())],
        )
        .held(&gate),
    );

    let session = Interactive::start(&cc, &[]);
    let fail = |what: &str| panic!("{what}\n{}", session.diagnostics());
    // Claude Code's own inbox, found from its pid.
    session.wait_inbox_socket(Duration::from_secs(30));
    session.submit("ping from the test");
    let busy = Duration::from_secs(30);
    if session
        .wait_until(|s| s.contains("esc to interrupt"), busy)
        .is_none()
    {
        fail("the turn never showed as running");
    }
    gate.open();
    if session
        .wait_until(|s| s.contains("pong from the stub"), busy)
        .is_none()
    {
        fail("the answer was not drawn");
    }
    session.wait_idle(busy);
    assert_eq!(api.pending(), 0, "{}", session.diagnostics());
    assert!(
        api.main_requests()
            .iter()
            .any(|r| r.last_user_text().contains("ping from the test")),
        "{}",
        session.diagnostics()
    );
}
