//! Coding agents other than Claude Code as peers. Each starts `serve` its own way; what
//! they share must not depend on what they pass on.

mod common;

use std::path::Path;

use common::serve::Serve;
use common::*;
use serde_json::{Value, json};

/// `claude-peers` with nothing of the test's environment but `HOME` and `PATH`, as an
/// agent that scrubs its servers' environment runs it (Codex passes only `HOME`, `LANG`,
/// `PATH`, `SHELL` and `TERM`).
fn scrubbed(user_home: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.env_clear()
        .env("HOME", user_home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LANG", "C.UTF-8")
        .env("SHELL", "/bin/sh")
        .env("TERM", "dumb")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Stops the broker of `user_home`'s default place when dropped.
struct StopAtEnd<'a>(&'a Path);

impl Drop for StopAtEnd<'_> {
    fn drop(&mut self) {
        let _ = scrubbed(self.0).arg("stop").output();
    }
}

/// A `serve` started with the user's whole environment (XDG variables included, as a
/// Claude Code session has them) and one started with a scrubbed environment find the
/// same broker and database, and see each other. (They used to find two: the scrubbed one
/// fell back to `~/.claude-peers` and started a broker of its own, without a word.)
#[tokio::test(flavor = "multi_thread")]
async fn a_serve_with_a_scrubbed_environment_reaches_the_same_broker() {
    let run_user = Path::new("/run/user").join(claude_peers::platform::current_uid().to_string());
    if run_user.exists() {
        eprintln!(
            "skipped: {} exists, so the default place is this user's own broker",
            run_user.display()
        );
        return;
    }
    let home = Home::new();
    let user_home = home.dir.path().join("user");
    let (claude_side, codex_side) = (user_home.join("claude-side"), user_home.join("codex-side"));
    for d in [
        &claude_side,
        &codex_side,
        &user_home.join("xdg-run"),
        &user_home.join("xdg-state"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let _stop = StopAtEnd(&user_home);

    let mut full = home.serve_cmd(None, &claude_side);
    full.env_remove("CLAUDE_PEERS_HOME")
        .env("HOME", &user_home)
        .env("XDG_RUNTIME_DIR", user_home.join("xdg-run"))
        .env("XDG_STATE_HOME", user_home.join("xdg-state"));
    let full = Serve::start(full, false).await;
    let mut codex = tokio::process::Command::from(scrubbed(&user_home));
    codex
        .arg("serve")
        .current_dir(&codex_side)
        .stderr(std::process::Stdio::null());
    let codex = Serve::start(codex, false).await;

    let a = full.whoami_when_ready().await;
    let b = codex.whoami_when_ready().await;
    assert_eq!(a["broker"], b["broker"], "{a}\n{b}");
    assert_eq!(a["database"], b["database"], "{a}\n{b}");
    let listed = full.ok("list_peers", json!({})).await;
    let names = peer_names(&listed);
    assert!(names.contains(&b["name"].as_str().unwrap()), "{listed}");
    // And a person's CLI, with the whole environment or none of it, the same.
    let peers = scrubbed(&user_home)
        .args(["peers", "--json"])
        .output()
        .unwrap();
    assert!(peers.status.success(), "{peers:?}");
    let text = String::from_utf8_lossy(&peers.stdout);
    assert!(
        text.contains("claude-side") && text.contains("codex-side"),
        "{text}"
    );
    full.close().await;
    codex.close().await;
}

/// Every tool says what it does to the world, so an agent that runs only annotated tools
/// without asking (Codex refuses unannotated ones in `codex exec`) runs ours: read tools
/// are `readOnlyHint`, the others neither destructive nor open-world. Input schemas are
/// flat, as every agent's function declarations take them: no `$ref`, no `oneOf`, no
/// `null` in a type.
#[tokio::test(flavor = "multi_thread")]
async fn tools_are_annotated_and_their_inputs_flat() {
    let home = Home::new();
    let s = home.session("annotated", false).await;
    let tools = s.service().list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 7);
    for t in &tools {
        let a = t
            .annotations
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no annotations", t.name));
        let runs_unasked = a.read_only_hint == Some(true)
            || (a.destructive_hint == Some(false) && a.open_world_hint == Some(false));
        assert!(runs_unasked, "{}: {a:?}", t.name);
        let read_only = ["whoami", "list_peers", "list_sessions"].contains(&t.name.as_ref());
        assert_eq!(a.read_only_hint == Some(true), read_only, "{}", t.name);
        let text = serde_json::to_string(&t.input_schema).unwrap();
        for bad in ["$ref", "$defs", "oneOf", "anyOf", "\"null\""] {
            assert!(
                !text.contains(bad),
                "{}'s input schema has {bad}: {text}",
                t.name
            );
        }
    }
    let list = tools.iter().find(|t| t.name == "list_peers").unwrap();
    assert_eq!(
        list.input_schema["properties"]["scope"]["enum"],
        json!(["machine", "directory", "repo", "network"])
    );
    let broadcast = tools.iter().find(|t| t.name == "broadcast").unwrap();
    assert_eq!(
        broadcast.input_schema["properties"]["scope"]["enum"],
        json!(["machine", "directory", "repo", "network"])
    );
    let send = tools.iter().find(|t| t.name == "send_message").unwrap();
    assert_eq!(send.input_schema["properties"]["to"]["type"], "string");

    // Told what this client has: tool results and check_messages, not Claude Code's
    // channels or built-in SendMessage.
    let info = s.service().peer_info().expect("initialized");
    let said = info.instructions.as_deref().unwrap_or_default();
    assert!(
        said.contains("check_messages") && said.contains("annotated"),
        "{said}"
    );
    for foreign in ["SendMessage", "channel", "cross-session-message"] {
        assert!(!said.contains(foreign), "{foreign} in: {said}");
    }
    s.close().await;
}

/// `--push channel` for a client that cannot show channel events (Codex, Gemini CLI:
/// they declare no `claude/channel`) is not obeyed: the events would be lost, acked as
/// pushed and never seen. The mail waits for `check_messages` instead. A client that
/// declared the channel gets events.
#[tokio::test(flavor = "multi_thread")]
async fn push_channel_to_a_client_without_the_channel_waits_for_check_messages() {
    let home = Home::new();
    let push = [("CLAUDE_PEERS_PUSH", "channel")];
    let mut agent = home
        .session_in("agent", false, home.dir.path(), &push)
        .await;
    let mut claude = home
        .session_in("cc-session", true, home.dir.path(), &push)
        .await;
    let me = agent.whoami_when_ready().await;
    assert_eq!(me["delivery"], "poll", "{me}");
    assert_eq!(claude.whoami_when_ready().await["delivery"], "channel");

    let sent = claude
        .ok(
            "send_message",
            json!({"to": "agent", "message": "are you there?"}),
        )
        .await;
    assert_eq!(sent["recipients"][0]["state"], "queued", "{sent}");
    agent.no_event(std::time::Duration::from_millis(200)).await;
    let got = agent.ok("check_messages", json!({})).await;
    assert_eq!(got["messages"][0]["text"], "are you there?", "{got}");

    agent
        .ok(
            "send_message",
            json!({"to": "cc-session", "message": "yes"}),
        )
        .await;
    assert_eq!(claude.next_event().await["content"], "yes");
    agent.close().await;
    claude.close().await;
}

/// `claude-peers hook stop` as another agent's stop hook (here Gemini CLI's AfterAgent):
/// unread mail comes back at once in that host's shape, as the reason its turn goes on;
/// it is then settled, so the next stop finds none and the turn can end (no loop), and
/// `check_messages` does not show it again.
#[tokio::test(flavor = "multi_thread")]
async fn the_stop_hook_returns_mail_once_in_the_host_s_shape() {
    let home = Home::new();
    let bob = home.session("bob", false).await;
    bob.whoami_when_ready().await;
    home.run_ok(&["send", "bob", "please rebase", "--from", "alice"]);
    wait_for(
        || {
            let out = home.run_ok(&["doctor", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            v["sessions"][0]["unread"] == 1
        },
        "bob's serve to hold the mail",
    );
    let stop = || {
        let mut child = home
            .cmd()
            .args(["hook", "stop"])
            // Not the pid of a Claude Code that may run these tests.
            .env_remove("CLAUDE_PID")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let event = r#"{"hook_event_name":"AfterAgent","session_id":"s1"}"#;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(event.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let first = stop();
    assert!(first.status.success(), "{first:?}");
    let v: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(v["decision"], "deny", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("please rebase") && reason.contains("from=\"alice\""),
        "{reason}"
    );
    let again = stop();
    assert!(
        again.status.success() && again.stdout.is_empty(),
        "{again:?}"
    );
    let left = bob.ok("check_messages", json!({})).await;
    assert_eq!(left["messages"], json!([]), "{left}");
    bob.close().await;
}

/// A claude-peers variable that is set but empty (as an agent's config template may leave
/// it) means the default place, as its absence does; it is not an error.
#[test]
fn an_empty_home_variable_means_the_default_place() {
    let run_user = Path::new("/run/user").join(claude_peers::platform::current_uid().to_string());
    if run_user.exists() {
        eprintln!(
            "skipped: {} exists, so the default place is this user's own",
            run_user.display()
        );
        return;
    }
    let home = Home::new();
    let user = home.dir.path().join("user");
    std::fs::create_dir_all(&user).unwrap();
    let out = scrubbed(&user)
        .env("CLAUDE_PEERS_HOME", "")
        .env("CLAUDE_PEERS_DB", "")
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let socket = user.join(".claude-peers/broker.sock");
    assert!(text.contains(&socket.display().to_string()), "{out:?}");
    assert_eq!(out.status.code(), Some(1), "no broker runs: {out:?}");
}

/// A second `serve` of one agent session (the agent restarted its server, or opened a new
/// window on it, before the first went away: Codex's app-server does) keeps the session's
/// name and the mail waiting for it, and gets its hooks; the first steps aside, and used
/// again registers under another name, with none of that mail. Servers of one agent
/// process are one session (by default: here the agent is this test); another session in
/// the same directory still gets `name-N`.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_serve_of_the_same_session_keeps_its_name_and_mail() {
    let home = Home::new();
    let same_agent = || {
        let mut cmd = home.serve_cmd(None, home.dir.path());
        cmd.env_remove("CLAUDE_PEERS_SESSION");
        cmd
    };
    let old = Serve::start(same_agent(), false).await;
    let name = old.whoami_when_ready().await["name"]
        .as_str()
        .unwrap()
        .to_string();
    home.run_ok(&["send", &name, "first", "--from", "carol"]);
    wait_for(
        || {
            let out = home.run_ok(&["doctor", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            v["sessions"][0]["unread"] == 1
        },
        "the first serve to hold the mail",
    );

    let new = Serve::start(same_agent(), false).await;
    let me = new.whoami_when_ready().await;
    assert_eq!(me["name"], name.as_str(), "{me}");
    let got = new.ok("check_messages", json!({})).await;
    assert_eq!(got["messages"][0]["text"], "first", "{got}");

    // The agent's hooks reach the newer serve.
    home.run_ok(&["send", &name, "second", "--from", "carol"]);
    wait_for(
        || {
            let out = home.run_ok(&["doctor", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
            sessions.iter().any(|s| s["unread"] == 1)
        },
        "the newer serve to hold the second message",
    );
    let mut hook = home
        .cmd()
        .args(["hook", "prompt"])
        .env("CLAUDE_PID", std::process::id().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = hook.stdin.take().unwrap();
        stdin
            .write_all(br#"{"hook_event_name":"UserPromptSubmit","session_id":"s1"}"#)
            .unwrap();
    }
    let out = hook.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("second") && shown.contains(&format!("message for {name} ")),
        "{out:?}"
    );

    // The older one kept nothing of the name's mail, and never takes the name back.
    let left = old.ok("check_messages", json!({})).await;
    assert_eq!(left["messages"], json!([]), "{left}");
    let moved = old.whoami_when_ready().await;
    assert_eq!(moved["name"], format!("{name}-2"), "{moved}");
    let peers = home.run_ok(&["peers", "--json"]);
    let peers: Value = serde_json::from_slice(&peers.stdout).unwrap();
    let holder = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{peers}"));
    assert_eq!(holder["context"]["pid"], new.pid, "{holder}");

    // Another session in the same directory is not this one.
    let other = Serve::start(home.serve_cmd(None, home.dir.path()), false).await;
    let theirs = other.whoami_when_ready().await;
    assert_eq!(theirs["name"], format!("{name}-3"), "{theirs}");
    for s in [old, new, other] {
        s.close().await;
    }
}

/// Every tool answers a sentence for the model to read (the text content: what Claude Code
/// and Gemini CLI show it) beside its record (`structuredContent`, for programs); mail
/// reads as the hooks show it, framed as a colleague's request. (Codex shows the record
/// instead of the text, so it gets the text alone: `tests/codex.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn each_tool_answers_a_sentence_beside_its_record() {
    let home = Home::new();
    let alice = home.session("alice", false).await;
    let bob = home.session("bob", false).await;
    bob.whoami_when_ready().await;
    let text = |r: &rmcp::model::CallToolResult| {
        assert_eq!(r.is_error, Some(false), "{r:?}");
        assert!(r.structured_content.is_some(), "no record: {r:?}");
        r.content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect::<String>()
    };

    let me = text(&alice.call("whoami", json!({})).await);
    assert!(me.starts_with("You are alice, in "), "{me}");
    assert!(me.contains("call check_messages"), "{me}");
    let sent = alice
        .call(
            "send_message",
            json!({"to": "bob", "message": "rebase please"}),
        )
        .await;
    let id = sent.structured_content.as_ref().unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text(&sent), format!("Sent message {id} to bob: queued."));
    let summary = text(
        &alice
            .call("set_summary", json!({"summary": "fixing the API"}))
            .await,
    );
    assert_eq!(summary, "Your summary is now: fixing the API");

    let mail = text(&bob.call("check_messages", json!({})).await);
    assert!(
        mail.contains(&format!("<peer-message from=\"alice\" message-id=\"{id}\"")),
        "{mail}"
    );
    assert!(
        mail.contains("rebase please") && mail.contains("never instructions"),
        "{mail}"
    );
    let none = text(&bob.call("check_messages", json!({})).await);
    assert_eq!(none, "No new peer messages.");
    alice.close().await;
    bob.close().await;
}

/// A hook finds its own session's `serve` by the session id the agent gives both (Codex:
/// `sessionId` in each tool call's `_meta`, `session_id` in the hook's event), whichever
/// process runs it: Codex's app-server runs the servers and hooks of every window. A
/// `serve` that knows its session turns away another session's hook, which looks further
/// and takes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_hook_finds_its_session_by_the_agent_s_session_id() {
    let home = Home::new();
    // `a` under a shell of its own: its host is no ancestor of the hooks below.
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "\"$0\" serve; exit $?", BIN])
        .current_dir(home.dir.path());
    for (k, v) in home.cmd().get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    sh.env("CLAUDE_PEERS_NAME", "a")
        .env("CLAUDE_PEERS_LOG", "error")
        .stderr(std::process::Stdio::null());
    let a = Serve::start(tokio::process::Command::from(sh), false).await;
    // `b` a child of this test, as the hooks are: their walk up reaches it.
    let b = home.session("b", false).await;
    for (s, thread) in [(&a, "thread-a"), (&b, "thread-b")] {
        let mut call = rmcp::model::CallToolRequestParams::new("whoami");
        let meta = json!({ "sessionId": thread, "threadId": thread });
        call.meta = Some(rmcp::model::RequestMetaObject(rmcp::model::MetaObject(
            meta.as_object().unwrap().clone(),
        )));
        let r = s.service().call_tool(call).await.unwrap();
        assert_eq!(r.is_error, Some(false), "{r:?}");
    }
    home.run_ok(&["send", "a", "for a", "--from", "carol"]);
    home.run_ok(&["send", "b", "for b", "--from", "carol"]);
    wait_for(
        || {
            let out = home.run_ok(&["doctor", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
            sessions.iter().filter(|s| s["unread"] == 1).count() == 2
        },
        "both servers to hold their mail",
    );
    let hook = |session: &str| {
        let mut child = home
            .cmd()
            .args(["hook", "prompt"])
            .env_remove("CLAUDE_PID")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let event = json!({"hook_event_name": "UserPromptSubmit", "session_id": session});
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(event.to_string().as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };

    let other = hook("thread-c");
    assert_eq!(other, "", "another session's hook took mail");
    let for_a = hook("thread-a");
    assert!(
        for_a.contains("for a") && !for_a.contains("for b"),
        "{for_a}"
    );
    let for_b = hook("thread-b");
    assert!(
        for_b.contains("for b") && !for_b.contains("for a"),
        "{for_b}"
    );
    a.close().await;
    b.close().await;
}
