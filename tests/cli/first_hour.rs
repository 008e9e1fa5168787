//! What a newcomer meets in the first hour (issue 15): each point found by trying the CLI
//! from a fresh clone, as a test that failed before its fix.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use claude_peers::protocol::{Ack, PROTOCOL_VERSION};
use serde_json::json;

use super::{json, stderr, stdout};
use crate::common::*;

/// The first verb that needs a broker starts one and says so, once, on stderr; the next
/// verb finds it running and says nothing. `status` does not count its own connection.
#[test]
fn a_verb_that_starts_the_broker_says_so() {
    let home = Home::new();
    let o = home.run_ok(&["peers"]);
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("claude-peers: started the broker (pid "),
        "{err}"
    );
    assert!(err.contains(&home.paths.log.display().to_string()), "{err}");
    assert!(stdout(&o).contains("no online peers"), "{}", stdout(&o));

    let o = home.run_ok(&["peers"]);
    assert_eq!(stderr(&o), "", "a broker already running is not news");
    let v = json(&home.run(&["status", "--json"]));
    assert_eq!(v["connections"], 0, "{v}");
    let o = home.run_ok(&["status"]);
    assert!(
        stdout(&o).contains("connections  0 besides this one"),
        "{}",
        stdout(&o)
    );
}

/// Tables show local time with its offset (`TZ` is honoured); `--json` gives RFC 3339.
#[tokio::test(flavor = "multi_thread")]
async fn times_are_local_with_their_offset_and_json_is_rfc3339() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let (_bob, _) = home.peer("bob", "/b").await;
    home.run_ok(&["send", "bob", "what time is it"]);
    let line = |tz: &str| {
        let o = home.cmd().env("TZ", tz).args(["log"]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let kolkata = line("Asia/Kolkata");
    let utc = line("UTC");
    assert!(kolkata.contains(" +05:30  cli -> bob"), "{kolkata}");
    assert!(utc.contains(" +00:00  cli -> bob"), "{utc}");
    assert_ne!(kolkata[..16], utc[..16], "the clock moves with TZ");

    let v = json(&home.run(&["log", "--json"]));
    let sent_at = v[0]["sent_at"].as_str().expect("a string");
    assert!(
        sent_at.len() >= 20 && sent_at.ends_with('Z') && sent_at.contains('T'),
        "{sent_at}"
    );
    let v = json(&home.run(&["peers", "--json"]));
    assert!(v[0]["last_seen"].as_str().unwrap().ends_with('Z'), "{v}");
}

/// `log -f` shows a message on one line, and a later state as a short line under it,
/// never the whole message twice.
#[tokio::test(flavor = "multi_thread")]
async fn log_follow_shows_each_message_once() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let (mut bob, _) = home.peer("bob", "/b").await;
    let mut follow = home
        .cmd()
        .args(["log", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    home.run_ok(&["send", "bob", "rebase on main"]);
    let d = next_delivery(&mut bob).await;
    bob.notify(Ack::delivered(vec![d.id])).unwrap();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains("cli -> bob") && first.contains("rebase on main"),
        "{first}"
    );
    // Sent as queued or pushed, then delivered: the receipt is its own short line.
    let second = lines.next().unwrap().unwrap();
    assert!(
        second.contains("↳ delivered bob \"rebase on main\"") && !second.contains("cli -> bob"),
        "{first}\n{second}"
    );
    // The next message is one line again (the receipt was not printed twice).
    home.run_ok(&["send", "bob", "second"]);
    let third = lines.next().unwrap().unwrap();
    assert!(
        third.contains("cli -> bob") && third.contains("second"),
        "{third}"
    );
    let _ = follow.kill();
    let _ = follow.wait();
}

/// Every flag has help, and `stop`'s older name is listed.
#[test]
fn every_flag_has_help_and_aliases_are_listed() {
    let home = Home::new();
    let help = stdout(&home.run_ok(&["log", "--help"]));
    for line in help.lines().filter(|l| l.trim_start().starts_with('-')) {
        let words = line.split_whitespace().count();
        // `--json  One JSON object…`: the flag, maybe its value, and words of help.
        assert!(words > 3, "no help for `{}`:\n{help}", line.trim());
    }
    for verb in ["status", "peers", "send", "doctor"] {
        let help = stdout(&home.run_ok(&[verb, "--help"]));
        let json_line = help.lines().find(|l| l.contains("--json")).unwrap();
        assert!(
            json_line.split_whitespace().count() > 2,
            "{verb}: {json_line}"
        );
    }
    let top = stdout(&home.run_ok(&["--help"]));
    assert!(
        top.contains("[aliases: kill-broker]") || top.contains("[alias: kill-broker]"),
        "{top}"
    );
    let v = stdout(&home.run_ok(&["--version"]));
    assert_eq!(
        v.trim(),
        format!(
            "claude-peers {} (broker protocol {PROTOCOL_VERSION})",
            env!("CARGO_PKG_VERSION")
        )
    );
}

/// A message too large for the wire is one clear line, and the broker keeps running.
#[test]
fn an_oversized_message_is_one_line_that_says_what_to_do() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let mut child = home
        .cmd()
        .args(["send", "bob", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let big = vec![b'a'; 2 << 20];
    std::thread::spawn(move || {
        let _ = stdin.write_all(&big);
    });
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("put the content in a file"), "{err}");
    assert!(!err.contains("WARN"), "{err}");
    home.run_ok(&["status"]);
}

/// `log -n 0` shows nothing; `--peer` with a name nobody has is a typo, said so with the
/// closest names; a name with history (the CLI's own `cli`) is not.
#[tokio::test(flavor = "multi_thread")]
async fn log_limits_and_unknown_peers() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let (_bob, _) = home.peer("bobby", "/b").await;
    home.run_ok(&["send", "bobby", "one"]);
    home.run_ok(&["send", "bobby", "two"]);
    let o = home.run_ok(&["log", "-n", "0"]);
    assert_eq!(stdout(&o), "");
    assert_eq!(stdout(&home.run_ok(&["log", "-n", "1"])).lines().count(), 1);

    let o = home.run(&["log", "--peer", "boby"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("no peer is named \"boby\"; did you mean bobby?"),
        "{err}"
    );
    assert_eq!(
        stdout(&home.run_ok(&["log", "--peer", "cli"]))
            .lines()
            .count(),
        2
    );
    let o = home.run(&["log", "--peer", "nobody", "-n", "0"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "checked even when none is asked for"
    );
}

/// `--in-reply-to` takes a message id and nothing else, at the CLI and at the broker.
#[tokio::test(flavor = "multi_thread")]
async fn in_reply_to_must_be_a_message_id() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let (_bob, _) = home.peer("bob", "/b").await;
    let o = home.run(&["send", "bob", "hi", "--in-reply-to", "not-a-uuid"]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(stderr(&o).contains("not a message id"), "{}", stderr(&o));

    let mut raw = Raw::greeted(&home.paths.socket);
    let answer = raw.call(
        &json!({"id": 2, "op": "send", "from": "ops", "to": ["bob"], "text": "hi", "in_reply_to": "msg-1"})
            .to_string(),
    );
    assert_eq!(error_code(&answer), Some("bad_request"), "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not a message id")
    );

    let sent = json(&home.run(&["send", "bob", "first", "--json"]));
    let id = sent["message_id"].as_str().unwrap();
    home.run_ok(&["send", "bob", "answer", "--in-reply-to", id]);
    let v = json(&home.run(&["log", "--json", "-n", "1"]));
    assert_eq!(v[0]["in_reply_to"], id);
}

/// A directory named in another script gives a name a person can read back.
#[tokio::test(flavor = "multi_thread")]
async fn a_directory_in_another_script_gives_a_readable_name() {
    let home = Home::new();
    let dir = home.dir.path().join("日本語");
    std::fs::create_dir(&dir).unwrap();
    let mut cmd = home.serve_cmd(None, &dir);
    cmd.env_remove("CLAUDE_PEERS_NAME");
    let serve = serve::Serve::start(cmd, false).await;
    let me = serve.whoami_when_ready().await;
    assert_eq!(me["name"], "Ri-Ben-Yu", "{me}");
}

/// `serve --name` with a name that cannot be used starts anyway, under the name made
/// valid, and says why in its instructions and with every tool result (Claude Code shows
/// a server that exits only as "connection closed").
#[tokio::test(flavor = "multi_thread")]
async fn serve_with_a_bad_name_starts_and_says_why() {
    let home = Home::new();
    let mut cmd = home.serve_cmd(None, home.dir.path());
    cmd.args(["--name", "my api"]);
    let serve = serve::Serve::start(cmd, false).await;
    let instructions = serve
        .service()
        .peer_info()
        .and_then(|i| i.instructions.clone())
        .unwrap_or_default();
    assert!(
        instructions.contains("cannot be used") && instructions.contains("goes by my-api"),
        "{instructions}"
    );
    let me = serve.whoami_when_ready().await;
    assert_eq!(me["name"], "my-api");
    for (tool, args) in [
        ("whoami", json!({})),
        ("list_peers", json!({})),
        ("check_messages", json!({})),
        ("send_message", json!({"to": "ghost", "message": "hi"})),
    ] {
        let r = serve.call(tool, args).await;
        let text = serve::text_of(&r);
        assert!(
            text.contains("my api") && text.contains("goes by my-api"),
            "{tool}: {text}"
        );
    }
}

/// A wrong tool argument is named, with what it must be, not in serde's words.
#[tokio::test(flavor = "multi_thread")]
async fn tool_errors_name_the_argument() {
    let home = Home::new();
    let serve = home.session("alice", false).await;
    serve.whoami_when_ready().await;
    for (tool, args, want) in [
        (
            "list_peers",
            json!({"scope": "galaxy"}),
            "scope must be machine, directory, repo or network, not \"galaxy\"",
        ),
        (
            "list_peers",
            json!({"include_offline": "yes"}),
            "include_offline must be true or false, not \"yes\"",
        ),
        ("send_message", json!({"to": "bob"}), "message is required"),
        (
            "send_message",
            json!({"to": "bob", "message": 5}),
            "message must be text, not 5",
        ),
        (
            "broadcast",
            json!({"message": "hi", "scope": "world"}),
            "scope must be machine",
        ),
    ] {
        let r = serve.call(tool, args.clone()).await;
        assert_eq!(r.is_error, Some(true), "{tool} {args}");
        let text = serve::text_of(&r);
        assert!(text.starts_with(want), "{tool} {args}: {text}");
        assert!(
            !text.contains("unknown variant") && !text.contains("deserialize"),
            "{text}"
        );
    }
}

/// Completions and a man page come from the same definitions as the help; the licence
/// Cargo.toml names is in the repository.
#[test]
fn completions_man_page_and_licence() {
    let home = Home::new();
    let bash = stdout(&home.run_ok(&["completions", "bash"]));
    assert!(
        bash.contains("complete -F") && bash.contains("kill-broker") && bash.contains("top"),
        "{bash}"
    );
    let zsh = stdout(&home.run_ok(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef claude-peers"), "{zsh}");
    let o = home.run(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    let man = stdout(&home.run_ok(&["man"]));
    assert!(
        man.starts_with(".ie") || man.starts_with(".TH"),
        "{}",
        &man[..200]
    );
    assert!(man.contains("claude\\-peers") && man.contains("completions"));
    let licence = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/LICENSE"))
        .expect("a LICENSE file");
    assert!(licence.starts_with("MIT License"), "{licence}");
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT\""));
}

/// `log -f --peer` for a session that has not come yet waits for it, rather than failing
/// as a typo would in plain `log`.
#[tokio::test(flavor = "multi_thread")]
async fn log_follow_waits_for_a_peer_not_yet_seen() {
    let home = Home::new();
    home.run_ok(&["peers"]);
    let mut follow = home
        .cmd()
        .args(["log", "-f", "--peer", "carol"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(follow.stderr.take().unwrap()).lines();
    let said = err.next().unwrap().unwrap();
    assert!(said.contains("no peer is named \"carol\" yet"), "{said}");
    let (_carol, _) = home.peer("carol", "/c").await;
    home.run_ok(&["send", "carol", "welcome"]);
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    assert!(
        line.contains("cli -> carol") && line.contains("welcome"),
        "{line}"
    );
    let _ = follow.kill();
    let _ = follow.wait();
}
