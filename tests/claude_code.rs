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

    cc.print_shows_whoami(&api, "Who am I among the peers?", "stub-alice");
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

/// The model's first answer once it is shown `text`: `ToolSearch` loading `tool`, held
/// until `gate` opens (so the turn is busy, and the test can script what comes next).
fn search_when_shown(text: &str, tool: &str, gate: &Gate) -> Reply {
    Reply::when_shown(
        text,
        vec![Block::ToolUse {
            name: "ToolSearch".into(),
            input: json!({ "query": format!("select:{tool}") }),
        }],
    )
    .held(gate)
}

/// A peers home, a stub API and a Claude Code home whose server is named `bob`.
fn bob() -> (Home, StubApi, ClaudeHome) {
    let peers = Home::new();
    let api = StubApi::start();
    let mut cc = ClaudeHome::new(&peers, &api);
    cc.server_env("CLAUDE_PEERS_NAME", "bob");
    (peers, api, cc)
}

/// The first main-loop request that shows the model `text`, within 30 s.
fn shown_to_model(api: &StubApi, text: &str, session: &Interactive) -> common::claude::Request {
    api.wait_for_request(
        |r| r.is_main() && r.messages_text().contains(text),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| {
        panic!(
            "the model was never shown {text:?}\n{}",
            session.diagnostics()
        )
    })
}

/// Allows `rules` in the session's permission settings, beside our MCP server, as a user
/// who answered "don't ask again" would.
fn allow(cc: &ClaudeHome, rules: &[&str]) {
    let mut allow = vec![json!(common::claude::mcp_tool("").trim_end_matches("__"))];
    allow.extend(rules.iter().map(|r| json!(r)));
    std::fs::write(
        cc.home.join(".claude/settings.json"),
        json!({ "permissions": { "allow": allow } }).to_string(),
    )
    .unwrap();
}

