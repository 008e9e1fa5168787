//! Sockets: no network sockets in the broker or serve, socket paths the OS cannot take,
//! tool errors naming an unusable home, and a socket served by another uid.

use super::*;

/// Socket inodes of the process's open file descriptors (`socket:[N]` links in /proc).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inodes listed in `/proc/<pid>/net/<table>` (the process's network namespace),
/// whose inode column is `column`.
fn table_inodes(pid: u32, table: &str, column: usize) -> HashSet<u64> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return HashSet::new(); // e.g. no IPv6 in this kernel
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(column)?.parse().ok())
        .collect()
}

/// Inodes of every TCP, UDP and raw IP socket in the namespace of `pid`.
fn inet_inodes(pid: u32) -> HashSet<u64> {
    [
        "tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6",
    ]
    .into_iter()
    .flat_map(|t| table_inodes(pid, t, 9))
    .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn the_broker_and_serve_have_no_network_sockets() {
    // The method first: our own TCP and UDP sockets must show up as network sockets.
    let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let me = std::process::id();
    let mine = socket_inodes(me);
    assert!(
        mine.intersection(&inet_inodes(me)).count() >= 2,
        "this check cannot see our own TCP/UDP sockets; it would prove nothing"
    );
    drop((tcp, udp));

    let home = Home::new();
    let broker = home.broker(&[]);
    let mut serve = KillOnDrop(home.serve_child("netcheck"));
    let mut stdin = serve.0.stdin.take().unwrap();
    stdin
        .write_all(
            concat!(
                r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{"experimental":{"claude/channel":{}}},"clientInfo":{"name":"t","version":"0"}}}"#,
                "\n",
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                "\n"
            )
            .as_bytes(),
        )
        .unwrap();
    // serve is connected and registered once the broker lists it online.
    let mut probe = Raw::greeted(&home.paths.socket);
    wait_for(
        || {
            let s = probe.call(r#"{"id":1,"op":"status"}"#);
            s.pointer("/result/peers_online").and_then(Value::as_u64) == Some(1)
        },
        "serve to register",
    );
    for (who, pid) in [("broker", broker.pid()), ("serve", serve.0.id())] {
        let sockets = socket_inodes(pid);
        let inet = inet_inodes(pid);
        let unix = table_inodes(pid, "unix", 6);
        assert!(!sockets.is_empty(), "{who} has no socket at all?");
        let network: Vec<_> = sockets.intersection(&inet).collect();
        assert!(
            network.is_empty(),
            "{who} has TCP/UDP/raw sockets: {network:?}"
        );
        let other: Vec<_> = sockets.difference(&unix).collect();
        assert!(other.is_empty(), "{who} has non-Unix sockets: {other:?}");
    }
    drop(stdin);
}

/// A child process killed and reaped when dropped, so a failing test leaves nothing behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_socket_path_too_long_for_the_os_is_a_clear_error() {
    let home = Home::new();
    let mut deep = home.dir.path().to_path_buf();
    for i in 0..20 {
        deep.push(format!("component-{i:02}"));
    }
    for args in [
        &["status"][..],
        &["broker"],
        &["peers"],
        &["send", "x", "hi"],
    ] {
        let line = refusal(&run_with_home(&home, &deep, args), &args.join(" "));
        assert!(
            line.contains("socket path")
                && line.contains("bytes; this OS allows")
                && line.contains("Set CLAUDE_PEERS_HOME to a shorter directory"),
            "{line}"
        );
    }
    assert!(!deep.join("broker.sock").exists());
}

