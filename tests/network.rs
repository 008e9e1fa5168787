//! Brokers on two "machines" (two homes with their own host names) bridged through a real
//! `nats-server` with JetStream, started by each test on a free loopback port. Skipped
//! when `nats-server` is not on PATH; `.ci/run` installs it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use claude_peers::broker::bridge::{NetworkOptions, Relayed, user_name};
use common::nats::{Nats, free_port};
use common::serve::Serve;
use common::*;
use serde_json::{Value, json};

/// A session `name` on machine `host` of `home`, its broker bridged through `url`.
async fn session_on(home: &Home, host: &str, name: &str, url: &str) -> Serve {
    session_with(home, host, name, url, &[]).await
}

/// [`session_on`], with more of the broker's environment.
async fn session_with(
    home: &Home,
    host: &str,
    name: &str,
    url: &str,
    more: &[(&str, &str)],
) -> Serve {
    let mut env = vec![
        ("CLAUDE_PEERS_NATS_URL", url),
        ("CLAUDE_PEERS_HOST", host),
        ("CLAUDE_PEERS_SEND_RATE", "0"),
    ];
    env.extend_from_slice(more);
    let s = home.session_in(name, false, home.dir.path(), &env).await;
    s.whoami_when_ready().await;
    s
}

/// Waits until `home`'s broker is connected to NATS.
fn connected(home: &Home) {
    wait_for(
        || {
            let out = home.run_ok(&["status", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            v["network"]["connected"] == true
        },
        "the broker to connect to NATS",
    );
}

/// Two machines bridged through a fresh NATS server (fsyncing every write if `synced`):
/// alice on hosta, bob on hostb, both brokers connected.
struct TwoMachines {
    _js: tempfile::TempDir,
    nats: Nats,
    a: Home,
    b: Home,
    alice: Serve,
    bob: Serve,
}

async fn two_machines(synced: bool) -> TwoMachines {
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start_as(js.path(), free_port(), synced);
    let (a, b) = (Home::new(), Home::new());
    let alice = session_on(&a, "hosta", "alice", &nats.url()).await;
    let bob = session_on(&b, "hostb", "bob", &nats.url()).await;
    connected(&a);
    connected(&b);
    TwoMachines {
        _js: js,
        nats,
        a,
        b,
        alice,
        bob,
    }
}

/// The broker settings of machine `host` as far as NATS names go (its subjects, the
/// stream), for tests that publish or look at the stream themselves.
fn names_of(host: &str) -> NetworkOptions {
    NetworkOptions {
        url: String::new(),
        creds: None,
        tls: Default::default(),
        replicas: 1,
        host: host.into(),
        user: user_name(),
        instance: String::new(),
    }
}

/// `check_messages` of `s` until it returns some (30 s at most: a broker that found NATS
/// down tries again after up to 5 s, and CI runs every test at once on 2 cores).
async fn mail_of(s: &Serve) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = s.ok("check_messages", json!({})).await;
        let messages = got["messages"].as_array().cloned().unwrap_or_default();
        if !messages.is_empty() {
            return messages;
        }
        assert!(Instant::now() < deadline, "no mail came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state `home`'s history shows for message `id` to `to`, once it is `want` (15 s).
fn wait_for_state(home: &Home, id: &str, to: &str, want: &str) {
    wait_for(
        || {
            let out = home.run_ok(&["log", "--json", "-n", "50"]);
            let log: Value = serde_json::from_slice(&out.stdout).unwrap();
            log.as_array()
                .unwrap()
                .iter()
                .any(|e| e["id"] == id && e["to"] == to && e["state"] == want)
        },
        &format!("{to}'s copy of {id} to be {want}"),
    );
}

/// alice on host "hosta" and bob on "hostb" message each other by `name@host` through
/// NATS; the reply threads; the sender sees `relaying`, then `delivered` once bob's
/// session has it.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_on_two_machines_message_each_other() {
    require!("nats-server");
    let TwoMachines {
        _js,
        nats: _nats,
        a,
        b,
        alice,
        bob,
    } = two_machines(false).await;

    // Each sees the other in scope network, by the name to write to.
    let listed = alice.ok("list_peers", json!({"scope": "network"})).await;
    let names = common::peer_names(&listed);
    assert_eq!(names, ["bob@hostb"], "{listed}");
    let out = b.run_ok(&["peers", "--scope", "network", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let alice_there = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "alice@hosta")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(alice_there["context"]["host"], "hosta", "{listed}");

    let sent = alice
        .ok(
            "send_message",
            json!({"to": "bob@hostb", "message": "hello from the laptop"}),
        )
        .await;
    assert_eq!(sent["recipients"][0]["state"], "relaying", "{sent}");
    let id = sent["message_id"].as_str().unwrap().to_string();
    let got = mail_of(&bob).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["from"], "alice@hosta");
    assert_eq!(got[0]["text"], "hello from the laptop");
    assert_eq!(got[0]["message_id"], id.as_str());

    let reply = bob
        .ok(
            "send_message",
            json!({"to": "alice@hosta", "message": "hello from the dev box", "in_reply_to": id}),
        )
        .await;
    assert_eq!(reply["recipients"][0]["state"], "relaying", "{reply}");
    let back = mail_of(&alice).await;
    assert_eq!(back[0]["from"], "bob@hostb");
    assert_eq!(back[0]["in_reply_to"], id.as_str());

    // bob's session acked it: alice's broker hears so.
    wait_for_state(&a, &id, "bob@hostb", "delivered");

    // hostb has no carol: alice hears that too.
    let lost = alice
        .ok(
            "send_message",
            json!({"to": "carol@hostb", "message": "hi"}),
        )
        .await;
    let lost = lost["message_id"].as_str().unwrap().to_string();
    wait_for_state(&a, &lost, "carol@hostb", "undeliverable");
    alice.close().await;
    bob.close().await;
}

/// A send to another machine is answered (and durable) while NATS is down; it goes out
/// when NATS comes up, and arrives once.
#[tokio::test(flavor = "multi_thread")]
async fn mail_waits_in_the_outbox_while_nats_is_down() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    // The port is held (nothing answers on it) until NATS takes it, so that no other test
    // is given it meanwhile.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let a = Home::new();
    let alice = session_on(&a, "hosta", "alice", &url).await;
    let sent = alice
        .ok(
            "send_message",
            json!({"to": "bob@hostb", "message": "sent while NATS was down"}),
        )
        .await;
    assert_eq!(sent["recipients"][0]["state"], "relaying", "{sent}");
    let network = |home: &Home| {
        let out = home.run_ok(&["status", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["network"].clone()
    };
    let waiting = network(&a);
    assert_eq!(waiting["connected"], false, "{waiting}");
    assert_eq!(waiting["waiting"], 1, "{waiting}");
    assert_eq!(waiting["host"], "hosta", "{waiting}");
    // This machine's mail does not wait for NATS.
    let ada = session_on(&a, "hosta", "ada", &url).await;
    alice
        .ok("send_message", json!({"to": "ada", "message": "local"}))
        .await;
    assert_eq!(mail_of(&ada).await[0]["text"], "local");
    ada.close().await;

    drop(held);
    let _nats = Nats::start(js.path(), port);
    let b = Home::new();
    let bob = session_on(&b, "hostb", "bob", &url).await;
    let got = mail_of(&bob).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["text"], "sent while NATS was down");
    wait_for(
        || {
            let n = network(&a);
            n["connected"] == true && n["waiting"] == 0
        },
        "alice's broker to have relayed everything",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = bob.ok("check_messages", json!({})).await;
    assert_eq!(again["messages"], json!([]), "{again}");
    alice.close().await;
    bob.close().await;
}

/// The same mail relayed twice (past JetStream's duplicate window, or by a broker that
/// died between its publish and its outbox update) is stored and shown once.
#[tokio::test(flavor = "multi_thread")]
async fn mail_relayed_twice_is_stored_once() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start(js.path(), free_port());
    let b = Home::new();
    let bob = session_on(&b, "hostb", "bob", &nats.url()).await;
    connected(&b);

    let opts = names_of("hosta");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jet = async_nats::jetstream::new(client);
    let mail = Relayed::Mail {
        id: uuid::Uuid::now_v7().to_string(),
        from: "alice@hosta".into(),
        // A name twice is one recipient (it used to fail the batch, again and again).
        to: vec!["bob".into(), "bob".into()],
        text: "only once".into(),
        in_reply_to: None,
        sent_at: 1,
    };
    for copy in ["first", "second"] {
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&mail).unwrap().into())
            .message_id(copy);
        jet.send_publish(opts.mail_subject("hostb"), msg)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let got = mail_of(&bob).await;
    assert_eq!(got.len(), 1, "{got:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = bob.ok("check_messages", json!({})).await;
    assert_eq!(again["messages"], json!([]), "{again}");
    // What was taken is gone from the stream (a work queue): NATS keeps no old mail.
    let mut stream = jet.get_stream(opts.stream_name()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = stream.info().await.unwrap();
        // bob's two receipts for hosta (queued, then delivered) stay: no broker of
        // hosta reads them here. The two copies of the mail go.
        let left = info.state.messages;
        if left <= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} messages left in the stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bob.close().await;
}

/// Receipts may come twice or out of order (redelivered after a lost ack): an older one
/// never takes a message's state back.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_receipt_never_takes_the_state_back() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start(js.path(), free_port());
    let a = Home::new();
    let alice = session_on(&a, "hosta", "alice", &nats.url()).await;
    connected(&a);
    let sent = alice
        .ok("send_message", json!({"to": "bob@hostb", "message": "hi"}))
        .await;
    let id = sent["message_id"].as_str().unwrap().to_string();
    let opts = names_of("hostb");
    let jet = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let receipts = [
        (claude_peers::protocol::DeliveryState::Delivered, 2_000),
        (claude_peers::protocol::DeliveryState::Queued, 1_000),
    ];
    for (state, at) in receipts {
        let receipt = Relayed::Receipt {
            id: id.clone(),
            recipient: "bob@hostb".into(),
            state,
            at: Some(at),
        };
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&receipt).unwrap().into())
            .message_id(format!("r{at}"));
        jet.send_publish(opts.receipt_subject("hosta"), msg)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for_state(&a, &id, "bob@hostb", "delivered");
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for_state(&a, &id, "bob@hostb", "delivered");
    alice.close().await;
}