/// `claude-peers doctor --json` as the user of `cc` runs it.
fn doctor(peers: &Home, cc: &ClaudeHome) -> serde_json::Value {
    let out = peers
        .cmd()
        .args(["doctor", "--json"])
        .env("HOME", &cc.home)
        .env_remove("CLAUDE_CONFIG_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until the broker lists `name` online (the session registered).
fn wait_online(peers: &Home, name: &str, session: &Interactive) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = peers.run(&["peers", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let online = v
            .as_array()
            .or_else(|| v["peers"].as_array())
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["online"] == true));
        if online {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never came online: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            session.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `from="uds:…"` address of the wrapper around `text` in a request the model saw.
fn from_address(text: &str, marker: &str) -> String {
    let at = text.find(marker).expect("the message is in the request");
    let before = &text[..at];
    let start = before.rfind("from=\"uds:").expect("a from address") + "from=\"".len();
    let end = start + before[start..].find('"').unwrap();
    before[start..end].to_string()
}

/// Mail to an idle interactive session starts a turn by itself: nothing is typed, and the
/// model's request holds the text, wrapped with the sender's name and the message id.
/// The sender is told `delivered`.
#[test]
fn mail_to_an_idle_session_starts_a_turn() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    // The send waits for the session's ack long enough for a loaded machine.
    let _broker = peers.broker(&["--ack-wait", "10s"]);
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    session.wait_idle(Duration::from_secs(30));

    let out = peers.run_ok(&[
        "send",
        "bob",
        "idle hello from alice",
        "--from",
        "alice",
        "--json",
    ]);
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = sent["message_id"].as_str().unwrap().to_string();
    let shown = shown_to_model(&api, "idle hello from alice", &session);
    let text = shown.messages_text();
    assert!(
        text.contains("Another Claude session sent a message"),
        "{text}"
    );
    assert!(text.contains("from-name=\"alice\""), "{text}");
    assert!(text.contains(&format!("message-id=\"{id}\"")), "{text}");
    assert_eq!(sent["recipients"][0]["state"], "delivered", "{sent}");
    assert_eq!(
        text.matches("idle hello from alice").count(),
        1,
        "shown once: {text}"
    );

    // doctor tells the path and why, and how claude-peers is set up.
    let report = doctor(&peers, &cc);
    let bob = &report["sessions"][0];
    assert_eq!(bob["route"], "inbox", "{report}");
    assert!(bob["why"].as_str().unwrap().contains("inbox"), "{report}");
    assert_eq!(bob["host_pid"], session.pid(), "{report}");
    assert_eq!(report["claude"]["inbox"], true, "{report}");
    assert_eq!(report["setup"]["server"], true, "{report}");
    assert_eq!(report["broker"]["running"], true, "{report}");
}

/// Mail to a session in the middle of a turn joins that turn at its next tool result.
#[test]
fn mail_to_a_busy_session_arrives_in_that_turn() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    let gate = Gate::new();
    // The turn's first answer is a tool call, held until the mail was sent.
    api.push(search_when_shown(
        "start a long task",
        "mcp__claude-peers__whoami",
        &gate,
    ));
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    session.submit("start a long task");
    if session
        .wait_until(|s| s.contains("esc to interrupt"), Duration::from_secs(30))
        .is_none()
    {
        panic!("the turn never started\n{}", session.diagnostics());
    }
    peers.run_ok(&["send", "bob", "busy hello from alice", "--from", "alice"]);
    gate.open();
    let shown = shown_to_model(&api, "busy hello from alice", &session);
    let text = shown.messages_text();
    assert!(
        text.contains("start a long task"),
        "not the same turn: {text}"
    );
    assert!(text.contains("while you were working"), "{text}");
}

/// The model answers with Claude Code's built-in SendMessage to the `from=` address: the
/// reply reaches the sender once, threaded to the message it answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_through_the_builtin_send_message_reaches_the_sender_once() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    allow(&cc, &["SendMessage"]);
    let gate = Gate::new();
    api.push(search_when_shown(
        "question from alice",
        "SendMessage",
        &gate,
    ));
    let _broker = peers.broker(&[]);
    let session = Interactive::start(&cc, &[]);
    let (mut alice, _) = peers.peer("alice", "/work/alice").await;
    wait_online(&peers, "bob", &session);

    let sent = alice
        .call(common::send("bob", "question from alice"))
        .await
        .unwrap();
    let shown = shown_to_model(&api, "question from alice", &session);
    let to = from_address(&shown.messages_text(), "question from alice");
    api.push(
        Reply::tool(
            "SendMessage",
            json!({"to": to, "message": "answer from bob's model"}),
        )
        .only_if(|r| r.has_tool("SendMessage")),
    );
    gate.open();

    let d = tokio::time::timeout(Duration::from_secs(30), common::next_delivery(&mut alice))
        .await
        .unwrap_or_else(|_| panic!("no reply reached alice\n{}", session.diagnostics()));
    assert_eq!(d.from, "bob");
    assert_eq!(d.text, "answer from bob's model");
    assert_eq!(d.in_reply_to.as_deref(), Some(sent.message_id.as_str()));
    alice
        .notify(claude_peers::protocol::Ack::delivered(vec![d.id]))
        .unwrap();
    common::assert_no_delivery(&mut alice, Duration::from_millis(500)).await;
}

/// The model answers with this server's send_message: the reply reaches the sender once.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_through_send_message_reaches_the_sender_once() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    let gate = Gate::new();
    let [search, _] = call_mcp_tool("send_message", json!({}));
    api.push(search.held(&gate));
    let _broker = peers.broker(&[]);
    let session = Interactive::start(&cc, &[]);
    let (mut alice, _) = peers.peer("alice", "/work/alice").await;
    wait_online(&peers, "bob", &session);

    let sent = alice
        .call(common::send("bob", "second question from alice"))
        .await
        .unwrap();
    let [_, call] = call_mcp_tool(
        "send_message",
        json!({"to": "alice", "message": "tool answer from bob", "in_reply_to": sent.message_id}),
    );
    api.push(call);
    gate.open();

    let d = tokio::time::timeout(Duration::from_secs(30), common::next_delivery(&mut alice))
        .await
        .unwrap_or_else(|_| panic!("no reply reached alice\n{}", session.diagnostics()));
    assert_eq!(
        (d.from.as_str(), d.text.as_str()),
        ("bob", "tool answer from bob")
    );
    assert_eq!(d.in_reply_to.as_deref(), Some(sent.message_id.as_str()));
    alice
        .notify(claude_peers::protocol::Ack::delivered(vec![d.id]))
        .unwrap();
    common::assert_no_delivery(&mut alice, Duration::from_millis(500)).await;
}

