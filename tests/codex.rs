//! The real OpenAI Codex CLI (`codex exec`) running our MCP server against a scripted stub
//! of the Responses API (`common/codex.rs`): what the model is shown, end to end. Skipped
//! when `codex` is not on PATH; `.ci/run` installs it.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::agent::{hello_bob, mail_shown_once, write_script};
use common::codex::{NAMESPACE, REFUSED, Reply, Request, homes};
use serde_json::{Value, json};

/// One `codex exec` turn: the model lists the peers, sends bob a message, and ends; bob
/// gets the text, and each next request shows the model the tool's answer.
#[tokio::test(flavor = "multi_thread")]
async fn exec_lists_peers_and_sends_to_bob() {
    require!("codex");
    let (peers, _broker, api, cx) = homes("alice");
    let (turns, out) =
        hello_bob((&peers, &api, &cx), "hello bob, from codex", |p| cx.exec(p)).await;
    let why = || cx.diagnostics(&out);
    for tool in ["list_peers", "send_message"] {
        assert!(turns[0].offers(tool), "{tool} not offered\n{}", why());
    }

    // The model is shown each tool's text, not its record: Codex would show the record
    // (`structuredContent`) if it got one.
    let listed = turns[1].result_of("list_peers").expect("list_peers shown");
    let listed = listed.answer();
    assert!(listed.starts_with("1 other session:"), "{listed}");
    assert!(listed.contains("\n- bob (online) in /work/bob"), "{listed}");

    let sent = turns[2]
        .result_of("send_message")
        .expect("send_message shown");
    let sent = sent.answer();
    assert!(sent.starts_with("Sent message "), "{sent}");
    assert!(
        sent.ends_with(" to bob: delivered.") || sent.ends_with(" to bob: pushed."),
        "{sent}"
    );

    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent it",
        "{}",
        why()
    );
}

/// Every tool we offer is called without an approval prompt: `codex exec` (approval policy
/// "never") refuses a tool unless its annotations say it is read-only, or not destructive
/// and not open-world. The list of tools is checked too, so a new one is called here.
#[tokio::test(flavor = "multi_thread")]
async fn no_tool_is_refused_for_approval() {
    require!("codex");
    let (peers, _broker, api, cx) = homes("alice");
    let (_bob, _) = peers.peer("bob", "/work/bob").await;
    let calls = [
        ("whoami", json!({})),
        ("list_peers", json!({ "scope": "machine" })),
        ("list_sessions", json!({})),
        ("set_summary", json!({ "summary": "trying codex" })),
        ("check_messages", json!({})),
        ("send_message", json!({ "to": "bob", "message": "one" })),
        ("broadcast", json!({ "message": "two", "scope": "machine" })),
    ];
    api.push_all(calls.iter().map(|(t, a)| Reply::tool(t, a.clone())));
    api.push(Reply::text("done"));

    let out = tokio::task::block_in_place(|| cx.exec("Try every claude-peers tool."));
    let why = || cx.diagnostics(&out);

    let turns = api.turns();
    assert_eq!(turns.len(), calls.len() + 1, "{}", why());
    let offered: BTreeSet<String> = turns[0].tools_in(NAMESPACE).into_iter().collect();
    let called: BTreeSet<String> = calls.iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(
        offered, called,
        "the tools offered are not the ones this test calls"
    );

    let last = turns.last().unwrap();
    for (tool, _) in &calls {
        let r = last
            .result_of(tool)
            .unwrap_or_else(|| panic!("{tool} not shown\n{}", why()));
        assert!(
            !r.output.contains(REFUSED),
            "{tool} was refused: {}",
            r.output
        );
        assert!(
            r.json().is_none() && !r.answer().trim().is_empty(),
            "{tool} was not shown as text: {}",
            r.output
        );
    }
}