/// Mail to a machine whose broker is down waits in JetStream for its durable consumer:
/// when that broker is back, its session gets it.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_that_was_down_catches_up() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start(js.path(), free_port());
    let (a, b) = (Home::new(), Home::new());
    let alice = session_on(&a, "hosta", "alice", &nats.url()).await;
    let bob = session_on(&b, "hostb", "bob", &nats.url()).await;
    bob.close().await;
    b.run_ok(&["stop"]);

    for i in 0..3 {
        let text = format!("while you were away {i}");
        alice
            .ok("send_message", json!({"to": "bob@hostb", "message": text}))
            .await;
    }
    let bob = session_on(&b, "hostb", "bob", &nats.url()).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(mail_of(&bob).await);
    }
    let texts: Vec<&str> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "while you were away 0",
            "while you were away 1",
            "while you were away 2"
        ]
    );
    alice.close().await;
    bob.close().await;
}

/// Without a NATS URL, scope network says how to bridge machines instead of pretending.
#[test]
fn scope_network_without_a_bridge_says_how_to_make_one() {
    let home = Home::new();
    let out = home.run(&["peers", "--scope", "network"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CLAUDE_PEERS_NATS_URL"), "{err}");
    home.run(&["stop"]);
}

/// The ids of the messages from `sender@hosta` to bob in `home`'s history. `env` is added
/// to the command (a broker it starts is then bridged as the machine's own).
fn arrived(home: &Home, env: &[(&str, &str)]) -> Vec<String> {
    let out = home
        .cmd()
        .args(["log", "--json", "-n", "1000", "--peer", "bob"])
        .envs(env.iter().copied())
        .output();
    let log = out
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    log.iter()
        .filter(|e| e["from"] == "sender@hosta")
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits (60 s at most) until every message of `ids` is in `home`'s history, and checks
/// each is there once.
async fn all_arrive_once(
    home: &Home,
    ids: &std::collections::BTreeSet<String>,
    env: &[(&str, &str)],
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = arrived(home, env);
        if got.len() >= ids.len() {
            let unique: std::collections::BTreeSet<String> = got.iter().cloned().collect();
            assert_eq!(got.len(), ids.len(), "some arrived twice");
            assert_eq!(&unique, ids, "not the messages sent");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} arrived",
            got.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kill -9` of the NATS server (fsyncing every write) in the middle of 1,000 sends to
/// another machine, started again a moment later: every answered send arrives there, each
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn nats_killed_mid_stream_loses_nothing() {
    require!("nats-server");
    let TwoMachines {
        _js,
        mut nats,
        a,
        b,
        alice,
        bob,
    } = two_machines(true).await;
    let (sender, _) = a.peer("sender", "/work/sender").await;

    const N: usize = 1_000;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..N {
        if i == N / 3 {
            nats.kill();
        }
        if i == 2 * N / 3 {
            nats.restart();
        }
        let sent = sender
            .call(send("bob@hostb", &format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(
            sent.recipients[0].state,
            claude_peers::protocol::DeliveryState::Relaying
        );
        ids.insert(sent.message_id);
    }
    all_arrive_once(&b, &ids, &[]).await;
    alice.close().await;
    bob.close().await;
}

/// Two users' brokers on one NATS server, each user an account of its own: they see
/// nothing of each other (listing, mail), while one user's machines still do.
#[tokio::test(flavor = "multi_thread")]
async fn two_users_on_one_server_see_nothing_of_each_other() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    let accounts = r#"accounts {
  ANN: { jetstream: enabled, users: [ { user: ann, password: ann-secret } ] }
  BEA: { jetstream: enabled, users: [ { user: bea, password: bea-secret } ] }
}"#;
    let port = free_port();
    let _nats = Nats::start_with(js.path(), port, accounts);
    let ann = format!("nats://ann:ann-secret@127.0.0.1:{port}");
    let bea = format!("nats://bea:bea-secret@127.0.0.1:{port}");
    let (a, c, b) = (Home::new(), Home::new(), Home::new());
    let alice = session_on(&a, "hosta", "alice", &ann).await;
    let carol = session_on(&c, "hostc", "carol", &ann).await;
    let bob = session_on(&b, "hostb", "bob", &bea).await;
    for home in [&a, &b, &c] {
        connected(home);
    }
    // The password is in no status (nor log).
    let status = a.run_ok(&["status", "--json"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.contains("ann-secret") && status.contains("nats://ann:***@127.0.0.1"),
        "{status}"
    );

    let listed = alice.ok("list_peers", json!({"scope": "network"})).await;
    assert_eq!(common::peer_names(&listed), ["carol@hostc"], "{listed}");
    let listed = bob.ok("list_peers", json!({"scope": "network"})).await;
    assert_eq!(common::peer_names(&listed), Vec::<&str>::new(), "{listed}");

    alice
        .ok(
            "send_message",
            json!({"to": "bob@hostb", "message": "psst"}),
        )
        .await;
    alice
        .ok(
            "send_message",
            json!({"to": "carol@hostc", "message": "hi carol"}),
        )
        .await;
    let got = mail_of(&carol).await;
    assert_eq!(got[0]["text"], "hi carol");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let none = bob.ok("check_messages", json!({})).await;
    assert_eq!(none["messages"], json!([]), "{none}");
    for s in [alice, bob, carol] {
        s.close().await;
    }
}

/// A credentials file others can read is refused, saying how to fix it.
#[test]
fn credentials_readable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::new();
    let creds = home.dir.path().join("user.creds");
    std::fs::write(&creds, "not shown").unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = home
        .cmd()
        .args(["broker", "--nats-url", "nats://127.0.0.1:1", "--nats-creds"])
        .arg(&creds)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

/// The receiving broker `kill -9`ed while mail streams in (some stored and not yet acked
/// to JetStream, some not stored): started again by its session, it gets the rest, and
/// what it had stored is not stored twice. Every answered send arrives once.
#[tokio::test(flavor = "multi_thread")]
async fn the_receiving_broker_killed_mid_stream_stores_each_message_once() {
    require!("nats-server");
    let TwoMachines {
        _js,
        nats,
        a,
        b,
        alice,
        bob,
    } = two_machines(false).await;
    let (sender, _) = a.peer("sender", "/work/sender").await;
    // A broker the history's command starts (after the kill) is bridged as bob's is.
    let url = nats.url();
    let env = [
        ("CLAUDE_PEERS_NATS_URL", url.as_str()),
        ("CLAUDE_PEERS_HOST", "hostb"),
    ];

    const N: usize = 400;
    let mut ids = std::collections::BTreeSet::new();
    let mut killed = false;
    for i in 0..N {
        let sent = sender
            .call(send("bob@hostb", &format!("m{i}")))
            .await
            .unwrap();
        ids.insert(sent.message_id);
        if !killed && i % 20 == 0 && arrived(&b, &env).len() >= 20 {
            let status = b.run_ok(&["status", "--json"]);
            let pid = serde_json::from_slice::<Value>(&status.stdout).unwrap()["pid"]
                .as_u64()
                .unwrap();
            kill9(pid as u32);
            killed = true;
        }
    }
    assert!(
        killed,
        "the stream ended before the broker could be killed in it"
    );
    // bob's session starts a broker again; JetStream redelivers what was not acked.
    bob.whoami_when_ready().await;
    all_arrive_once(&b, &ids, &env).await;
    alice.close().await;
    bob.close().await;
}

/// A broadcast in scope network reaches the online sessions of this machine and of every
/// machine that answers, each once; the sender hears a state for each. A host and a
/// session with dots in their names (NATS's separator) are reached as any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_broadcast_reaches_every_machine() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start(js.path(), free_port());
    let (a, b, c) = (Home::new(), Home::new(), Home::new());
    let alice = session_on(&a, "hosta", "alice", &nats.url()).await;
    let ada = session_on(&a, "hosta", "ada", &nats.url()).await;
    let bob = session_on(&b, "hostb", "bob", &nats.url()).await;
    let carol = session_on(&c, "dev.box", "carol.v2", &nats.url()).await;
    for home in [&a, &b, &c] {
        connected(home);
    }
    let sent = alice
        .ok(
            "broadcast",
            json!({"scope": "network", "message": "main is frozen"}),
        )
        .await;
    let mut to: Vec<(String, String)> = sent["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    to.sort();
    assert_eq!(
        to,
        [
            ("ada".to_string(), "queued".to_string()),
            ("bob@hostb".to_string(), "relaying".to_string()),
            ("carol.v2@dev.box".to_string(), "relaying".to_string()),
        ],
        "{sent}"
    );
    for s in [&ada, &bob, &carol] {
        let got = mail_of(s).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["text"], "main is frozen");
    }
    for s in [alice, ada, bob, carol] {
        s.close().await;
    }
}

/// Runs `openssl` with `args` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// The bridge over TLS: a NATS server with a certificate from a CA of our own, which the
/// brokers are given (`CLAUDE_PEERS_NATS_CA`); a broker not given it does not connect.
#[tokio::test(flavor = "multi_thread")]
async fn brokers_reach_nats_over_tls() {
    require!("nats-server");
    require!("openssl");
    let js = tempfile::tempdir().unwrap();
    let d = js.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=claude-peers test CA",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    let tls = format!(
        "tls {{ cert_file: \"{0}/server.pem\", key_file: \"{0}/server.key\" }}",
        d.display()
    );
    let nats = Nats::start_with(&d.join("js"), free_port(), &tls);
    let ca = d.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let url = format!("tls://127.0.0.1:{}", nats.port);

    let (a, b, c) = (Home::new(), Home::new(), Home::new());
    let more = [("CLAUDE_PEERS_NATS_CA", ca)];
    let alice = session_with(&a, "hosta", "alice", &url, &more).await;
    let bob = session_with(&b, "hostb", "bob", &url, &more).await;
    connected(&a);
    connected(&b);
    alice
        .ok(
            "send_message",
            json!({"to": "bob@hostb", "message": "over TLS"}),
        )
        .await;
    assert_eq!(mail_of(&bob).await[0]["text"], "over TLS");

    // Not given the CA, a broker does not trust the server (and says so in its log).
    let carol = session_on(&c, "hostc", "carol", &url).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = c.run_ok(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["network"]["connected"], false, "{status}");
    for s in [alice, bob, carol] {
        s.close().await;
    }
}

/// A machine that stops answering (its broker down, or NATS cut between us) is listed
/// `unreachable`, not dropped; mail sent to it meanwhile waits in JetStream and arrives
/// when it is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_out_of_reach_is_unreachable_not_gone() {
    require!("nats-server");
    let TwoMachines {
        _js,
        nats,
        a,
        b,
        alice,
        bob,
    } = two_machines(false).await;
    let listed = alice.ok("list_peers", json!({"scope": "network"})).await;
    assert_eq!(listed["peers"][0]["state"], "online", "{listed}");

    bob.close().await;
    b.run_ok(&["stop"]);
    let listed = alice.ok("list_peers", json!({"scope": "network"})).await;
    assert_eq!(listed["peers"][0]["name"], "bob@hostb", "{listed}");
    assert_eq!(listed["peers"][0]["state"], "unreachable", "{listed}");
    let out = a.run_ok(&["peers", "--scope", "network", "--json"]);
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bob_there = cli
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bob@hostb")
        .unwrap_or_else(|| panic!("{cli}"));
    assert_eq!(bob_there["unreachable"], true, "{cli}");

    alice
        .ok(
            "send_message",
            json!({"to": "bob@hostb", "message": "when you are back"}),
        )
        .await;
    let bob = session_on(&b, "hostb", "bob", &nats.url()).await;
    assert_eq!(mail_of(&bob).await[0]["text"], "when you are back");
    alice.close().await;
    bob.close().await;
}

/// A 3-node JetStream cluster (the stream kept 3 times) loses its stream leader, `kill
/// -9`ed, in the middle of 300 sends: nothing is lost, nothing doubled.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_losing_its_stream_leader_loses_nothing() {
    require!("nats-server");
    let js = tempfile::tempdir().unwrap();
    let (mut nodes, url) = common::nats::cluster(js.path(), 3);
    let (a, b) = (Home::new(), Home::new());
    let more = [("CLAUDE_PEERS_NATS_REPLICAS", "3")];
    let alice = session_with(&a, "hosta", "alice", &url, &more).await;
    let bob = session_with(&b, "hostb", "bob", &url, &more).await;
    // A cluster elects its leaders in a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    for home in [&a, &b] {
        while !home_connected(home) {
            assert!(
                Instant::now() < deadline,
                "no broker connected to the cluster"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (sender, _) = a.peer("sender", "/work/sender").await;
    let stream = names_of("hosta").stream_name();

    const N: usize = 300;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..N {
        if i == N / 3 {
            let client = async_nats::connect(nodes[0].url()).await.unwrap();
            let jet = async_nats::jetstream::new(client);
            let mut s = jet.get_stream(&stream).await.unwrap();
            let info = s.info().await.unwrap();
            let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
            let leader = leader.expect("the stream has a leader");
            let node = nodes
                .iter_mut()
                .find(|n| n.name() == Some(leader.as_str()))
                .expect("the leader is one of ours");
            node.kill();
        }
        let sent = sender
            .call(send("bob@hostb", &format!("m{i}")))
            .await
            .unwrap();
        ids.insert(sent.message_id);
    }
    all_arrive_once(&b, &ids, &[]).await;
    alice.close().await;
    bob.close().await;
}

/// Whether `home`'s broker is connected to NATS now.
fn home_connected(home: &Home) -> bool {
    let out = home.run_ok(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["network"]["connected"] == true
}

/// A git repository at `dir` whose `origin` is `url`.
fn repo(dir: &Path, url: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for args in [&["init", "-q"][..], &["remote", "add", "origin", url][..]] {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }
}

/// Scope repo spans machines when bridged: sessions of the same repository (its remote,
/// whether cloned over SSH or HTTPS) are listed and reached across hosts; others not.
#[tokio::test(flavor = "multi_thread")]
async fn scope_repo_spans_machines_by_the_remote() {
    require!("nats-server");
    require!("git");
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start(js.path(), free_port());
    let url = nats.url();
    let (a, b) = (Home::new(), Home::new());
    let shop_a = a.dir.path().join("shop");
    let shop_b = b.dir.path().join("shop");
    let other_b = b.dir.path().join("other");
    repo(&shop_a, "git@github.com:org/shop.git");
    repo(&shop_b, "https://github.com/org/shop");
    repo(&other_b, "git@github.com:org/other.git");
    let env = |host: &'static str| {
        vec![
            ("CLAUDE_PEERS_NATS_URL", url.clone()),
            ("CLAUDE_PEERS_HOST", host.to_string()),
        ]
    };
    let start = |home: &Home, name: &str, dir: &Path, host: &'static str| {
        let env = env(host);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut cmd = home.serve_cmd(Some(name), dir);
        cmd.envs(env);
        Serve::start(cmd, false)
    };
    let alice = start(&a, "alice", &shop_a, "hosta").await;
    alice.whoami_when_ready().await;
    let bob = start(&b, "bob", &shop_b, "hostb").await;
    bob.whoami_when_ready().await;
    let dave = start(&b, "dave", &other_b, "hostb").await;
    dave.whoami_when_ready().await;
    connected(&a);
    connected(&b);

    let listed = alice.ok("list_peers", json!({"scope": "repo"})).await;
    assert_eq!(common::peer_names(&listed), ["bob@hostb"], "{listed}");
    let sent = alice
        .ok(
            "broadcast",
            json!({"scope": "repo", "message": "rebasing the shop"}),
        )
        .await;
    assert_eq!(
        common::peer_names(&json!({"peers": sent["recipients"]})),
        ["bob@hostb"]
    );
    assert_eq!(mail_of(&bob).await[0]["text"], "rebasing the shop");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let none = dave.ok("check_messages", json!({})).await;
    assert_eq!(none["messages"], json!([]), "{none}");
    for s in [alice, bob, dave] {
        s.close().await;
    }
}
