//! The real Claude Code CLI running our MCP server, against a scripted stub of the
//! Messages API (`common/claude/`): what the model is shown, end to end. Skipped when
//! `claude` (or, for sessions, `tmux`) is not installed; `.ci/run` installs both.

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use common::Home;
use common::claude::{Block, ClaudeHome, Gate, Interactive, Reply, StubApi, call_mcp_tool, homes};
use serde_json::json;

/// `claude -p`: the model loads `whoami` through ToolSearch, calls it, and the next
/// request shows it our answer, which names this session.
#[test]
fn print_mode_shows_the_model_whoami() {
    require!("claude");
    let (_peers, api, mut cc) = homes();
    cc.server_env("CLAUDE_PEERS_NAME", "stub-alice");
    api.push_all(call_mcp_tool("whoami", json!({})));

    cc.print_shows_whoami(&api, "Who am I among the peers?", "stub-alice");
}

/// An interactive session under tmux: a typed prompt reaches the stub, the turn shows as
/// busy while the stub holds its answer, then the answer is drawn and the prompt is idle.
#[test]
fn interactive_session_draws_the_answer() {
    require!("claude");
    require!("tmux");
    let (_peers, api, cc) = homes();
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
    let (peers, api, mut cc) = homes();
    cc.server_env("CLAUDE_PEERS_NAME", "bob");
    (peers, api, cc)
}

/// The first main-loop request that shows the model `text`, within 30 s.
fn shown_to_model(api: &StubApi, text: &str, session: &Interactive) -> String {
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
    .messages_text()
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
    let out = cc
        .peers_cmd(peers)
        .args(["doctor", "--json"])
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
    require!("claude");
    require!("tmux");
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
    let text = shown_to_model(&api, "idle hello from alice", &session);
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
    require!("claude");
    require!("tmux");
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
    let text = shown_to_model(&api, "busy hello from alice", &session);
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
    require!("claude");
    require!("tmux");
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
    let text = shown_to_model(&api, "question from alice", &session);
    let to = from_address(&text, "question from alice");
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
    require!("claude");
    require!("tmux");
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
    require!("claude");
    let (peers, _api, mut cc) = homes();
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
    require!("claude");
    require!("tmux");
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
        // `held` in the answer when the session's receipt beat the broker's ack wait
        // (250 ms); `pushed` there and `held` in the log when it came later (under load).
        let state = || {
            let out = peers.run_ok(&["log", "--json", "--peer", "bob", "-n", "10"]);
            let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            log.as_array()
                .into_iter()
                .flatten()
                .find(|e| e["id"] == sent["message_id"])
                .map(|e| e["state"].clone())
        };
        let answered = &sent["recipients"][0]["state"];
        assert!(answered == "held" || answered == "pushed", "{sent}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while state() != Some("held".into()) {
            assert!(
                std::time::Instant::now() < deadline,
                "{sent} is not held: {:?}\n{}",
                state(),
                session.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    require!("claude");
    require!("tmux");
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

mod edges;
