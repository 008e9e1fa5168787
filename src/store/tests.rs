//! The store against a real SQLite file in a temp directory.

use super::mail::id_floor;
use super::*;
use crate::protocol::AckState;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("t.db")).unwrap();
    (dir, s)
}

#[test]
fn id_floor_orders_like_uuid_v7() {
    let at = 1_700_000_000_123;
    let earlier = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        (at / 1000 - 1) as u64,
        0,
    ))
    .to_string();
    let later = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        (at / 1000 + 1) as u64,
        0,
    ))
    .to_string();
    assert!(earlier < id_floor(at), "{earlier} < {}", id_floor(at));
    assert!(later > id_floor(at), "{later} > {}", id_floor(at));
}

fn msg<'a>(id: &'a str, text: &'a str, sent_at: Millis) -> NewMessage<'a> {
    NewMessage {
        key: None,
        id,
        sender: "a",
        text,
        in_reply_to: None,
        sent_at,
        expires_at: sent_at + 1000,
    }
}

#[test]
fn delivery_state_moves_once() {
    let (_d, s) = store();
    s.insert_message(&msg("m1", "hi", 10), &["b", "c"]).unwrap();
    assert_eq!(s.pending_for("b", None, 100).unwrap().rows.len(), 1);
    assert_eq!(s.queued_counts().unwrap()["c"], 1);
    assert!(s.mark_delivered("m1", "b", 11).unwrap());
    assert!(
        !s.mark_delivered("m1", "b", 12).unwrap(),
        "second ack changes nothing"
    );
    assert!(!s.mark_delivered("m1", "x", 12).unwrap(), "not x's message");
    assert!(s.pending_for("b", None, 100).unwrap().rows.is_empty());
    assert_eq!(s.pending_for("c", None, 100).unwrap().rows[0].text, "hi");
    let log = s.log(10, None, None).unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        log.iter()
            .filter(|e| e.state == DeliveryState::Delivered)
            .count(),
        1
    );
    assert_eq!(s.log(10, Some("c"), None).unwrap().len(), 1);
    assert_eq!(s.log(10, Some("a"), None).unwrap().len(), 2);
}