/// `claude mcp list` starts our server to check it and stops it at once: no peer is left.
#[test]
fn claude_mcp_list_leaves_no_peer() {
    require_claude!();
    let peers = Home::new();
    let api = StubApi::start();
    let mut cc = ClaudeHome::new(&peers, &api);
    cc.server_env("CLAUDE_PEERS_NAME", "health-check");
    let out = cc.print_with(&["mcp", "list"], Duration::from_secs(60));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("claude-peers") && listed.contains("Connected"),
        "{listed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Give a server that outlived the check the time it would take to register.
    std::thread::sleep(Duration::from_secs(1));
    let out = peers.run_ok(&["peers", "--all", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("health-check"), "{text}");
}

/// A session that bypasses permissions holds mail from other sessions for its user, but
/// would take its own server's unasked: so its mail is written by a relay outside the
/// session's process tree, Claude Code holds it like any other session's, the sender is
/// told `held`, and the model sees it only once the user approves it in Claude Code's
/// dialog (then `delivered`). `CLAUDE_PEERS_BYPASS_INBOX=true` opts out of the hold.
#[test]
fn a_bypass_mode_session_gets_mail_only_once_its_user_approves_it() {
    require_claude!();
    require_tmux!();
    for opted_in in [false, true] {
        let (peers, api, mut cc) = bob();
        if opted_in {
            cc.server_env("CLAUDE_PEERS_BYPASS_INBOX", "true");
        }
        let _broker = peers.broker(&["--ack-wait", "10s"]);
        let session = Interactive::start(&cc, &["--dangerously-skip-permissions"]);
        wait_online(&peers, "bob", &session);
        session.wait_idle(Duration::from_secs(30));
        let out = peers.run_ok(&[
            "send",
            "bob",
            "unapproved hello",
            "--from",
            "alice",
            "--json",
        ]);
        let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let why = doctor(&peers, &cc)["sessions"][0].clone();
        assert_eq!(
            (why["name"].as_str(), why["route"].as_str()),
            (Some("bob"), Some("inbox")),
            "{why}"
        );
        if opted_in {
            shown_to_model(&api, "unapproved hello", &session);
            assert_eq!(sent["recipients"][0]["state"], "delivered", "{sent}");
            continue;
        }
        assert_eq!(
            sent["recipients"][0]["state"],
            "held",
            "{sent}\n{}",
            session.diagnostics()
        );
        assert!(why["why"].as_str().unwrap().contains("relay"), "{why}");
        let early = api.wait_for(
            |r| r.is_main() && r.messages_text().contains("unapproved hello"),
            Duration::from_secs(2),
        );
        assert!(early.is_none(), "the model was shown unapproved mail");
        // Claude Code asks its user; the cursor starts on Deny.
        let dialog = session.wait_until(
            |s| s.contains("Deliver this message to Claude"),
            Duration::from_secs(30),
        );
        assert!(
            dialog.is_some(),
            "no approval dialog\n{}",
            session.diagnostics()
        );
        session.send_keys(&["Down"]);
        std::thread::sleep(Duration::from_millis(300));
        session.send_keys(&["Enter"]);
        shown_to_model(&api, "unapproved hello", &session);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = peers.run(&["log", "--json"]);
            let text = String::from_utf8_lossy(&log.stdout).into_owned();
            if text.contains("\"delivered\"") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the approval never reached the log: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A session whose settings hold other sessions' messages (`crossSessionInbound`) would
/// still take its own server's: so the relay writes its mail, Claude Code holds it as
/// the settings say, and the sender is told `held`.
#[test]
fn a_session_that_holds_cross_session_mail_holds_ours_too() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    std::fs::write(
        cc.home.join(".claude/settings.json"),
        json!({
            "permissions": { "allow": ["mcp__claude-peers"] },
            "crossSessionInbound": "hold"
        })
        .to_string(),
    )
    .unwrap();
    let _broker = peers.broker(&["--ack-wait", "10s"]);
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    let out = peers.run_ok(&[
        "send",
        "bob",
        "held by setting",
        "--from",
        "alice",
        "--json",
    ]);
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent["recipients"][0]["state"], "held", "{sent}");
    let shown = api.wait_for(
        |r| r.is_main() && r.messages_text().contains("held by setting"),
        Duration::from_secs(3),
    );
    assert!(
        shown.is_none(),
        "the model was shown mail its settings hold"
    );
}

/// `claude-peers setup claude` registers the server (Claude Code lists it and it
/// answers) and the hooks; run again it changes nothing; `--uninstall` takes both out and
/// keeps the rest of the files, with backups of what was there.
#[test]
fn setup_claude_registers_and_uninstalls() {
    require_claude!();
    let peers = Home::new();
    let api = StubApi::start();
    let mut cc = ClaudeHome::new(&peers, &api);
    cc.config(|c| {
        c["mcpServers"]
            .as_object_mut()
            .unwrap()
            .remove("claude-peers");
    });
    let setup = |args: &[&str]| {
        let out = peers
            .cmd()
            .args(["setup", "claude"])
            .args(args)
            .env("HOME", &cc.home)
            .env_remove("CLAUDE_CONFIG_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = || {
        let out = cc.print_with(&["mcp", "list"], Duration::from_secs(60));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!listed().contains("claude-peers"));

    let said = setup(&[]);
    assert!(
        said.contains("registered the MCP server claude-peers"),
        "{said}"
    );
    assert!(said.contains("wrote the mail hooks"), "{said}");
    let list = listed();
    assert!(
        list.lines()
            .any(|l| l.starts_with("claude-peers") && l.contains("Connected")),
        "{list}"
    );
    let settings_file = cc.home.join(".claude/settings.json");
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&settings_file).unwrap()).unwrap();
    assert!(
        settings["hooks"]["Stop"][0]["hooks"][0]["command"]
            .as_str()
            .unwrap()
            .ends_with("hook wait")
    );
    assert_eq!(
        settings["permissions"]["allow"][0], "mcp__claude-peers",
        "kept"
    );
    assert!(cc.home.join(".claude.json.claude-peers.bak").exists());

    assert!(setup(&[]).contains("nothing to change"));

    let said = setup(&["--uninstall"]);
    assert!(said.contains("removed the MCP server"), "{said}");
    assert!(!listed().contains("claude-peers"));
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&settings_file).unwrap()).unwrap();
    assert_eq!(
        settings,
        json!({"permissions": {"allow": ["mcp__claude-peers"]}}),
        "only our hooks were taken out"
    );
}

