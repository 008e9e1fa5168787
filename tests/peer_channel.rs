//! peer-channel interop: our sessions and peer-channel's are one network. Our own client
//! and listener here speak peer-channel's protocol from its description (one JSON-RPC
//! request per connection; `~/.peer-channel/sessions/<name>.sock`, the name claimed with
//! the lock directory `<name>.lock/`, refreshed every 5 s, stale after 10 s).

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::serve::text_of;
use common::*;
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

/// One request on a connection of its own, as peer-channel's clients make them: the raw
/// bytes written, the one response line read (`None` when the session closed without one).
fn pc_raw(socket: &Path, request: &[u8]) -> Option<Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    (!line.is_empty()).then(|| serde_json::from_str(&line).unwrap())
}

fn pc_call(socket: &Path, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    pc_raw(socket, format!("{req}\n").as_bytes()).expect("an answer")
}

/// Waits until `path` exists (a session claims its name just after it registers).
fn wait_exists(path: &Path) {
    wait_for(|| path.exists(), &format!("{} to exist", path.display()));
}

fn age(path: &Path) -> Duration {
    let m = std::fs::symlink_metadata(path).unwrap().modified().unwrap();
    SystemTime::now().duration_since(m).unwrap_or_default()
}

/// A peer-channel session as its protocol describes it: claims `name` with the lock
/// directory, listens on `name.sock`, answers `ping` and `deliver` (reading the text from
/// `field`, refusing the other name with invalid params, as a strict version would),
/// and records what it was delivered.
struct PcSession {
    delivered: Arc<Mutex<Vec<Value>>>,
    socket: PathBuf,
    lock: PathBuf,
}

impl PcSession {
    fn start(dir: &Path, name: &str, field: &'static str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let lock = dir.join(format!("{name}.lock"));
        std::fs::create_dir(&lock).unwrap();
        let socket = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&socket).unwrap();
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let (rec, name, lock2) = (delivered.clone(), name.to_string(), lock.clone());
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let _ = std::fs::File::open(&lock2).and_then(|f| f.set_modified(SystemTime::now()));
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                let p = &req["params"];
                let answer = match req["method"].as_str() {
                    Some("ping") => {
                        json!({"result": {"name": name, "version": "0.9.1", "protocol": 1}})
                    }
                    Some("deliver") if p[field].is_string() && p.get(other(field)).is_none() => {
                        rec.lock().unwrap().push(p.clone());
                        json!({"result": {"message_id": format!("pc-{n}")}})
                    }
                    Some("deliver") => json!({"error": {"code": -32602, "message": "bad params"}}),
                    _ => json!({"error": {"code": -32601, "message": "no such method"}}),
                };
                let mut answer = answer;
                answer["jsonrpc"] = json!("2.0");
                answer["id"] = req["id"].clone();
                let _ = writeln!(conn, "{answer}");
            }
        });
        Self {
            delivered,
            socket,
            lock,
        }
    }

    fn delivered(&self) -> Vec<Value> {
        self.delivered.lock().unwrap().clone()
    }
}