#[cfg(target_os = "linux")]
#[test]
fn the_longest_socket_path_linux_allows_works_and_one_byte_more_is_refused() {
    // sun_path is 108 bytes on Linux, one of them the terminating NUL.
    const SUN_PATH_MAX: usize = 107;
    let socket_name = "/broker.sock".len();
    let tmp = short_tempdir();
    let base = tmp.path().to_path_buf();
    let pad = |n: usize| {
        let room = n - socket_name - base.as_os_str().len() - 1;
        base.join("p".repeat(room))
    };
    let fits = pad(SUN_PATH_MAX);
    let too_long = pad(SUN_PATH_MAX + 1);
    let home = home_at(tmp, &fits);
    assert_eq!(home.paths.socket.as_os_str().len(), SUN_PATH_MAX);

    let o = run_with_home(&home, &fits, &["peers"]);
    assert!(
        o.status.success(),
        "a {SUN_PATH_MAX}-byte socket path should work: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(run_with_home(&home, &fits, &["status"]).status.success());

    for args in [&["status"][..], &["broker"]] {
        let line = refusal(&run_with_home(&home, &too_long, args), &args.join(" "));
        assert!(
            line.contains(&format!(
                "is {} bytes; this OS allows {SUN_PATH_MAX}",
                SUN_PATH_MAX + 1
            )),
            "{line}"
        );
    }
}

/// Reads stdout lines of a child on a thread, so the test can wait for one with a deadline.
fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn serve_names_an_unusable_home_in_its_tool_errors() {
    let home = Home::new();
    let deep = home.dir.path().join("d".repeat(150));
    let mut serve = KillOnDrop(
        home.cmd()
            .env("CLAUDE_PEERS_HOME", &deep)
            .env("CLAUDE_PEERS_NAME", "deep")
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(serve.0.stdout.take().unwrap());
    let mut stdin = serve.0.stdin.take().unwrap();
    for line in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#,
    ] {
        writeln!(stdin, "{line}").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("serve answered the tool call within 20s");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 2 {
            break v;
        }
    };
    assert_eq!(answer.pointer("/result/isError"), Some(&Value::Bool(true)));
    let text = answer
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        text.contains("bytes; this OS allows") && text.contains("CLAUDE_PEERS_HOME"),
        "the tool error should say what is wrong and what to do: {text}"
    );
}

/// When this test binary is re-run as another uid, this "test" is the impostor broker: it
/// listens on the socket named in the environment, says READY, and answers every
/// connection with a plausible hello reply.
#[test]
fn foreign_listener_helper() {
    let Ok(socket) = std::env::var("CP_FOREIGN_LISTEN") else {
        return;
    };
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    listener.set_nonblocking(true).unwrap();
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.write_all(
                    b"{\"id\":1,\"result\":{\"protocol\":1,\"broker_version\":\"0.1.0\",\"pid\":1}}\n",
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn a_socket_served_by_another_uid_is_not_trusted() {
    if !root_or_skip("to listen as another uid") {
        return;
    }
    let home = Home::new();
    // Let the other uid in long enough to plant its socket where our broker's would be.
    std::fs::create_dir(home.root()).unwrap();
    for p in [home.dir.path(), home.root()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let exe = home.dir.path().join("impostor");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut impostor = KillOnDrop({
        use std::os::unix::process::CommandExt;
        Command::new(&exe)
            .args([
                "--exact",
                "sockets::foreign_listener_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CP_FOREIGN_LISTEN", &home.paths.socket)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    let lines = lines_of(impostor.0.stdout.take().unwrap());
    let ready = Instant::now() + Duration::from_secs(20);
    // With --nocapture the harness's own "test … " text shares the line.
    while !lines
        .recv_timeout(ready.saturating_duration_since(Instant::now()))
        .expect("the impostor to listen within 20s")
        .ends_with("READY")
    {}
    assert_eq!(
        std::fs::symlink_metadata(&home.paths.socket).unwrap().uid(),
        NOBODY
    );
    // Ours and private again; the planted socket stays (root reaches it regardless).
    std::fs::set_permissions(home.root(), std::fs::Permissions::from_mode(0o700)).unwrap();
    for args in [&["status"][..], &["peers"], &["send", "x", "hi"]] {
        let line = refusal(&run_with_home(&home, home.root(), args), &args.join(" "));
        assert!(
            line.contains(&format!("is served by uid {NOBODY}, not by you")),
            "{line}"
        );
    }
}