/// A hooks-only setup: `serve` may not use the inbox (`--push never` here, as for a
/// host without one), and the hooks `claude-peers setup claude` writes show the mail.
/// Returns the session's home with those hooks, pointing at the test's broker.
fn hooks_only(peers: &Home, api: &StubApi, events: &[&str]) -> ClaudeHome {
    let mut cc = ClaudeHome::new(peers, api);
    cc.server_env("CLAUDE_PEERS_NAME", "bob");
    cc.server_env("CLAUDE_PEERS_PUSH", "never");
    // Hooks run with Claude Code's environment.
    cc.env("CLAUDE_PEERS_HOME", peers.root().to_str().unwrap());
    let out = peers
        .cmd()
        .args(["setup", "claude"])
        .env("HOME", &cc.home)
        .env_remove("CLAUDE_CONFIG_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // setup registered its own server entry (without our test environment): keep ours,
    // and only the hook events this test wants.
    cc.config(|_| {});
    let file = cc.home.join(".claude/settings.json");
    let mut settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    settings["hooks"]
        .as_object_mut()
        .unwrap()
        .retain(|event, _| events.contains(&event.as_str()));
    std::fs::write(&file, settings.to_string()).unwrap();
    cc
}

/// Hooks only: mail that arrived while the session was idle is shown with the next
/// prompt (UserPromptSubmit additional context), once, and the log says delivered.
#[test]
fn hooks_show_mail_at_the_next_prompt() {
    require_claude!();
    require_tmux!();
    let peers = Home::new();
    let api = StubApi::start();
    let _broker = peers.broker(&[]);
    let cc = hooks_only(&peers, &api, &["UserPromptSubmit"]);
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    peers.run_ok(&["send", "bob", "mail for the next prompt", "--from", "alice"]);
    let quiet = api.wait_for(
        |r| r.is_main() && r.messages_text().contains("mail for the next prompt"),
        Duration::from_secs(2),
    );
    assert!(quiet.is_none(), "shown before any prompt");
    session.submit("what is new?");
    let shown = shown_to_model(&api, "mail for the next prompt", &session);
    let text = shown.messages_text();
    assert!(
        text.contains("UserPromptSubmit hook additional context"),
        "{text}"
    );
    assert!(text.contains("from=\"alice\""), "{text}");
    session.wait_idle(Duration::from_secs(30));
    session.submit("anything else?");
    let next = shown_to_model(&api, "anything else?", &session);
    assert_eq!(
        next.messages_text()
            .matches("mail for the next prompt")
            .count(),
        1,
        "shown once, kept in the history only"
    );
    let log = peers.run(&["log", "--json"]);
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("\"delivered\""),
        "{log:?}"
    );
}

