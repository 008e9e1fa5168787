//! Hostile and bad input at the socket, against a real broker: every class gets a clear
//! error, the connection stays usable where the protocol says so, the broker stays up, and
//! mail already queued is neither lost nor doubled.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use claude_peers::protocol::{MAX_FRAME_BYTES, PROTOCOL_VERSION};
use common::*;
use serde_json::Value;

/// A raw connection registered as `name`, without push (so the broker never waits for
/// it), and the `register` answer.
fn raw_peer(home: &Home, name: &str) -> (Raw, Value) {
    let mut r = Raw::greeted(&home.paths.socket);
    let v = r.call(&format!(
        r#"{{"id":1,"op":"register","name":"{name}","context":{{"cwd":"/{name}"}}}}"#
    ));
    assert_eq!(v["result"]["name"], name, "{v}");
    (r, v)
}

/// The queued mail `name` gets on registering, as texts, in order.
fn collect_mail(home: &Home, name: &str) -> Vec<String> {
    let (mut r, v) = raw_peer(home, name);
    let queued = v["result"]["queued"].as_u64().expect("registered");
    (0..queued)
        .map(|_| {
            let d = r.recv().expect("a delivery");
            d["deliver"]["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn every_class_of_bad_input_gets_a_clear_error_and_loses_nothing() {
    let home = Home::new();
    let _b = home.broker(&["--send-rate", "20"]);
    // Mail waiting for an offline peer before the onslaught.
    drop(raw_peer(&home, "bob"));
    let (mut r, _) = raw_peer(&home, "alice");
    let v = r.call(r#"{"id":2,"op":"send","to":["bob"],"text":"before"}"#);
    assert_eq!(v["result"]["recipients"][0]["state"], "queued", "{v}");

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_field = format!(
        r#"{{"id":3,"op":"send","to":{}"bob"{},"text":"x"}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let long_name = "n".repeat(65);
    let over = "x".repeat(64 * 1024 + 1);
    let at_limit = "x".repeat(64 * 1024);
    let long_summary = "s".repeat(4097);
    let long_cwd = "/d".repeat(2049);
    // (class, frame, expected error code or "ok").
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"this is not json".to_vec(), "bad_frame"),
        ("a JSON array", b"[1,2,3]".to_vec(), "bad_frame"),
        (
            "trailing garbage",
            br#"{"op":"status"} x"#.to_vec(),
            "bad_frame",
        ),
        ("invalid UTF-8", b"\xff\xfe{}".to_vec(), "bad_frame"),
        (
            "invalid UTF-8 inside a string",
            b"{\"id\":4,\"op\":\"send\",\"to\":[\"bob\"],\"text\":\"\xc3\x28\"}".to_vec(),
            "bad_frame",
        ),
        (
            "a lone surrogate escape",
            br#"{"id":5,"op":"send","to":["bob"],"text":"\ud800"}"#.to_vec(),
            "bad_request",
        ),
        ("deep nesting", deep.into_bytes(), "bad_frame"),
        (
            "deep nesting in a field",
            deep_field.into_bytes(),
            "bad_request",
        ),
        (
            "unknown op",
            br#"{"id":6,"op":"fly"}"#.to_vec(),
            "unknown_op",
        ),
        (
            "op not a string",
            br#"{"id":7,"op":7}"#.to_vec(),
            "bad_request",
        ),
        ("no op", br#"{"id":8}"#.to_vec(), "bad_request"),
        (
            "unknown field",
            br#"{"id":9,"op":"send","to":["bob"],"text":"x","reply_to":"m"}"#.to_vec(),
            "bad_request",
        ),
        (
            "wrong type: to",
            br#"{"id":10,"op":"send","to":"bob","text":"x"}"#.to_vec(),
            "bad_request",
        ),
        (
            "wrong type: text",
            br#"{"id":11,"op":"send","to":["bob"],"text":5}"#.to_vec(),
            "bad_request",
        ),
        (
            "missing field",
            br#"{"id":12,"op":"send","to":["bob"]}"#.to_vec(),
            "bad_request",
        ),
        (
            "negative id",
            br#"{"id":-1,"op":"status"}"#.to_vec(),
            "bad_request",
        ),
        (
            "id past u64",
            br#"{"id":18446744073709551616,"op":"status"}"#.to_vec(),
            "bad_request",
        ),
        (
            "wrong type: limit",
            br#"{"id":13,"op":"log","limit":-1}"#.to_vec(),
            "bad_request",
        ),
        (
            "empty message",
            br#"{"id":14,"op":"send","to":["bob"],"text":""}"#.to_vec(),
            "empty_message",
        ),
        (
            "blank message",
            br#"{"id":15,"op":"send","to":["bob"],"text":" \n\t"}"#.to_vec(),
            "empty_message",
        ),
        (
            "message over 64 KiB",
            format!(r#"{{"id":16,"op":"send","to":["bob"],"text":"{over}"}}"#).into_bytes(),
            "message_too_large",
        ),
        (
            "message of exactly 64 KiB",
            format!(r#"{{"id":17,"op":"send","to":["bob"],"text":"{at_limit}"}}"#).into_bytes(),
            "ok",
        ),
        (
            "recipient with /",
            br#"{"id":18,"op":"send","to":["a/b"],"text":"x"}"#.to_vec(),
            "bad_name",
        ),
        (
            "recipient ..",
            br#"{"id":19,"op":"send","to":[".."],"text":"x"}"#.to_vec(),
            "bad_name",
        ),
        (
            "recipient with a control character",
            br#"{"id":20,"op":"send","to":["b\u0007ob"],"text":"x"}"#.to_vec(),
            "bad_name",
        ),
        (
            "recipient over 64 bytes",
            format!(r#"{{"id":21,"op":"send","to":["{long_name}"],"text":"x"}}"#).into_bytes(),
            "bad_name",
        ),
        (
            "sender name with /",
            br#"{"id":22,"op":"log","peer":"../bob"}"#.to_vec(),
            "bad_name",
        ),
        (
            "a sender posing as the user",
            br#"{"id":28,"op":"send","to":["bob"],"text":"x","from":"User"}"#.to_vec(),
            "bad_name",
        ),
        (
            "unknown recipient",
            br#"{"id":23,"op":"send","to":["bobb"],"text":"x"}"#.to_vec(),
            "unknown_peer",
        ),
        (
            "summary over 4 KiB",
            format!(r#"{{"id":24,"op":"set_summary","summary":"{long_summary}"}}"#).into_bytes(),
            "bad_request",
        ),
        (
            "scope place over 4 KiB",
            format!(r#"{{"id":25,"op":"list_peers","scope":"directory","cwd":"{long_cwd}"}}"#)
                .into_bytes(),
            "bad_request",
        ),
        (
            "second register",
            br#"{"id":26,"op":"register","name":"carol","context":{"cwd":"/c"}}"#.to_vec(),
            "bad_request",
        ),
        (
            "second hello",
            br#"{"id":27,"op":"hello","protocol":3,"client":"x","version":"0"}"#.to_vec(),
            "bad_request",
        ),
    ];
    for (class, frame, expected) in &cases {
        let mut line = frame.clone();
        line.push(b'\n');
        r.send_bytes(&line);
        let v = r
            .recv()
            .unwrap_or_else(|| panic!("{class}: connection closed"));
        if *expected == "ok" {
            assert!(v.get("result").is_some(), "{class}: {v}");
            continue;
        }
        assert_eq!(error_code(&v), Some(*expected), "{class}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.len() > 10, "{class}: no clear message: {v}");
    }
    // A register with a bad name, on a fresh connection, for each kind of bad name.
    for name in ["a/b", "..", "tab\\there", long_name.as_str(), ""] {
        let mut c = Raw::greeted(&home.paths.socket);
        let v = c.call(&format!(
            r#"{{"id":1,"op":"register","name":"{name}","context":{{"cwd":"/x"}}}}"#
        ));
        assert_eq!(error_code(&v), Some("bad_name"), "{name:?}: {v}");
    }

    // A flood past the rate limit (20/s, bursts of 40), written without waiting: every
    // send is answered, the excess with `rate_limited`, and the connection stays usable.
    let flood = 200;
    let mut burst = Vec::new();
    for i in 0..flood {
        burst.extend_from_slice(
            format!(
                r#"{{"id":{},"op":"send","to":["bob"],"text":"flood {i}"}}"#,
                1000 + i
            )
            .as_bytes(),
        );
        burst.push(b'\n');
    }
    r.send_bytes(&burst);
    let mut answers: HashMap<u64, Value> = HashMap::new();
    while answers.len() < flood {
        let v = r.recv().expect("an answer to each flooded send");
        answers.insert(v["id"].as_u64().expect("answer with id"), v);
    }
    let accepted: Vec<u64> = (1000..1000 + flood as u64)
        .filter(|id| answers[id].get("result").is_some())
        .collect();
    let limited = answers
        .values()
        .filter(|v| error_code(v) == Some("rate_limited"))
        .count();
    assert!(
        !accepted.is_empty() && accepted.len() <= 41,
        "{}",
        accepted.len()
    );
    assert_eq!(accepted.len() + limited, flood, "only rate limits refuse");
    let v = r.call(r#"{"id":3000,"op":"status"}"#);
    assert!(v["result"]["pid"].is_u64(), "still usable: {v}");

    // An oversized frame is refused and that connection closed; the broker stays up.
    let mut big = vec![b'x'; MAX_FRAME_BYTES + 10];
    big.push(b'\n');
    r.send_bytes_until_closed(&big);
    let v = r.recv().expect("an answer before closing");
    assert_eq!(error_code(&v), Some("frame_too_large"), "{v}");
    assert!(
        r.recv().is_none(),
        "connection closed after an oversized frame"
    );

    // Nothing queued was lost or doubled: bob gets exactly what was accepted, in order.
    let mut expected = vec!["before".to_string(), at_limit.clone()];
    expected.extend(accepted.iter().map(|id| format!("flood {}", id - 1000)));
    let mail = collect_mail(&home, "bob");
    assert_eq!(mail.len(), expected.len());
    assert!(
        mail == expected,
        "bob's mail differs from what was accepted"
    );
}

#[test]
fn before_hello_only_hello_is_answered() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let mut r = Raw::connect(&home.paths.socket);
    let v = r.call(r#"{"id":1,"op":"status"}"#);
    assert_eq!(error_code(&v), Some("hello_required"), "{v}");
    assert_eq!(v["id"], 1);
    let v = r.call(&format!(
        r#"{{"id":2,"op":"hello","protocol":{PROTOCOL_VERSION},"client":"raw","version":"0"}}"#
    ));
    assert_eq!(v["result"]["protocol"], PROTOCOL_VERSION, "{v}");
    let v = r.call(r#"{"id":3,"op":"whoami"}"#);
    assert_eq!(error_code(&v), Some("not_registered"), "{v}");
}

#[test]
fn a_client_that_floods_without_reading_is_held_back() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let mut r = Raw::greeted(&home.paths.socket);
    r.stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // Each line earns an error frame the client never reads. Once the answers fill the
    // socket, the broker stops reading, and our writes stall instead of the broker's memory
    // growing without bound.
    let line =
        b"{\"id\":1,\"op\":\"fly\",\"pad\":\"................................\"}\n".repeat(1024);
    let limit = 256 << 20;
    let mut written = 0usize;
    let stalled = loop {
        match std::io::Write::write(&mut r.stream, &line) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
            Err(e) => panic!("write failed: {e}"),
        }
        if written > limit {
            break false;
        }
    };
    assert!(
        stalled,
        "the broker kept reading {written} bytes of requests whose answers nobody read"
    );
    // Others are served meanwhile.
    let mut other = Raw::greeted(&home.paths.socket);
    let v = other.call(r#"{"id":1,"op":"status"}"#);
    assert!(v["result"]["pid"].is_u64(), "{v}");
}