/// What a hook and our server can both know, and how hooks reach the model in `codex exec`:
/// - hooks get `session_id` (= the `session-id` header of model calls, and the
///   `sessionId` Codex puts in each tools/call's `_meta`), `cwd`, `hook_event_name`, …;
/// - a hook's parent is the Codex process, which is also `serve`'s parent;
/// - `UserPromptSubmit` stdout `hookSpecificOutput.additionalContext` becomes a developer
///   message after the prompt; `Stop` `{"decision":"block","reason":…}` continues the turn
///   with the reason as a user message `<hook_prompt …>reason</hook_prompt>`.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_and_serve_share_the_codex_process() {
    require!("codex");
    let (peers, _broker, api, mut cx) = homes("alice");
    let rec = cx.mkdir("rec");
    let r = rec.display();
    let sockets = peers.root().join("hooks");
    let sockets = sockets.display();
    // A serve wrapper that records its environment and parent, then becomes serve.
    cx.server_command(
        "/bin/sh",
        &[
            "-c",
            &format!("env > {r}/serve.env; echo $PPID > {r}/serve.ppid; exec \"$0\" serve"),
            common::BIN,
        ],
    );
    let hook = |event: &str, answer: &str| {
        let script = rec.join(format!("{event}.sh"));
        write_script(
            &script,
            &format!(
                "#!/bin/sh\ncat > {r}/{event}.json\necho $PPID > {r}/{event}.ppid\n\
                 ls {sockets} > {r}/{event}.ls\n\
                 [ -e {r}/{event}.done ] && exit 0\ntouch {r}/{event}.done\nprintf '%s' '{answer}'\n"
            ),
        );
        json!([{ "hooks": [{ "type": "command", "command": script }] }])
    };
    let context = json!({ "hookSpecificOutput": {
        "hookEventName": "UserPromptSubmit", "additionalContext": "context from the hook" } });
    let block = json!({ "decision": "block", "reason": "mail waits: call check_messages" });
    cx.hooks(json!({ "hooks": {
        "UserPromptSubmit": hook("UserPromptSubmit", &context.to_string()),
        "Stop": hook("Stop", &block.to_string()),
    } }));
    api.push_all([
        Reply::tool("whoami", json!({})),
        Reply::text("first answer"),
        Reply::text("after the stop hook"),
    ]);

    let out = tokio::task::block_in_place(|| cx.exec("Hello hooks."));
    let why = || cx.diagnostics(&out);
    let read = |f: &str| {
        std::fs::read_to_string(rec.join(f)).unwrap_or_else(|e| panic!("{f}: {e}\n{}", why()))
    };
    let json_of = |f: &str| serde_json::from_str::<Value>(&read(f)).unwrap();

    let turns = api.turns();
    assert_eq!(turns.len(), 3, "{}", why());
    let prompt = json_of("UserPromptSubmit.json");
    assert_eq!(prompt["hook_event_name"], "UserPromptSubmit", "{prompt}");
    assert_eq!(prompt["prompt"], "Hello hooks.", "{prompt}");
    assert_eq!(
        Path::new(prompt["cwd"].as_str().unwrap()),
        cx.project.as_path()
    );
    assert_eq!(
        prompt["session_id"].as_str(),
        turns[0].header("session-id"),
        "{prompt}"
    );
    let dev = turns[0].messages("developer");
    assert_eq!(
        dev.last().map(String::as_str),
        Some("context from the hook"),
        "{}",
        why()
    );

    let stop = json_of("Stop.json");
    assert_eq!(stop["session_id"], prompt["session_id"], "{stop}");
    // The whoami call told serve the session (`_meta.sessionId`): its hooks find it by that.
    let session = stop["session_id"].as_str().unwrap();
    let listed = read("Stop.ls");
    assert!(
        listed
            .lines()
            .any(|l| l == format!("session-{session}.sock")),
        "{listed}"
    );
    assert_eq!(
        stop["stop_hook_active"], true,
        "the last Stop runs after a block: {stop}"
    );
    let user = turns[2].messages("user");
    let last = user.last().unwrap();
    assert!(
        last.starts_with("<hook_prompt")
            && last.ends_with(">mail waits: call check_messages</hook_prompt>"),
        "{last}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "after the stop hook",
        "{}",
        why()
    );

    // Hooks and serve are both children of the Codex process.
    assert_eq!(
        read("serve.ppid"),
        read("UserPromptSubmit.ppid"),
        "{}",
        why()
    );
    assert_eq!(read("serve.ppid"), read("Stop.ppid"));
    // serve gets its configured variables, and none of the others Codex has.
    let env = read("serve.env");
    assert!(env.lines().any(|l| l == "CLAUDE_PEERS_NAME=alice"), "{env}");
    assert!(!env.contains("OPENAI_API_KEY"), "{env}");
}

/// Mail to a Codex session reaches its model through what `claude-peers setup codex`
/// writes, exactly once (Codex shows the model no MCP notifications): as context of the
/// next prompt, or, when it arrives during a turn, from the Stop hook as the reason the
/// turn goes on; the next stop, finding none, lets the turn end.
#[tokio::test(flavor = "multi_thread")]
async fn mail_reaches_the_codex_model_through_the_setup_hooks_once() {
    require!("codex");
    let (peers, _broker, api, mut cx) = homes("alice");
    // The user's own setup, on top of the harness's config: our server entry is replaced
    // by setup's, which names the session after its directory.
    cx.setup(&peers, "codex");
    let hooks: Value =
        serde_json::from_slice(&std::fs::read(cx.home.join(".codex/hooks.json")).unwrap()).unwrap();
    cx.hooks(hooks);

    let whoami = |r: &Request| r.result_of("whoami").map(|r| r.answer().to_string());
    let (turn, out) = mail_shown_once((&peers, &api, &cx), |p| cx.exec(p), whoami).await;
    // Shown by whichever hook came first after the mail reached the session: the prompt's
    // (as context, when the session registered before Codex sent the prompt) or the
    // stop's (as the reason the turn goes on).
    let last = serde_json::to_string(turn.last().unwrap().input()).unwrap();
    let by_stop = last.contains("hook_prompt");
    let n = if by_stop { 3 } else { 2 };
    assert_eq!(turn.len(), n, "{}", cx.diagnostics(&out));
}