/// Hooks only: an idle session is woken by `hook wait` (Stop/SessionStart, asyncRewake)
/// when mail arrives, with no input typed.
#[test]
fn hook_wait_wakes_an_idle_session() {
    require_claude!();
    require_tmux!();
    let peers = Home::new();
    let api = StubApi::start();
    let _broker = peers.broker(&[]);
    let cc = hooks_only(&peers, &api, &["SessionStart", "Stop"]);
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    session.wait_idle(Duration::from_secs(30));
    peers.run_ok(&["send", "bob", "wake up for this", "--from", "alice"]);
    let shown = shown_to_model(&api, "wake up for this", &session);
    let text = shown.messages_text();
    assert!(
        text.contains("Mail from another session (claude-peers)"),
        "{text}"
    );
    assert!(text.contains("from=\"alice\""), "{text}");
}

/// A Claude Code session that does not run claude-peers is a peer too: `list_peers`
/// shows it (as `cc:<name>`), `send_message` writes its inbox (its model is shown the
/// message with our name), and its answer through the built-in SendMessage comes back
/// to us, threaded.
#[tokio::test(flavor = "multi_thread")]
async fn a_claude_code_session_without_claude_peers_is_a_peer() {
    require_claude!();
    require_tmux!();
    let peers = Home::new();
    let api = StubApi::start();
    let mut cc = ClaudeHome::new(&peers, &api);
    cc.config(|c| {
        c["mcpServers"]
            .as_object_mut()
            .unwrap()
            .remove("claude-peers");
    });
    allow(&cc, &["SendMessage"]);
    let gate = Gate::new();
    api.push(search_when_shown(
        "hello native session",
        "SendMessage",
        &gate,
    ));
    let native = Interactive::start(&cc, &[]);
    native.wait_inbox_socket(Duration::from_secs(30));
    let _broker = peers.broker(&[]);

    // Our session, reading Claude Code's session records from the same HOME.
    let mut cmd = peers.serve_cmd(Some("alice"), peers.dir.path());
    cmd.env("HOME", &cc.home)
        .env_remove("CLAUDE_CONFIG_DIR")
        .env("CLAUDE_PEERS_PUSH", "never");
    let alice = common::serve::Serve::start(cmd, false).await;

    let listed = alice.ok("list_peers", json!({})).await;
    let native_peer = listed["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "claude-code")
        .unwrap_or_else(|| panic!("no Claude Code session listed: {listed}"))
        .clone();
    let address = native_peer["name"].as_str().unwrap().to_string();
    assert!(address.starts_with("cc:"), "{native_peer}");
    assert_eq!(native_peer["cwd"], cc.project.to_str().unwrap());

    let sent = alice
        .ok(
            "send_message",
            json!({"to": address, "message": "hello native session"}),
        )
        .await;
    assert_eq!(sent["recipients"][0]["state"], "delivered", "{sent}");
    let id = sent["message_id"].as_str().unwrap().to_string();
    let shown = shown_to_model(&api, "hello native session", &native);
    let text = shown.messages_text();
    assert!(text.contains("from-name=\"alice\""), "{text}");
    assert!(text.contains("from-mode=\"prompting\""), "{text}");
    let to = from_address(&text, "hello native session");
    api.push(
        Reply::tool("SendMessage", json!({"to": to, "message": "native answer"}))
            .only_if(|r| r.has_tool("SendMessage")),
    );
    gate.open();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got = alice.ok("check_messages", json!({})).await;
        if !got["messages"].as_array().unwrap().is_empty() {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer came back\n{}",
            native.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let m = &got["messages"][0];
    assert_eq!(m["from"], address.as_str(), "{got}");
    assert_eq!(m["text"], "native answer");
    assert_eq!(m["in_reply_to"], id.as_str());
    assert_eq!(got["messages"].as_array().unwrap().len(), 1, "once: {got}");
}

/// kill -9 of the broker while mail streams into a real session's inbox: every send that
/// was answered reaches the model, and none is shown twice (a redelivery of what `serve`
/// already wrote is acked again, not written again).
#[test]
fn broker_killed_while_mail_streams_into_the_inbox_loses_and_doubles_nothing() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    session.wait_idle(Duration::from_secs(30));
    let broker_pid = || -> Option<i32> {
        std::fs::read_to_string(&peers.paths.lock)
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let mut answered = Vec::new();
    for i in 0..18 {
        if i == 6 || i == 12 {
            let pid = broker_pid().expect("a broker runs");
            common::kill9(pid as u32);
            common::wait_for(
                || !claude_peers::platform::process_exists(pid as u32),
                "broker death",
            );
        }
        let text = format!("stream-{i:02}-marker");
        let out = peers.run(&["send", "bob", &text, "--from", "alice"]);
        if out.status.success() {
            answered.push(text);
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        answered.len() >= 16,
        "most sends are answered: {answered:?}"
    );
    let last = answered.last().unwrap().clone();
    shown_to_model(&api, &last, &session);
    session.wait_idle(Duration::from_secs(60));
    // Everything shown so far is in the newest request's history, each once.
    let newest = api
        .main_requests()
        .into_iter()
        .last()
        .expect("requests")
        .messages_text();
    for text in &answered {
        assert_eq!(
            newest.matches(text.as_str()).count(),
            1,
            "{text} shown {} times\n{}",
            newest.matches(text.as_str()).count(),
            session.diagnostics()
        );
    }
}

/// The `serve` processes whose parent is `host`.
fn serves_of(host: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| claude_peers::platform::parent_of(*pid) == Some(host))
        .filter(|pid| {
            claude_peers::platform::command_line(*pid)
                .is_some_and(|argv| argv.iter().any(|a| a == "serve"))
        })
        .collect()
}

/// kill -9 of a session's `serve`: mail sent while it is gone is kept, and the next
/// Claude Code session of that name (same directory) gets it in its inbox, once.
#[test]
fn serve_killed_then_a_new_session_of_the_name_gets_the_mail_once() {
    require_claude!();
    require_tmux!();
    let (peers, api, cc) = bob();
    let _broker = peers.broker(&[]);
    let first = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &first);
    let serve = serves_of(first.pid());
    assert_eq!(serve.len(), 1, "one serve under claude: {serve:?}");
    common::kill9(serve[0]);
    let c = tokio::runtime::Runtime::new().unwrap();
    c.block_on(async {
        let w = peers.client().await;
        common::wait_offline(&w, "bob").await;
    });
    let out = peers.run_ok(&[
        "send",
        "bob",
        "sent while bob was away",
        "--from",
        "alice",
        "--json",
    ]);
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent["recipients"][0]["state"], "queued", "{sent}");
    drop(first);

    let second = Interactive::start(&cc, &[]);
    let shown = shown_to_model(&api, "sent while bob was away", &second);
    assert_eq!(
        shown
            .messages_text()
            .matches("sent while bob was away")
            .count(),
        1
    );
    second.wait_idle(Duration::from_secs(30));
    let newest = api
        .main_requests()
        .into_iter()
        .last()
        .unwrap()
        .messages_text();
    assert_eq!(newest.matches("sent while bob was away").count(), 1, "once");
}

