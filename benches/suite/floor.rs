//! The floor (issue 16): the least any program can do over the hops a message takes in
//! claude-peers, measured beside ours in the same run, so that our figures are stated as
//! ratios to it instead of absolute times, which this shared VM moves by ±50%.
//!
//! Two "session" processes speak just enough MCP over stdio (they answer `initialize`
//! and `tools/list`, take a `tools/call` of `send_message` and find its text by string
//! search) and one "broker" process sits between them on a Unix socket: A forwards the
//! text to the broker, which forwards it to B, which writes a
//! `notifications/claude/channel` line to its stdout and acks; the broker passes the ack
//! to A, which then answers the call. No JSON parser, no async runtime, blocking I/O, a
//! thread per connection. The second variant stores each message in SQLite (WAL,
//! `synchronous=NORMAL`) before forwarding it: the floor of a system that persists.
//!
//! The roles are this bench binary itself, run again with `CLAUDE_PEERS_FLOOR_ROLE`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Runs a floor role if this process was started as one; returns whether it was.
pub fn role() -> bool {
    let Ok(role) = std::env::var("CLAUDE_PEERS_FLOOR_ROLE") else {
        return false;
    };
    let socket = std::env::var("CLAUDE_PEERS_FLOOR_SOCKET").expect("a socket path");
    match role.as_str() {
        "broker" => broker(
            Path::new(&socket),
            std::env::var("CLAUDE_PEERS_FLOOR_DB")
                .ok()
                .as_deref()
                .map(Path::new),
        ),
        "session" => session(
            Path::new(&socket),
            &std::env::var("CLAUDE_PEERS_FLOOR_NAME").expect("a name"),
        ),
        other => panic!("no floor role {other}"),
    }
    true
}

/// The broker: `name\n` registers a connection; `S\t<to>\t<text>` is stored (with a
/// database) and passed to `to` as `M\t<from>\t<text>`; `A\t<from>` (B's ack) is passed
/// to `from` as `K`.
fn broker(socket: &Path, db: Option<&Path>) {
    let listener = UnixListener::bind(socket).expect("bind");
    let peers: Arc<Mutex<HashMap<String, UnixStream>>> = Arc::default();
    let db = db.map(|path| {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS messages(id INTEGER PRIMARY KEY, sender TEXT, recipient TEXT, text TEXT);",
        )
        .unwrap();
        Arc::new(Mutex::new(c))
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let peers = peers.clone();
        let db = db.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
            let Some(Ok(name)) = lines.next() else { return };
            peers.lock().unwrap().insert(name.clone(), conn);
            for line in lines {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(3, '\t');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("S"), Some(to), Some(text)) => {
                        if let Some(db) = &db {
                            db.lock()
                                .unwrap()
                                .prepare_cached("INSERT INTO messages(sender, recipient, text) VALUES (?1, ?2, ?3)")
                                .unwrap()
                                .execute((&name, to, text))
                                .unwrap();
                        }
                        let out = format!("M\t{name}\t{text}\n");
                        if let Some(mut b) = peers.lock().unwrap().get(to) {
                            let _ = b.write_all(out.as_bytes());
                        }
                    }
                    (Some("A"), Some(from), None) => {
                        if let Some(mut a) = peers.lock().unwrap().get(from) {
                            let _ = a.write_all(b"K\n");
                        }
                    }
                    _ => panic!("floor broker: bad line {line:?}"),
                }
            }
        });
    }
}

/// The text between `"<key>":"` and the next unescaped quote.
fn string_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = &line[start..];
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(&rest[..i]),
            _ => i += 1,
        }
    }
    None
}

/// The request id: the digits after `"id":`.
fn id_of(line: &str) -> Option<&str> {
    let start = line.find("\"id\":")? + 5;
    let rest = line[start..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// A session: MCP on stdio, the broker on the socket.
fn session(socket: &Path, name: &str) {
    let mut conn = UnixStream::connect(socket).expect("the floor broker");
    conn.write_all(format!("{name}\n").as_bytes()).unwrap();
    let pending: Arc<Mutex<VecDeque<String>>> = Arc::default();
    {
        let pending = pending.clone();
        let mut acks = conn.try_clone().unwrap();
        let reader = BufReader::new(conn.try_clone().unwrap());
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let mut out = std::io::stdout().lock();
                if let Some(rest) = line.strip_prefix("M\t") {
                    let (from, text) = rest.split_once('\t').unwrap();
                    let _ = writeln!(
                        out,
                        r#"{{"jsonrpc":"2.0","method":"notifications/claude/channel","params":{{"content":"{text}","meta":{{"from":"{from}"}}}}}}"#
                    );
                    let _ = out.flush();
                    let _ = acks.write_all(format!("A\t{from}\n").as_bytes());
                } else if line == "K" {
                    let id = pending.lock().unwrap().pop_front().unwrap();
                    let _ = writeln!(
                        out,
                        r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"delivered"}}],"isError":false}}}}"#
                    );
                    let _ = out.flush();
                }
            }
            std::process::exit(0);
        });
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let answer = |result: &str| {
            let id = id_of(&line).unwrap_or("0");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
            let _ = out.flush();
        };
        if line.contains(r#""method":"initialize""#) {
            answer(
                r#"{"protocolVersion":"2025-11-25","capabilities":{"experimental":{"claude/channel":{}},"tools":{}},"serverInfo":{"name":"floor","version":"1"}}"#,
            );
        } else if line.contains(r#""method":"tools/list""#) {
            answer(
                r#"{"tools":[{"name":"send_message","inputSchema":{"type":"object","properties":{"to":{"type":"string"},"message":{"type":"string"}}}}]}"#,
            );
        } else if line.contains(r#""method":"tools/call""#) {
            let to = string_after(&line, "to").expect("to");
            let text = string_after(&line, "message").expect("message");
            pending
                .lock()
                .unwrap()
                .push_back(id_of(&line).unwrap_or("0").to_string());
            conn.write_all(format!("S\t{to}\t{text}\n").as_bytes())
                .unwrap();
        }
    }
}
