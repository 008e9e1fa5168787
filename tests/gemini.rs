//! The real Gemini CLI (`gemini -p`) running our MCP server against a scripted stub of the
//! Gemini API (`common/gemini.rs`): what the model is shown, end to end, and what Gemini's
//! hooks see. Skipped when `gemini` is not on PATH; `.ci/run` installs it.

mod common;

use std::time::Duration;

use common::agent::{hello_bob, mail_shown_once, write_script};
use common::gemini::{Reply, Request, homes};
use serde_json::{Value, json};

/// One `gemini -p` turn: the model lists the peers, sends bob a message, and ends; bob
/// gets the text, and each next request shows the model the tool's answer (our text
/// content, marked untrusted).
#[tokio::test(flavor = "multi_thread")]
async fn print_lists_peers_and_sends_to_bob() {
    require!("gemini");
    let (peers, _broker, api, gm) = homes("alice");
    let (turns, out) = hello_bob((&peers, &api, &gm), "hello bob, from gemini", |p| {
        gm.print(p)
    })
    .await;
    let why = || gm.diagnostics(&out);
    // Our input schema, as the model is given it.
    let decl = turns[0]
        .declaration("send_message")
        .expect("send_message offered");
    let schema = &decl["parametersJsonSchema"];
    for field in ["to", "message", "in_reply_to"] {
        assert!(schema["properties"][field].is_object(), "{decl:#}");
    }
    assert!(turns[0].offers("list_peers"), "{}", why());

    // The model is shown each tool's text content, wrapped as untrusted.
    let listed = turns[1]
        .response_of("list_peers")
        .expect("list_peers shown");
    let listed = output(listed);
    assert!(listed.starts_with("<untrusted_context>"), "{listed}");
    assert!(listed.contains("bob"), "{listed}");
    let sent = turns[2]
        .response_of("send_message")
        .expect("send_message shown");
    let sent = output(sent);
    assert!(sent.contains("Sent message "), "{sent}");
    assert!(
        sent.contains(" to bob: delivered.") || sent.contains(" to bob: pushed."),
        "{sent}"
    );

    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent it",
        "{}",
        why()
    );
}

/// The `output` of a tool's `functionResponse` (a failed call has `error` instead).
fn output(response: &Value) -> &str {
    response["output"]
        .as_str()
        .unwrap_or_else(|| panic!("not a tool's output: {response}"))
}

/// `gemini mcp list` starts our server for a health check (initialize, ping, SIGTERM) and
/// shows it connected; no peer stays registered behind it.
#[tokio::test(flavor = "multi_thread")]
async fn mcp_list_leaves_no_peer_behind() {
    require!("gemini");
    let (peers, _broker, _api, gm) = homes("alice");

    let out = gm.run(&["mcp", "list"], Duration::from_secs(60));
    let listing =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        listing
            .lines()
            .any(|l| l.contains("claude-peers") && l.contains("Connected")),
        "{}",
        gm.diagnostics(&out)
    );

    // Longer than a session waits before it registers.
    std::thread::sleep(Duration::from_secs(1));
    let all = peers.run_ok(&["peers", "--all", "--json"]);
    let all: Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(all, json!([]), "{}", gm.diagnostics(&out));
}

/// What Gemini's hooks see in `gemini -p`, and how they steer the turn: each gets the
/// session id (stdin `session_id` = `GEMINI_SESSION_ID`) and is a child of the same
/// process as our server; BeforeAgent's `additionalContext` reaches the model as
/// `<hook_context>`; AfterAgent's `{"decision":"deny","reason":…}` starts another turn
/// whose prompt is the reason.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_see_the_session_and_steer_the_turn() {
    require!("gemini");
    let (_peers, _broker, api, mut gm) = homes("alice");
    let rec = gm.mkdir("rec");
    let script = gm.dir.path().join("hook.sh");
    write_script(
        &script,
        &format!(
            r#"#!/bin/sh
# $1: the event. Records what Gemini gives a hook, then answers for the event.
d={rec}
in=$(cat)
printf '%s\n' "$in" >> "$d/$1.json"
echo "$PPID $GEMINI_SESSION_ID" >> "$d/$1.env"
case "$1:$in" in
  BeforeAgent:*) echo '{{"hookSpecificOutput":{{"additionalContext":"mail from bob: hi"}}}}' ;;
  AfterAgent:*'"stop_hook_active":false'*) echo '{{"decision":"deny","reason":"You have mail: call check_messages."}}' ;;