fn other(field: &str) -> &'static str {
    if field == "text" { "message" } else { "text" }
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_and_deliver_reach_a_session_once_by_its_route() {
    let home = Home::new();
    let mut alice = home.session("alice", true).await;
    alice.whoami_when_ready().await;
    let sock = home.pc_dir().join("alice.sock");
    wait_exists(&sock);
    let lock = home.pc_dir().join("alice.lock");
    assert!(std::fs::symlink_metadata(&lock).unwrap().is_dir());
    assert_eq!(
        std::fs::symlink_metadata(&sock).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::symlink_metadata(home.pc_dir()).unwrap().mode() & 0o777,
        0o700
    );

    let pong = pc_call(&sock, "ping", json!({}));
    assert_eq!(pong["result"]["name"], "alice", "{pong}");
    assert_eq!(pong["result"]["protocol"], 1, "{pong}");
    assert!(pong["result"]["version"].is_string(), "{pong}");

    let answer = pc_call(
        &sock,
        "deliver",
        json!({"from": "bob", "text": "rebase onto main", "in_reply_to": null}),
    );
    let id = answer["result"]["message_id"]
        .as_str()
        .expect("a message id");
    assert!(claude_peers::protocol::is_message_id(id), "{answer}");
    let ev = alice.next_event().await;
    assert_eq!(ev["content"], "rebase onto main");
    assert_eq!(ev["meta"]["from"], "pc:bob");
    assert_eq!(ev["meta"]["message_id"], id);
    alice.no_event(Duration::from_millis(500)).await;

    // Newer versions call the text `message`; ours is in the broker's history.
    let answer = pc_call(
        &sock,
        "deliver",
        json!({"from": "bob", "message": "second"}),
    );
    assert!(answer["result"]["message_id"].is_string(), "{answer}");
    assert_eq!(alice.next_event().await["content"], "second");
    let log = home.run_ok(&["log", "--json", "--peer", "alice"]);
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(log.contains(id) && log.contains("\"pc:bob\""), "{log}");

    // The model replies by the name it was shown: over bob's socket, were bob running.
    let r = alice
        .call(
            "send_message",
            json!({"to": "pc:bob", "message": "done", "in_reply_to": id}),
        )
        .await;
    assert_eq!(r.is_error, Some(true));
    let text = text_of(&r);
    assert!(
        text.contains("not running") && text.contains("keeps no mail"),
        "{text}"
    );

    // Leaving gives the name back.
    alice.close().await;
    wait_for(
        || !lock.exists() && !sock.exists(),
        "the lock and socket to go",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delivered_mail_survives_a_broker_kill9_after_the_answer() {
    let home = Home::new();
    let mut broker = home.broker(&[]);
    let mut carol = home.session("carol", false).await;
    carol.whoami_when_ready().await;
    let sock = home.pc_dir().join("carol.sock");
    wait_exists(&sock);
    let answer = pc_call(&sock, "deliver", json!({"from": "bob", "text": "kept"}));
    let id = answer["result"]["message_id"].clone();
    assert!(id.is_string(), "{answer}");
    // The answer came after the commit: the broker and the session may both die now.
    broker.kill9();
    carol.kill9().await;
    let lock = home.pc_dir().join("carol.lock");
    let born = |p: &Path| std::fs::metadata(p).and_then(|m| m.created()).ok();
    let dead_lock = born(&lock);
    // Its lock is not stale yet and nobody answers on its socket: the restarted session
    // keeps its name, and with it its mail, ...
    let carol = home.session("carol", false).await;
    assert_eq!(carol.whoami_when_ready().await["name"], "carol");
    let got = carol.ok("check_messages", json!({})).await;
    let msgs = got["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{got}");
    assert_eq!(msgs[0]["message_id"], id);
    assert_eq!(msgs[0]["from"], "pc:bob");
    assert_eq!(
        carol.ok("check_messages", json!({})).await["messages"],
        json!([])
    );
    // ... and leaves the lock alone until it is stale (its holder might be a
    // peer-channel session restarting), then takes it.
    assert_eq!(born(&lock), dead_lock, "a fresh lock was taken");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while born(&lock) == dead_lock || pc_raw_ok(&sock).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale lock was never reclaimed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pc_raw_ok(&sock).unwrap()["result"]["name"], "carol");
    assert!(age(&lock) < Duration::from_secs(10));
}

/// A `ping`, or `None` while nothing answers.
fn pc_raw_ok(socket: &Path) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n")
        .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn our_sends_reach_peer_channel_sessions_over_their_sockets() {
    let home = Home::new();
    let dave = PcSession::start(&home.pc_dir(), "dave", "text");
    let erin = PcSession::start(&home.pc_dir(), "erin", "message");
    // A socket nobody listens on any more: passed over, never removed.
    let ghost = home.pc_dir().join("ghost.sock");
    drop(UnixListener::bind(&ghost).unwrap());
    // A symbolic link to a live one: never followed.
    std::os::unix::fs::symlink(&dave.socket, home.pc_dir().join("evil.sock")).unwrap();
    let alice = home.session("alice", true).await;
    alice.whoami_when_ready().await;

    let listed = alice.ok("list_peers", json!({})).await;
    let names = peer_names(&listed);
    assert!(
        names.contains(&"pc:dave") && names.contains(&"pc:erin"),
        "{listed}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains("ghost") || n.contains("alice") || n.contains("evil")),
        "{listed}"
    );
    let dave_row = listed["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "pc:dave")
        .unwrap();
    assert_eq!(dave_row["kind"], "peer-channel");
    assert!(ghost.exists());

    let sent = alice
        .ok(
            "send_message",
            json!({"to": "pc:dave", "message": "review my diff",
                "in_reply_to": "019ad3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"}),
        )
        .await;
    assert_eq!(sent["recipients"][0]["state"], "delivered", "{sent}");
    assert_eq!(sent["recipients"][0]["name"], "pc:dave");
    assert_eq!(sent["message_id"], "pc-1", "{sent}");
    let got = dave.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["from"], "alice");
    assert_eq!(got[0]["text"], "review my diff");
    assert_eq!(
        got[0]["in_reply_to"],
        "019ad3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"
    );

    // A version that names the text `message` gets it so.
    let sent = alice
        .ok("send_message", json!({"to": "pc:erin", "message": "hello"}))
        .await;
    assert_eq!(sent["recipients"][0]["state"], "delivered", "{sent}");
    assert_eq!(erin.delivered()[0]["message"], "hello");

    // The command line lists and reaches them too.
    let out = home.run_ok(&["peers"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("pc:dave") && table.contains("peer-channel"),
        "{table}"
    );
    let out = home.run_ok(&["send", "pc:dave", "from the shell", "--from", "ci"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("delivered to pc:dave"), "{said}");
    assert_eq!(dave.delivered()[1]["from"], "ci");
    let gone = home.run(&["send", "pc:nobody", "hi"]);
    assert_eq!(gone.status.code(), Some(1));
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        err.contains("not running") && err.contains("Nothing was sent"),
        "{err}"
    );
    let evil = home.run(&["send", "pc:evil", "hi"]);
    let err = String::from_utf8_lossy(&evil.stderr);
    assert!(err.contains("not a socket of yours"), "{err}");
    // A name is checked before it becomes a path.
    let bad = home.run(&["send", "pc:../dave", "hi"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("pc:../dave") && err.contains("'/'"), "{err}");
    assert_eq!(dave.delivered().len(), 2);
    assert!(dave.lock.exists() && dave.socket.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_held_by_a_peer_channel_lock_is_not_taken_and_a_stale_one_is() {
    let home = Home::new();
    let dir = home.pc_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A live lock (a peer-channel session starting up: no socket yet).
    let held = dir.join("erin.lock");
    std::fs::create_dir(&held).unwrap();
    // An abandoned one: 11 s without a refresh.
    let stale = dir.join("frank.lock");
    std::fs::create_dir(&stale).unwrap();
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(11))
        .unwrap();
    let stale_born = std::fs::metadata(&stale).unwrap().created().unwrap();

    let erin = home.session("erin", false).await;
    assert_eq!(erin.whoami_when_ready().await["name"], "erin-2");
    wait_exists(&dir.join("erin-2.sock"));
    assert!(held.exists() && !dir.join("erin.sock").exists());

    let frank = home.session("frank", false).await;
    assert_eq!(frank.whoami_when_ready().await["name"], "frank");
    wait_exists(&dir.join("frank.sock"));
    let born = std::fs::metadata(&stale).unwrap().created().unwrap();
    assert_ne!(born, stale_born, "reclaimed");

    // Kept fresh while the session lives: never stale to peer-channel.
    std::thread::sleep(Duration::from_secs(11));
    assert!(age(&stale) < Duration::from_secs(10), "{:?}", age(&stale));
    let pong = pc_call(&dir.join("frank.sock"), "ping", json!({}));
    assert_eq!(pong["result"]["name"], "frank");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_serve_of_the_same_session_takes_the_name_over() {
    let home = Home::new();
    let env = [("CLAUDE_PEERS_SESSION", "one-agent-session")];
    let old = home.session_in("gina", true, home.dir.path(), &env).await;
    old.whoami_when_ready().await;
    let sock = home.pc_dir().join("gina.sock");
    wait_exists(&sock);
    let born = |p: &Path| std::fs::metadata(p).and_then(|m| m.created()).ok();
    let old = (old, born(&sock));
    let mut new = home.session_in("gina", true, home.dir.path(), &env).await;
    assert_eq!(new.whoami_when_ready().await["name"], "gina");
    wait_for(
        || born(&sock).is_some_and(|b| Some(b) != old.1),
        "the newer serve's socket",
    );
    let answer = pc_call(
        &sock,
        "deliver",
        json!({"from": "bob", "text": "to the new one"}),
    );
    assert!(answer["result"]["message_id"].is_string(), "{answer}");
    assert_eq!(new.next_event().await["content"], "to the new one");
    // The replaced one leaves the new one's lock and socket alone.
    drop(old);
    std::thread::sleep(Duration::from_millis(300));
    assert!(sock.exists() && home.pc_dir().join("gina.lock").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_oversized_frames_get_the_right_json_rpc_errors() {
    let home = Home::new();
    let mut hal = home.session("hal", true).await;
    hal.whoami_when_ready().await;
    let sock = home.pc_dir().join("hal.sock");
    wait_exists(&sock);
    let code = |bytes: &[u8]| pc_raw(&sock, bytes).expect("an answer")["error"]["code"].clone();
    assert_eq!(code(b"this is not json\n"), -32700);
    assert_eq!(code(b"[1,2,3]\n"), -32600);
    assert_eq!(code(b"{\"id\":1,\"method\":\"ping\"}\n"), -32600);
    assert_eq!(
        code(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"format_disk\"}\n"),
        -32601
    );
    let no_from = json!({"jsonrpc":"2.0","id":1,"method":"deliver","params":{"text":"x"}});
    assert_eq!(code(format!("{no_from}\n").as_bytes()), -32602);
    let empty =
        json!({"jsonrpc":"2.0","id":1,"method":"deliver","params":{"from":"b","text":"  "}});
    assert_eq!(code(format!("{empty}\n").as_bytes()), -32602);
    // Larger than the broker takes (64 KiB), smaller than a frame: invalid params.
    let big = json!({"jsonrpc":"2.0","id":1,"method":"deliver",
        "params":{"from":"b","text":"x".repeat(70_000)}});
    let answer = pc_raw(&sock, format!("{big}\n").as_bytes()).unwrap();
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{answer}"
    );
    // Larger than a frame (1 MiB): refused without reading it all.
    let huge = vec![b'x'; (1 << 20) + 100];
    assert_eq!(code(&huge), -32600);
    // Connected and gone: no answer, no harm.
    drop(UnixStream::connect(&sock).unwrap());
    hal.no_event(Duration::from_millis(300)).await;
    assert_eq!(pc_call(&sock, "ping", json!({}))["result"]["name"], "hal");
}

#[tokio::test(flavor = "multi_thread")]
async fn turned_off_it_touches_nothing_of_peer_channel() {
    let home = Home::new();
    let _dave = PcSession::start(&home.pc_dir(), "dave", "text");
    let ivy = home
        .session_in(
            "ivy",
            true,
            home.dir.path(),
            &[("CLAUDE_PEERS_PEER_CHANNEL", "off")],
        )
        .await;
    ivy.whoami_when_ready().await;
    std::thread::sleep(Duration::from_millis(300));
    assert!(!home.pc_dir().join("ivy.lock").exists());
    let listed = ivy.ok("list_peers", json!({})).await;
    assert!(!peer_names(&listed).contains(&"pc:dave"), "{listed}");
    let r = ivy
        .call("send_message", json!({"to": "pc:dave", "message": "hi"}))
        .await;
    assert_eq!(r.is_error, Some(true));
    assert!(text_of(&r).contains("turned off"), "{}", text_of(&r));
    assert!(String::from_utf8_lossy(&home.run_ok(&["peers"]).stdout).contains("pc:dave"));
    let out = home.run_ok(&["--peer-channel", "off", "peers"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("pc:dave"));
    let out = home
        .cmd()
        .args(["peers"])
        .env("CLAUDE_PEERS_PEER_CHANNEL", "OFF")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("pc:dave"));
}

/// When this test binary is re-run as another uid, this "test" is the other user's
/// client: it sends `ping` to the socket named in the environment and prints what came
/// back, or EOF.
#[test]
fn foreign_client_helper() {
    let Ok(socket) = std::env::var("CP_PC_FOREIGN_SOCKET") else {
        return;
    };
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The session may close the connection before this is written (EPIPE).
    let _ = s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    println!("GOT[{}]", got.trim());
}

#[tokio::test(flavor = "multi_thread")]
async fn another_uid_gets_no_answer() {
    if !root_or_skip("to connect as another uid") {
        return;
    }
    let home = Home::new();
    let ken = home.session("ken", false).await;
    ken.whoami_when_ready().await;
    let sock = home.pc_dir().join("ken.sock");
    wait_exists(&sock);
    // Let the other uid reach the socket, as a careless chmod would.
    for p in [home.dir.path(), &home.pc_dir(), &sock] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let exe = home.dir.path().join("other-user");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(&exe)
            .args([
                "--exact",
                "foreign_client_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CP_PC_FOREIGN_SOCKET", &sock)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("GOT[]"),
        "the other uid got an answer: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ours still does.
    assert_eq!(pc_call(&sock, "ping", json!({}))["result"]["name"], "ken");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_lost_while_away_is_claimed_again_once_stale() {
    let home = Home::new();
    let lena = home.session("lena", false).await;
    lena.whoami_when_ready().await;
    let (lock, sock) = (
        home.pc_dir().join("lena.lock"),
        home.pc_dir().join("lena.sock"),
    );
    wait_exists(&sock);
    // Someone reclaimed the name (as if this session had been stopped for 10 s) and has
    // not bound its socket yet.
    std::fs::remove_dir(&lock).unwrap();
    std::fs::create_dir(&lock).unwrap();
    let theirs = std::fs::metadata(&lock).unwrap().created().unwrap();
    // The session notices at its next refresh, gives the socket up and leaves their
    // fresh lock alone; once it is stale, the name is its own again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut gave_up_socket = false;
    let mut theirs_lasted = Duration::ZERO;
    loop {
        let now_born = std::fs::metadata(&lock).and_then(|m| m.created()).ok();
        if now_born == Some(theirs) {
            theirs_lasted = theirs_lasted.max(age(&lock));
            gave_up_socket |= !sock.exists();
        } else if pc_raw_ok(&sock).is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never claimed again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gave_up_socket, "kept serving a name it no longer held");
    assert!(
        theirs_lasted >= Duration::from_millis(9_500),
        "their lock was taken fresh, {theirs_lasted:?} old"
    );
    assert_eq!(pc_raw_ok(&sock).unwrap()["result"]["name"], "lena");
}
