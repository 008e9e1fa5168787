//! The broker as a process: foreign uids refused, an older broker handing over, idle
//! exit, SIGTERM, and the WAL checkpointed.

use super::*;

/// When this test binary is re-run as another user, this "test" is the foreign client:
/// it connects to the socket named in the environment and prints the first frame.
#[test]
fn foreign_client_helper() {
    let Ok(socket) = std::env::var("CP_FOREIGN_SOCKET") else {
        return;
    };
    let mut r = Raw::connect(std::path::Path::new(&socket));
    // The broker may refuse before we get to write.
    r.send_bytes_until_closed(
        b"{\"id\":1,\"op\":\"hello\",\"protocol\":1,\"client\":\"intruder\",\"version\":\"0\"}\n",
    );
    println!("FRAME {}", serde_json::to_string(&r.recv()).unwrap());
}

#[test]
fn a_foreign_uid_is_refused_even_with_open_permissions() {
    if !root_or_skip("to run a client under another uid") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let home = Home::new();
    let _b = home.broker(&[]);
    // Open everything up, as a careless chmod would.
    for p in [home.dir.path(), home.root()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::set_permissions(&home.paths.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    // A copy of this test binary that the other uid can surely execute, wherever the
    // checkout lives.
    let exe = home.dir.path().join("foreign-client");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&exe)
        .args([
            "--exact",
            "process::foreign_client_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CP_FOREIGN_SOCKET", &home.paths.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let frame = stdout
        .lines()
        .find_map(|l| l.split_once("FRAME ").map(|(_, f)| f))
        .unwrap_or_else(|| {
            panic!(
                "helper printed no frame: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: serde_json::Value = serde_json::from_str(frame).unwrap();
    assert_eq!(error_code(&v), Some("forbidden"), "{v}");
    wait_for(
        || {
            home.broker_output()
                .contains("refused a connection from another user")
        },
        "the refusal in the broker log",
    );
    // The broker still serves its own user.
    let mut mine = Raw::greeted(&home.paths.socket);
    assert!(mine.call(r#"{"id":1,"op":"status"}"#)["result"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_broker_hands_over_to_a_newer_client() {
    let home = Home::new();
    let mut old = home.broker(&["--protocol-version", "0"]);
    let old_pid = old.pid();
    let mut opts = home.connect_options();
    opts.autostart = true;
    let c = claude_peers::client::Client::connect(&home.paths, &opts)
        .await
        .unwrap();
    assert_eq!(c.broker().protocol, PROTOCOL_VERSION);
    assert_ne!(c.broker().pid, old_pid);
    assert!(
        old.wait_exit(Duration::from_secs(5)),
        "old broker exits cleanly"
    );
}

#[test]
fn idle_broker_exits_by_itself() {
    let home = Home::new();
    let mut b = home.broker(&["--idle-timeout", "300ms"]);
    {
        let mut r = Raw::greeted(&home.paths.socket);
        assert!(r.call(r#"{"id":1,"op":"status"}"#)["result"].is_object());
    }
    assert!(b.wait_exit(Duration::from_secs(5)));
    assert!(!home.paths.socket.exists(), "socket removed on exit");
}

#[test]
fn sigterm_stops_cleanly() {
    let home = Home::new();
    let mut b = home.broker(&[]);
    let out = home.run(&["send", "nobody", "x"]);
    assert_eq!(out.status.code(), Some(1));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(b.pid() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(b.wait_exit(Duration::from_secs(5)));
    assert!(!home.paths.socket.exists());
}

/// The checkpointer copies the WAL back into the database after writes (it is woken by
/// commits, not by a timer), so the WAL starts over instead of growing with every
/// message: 4,000 sends of about 5 pages each would make an 80 MB WAL without it.
#[tokio::test(flavor = "multi_thread")]
async fn the_wal_is_checkpointed_after_writes() {
    let home = Home::new();
    let _b = home.broker(&["--send-rate", "0", "--mailbox-limit", "100000"]);
    // Neither reads its mail as it comes: the sends do not wait for acks.
    let bob = home.client().await;
    let mut reg = register("bob", "/w");
    reg.context.push = false;
    bob.call(reg).await.unwrap();
    let alice = home.client().await;
    let mut reg = register("alice", "/w");
    reg.context.push = false;
    alice.call(reg).await.unwrap();
    let text = "x".repeat(200);
    for _ in 0..8 {
        for _ in 0..500 {
            alice.call(send("bob", &text)).await.unwrap();
        }
        // Time for the checkpoint to finish, so the next commit starts the WAL over
        // (150 ms was too short once on this 2-core VM with other tests running).
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let wal = home.paths.db.with_extension("db-wal");
    let size = std::fs::metadata(&wal).unwrap().len();
    // At most the limit the store sets (`journal_size_limit`, 16 MiB): a busy machine
    // may leave the WAL at it, never past it.
    assert!(
        size <= 16 << 20,
        "{} is {size} bytes after 4,000 sends",
        wal.display()
    );
}
