//! Real Claude Code beyond the inbox's everyday path: `setup claude` and the hooks;
//! Claude Code sessions that do not run claude-peers, as peers; and faults (the broker
//! or `serve` killed while mail streams in, bursts past Claude Code's per-sender rate).

use super::*;

/// `claude-peers setup claude` registers the server (Claude Code lists it and it
/// answers) and the hooks; run again it changes nothing; `--uninstall` takes both out and
/// keeps the rest of the files, with backups of what was there.
#[test]
fn setup_claude_registers_and_uninstalls() {
    require!("claude");
    let (peers, _api, mut cc) = homes();
    cc.without_our_server();
    let setup = |args: &[&str]| {
        let out = cc
            .peers_cmd(&peers)
            .args(["setup", "claude"])
            .args(args)
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
    let out = cc
        .peers_cmd(peers)
        .args(["setup", "claude"])
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
    require!("claude");
    require!("tmux");
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
    let text = shown_to_model(&api, "mail for the next prompt", &session);
    assert!(
        text.contains("UserPromptSubmit hook additional context"),
        "{text}"
    );
    assert!(text.contains("from=\"alice\""), "{text}");
    session.wait_idle(Duration::from_secs(30));
    session.submit("anything else?");
    let next = shown_to_model(&api, "anything else?", &session);
    assert_eq!(
        next.matches("mail for the next prompt").count(),
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
    require!("claude");
    require!("tmux");
    let peers = Home::new();
    let api = StubApi::start();
    let _broker = peers.broker(&[]);
    let cc = hooks_only(&peers, &api, &["SessionStart", "Stop"]);
    let session = Interactive::start(&cc, &[]);
    wait_online(&peers, "bob", &session);
    session.wait_idle(Duration::from_secs(30));
    peers.run_ok(&["send", "bob", "wake up for this", "--from", "alice"]);
    let text = shown_to_model(&api, "wake up for this", &session);
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
    require!("claude");
    require!("tmux");
    let (peers, api, mut cc) = homes();
    cc.without_our_server();
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
    let text = shown_to_model(&api, "hello native session", &native);
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

/// Two real sessions, one with claude-peers and one without: our model's `send_message`
/// to `cc:<pid>` reaches the other, whose `SendMessage` answer reaches our model signed
/// with that session's own address, so that our model's answer to it goes straight there
/// (not back into our own reply socket).
#[test]
fn an_answer_from_a_session_without_claude_peers_is_signed_with_its_address() {
    require!("claude");
    require!("tmux");
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

/// kill -9 of the broker while mail streams into a real session's inbox: every send that
/// was answered reaches the model, and none is shown twice (a redelivery of what `serve`
/// already wrote is acked again, not written again).
#[test]
fn broker_killed_while_mail_streams_into_the_inbox_loses_and_doubles_nothing() {
    require!("claude");
    require!("tmux");
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
    require!("claude");
    require!("tmux");
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
    let text = shown_to_model(&api, "sent while bob was away", &second);
    assert_eq!(text.matches("sent while bob was away").count(), 1);
    second.wait_idle(Duration::from_secs(30));
    let newest = api
        .main_requests()
        .into_iter()
        .last()
        .unwrap()
        .messages_text();
    assert_eq!(newest.matches("sent while bob was away").count(), 1, "once");
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
        let log = common::history(&alice, "bob", 100).await;
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
    require!("claude");
    require!("tmux");
    burst_arrives_once(36, "burst", &[], Duration::from_secs(90)).await;
}

/// Past Claude Code's rate after all (our pace set above it, as if Claude Code had
/// lowered its limit): it drops messages and says so seconds after we acked them
/// delivered. Those late notices still count: each message is queued again and written
/// again, reaches the model once, and ends delivered.

#[tokio::test(flavor = "multi_thread")]
async fn messages_claude_code_drops_late_are_written_again() {
    require!("claude");
    require!("tmux");
    let above_its_limit = [("CLAUDE_PEERS_INBOX_BURST", "60")];
    burst_arrives_once(36, "late", &above_its_limit, Duration::from_secs(150)).await;
}
