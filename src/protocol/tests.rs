//! The wire shapes, as documented in docs/PROTOCOL.md.

use super::*;

#[test]
fn requests_have_the_documented_shape() {
    let f = ClientFrame {
        id: Some(7),
        request: Send {
            key: None,
            to: vec!["bob".into()],
            text: "hi".into(),
            in_reply_to: None,
            from: None,
        }
        .into(),
    };
    assert_eq!(
        serde_json::to_string(&f).unwrap(),
        r#"{"id":7,"op":"send","to":["bob"],"text":"hi"}"#
    );
    let back: ClientFrame = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
    assert!(matches!(back.request, Request::Status));
    assert_eq!(back.id, None);
}

#[test]
fn ops_list_matches_the_enum() {
    // serde names every variant it knows when it meets one it does not: the list must be
    // exactly that, in both directions.
    let err = serde_json::from_value::<Request>(serde_json::json!({"op": "no-such-op"}))
        .unwrap_err()
        .to_string();
    let known: Vec<&str> = err
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("serde's message changed: {err}"))
        .1
        .split(", ")
        .map(|v| v.trim_matches(|c: char| c == '`' || c.is_whitespace() || c == ','))
        .map(|v| v.split('`').next().unwrap())
        .collect();
    assert_eq!(known, Request::OPS, "{err}");
    for op in Request::OPS {
        let v = serde_json::json!({ "op": op });
        let err = serde_json::from_value::<Request>(v)
            .err()
            .map(|e| e.to_string());
        assert!(
            !err.unwrap_or_default().contains("unknown variant"),
            "{op} is not a Request variant"
        );
    }
}

#[test]
fn borrowed_peer_records_read_back_as_owned_ones() {
    let r = PeerInfoRef {
        name: "bob",
        online: true,
        summary: "line\nbreak",
        first_seen: 1,
        last_seen: 2,
        unread: 3,
        context: &PeerContext {
            pid: 7,
            cwd: "/w/a \"q\"".into(),
            git_root: Some("/w".into()),
            git_common_dir: None,
            branch: Some("main".into()),
            git_remote: None,
            tty: None,
            host: Some("h".into()),
            client_name: Some("claude-code".into()),
            client_version: None,
            push: true,
        },
    };
    let expected = r.to_owned();
    let s = serde_json::to_string(&PeerListRef {
        next: None,
        peers: vec![r],
    })
    .unwrap();
    let back: PeerList = serde_json::from_str(&s).unwrap();
    assert_eq!(back.peers, vec![expected]);
    // Every field of PeerInfo is written by PeerInfoRef, under the same name.
    let owned = serde_json::to_value(&back.peers[0]).unwrap();
    let borrowed: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(owned, borrowed["peers"][0]);
}

#[test]
fn server_frames_round_trip() {
    let f = ServerFrame::result(Some(1), Reply::Done(Done {}));
    let s = serde_json::to_string(&f).unwrap();
    assert_eq!(s, r#"{"id":1,"result":{}}"#);
    let back: ServerFrame<Box<serde_json::value::RawValue>> = serde_json::from_str(&s).unwrap();
    assert!(matches!(back.body, Body::Result(r) if r.get() == "{}"));
    // A key of a later protocol is passed over.
    let later = r#"{"id":2,"result":{},"hint":{"x":1}}"#;
    let back: ServerFrame<Box<serde_json::value::RawValue>> = serde_json::from_str(later).unwrap();
    assert_eq!(back.id, Some(2));
}

#[test]
fn a_frame_is_read_as_exactly_one_message() {
    let read = |s: &str| {
        serde_json::from_str::<ServerFrame<Box<RawValue>>>(s)
            .map_err(|e| e.to_string())
            .and_then(ServerFrame::into_message)
    };
    assert!(matches!(
        read(r#"{"id":4,"result":{}}"#),
        Ok(ServerMessage::Answer {
            id: 4,
            result: Ok(_)
        })
    ));
    assert!(matches!(
        read(r#"{"id":5,"error":{"code":"internal","message":"x"}}"#),
        Ok(ServerMessage::Answer {
            id: 5,
            result: Err(_)
        })
    ));
    assert!(matches!(
        read(r#"{"error":{"code":"busy","message":"x"}}"#),
        Ok(ServerMessage::Refused(_))
    ));
    assert!(matches!(
        read(r#"{"lagged":{"missed":3}}"#),
        Ok(ServerMessage::Lagged(Lagged { missed: 3 }))
    ));
    assert!(read(r#"{"id":1}"#).is_err(), "nothing in it");
    assert!(
        read(r#"{"id":1,"result":{},"lagged":{"missed":1}}"#).is_err(),
        "two things in it"
    );
    assert!(read(r#"{"result":{}}"#).is_err(), "a result for no request");
}
