//! Faults at start-up: stale files of a killed broker, databases that cannot be used,
//! clients racing to start a broker, two brokers on one database.

use super::*;

// ---------------------------------------------------------------------------------------
// 3. Stale files, and databases that cannot be used.
// ---------------------------------------------------------------------------------------

/// Runs `cmd` and returns its output, failing the test if it has not exited within
/// `within` (the process is then killed, so a hang fails instead of blocking CI).
fn output_within(cmd: Command, within: Duration) -> Output {
    let shown = format!("{cmd:?}");
    common::run_within(cmd, within).unwrap_or_else(|out| {
        panic!(
            "{shown} still running after {within:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn status_json(home: &Home) -> Value {
    let out = home.run(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn lock_pid(home: &Home) -> u32 {
    std::fs::read_to_string(&home.paths.lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The live `claude-peers broker` processes of this home (Linux: read from /proc).
fn brokers_of(home: &Home) -> Vec<u32> {
    let want = format!("CLAUDE_PEERS_HOME={}", home.root().display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let (Ok(cmdline), Ok(environ), Ok(stat)) = (
            std::fs::read(dir.join("cmdline")),
            std::fs::read(dir.join("environ")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // gone meanwhile
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_broker =
            args.len() >= 2 && args[0] == common::BIN.as_bytes() && args[1] == b"broker";
        let ours = environ.split(|b| *b == 0).any(|v| v == want.as_bytes());
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if is_broker && ours && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Proves: the socket and lock file a `kill -9`ed broker leaves behind stop neither a new
/// foreground broker (`claude-peers broker`) nor one started on demand by a CLI command;
/// and `status` reports such a leftover as "not running" instead of failing or hanging.
#[test]
fn stale_socket_and_lock_of_a_killed_broker_never_block_a_new_one() {
    let home = Home::new();
    for round in 0..2 {
        let mut b = home.broker(&[]);
        let pid = b.pid();
        assert_eq!(status_json(&home)["pid"], pid);
        b.kill9();
        // The leftovers: a socket nobody listens on, and a lock file naming a dead pid.
        assert!(
            home.paths.socket.exists(),
            "round {round}: socket left behind"
        );
        assert_eq!(lock_pid(&home), pid);
        assert!(std::os::unix::net::UnixStream::connect(&home.paths.socket).is_err());
        let out = output_within(
            {
                let mut c = home.cmd();
                c.args(["status", "--json"]);
                c
            },
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(1), "status with a stale socket");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["running"], false, "{v}");
    }
    // A CLI command starts a broker over the leftovers of the second kill.
    let killed = lock_pid(&home);
    let out = output_within(
        {
            let mut c = home.cmd();
            c.args(["peers", "--json"]);
            c
        },
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let pid = status_json(&home)["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid, killed);
    assert_eq!(lock_pid(&home), pid);
    assert_eq!(brokers_of(&home), [pid]);
    assert!(
        home.broker_output().contains("removed stale socket"),
        "{}",
        home.broker_output()
    );
}

/// How a test spoils the database.
enum BadDb {
    /// The database path is a directory.
    Directory,
    /// A file of random bytes.
    Garbage,
}

fn spoil(home: &Home, how: BadDb) {
    home.paths.prepare().unwrap();
    match how {
        BadDb::Directory => std::fs::create_dir(&home.paths.db).unwrap(),
        BadDb::Garbage => {
            let bytes: Vec<u8> = (0..8192u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            std::fs::write(&home.paths.db, bytes).unwrap();
        }
    }
}

/// Holds an exclusive SQLite lock on the database of `home`, as another program could.
/// With `wal`, the database is first made by a real broker (so it is in WAL mode, where an
/// exclusive transaction locks out writers only); otherwise it is a new file in SQLite's
/// default rollback-journal mode, where it locks out readers too.
fn lock_database(home: &Home, wal: bool) -> rusqlite::Connection {
    home.paths.prepare().unwrap();
    if wal {
        home.run_ok(&["peers"]);
        home.run_ok(&["stop"]);
    }
    let conn = rusqlite::Connection::open(&home.paths.db).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS held (x); BEGIN EXCLUSIVE; INSERT INTO held VALUES (1);",
    )
    .unwrap();
    conn
}

/// Runs `claude-peers broker` and checks it gives up quickly and clearly: it exits with
/// status 1 (within 10 s, else the test fails as a hang), its one-line error names the
/// database, says what is wrong (`cause`) and what to do, and it leaves no socket behind.
fn broker_refuses(home: &Home, cause: &str) {
    let out = output_within(
        {
            let mut c = home.cmd();
            c.arg("broker");
            c
        },
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let db = home.paths.db.display().to_string();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("claude-peers: error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains(&db), "does not name the database: {line}");
    assert!(line.contains(cause), "does not say {cause:?}: {line}");
    assert!(
        line.contains("CLAUDE_PEERS_DB"),
        "does not say what to do: {line}"
    );
    assert!(
        !home.paths.socket.exists(),
        "a failed broker left its socket"
    );
}

/// Runs a CLI command that needs a broker, and checks that it fails within 15 s with an
/// error naming the database and what is wrong with it (`cause`).
fn cli_autostart_refuses(home: &Home, cause: &str) {
    let out = output_within(
        {
            let mut c = home.cmd();
            c.args(["peers", "--json"]);
            c
        },
        Duration::from_secs(15),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let db = home.paths.db.display().to_string();
    assert!(stderr.contains(&db), "does not name the database: {stderr}");
    assert!(stderr.contains(cause), "does not say {cause:?}: {stderr}");
}

/// Proves: a database path that is a directory stops the broker at once with a clear error.
#[test]
fn database_that_is_a_directory_stops_the_broker_clearly() {
    let home = Home::new();
    spoil(&home, BadDb::Directory);
    broker_refuses(&home, "Is a directory");
}

/// Proves: a database file of garbage bytes stops the broker at once with a clear error.
#[test]
fn database_of_garbage_stops_the_broker_clearly() {
    let home = Home::new();
    spoil(&home, BadDb::Garbage);
    broker_refuses(&home, "not a database");
}

/// Proves: a database another process holds a lock on stops the broker at start, after
/// its short busy wait, with a clear error: an exclusive lock (rollback-journal mode, so
/// even reading waits) instead of hanging, and the write lock of a database in WAL mode
/// (it used to start, since reading works, and then stall 2 s on every batch and answer
/// every write with `internal`).
#[test]
fn a_locked_database_stops_the_broker_at_start() {
    for wal in [false, true] {
        let home = Home::new();
        let lock = lock_database(&home, wal);
        broker_refuses(&home, "locked");
        drop(lock);
    }
}

/// Proves: a CLI command that starts a broker on demand reports why the broker could not
/// start — naming the database and what is wrong — for each kind of unusable database.
/// (It used to wait 5 s and say only "no broker answered ... See its log".)
#[test]
fn cli_autostart_reports_why_the_database_is_unusable() {
    for (how, cause) in [
        (BadDb::Directory, "Is a directory"),
        (BadDb::Garbage, "not a database"),
    ] {
        let home = Home::new();
        spoil(&home, how);
        cli_autostart_refuses(&home, cause);
    }
    let home = Home::new();
    let lock = lock_database(&home, false);
    cli_autostart_refuses(&home, "locked");
    // Brokers started on demand give up by themselves; none may outlive the lock and then
    // start for real.
    wait_for(
        || brokers_of(&home).is_empty(),
        "the started brokers to give up",
    );
    drop(lock);
}

/// Proves: when a send fails because the database is locked, it was not stored, so
/// trying again (as the error says) cannot deliver it twice. The lock is released just
/// after the broker fails to begin its transaction, while the send is still being handled.
/// (The send used to run outside any transaction: its writes committed on their own, and
/// the sender was told "nothing was saved, try again".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refused_for_a_locked_database_is_not_stored() {
    let home = Home::new();
    let _b = home.broker(&["--ack-wait", "0"]);
    let (bob, _) = home.peer("bob", "/b").await;
    drop(bob);
    let alice = home.client().await;
    wait_offline(&alice, "bob").await;

    let lock = rusqlite::Connection::open(&home.paths.db).unwrap();
    lock.busy_timeout(Duration::from_secs(10)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let answer = alice.start(send("bob", "exactly once")).unwrap();
    wait_for(
        || home.broker_output().contains("cannot start a transaction"),
        "the broker to fail to begin its transaction",
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("an answer within 10s");

    let mut bob = home.client().await;
    let reg = bob.call(register("bob", "/b")).await.unwrap();
    match decode::<Sent>(answer) {
        Ok(sent) => {
            assert_eq!(reg.queued, 1);
            assert_eq!(next_delivery(&mut bob).await.id, sent.message_id);
        }
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::Internal), "{e}");
            assert!(e.to_string().contains("try again"), "{e}");
            assert_eq!(
                reg.queued, 0,
                "the send was refused with {e:?}, yet it was stored: trying again sends it twice"
            );
        }
    }
}

/// Proves: requests that only read are answered while another program holds the
/// database's write lock (or a checkpoint holds writers back); only writes wait for it.
/// (Every batch used to begin as a write transaction, so a `peers` or `log` was refused
/// with "could not write its database" after the 2 s busy wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_the_write_lock_is_held() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (_bob, _) = home.peer("bob", "/b").await;
    let alice = home.client().await;
    alice.call(send("bob", "before the lock")).await.unwrap();

    let lock = rusqlite::Connection::open(&home.paths.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let peers = alice.call(ListPeers::default()).await.unwrap().peers;
    assert!(peers.iter().any(|p| p.name == "bob"));
    let log = alice.call(LogQuery::default()).await.unwrap().messages;
    assert!(log.iter().any(|m| m.text == "before the lock"));
    assert_eq!(alice.call(StatusCall).await.unwrap().peers_online, 1);
    lock.execute_batch("ROLLBACK").unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Twenty clients racing to start a broker.
// ---------------------------------------------------------------------------------------

/// Proves: twenty CLI commands started at once with no broker running all succeed, and
/// leave exactly one broker process, the one holding the lock and answering `status`.
#[test]
fn twenty_clients_starting_at_once_share_one_broker() {
    let home = Home::new();
    let children: Vec<_> = (0..20)
        .map(|_| {
            home.cmd()
                .args(["peers", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for c in children {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(c.wait_with_output()));
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..20 {
        let left = deadline.saturating_duration_since(Instant::now());
        let out = rx
            .recv_timeout(left)
            .expect("all twenty clients finish within 20s")
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    }
    // Brokers that lost the race for the lock exit by themselves; one must remain.
    wait_for(|| brokers_of(&home).len() == 1, "a single broker process");
    let pid = brokers_of(&home)[0];
    assert_eq!(status_json(&home)["pid"], pid);
    assert_eq!(lock_pid(&home), pid);
    let log = home.broker_output();
    assert_eq!(log.matches("broker started").count(), 1, "{log}");
}

/// One broker per database: a second broker (another runtime directory, the same
/// database, as when logind removed the runtime directory under a running broker) is
/// refused with an error that names the first, and the first keeps working.
#[test]
fn a_second_broker_on_one_database_is_refused() {
    let first = Home::new();
    let _b = first.broker(&[]);
    let second = Home::new();
    let out = second
        .cmd()
        .arg("broker")
        .env("CLAUDE_PEERS_DB", &first.paths.db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&first.paths.db.display().to_string()), "{err}");
    assert!(err.contains("another broker"), "{err}");
    assert!(
        err.contains(&first.paths.socket.display().to_string()),
        "names the first broker's socket: {err}"
    );
    assert!(!second.paths.socket.exists(), "no second socket");
    first.run_ok(&["status"]);
}