esac
"#,
            rec = rec.display()
        ),
    );
    for event in ["SessionStart", "BeforeAgent", "AfterAgent"] {
        gm.hook(event, &format!("{} {event}", script.display()));
    }
    // Our server, started by a shell that notes its parent and then becomes it.
    gm.server_command(
        "/bin/sh",
        &[
            "-c",
            &format!(
                "echo $PPID >> {}/serve.ppid; exec {} serve",
                rec.display(),
                common::BIN
            ),
        ],
    );
    api.push(Reply::text("first answer"));

    let out = tokio::task::block_in_place(|| gm.print("Anything new?"));
    let why = || gm.diagnostics(&out);
    assert!(out.status.success(), "{}", why());
    let read = |f: &str| std::fs::read_to_string(rec.join(f)).unwrap_or_default();
    let inputs = |event: &str| -> Vec<Value> {
        read(&format!("{event}.json"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    // SessionStart once; BeforeAgent and AfterAgent for the turn and for the one the
    // deny started.
    let (start, before, after) = (
        inputs("SessionStart"),
        inputs("BeforeAgent"),
        inputs("AfterAgent"),
    );
    assert_eq!(
        (start.len(), before.len(), after.len()),
        (1, 2, 2),
        "{}",
        why()
    );
    let sid = start[0]["session_id"].as_str().unwrap().to_string();
    let project = gm.project.to_str().unwrap();
    for (input, event) in [
        (&start[0], "SessionStart"),
        (&before[0], "BeforeAgent"),
        (&after[0], "AfterAgent"),
    ] {
        assert_eq!(input["hook_event_name"], event, "{input}");
        assert_eq!(input["session_id"], sid.as_str(), "{input}");
        assert_eq!(input["cwd"], project, "{input}");
        assert!(
            input["transcript_path"]
                .as_str()
                .unwrap()
                .contains(&sid[..8]),
            "{input}"
        );
        assert!(input["timestamp"].is_string(), "{input}");
    }
    assert_eq!(start[0]["source"], "startup");
    assert_eq!(before[0]["prompt"], "Anything new?");
    assert_eq!(before[1]["prompt"], "You have mail: call check_messages.");
    assert_eq!(
        (&after[0]["stop_hook_active"], &after[1]["stop_hook_active"]),
        (&json!(false), &json!(true))
    );
    assert_eq!(after[0]["prompt_response"], "first answer");

    // Every hook runs with GEMINI_SESSION_ID and as a child of the process that runs our
    // server (serve gets no session id: not in its environment, not in `initialize`).
    let serve_parent = read("serve.ppid");
    let serve_parent = serve_parent
        .lines()
        .next()
        .expect("serve started")
        .to_string();
    for event in ["SessionStart", "BeforeAgent", "AfterAgent"] {
        for line in read(&format!("{event}.env")).lines() {
            assert_eq!(line, format!("{serve_parent} {sid}"), "{event}");
        }
    }

    // The model saw the context, then the reason as the next prompt (with the context
    // again), and both answers were printed.
    let turns = api.turns();
    assert_eq!(turns.len(), 2, "{}", why());
    let context = "<hook_context>mail from bob: hi</hook_context>";
    assert!(turns[0].last_user_text().contains(context), "{}", why());
    let second = turns[1].last_user_text();
    assert!(
        second.contains("You have mail: call check_messages."),
        "{second}"
    );
    assert!(second.contains(context), "{second}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("first answer") && stdout.contains("ok"),
        "{}",
        why()
    );
}

/// Mail to a Gemini CLI session reaches its model through what `claude-peers setup
/// gemini` writes, exactly once (Gemini shows the model no MCP notifications): as context
/// before the next turn (BeforeAgent), or, when it arrives during one, from the AfterAgent
/// hook as the reason another turn follows; the next AfterAgent, finding none, lets it end.
#[tokio::test(flavor = "multi_thread")]
async fn mail_reaches_the_gemini_model_through_the_setup_hooks_once() {
    require!("gemini");
    let (peers, _broker, api, mut gm) = homes("alice");
    // The user's own setup over the harness's settings: our server entry is replaced by
    // setup's (trusted, named after its directory), and the hooks are added.
    gm.setup(&peers, "gemini");

    let whoami = |r: &Request| r.response_of("whoami").map(|r| output(r).to_string());
    mail_shown_once((&peers, &api, &gm), |p| gm.print(p), whoami).await;
}