/// Two real sessions, one with claude-peers and one without: our model's `send_message`
/// to `cc:<pid>` reaches the other, whose `SendMessage` answer reaches our model signed
/// with that session's own address, so that our model's answer to it goes straight there
/// (not back into our own reply socket).
#[test]
fn an_answer_from_a_session_without_claude_peers_is_signed_with_its_address() {
    require_claude!();
    require_tmux!();
    let (peers, api, mut cc) = bob();
    allow(&cc, &["SendMessage"]);
    cc.server_env("CLAUDE_PEERS_LOG", "warn");
    let _broker = peers.broker(&[]);
    let native = Interactive::start(&cc, &["--strict-mcp-config"]);
    let native_socket = native.wait_inbox_socket(Duration::from_secs(30));
    let gate = Gate::new();
    api.push(search_when_shown(
        "question for the native session",
        "SendMessage",
        &gate,
    ));
    let ours = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &ours);
    ours.wait_idle(Duration::from_secs(30));
    api.push_all(call_mcp_tool(
        "send_message",
        json!({"to": format!("cc:{}", native.pid()), "message": "question for the native session"}),
    ));
    ours.submit("ask the other session");
    // The native session's request, where the question arrived as mail: our own session's
    // requests hold the text too (our model's call), but no mail has reached it yet, and
    // only it has our MCP tools (the native one runs under --strict-mcp-config).
    let asked = api
        .wait_for_request(
            |r| {
                let text = r.messages_text();
                r.is_main()
                    && !r.has_tool(&common::claude::mcp_tool("send_message"))
                    && text.contains("<cross-session-message")
                    && text.contains("question for the native session")
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| {
            panic!(
                "the native session was never shown the question\n{}",
                native.diagnostics()
            )
        });
    let to = from_address(&asked.messages_text(), "question for the native session");
    assert!(to.contains("-cc:"), "our reply socket for it: {to}");
    api.push(
        Reply::tool(
            "SendMessage",
            json!({"to": to, "message": "answer from the native session"}),
        )
        .only_if(|r| r.has_tool("SendMessage")),
    );
    gate.open();
    // Our session's request (the other's history holds the text too, as its tool call).
    let shown = api
        .wait_for_request(
            |r| {
                let t = r.messages_text();
                r.is_main()
                    && t.contains("ask the other session")
                    && t.contains("Another Claude session sent a message")
                    && t.contains("answer from the native session")
            },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| {
            panic!(
                "our model was never shown the answer\n{}",
                ours.diagnostics()
            )
        });
    let text = shown.messages_text();
    let from = from_address(&text, "answer from the native session");
    assert_eq!(
        from,
        format!("uds:{}", native_socket.display()),
        "signed with the native session's address\n{text}"
    );
}

