//! The hooks and serve: mail lent to a hook is shown once, given back if the hook dies,
//! and does not wake a session that bypasses permissions.

use super::*;

/// Runs `claude-peers hook <kind>` as a child of this process, which is also the parent
/// (the "host") of the test's `serve`, with `event` as the hook's stdin.
fn hook(home: &Home, kind: &str, event: &str) -> std::process::Child {
    let mut child = home
        .cmd()
        .args(["hook", kind])
        // Not the pid of a Claude Code that may run these tests.
        .env_remove("CLAUDE_PID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(event.as_bytes()).unwrap();
    drop(stdin);
    child
}

/// Without an inbox or channel, hooks show the mail: `hook prompt` as the prompt's
/// additional context, once; `hook wait` sleeps until mail arrives and exits 2 with it.
/// What a hook showed is delivered and is not in check_messages.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_show_unread_mail_once_and_wake_on_new_mail() {
    let home = Home::new();
    let _b = home.broker(&["--ack-wait", "5s"]);
    let (alice, _) = home.peer("alice", "/work/alice").await;
    let bob = home.session("bob", false).await;
    assert_eq!(bob.whoami_when_ready().await["delivery"], "poll");

    let sent = alice.call(send("bob", "read me in a hook")).await.unwrap();
    let event = r#"{"hook_event_name":"UserPromptSubmit","prompt":"hi"}"#;
    let out = hook(&home, "prompt", event).wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hookSpecificOutput"]["hookEventName"], "UserPromptSubmit");
    let context = v["hookSpecificOutput"]["additionalContext"]
        .as_str()
        .unwrap();
    assert!(context.contains("read me in a hook"), "{context}");
    assert!(
        context.contains(&format!("message-id=\"{}\"", sent.message_id)),
        "{context}"
    );
    assert!(context.contains("from=\"alice\""), "{context}");

    // Shown once: not by the next prompt, not by check_messages; the log says delivered.
    let again = hook(&home, "prompt", event).wait_with_output().unwrap();
    assert!(
        again.status.success() && again.stdout.is_empty(),
        "{again:?}"
    );
    let got = bob.ok("check_messages", json!({})).await;
    assert_eq!(got["messages"], json!([]));
    let log = alice
        .call(claude_peers::protocol::LogQuery::default())
        .await
        .unwrap();
    assert_eq!(
        log.messages[0].state,
        claude_peers::protocol::DeliveryState::Delivered
    );

    // `hook wait` sleeps until mail comes, then wakes the session with it. The host
    // starts one after every turn and leaves the older ones: a newer one replaces them.
    let mut older = hook(&home, "wait", r#"{"hook_event_name":"Stop"}"#);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        older.try_wait().unwrap().is_none(),
        "wait returned with no mail"
    );
    let mut waiting = hook(&home, "wait", r#"{"hook_event_name":"Stop"}"#);
    let replaced = older.wait_with_output().unwrap();
    assert_eq!(replaced.status.code(), Some(0), "{replaced:?}");
    assert!(replaced.stderr.is_empty(), "{replaced:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "wait returned with no mail"
    );
    let sent = alice.call(send("bob", "wake up, bob")).await.unwrap();
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(shown.contains("wake up, bob"), "{shown}");
    assert!(shown.contains(&sent.message_id), "{shown}");
    let got = bob.ok("check_messages", json!({})).await;
    assert_eq!(got["messages"], json!([]));
}

/// A hook that dies before it showed the mail gives it back: nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn mail_lent_to_a_hook_that_dies_is_given_back() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (alice, _) = home.peer("alice", "/work/alice").await;
    let bob = home.session("bob", false).await;
    bob.whoami_when_ready().await;
    let mut waiting = hook(&home, "wait", "{}");
    std::thread::sleep(Duration::from_millis(200));
    waiting.kill().unwrap();
    waiting.wait().unwrap();
    alice.call(send("bob", "still here")).await.unwrap();
    // A raw hook that takes the mail and leaves without `shown`.
    let socket = home
        .paths
        .runtime_dir
        .join("hooks")
        .join(format!("{}.sock", std::process::id()));
    {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"op\":\"take\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("still here"), "{line}");
    }
    let got = bob.ok("check_messages", json!({})).await;
    let msgs = got["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{got}");
    assert_eq!(msgs[0]["text"], "still here");
}

/// A session that bypasses permissions is never woken by mail through `hook wait`
/// (that would get around the hold Claude Code puts on other sessions' mail); `hook
/// prompt` still shows it when its user prompts.
#[tokio::test(flavor = "multi_thread")]
async fn a_bypass_session_is_not_woken_by_hook_wait() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (alice, _) = home.peer("alice", "/work/alice").await;
    // `serve`'s host is this test process; its settings say bypass.
    let claude_dir = home.dir.path().join("claude-config");
    std::fs::create_dir_all(&claude_dir).unwrap();
    std::fs::write(
        claude_dir.join("settings.json"),
        r#"{"permissions":{"defaultMode":"bypassPermissions"}}"#,
    )
    .unwrap();
    let dir = claude_dir.to_str().unwrap().to_string();
    let bob = home
        .session_in(
            "bob",
            false,
            home.dir.path(),
            &[("CLAUDE_CONFIG_DIR", &dir)],
        )
        .await;
    bob.whoami_when_ready().await;
    let mut waiting = hook(&home, "wait", "{}");
    alice.call(send("bob", "do not wake")).await.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "a bypass session was woken by mail"
    );
    let out = hook(&home, "prompt", "{}").wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let context = v["hookSpecificOutput"]["additionalContext"]
        .as_str()
        .unwrap();
    assert!(context.contains("do not wake"), "{context}");
    waiting.kill().unwrap();
    let _ = waiting.wait();
}
