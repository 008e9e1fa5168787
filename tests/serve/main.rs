//! `claude-peers serve` driven as Claude Code drives it: the real binary over stdio, with
//! rmcp's client.

#[path = "../common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::serve::{Serve, text_of};
use common::*;
use serde_json::{Value, json};

#[test]
fn discover_probe_then_initialize_handshake() {
    let home = Home::new();
    let mut child = home.serve_child("probe");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut send = |v: Value| writeln!(stdin, "{v}").unwrap();
    send(
        json!({"jsonrpc":"2.0","id":1,"method":"server/discover","params":{"_meta":{
        "io.modelcontextprotocol/protocolVersion":"2025-11-25",
        "io.modelcontextprotocol/clientCapabilities":{},
        "io.modelcontextprotocol/clientInfo":{"name":"claude-code","version":"2"}}}}),
    );
    let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(v["id"], 1);
    assert_eq!(v["error"]["code"], -32601, "{v}");
    send(
        json!({"jsonrpc":"2.0","id":2,"method":"initialize","params":{
        "protocolVersion":"2025-11-25",
        "capabilities":{"experimental":{"claude/channel":{}}},
        "clientInfo":{"name":"claude-code","version":"2"}}}),
    );
    let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let r = &v["result"];
    assert_eq!(r["protocolVersion"], "2025-11-25");
    assert_eq!(r["serverInfo"]["name"], "claude-peers");
    assert_eq!(
        r["capabilities"]["experimental"]["claude/channel"],
        json!({})
    );
    assert!(r["capabilities"]["tools"].is_object());
    let instructions = r["instructions"].as_str().unwrap();
    for must in [
        "probe",
        "send_message",
        "SendMessage",
        "in_reply_to",
        "message_id",
        "untrusted",
    ] {
        assert!(instructions.contains(must), "instructions lack {must:?}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success(), "stdin closed: clean exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn tools_have_input_and_output_schemas() {
    let home = Home::new();
    let s = home.session("schemas", true).await;
    let tools = s.service().list_all_tools().await.unwrap();
    let mut names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "broadcast",
            "check_messages",
            "list_peers",
            "list_sessions",
            "send_message",
            "set_summary",
            "whoami"
        ]
    );
    for t in &tools {
        assert!(t.output_schema.is_some(), "{} has no output schema", t.name);
        assert_eq!(t.input_schema["type"], "object", "{}", t.name);
        assert!(t.description.as_ref().is_some_and(|d| !d.is_empty()));
    }
    let send = tools.iter().find(|t| t.name == "send_message").unwrap();
    let props = send.input_schema["properties"].as_object().unwrap();
    for p in ["to", "to_id", "message", "in_reply_to"] {
        assert!(props.contains_key(p), "send_message lacks {p}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sessions_exchange_a_message_and_a_threaded_reply() {
    let home = Home::new();
    let mut a = home.session("alice", true).await;
    let mut b = home.session("bob", true).await;
    assert_eq!(a.whoami_when_ready().await["name"], "alice");
    assert_eq!(b.whoami_when_ready().await["name"], "bob");
    a.ok("set_summary", json!({"summary": "fixing the login bug"}))
        .await;

    let sent = a
        .ok(
            "send_message",
            json!({"to": "bob", "message": "what are you editing?"}),
        )
        .await;
    let id = sent["message_id"].as_str().unwrap().to_string();
    assert_eq!(sent["recipients"][0]["name"], "bob");
    let ev = b.next_event().await;
    assert_eq!(ev["content"], "what are you editing?");
    let meta = ev["meta"].as_object().unwrap();
    assert_eq!(meta["from"], "alice");
    assert_eq!(meta["message_id"], id.as_str());
    assert_eq!(meta["reply_tool"], "send_message");
    assert_eq!(meta["from_summary"], "fixing the login bug");
    assert_eq!(meta["from_cwd"], home.dir.path().display().to_string());
    assert!(meta["sent_at"].as_str().unwrap().ends_with('Z'));
    assert!(!meta.contains_key("in_reply_to"));
    for (k, v) in meta {
        assert!(
            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "meta key {k}"
        );
        assert!(v.is_string(), "meta {k} is not a string");
    }

    // Reply with the other spelling of the recipient argument.
    let reply = b
        .ok(
            "send_message",
            json!({"to_id": "alice", "message": "auth.rs", "in_reply_to": id}),
        )
        .await;
    let ev = a.next_event().await;
    assert_eq!(ev["content"], "auth.rs");
    assert_eq!(ev["meta"]["in_reply_to"], id.as_str());
    assert_eq!(ev["meta"]["message_id"], reply["message_id"]);
    // A channel event cannot be confirmed: the sender is told pushed, never delivered.
    assert_eq!(reply["recipients"][0]["state"], "pushed");
    a.no_event(Duration::from_millis(200)).await;
    b.no_event(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repo_scope_spans_worktrees() {
    let home = Home::new();
    let repo = home.dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str], dir: &Path| {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"], &repo);
    git(&["commit", "-q", "--allow-empty", "-m", "init"], &repo);
    let wt = home.dir.path().join("wt");
    git(
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "feature",
            wt.to_str().unwrap(),
        ],
        &repo,
    );
    let elsewhere = home.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();

    let main = home.session_in("main", true, &repo, &[]).await;
    let side = home.session_in("side", true, &wt, &[]).await;
    let other = home.session_in("other", true, &elsewhere, &[]).await;
    for s in [&main, &side, &other] {
        s.whoami_when_ready().await;
    }
    let me = main.ok("whoami", json!({})).await;
    assert_eq!(me["branch"], "main");
    // The default summary comes from local git.
    assert_eq!(me["summary"], "repo on main; recent commits: init");
    main.ok("set_summary", json!({"summary": "reviewing"}))
        .await;
    assert_eq!(main.ok("whoami", json!({})).await["summary"], "reviewing");
    let peers = main.ok("list_peers", json!({"scope": "repo"})).await;
    let names: Vec<_> = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, [json!("side")]);
    assert_eq!(peers["peers"][0]["branch"], "feature");
    // The text the model reads is a line per peer, not the JSON again.
    let r = main.call("list_peers", json!({"scope": "repo"})).await;
    let text = text_of(&r);
    assert!(
        text.starts_with("1 other session:\n- side (online) in ") && text.contains(" on feature"),
        "{text}"
    );
    let all = main.ok("list_peers", json!({})).await;
    assert_eq!(all["peers"].as_array().unwrap().len(), 2);
    let sessions = other.ok("list_sessions", json!({})).await;
    assert_eq!(sessions["peers"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_channel_capability_mail_waits_for_check_messages() {
    let home = Home::new();
    let a = home.session("alice", true).await;
    let mut b = home.session("bob", false).await;
    assert_eq!(b.whoami_when_ready().await["delivery"], "poll");
    a.whoami_when_ready().await;
    let sent = a
        .ok("send_message", json!({"to": "bob", "message": "ping"}))
        .await;
    assert_eq!(sent["recipients"][0]["state"], "queued");
    b.no_event(Duration::from_millis(300)).await;

    let r = b.call("whoami", json!({})).await;
    assert!(
        text_of(&r).contains("1 unread peer message"),
        "{}",
        text_of(&r)
    );
    let got = b.ok("check_messages", json!({})).await;
    let msgs = got["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["text"], "ping");
    assert_eq!(msgs[0]["from"], "alice");
    assert_eq!(msgs[0]["message_id"], sent["message_id"]);
    let again = b.ok("check_messages", json!({})).await;
    assert_eq!(again["messages"], json!([]), "read once only");
    let r = b.call("whoami", json!({})).await;
    assert!(!text_of(&r).contains("unread"), "{}", text_of(&r));
}

#[tokio::test(flavor = "multi_thread")]
async fn push_mode_never_forces_polling() {
    let home = Home::new();
    let b = home
        .session_in(
            "bob",
            true,
            home.dir.path(),
            &[("CLAUDE_PEERS_PUSH", "never")],
        )
        .await;
    assert_eq!(b.whoami_when_ready().await["delivery"], "poll");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tool_input_is_a_clear_tool_error() {
    let home = Home::new();
    let a = home.session("alice", true).await;
    a.whoami_when_ready().await;
    let r = a
        .call("send_message", json!({"message": "to nobody"}))
        .await;
    assert_eq!(r.is_error, Some(true));
    assert!(text_of(&r).contains("needs `to`"), "{}", text_of(&r));
    let r = a.call("send_message", json!({"to": "bob"})).await;
    assert_eq!(r.is_error, Some(true));
    assert!(text_of(&r).contains("message"), "{}", text_of(&r));
    let r = a
        .call("send_message", json!({"to": "bob", "message": 42}))
        .await;
    assert_eq!(r.is_error, Some(true));
    assert!(
        text_of(&r).contains("message must be text, not 42"),
        "{}",
        text_of(&r)
    );
    let r = a.call("list_peers", json!({"scope": "galaxy"})).await;
    assert_eq!(r.is_error, Some(true));
    let r = a
        .call(
            "send_message",
            json!({"to": "nobody-here", "message": "hi"}),
        )
        .await;
    assert_eq!(r.is_error, Some(true));
    assert!(text_of(&r).contains("no peer is named"), "{}", text_of(&r));
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_killed_mid_session_loses_and_doubles_nothing() {
    let home = Home::new();
    let mut a = home.session("alice", true).await;
    let mut b = home.session("bob", true).await;
    a.whoami_when_ready().await;
    b.whoami_when_ready().await;
    pushed(&a, &mut b, "bob", "before").await;

    // kill -9 the auto-started broker.
    let pid: i32 = std::fs::read_to_string(&home.paths.lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    common::kill9(pid as u32);
    wait_for(
        || !claude_peers::platform::process_exists(pid as u32),
        "broker death",
    );

    // Tools wait for the reconnect (a new broker is started), then work as before, under
    // the same names.
    pushed(&a, &mut b, "bob", "after").await;
    assert_eq!(b.ok("whoami", json!({})).await["name"], "bob");
    pushed(&b, &mut a, "alice", "got it").await;
    b.no_event(Duration::from_millis(300)).await;
    a.no_event(Duration::from_millis(10)).await;
}

/// `from` sends `message` to `name`, whose session `to` is pushed it under the id `from`
/// was told.
async fn pushed(from: &Serve, to: &mut Serve, name: &str, message: &str) {
    let sent = from
        .ok("send_message", json!({"to": name, "message": message}))
        .await;
    let ev = to.next_event().await;
    assert_eq!(ev["content"], message);
    assert_eq!(ev["meta"]["message_id"], sent["message_id"]);
}

#[test]
fn stdin_closed_means_exit() {
    let home = Home::new();
    let mut child = home.serve_child("quitter");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(
        stdin,
        "{}",
        json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}})
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(stdin);
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve still running 1s after stdin closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a live process (not gone, not a zombie awaiting its reaper).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn parent_death_means_exit() {
    let home = Home::new();
    // A shell starts serve in the background (stdin stays open: ours), prints its pid,
    // then waits; killing the shell orphans serve.
    // (A background job's stdin is /dev/null unless redirected; fd 3 keeps ours.)
    let script = format!("exec 3<&0; {BIN} serve <&3 & echo $!; exec sleep 30");
    let mut sh = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("CLAUDE_PEERS_HOME", home.root())
        .env("CLAUDE_PEERS_PEER_CHANNEL_DIR", home.pc_dir())
        .env("CLAUDE_PEERS_NAME", "orphan")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Held open to the end: serve must notice its parent's death, not an EOF.
    let _stdin = sh.stdin.take().unwrap();
    let mut out = BufReader::new(sh.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let serve_pid: u32 = line.trim().parse().unwrap();
    wait_for(|| alive(serve_pid), "serve start");
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(serve_pid), "serve runs while its parent does");
    sh.kill().unwrap();
    sh.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while alive(serve_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "serve outlived its parent by 1s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How often the process has been switched off a CPU: every wake-up from a sleep counts.
#[cfg(target_os = "linux")]
fn context_switches(pid: u32) -> u64 {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        n += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    n
}

/// Idle sessions and an idle broker sleep until something happens: the parent process is
/// watched through a pidfd and the checkpointer waits for commits, so nothing polls, and
/// a hundred open sessions cost no CPU. (Polling did: 4 wake-ups a second per session,
/// 20 in the broker.)
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_and_broker_do_not_wake_up() {
    let home = Home::new();
    let mut a = home.session("alice", true).await;
    let b = home.session("bob", true).await;
    a.whoami_when_ready().await;
    b.whoami_when_ready().await;
    b.ok("send_message", json!({"to": "alice", "message": "hi"}))
        .await;
    a.next_event().await;
    let broker: u32 = std::fs::read_to_string(&home.paths.lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Let the last of the work settle: the ack, the checkpoint after it, and the broker's
    // first retention sweep, a second after it started.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pids = [
        ("alice's serve", a.pid),
        ("bob's serve", b.pid),
        ("the broker", broker),
    ];
    let before = pids.map(|(_, pid)| context_switches(pid));
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ((what, pid), before) in pids.into_iter().zip(before) {
        let woke = context_switches(pid).saturating_sub(before);
        assert!(woke <= 2, "{what} woke up {woke} times in 3 s of idling");
    }
}

/// Issue 11, item 5. A listing of 72 peers with long (allowed) fields is larger than a
/// frame: `serve` reads every page, stays connected, and shows each summary clipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_larger_than_a_frame_reaches_the_model_whole() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let main = home.session("main", true).await;
    main.whoami_when_ready().await;
    let long = |c: char| format!("/{}", c.to_string().repeat(3999));
    let mut peers = Vec::new();
    for i in 0..72 {
        let c = home.client().await;
        let mut r = register(&format!("p{i:02}"), &long('d'));
        r.context.git_root = Some(long('g'));
        r.context.git_common_dir = Some(long('c'));
        r.summary = Some("s".repeat(4000));
        c.call(r).await.unwrap();
        peers.push(c);
    }
    let listed = main.ok("list_peers", json!({})).await;
    let listed = listed["peers"].as_array().unwrap();
    assert_eq!(listed.len(), 72);
    for p in listed {
        let summary = p["summary"].as_str().unwrap();
        assert!(summary.len() <= 304 && summary.ends_with('…'), "{summary}");
    }
    // The same connection still answers: it was not dropped for an oversized frame.
    let me = main.ok("whoami", json!({})).await;
    assert_eq!(me["name"], "main");
    let status = home.run(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["peers_online"], 73);
}

/// Newcomer's run, issue 11: `claude-peers stop` sticks. A live session does not start
/// the broker again; it waits, asleep, and `status` says so; a tool call says why; once
/// someone who needs a broker starts one, the session comes back by itself and gets the
/// mail that waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sticks_until_someone_needs_a_broker() {
    let home = Home::new();
    // The session starts the broker, as sessions do.
    let mut a = home.session("a", true).await;
    a.whoami_when_ready().await;
    let out = home.run_ok(&["stop"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("broker stopped"),
        "{out:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !home.paths.socket.exists(),
        "a session started the broker again"
    );
    let status = home.run(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(status["stopped"], true, "{status}");
    assert_eq!(status["sessions_waiting"], 1, "{status}");
    let r = a.call("list_peers", json!({})).await;
    assert_eq!(r.is_error, Some(true));
    assert!(text_of(&r).contains("claude-peers stop"), "{}", text_of(&r));
    assert!(!home.paths.socket.exists());

    // A command that needs a broker starts one; the session reconnects and reads its mail.
    home.run_ok(&["send", "a", "back again", "--from", "cli"]);
    let ev = a.next_event().await;
    assert!(ev.to_string().contains("back again"), "{ev}");
    assert_eq!(a.ok("whoami", json!({})).await["name"], "a");
}

/// `doctor` asks each running session, over its hook socket, how it is: its name, how
/// its mail reaches the model and why, and how much waits unread. (It once hung there:
/// the session's state was locked twice in one answer.)
#[tokio::test(flavor = "multi_thread")]
async fn doctor_hears_from_each_session_its_route_and_unread_mail() {
    let home = Home::new();
    // One session: the hook socket is named by the host's pid, here the test's.
    let b = home.session("b", false).await;
    b.whoami_when_ready().await;
    home.run_ok(&["send", "b", "hello"]);
    let report = || -> Value {
        let out = home.run_ok(&["doctor", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    wait_for(
        || {
            let r = report();
            r["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "b" && s["unread"] == 1))
        },
        "doctor to show b with one unread message",
    );
    let r = report();
    let s = &r["sessions"][0];
    assert_eq!(r["sessions"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(s["route"], "poll", "{r}");
    assert!(!s["why"].as_str().unwrap().is_empty(), "{r}");
    assert_eq!(s["host_pid"], std::process::id(), "{r}");
}

mod hooks;