/// Sends `n` messages from alice to a real session `bob` at once, and checks that each
/// reaches the model exactly once and ends `delivered` in the log, within `within`.
/// `server_env` is set in bob's `serve`.
async fn burst_arrives_once(n: usize, tag: &str, server_env: &[(&str, &str)], within: Duration) {
    let (peers, api, mut cc) = bob();
    for (k, v) in server_env {
        cc.server_env(k, v);
    }
    let _broker = peers.broker(&["--send-rate", "0", "--ack-wait", "0"]);
    let session = Interactive::start(&cc, &[]);
    let (alice, _) = peers.peer("alice", "/work/alice").await;
    wait_online(&peers, "bob", &session);
    session.wait_idle(Duration::from_secs(30));
    let marker = |i: usize| format!("{tag}-{i:02}-marker");
    let mut ids = Vec::new();
    for i in 0..n {
        let sent = alice.call(common::send("bob", &marker(i))).await.unwrap();
        ids.push(sent.message_id);
    }
    let newest = || {
        api.main_requests()
            .into_iter()
            .last()
            .map(|r| r.messages_text())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = newest();
        let missing: Vec<usize> = (0..n).filter(|i| !text.contains(&marker(*i))).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reached the model: {missing:?}\n{}",
            session.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    session.wait_idle(Duration::from_secs(60));
    let text = newest();
    for i in 0..n {
        assert_eq!(text.matches(&marker(i)).count(), 1, "{}", marker(i));
    }
    // Each is acked delivered once the session kept it (the ack follows the write by the
    // receipt window, so the newest may still be on its way).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = alice
            .call(claude_peers::protocol::LogQuery {
                before: None,
                limit: Some(100),
                peer: Some("bob".into()),
            })
            .await
            .unwrap();
        let pending: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| {
                log.messages.iter().find(|e| &e.id == *id).unwrap().state
                    != claude_peers::protocol::DeliveryState::Delivered
            })
            .map(|(i, _)| i)
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not delivered: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Claude Code drops mail past its per-sender rate (a burst of 30, then one every 2 s)
/// and says so in a `dropped` receipt: nothing is lost, each message reaches the model
/// once (what was dropped is written again later), and none is reported delivered
/// before the session kept it.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_past_claude_codes_rate_limit_loses_nothing() {
    require_claude!();
    require_tmux!();
    burst_arrives_once(36, "burst", &[], Duration::from_secs(90)).await;
}

/// Past Claude Code's rate after all (our pace set above it, as if Claude Code had
/// lowered its limit): it drops messages and says so seconds after we acked them
/// delivered. Those late notices still count: each message is queued again and written
/// again, reaches the model once, and ends delivered.

#[tokio::test(flavor = "multi_thread")]
async fn messages_claude_code_drops_late_are_written_again() {
    require_claude!();
    require_tmux!();
    let above_its_limit = [("CLAUDE_PEERS_INBOX_BURST", "60")];
    burst_arrives_once(36, "late", &above_its_limit, Duration::from_secs(150)).await;
}