#[test]
fn held_moves_on_to_delivered_and_pushed_stays() {
    let (_d, s) = store();
    s.insert_message(&msg("m1", "hi", 10), &["b", "c"]).unwrap();
    let held = s.mark("m1", "b", AckState::Held, 11).unwrap();
    assert_eq!(held, Some(Marked::FromQueued));
    assert_eq!(s.mark("m1", "b", AckState::Held, 12).unwrap(), None);
    assert_eq!(s.mark("m1", "b", AckState::Pushed, 12).unwrap(), None);
    assert!(
        s.pending_for("b", None, 100).unwrap().rows.is_empty(),
        "held is not pushed again"
    );
    assert_eq!(
        s.log_entry("m1", "b").unwrap().unwrap().state,
        DeliveryState::Held
    );
    let on = s.mark("m1", "b", AckState::Delivered, 13).unwrap();
    assert_eq!(on, Some(Marked::FromHeld));
    assert_eq!(
        s.log_entry("m1", "b").unwrap().unwrap().state,
        DeliveryState::Delivered
    );
    assert_eq!(s.mark("m1", "b", AckState::Delivered, 14).unwrap(), None);

    let pushed = s.mark("m1", "c", AckState::Pushed, 11).unwrap();
    assert_eq!(pushed, Some(Marked::FromQueued));
    assert!(
        s.pending_for("c", None, 100).unwrap().rows.is_empty(),
        "pushed is not pushed again"
    );
    assert_eq!(s.mark("m1", "c", AckState::Delivered, 12).unwrap(), None);
    assert_eq!(
        s.log_entry("m1", "c").unwrap().unwrap().state,
        DeliveryState::Pushed
    );
    assert!(s.queued_counts().unwrap().is_empty());

    // Held, then let go unshown: queued again; held, then declined: denied for good.
    s.insert_message(&msg("m2", "again", 20), &["b"]).unwrap();
    s.mark("m2", "b", AckState::Held, 21).unwrap();
    let back = s.mark("m2", "b", AckState::Returned, 22).unwrap();
    assert_eq!(back, Some(Marked::Requeued));
    assert_eq!(s.pending_for("b", None, 100).unwrap().rows[0].id, "m2");
    assert_eq!(s.mark("m2", "b", AckState::Returned, 23).unwrap(), None);
    s.mark("m2", "b", AckState::Held, 24).unwrap();
    let no = s.mark("m2", "b", AckState::Denied, 25).unwrap();
    assert_eq!(no, Some(Marked::FromHeld));
    assert_eq!(
        s.log_entry("m2", "b").unwrap().unwrap().state,
        DeliveryState::Denied
    );
    assert_eq!(s.mark("m2", "b", AckState::Delivered, 26).unwrap(), None);
    assert!(s.pending_for("b", None, 100).unwrap().rows.is_empty());

    // Delivered, then a late word from the session: held, or dropped (queued again),
    // within the grace; after it, delivered is final.
    s.insert_message(&msg("m3", "late", 30), &["b"]).unwrap();
    s.mark("m3", "b", AckState::Delivered, 1_000).unwrap();
    let held = s.mark("m3", "b", AckState::Held, 2_000).unwrap();
    assert_eq!(held, Some(Marked::FromHeld));
    s.mark("m3", "b", AckState::Delivered, 3_000).unwrap();
    let back = s.mark("m3", "b", AckState::Returned, 4_000).unwrap();
    assert_eq!(back, Some(Marked::Requeued));
    assert_eq!(s.pending_for("b", None, 100).unwrap().rows[0].id, "m3");
    s.mark("m3", "b", AckState::Delivered, 5_000).unwrap();
    let too_late = 5_000 + REOPEN_GRACE + 1;
    assert_eq!(
        s.mark("m3", "b", AckState::Returned, too_late).unwrap(),
        None
    );
    assert_eq!(s.mark("m3", "b", AckState::Held, too_late).unwrap(), None);
    assert_eq!(
        s.log_entry("m3", "b").unwrap().unwrap().state,
        DeliveryState::Delivered
    );
}

#[test]
fn sweep_expires_mail_and_forgets_idle_peers() {
    let (_d, s) = store();
    for name in ["old", "busy", "online"] {
        s.upsert_peer(&PeerRow {
            name: name.into(),
            context: crate::protocol::PeerContext {
                cwd: "/".into(),
                ..Default::default()
            },
            first_seen: 0,
            last_seen: 0,
            ..Default::default()
        })
        .unwrap();
    }
    let old_id = format!("{}-7000-8000-000000000001", id_floor(0));
    let fresh_id = format!("{}-7000-8000-000000000002", id_floor(5000));
    s.insert_message(&msg(&old_id, "expired", 0), &["old"])
        .unwrap();
    s.insert_message(&msg(&fresh_id, "fresh", 5000), &["busy"])
        .unwrap();
    let swept = s.sweep(2000, 2000, 100, &|n| n == "online", 1000).unwrap();
    assert_eq!(
        swept,
        Swept {
            messages: 1,
            peers: 1
        }
    );
    let names: Vec<_> = s
        .load_peers()
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(names.contains(&"busy".to_string()) && names.contains(&"online".to_string()));
    assert_eq!(s.pending_for("busy", None, 100).unwrap().rows.len(), 1);
}

#[test]
fn reopening_keeps_data_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    Store::open(&path)
        .unwrap()
        .insert_message(&msg("m1", "x", 1), &["b"])
        .unwrap();
    let s = Store::open(&path).unwrap();
    assert_eq!(s.log_entry("m1", "b").unwrap().unwrap().text, "x");
    s.conn.pragma_update(None, "user_version", 99).unwrap();
    drop(s);
    assert!(matches!(Store::open(&path), Err(StoreError::TooNew { .. })));
}
