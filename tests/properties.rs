//! Property tests: the name rules, the store's delivery state machine against a model, and
//! the frame checks against their stated rules, over generated inputs.

use std::collections::{BTreeMap, HashMap};

use claude_peers::broker::frame;
use claude_peers::config::Limits;
use claude_peers::names::{MAX_NAME_LEN, PeerName};
use claude_peers::protocol::{ClientFrame, ErrorCode, Request, Send};
use claude_peers::store::{NewMessage, Store};
use proptest::prelude::*;

/// The rule of `names.rs`, written independently.
fn is_valid_name(s: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && s != "."
        && s != ".."
}

proptest! {
    #[test]
    fn a_name_is_accepted_exactly_when_it_follows_the_rule(s in any::<String>()) {
        prop_assert_eq!(PeerName::new(&s).is_ok(), is_valid_name(&s));
    }

    #[test]
    fn likely_names_are_accepted_exactly_when_they_follow_the_rule(
        s in "[A-Za-z0-9._/ -]{0,70}"
    ) {
        prop_assert_eq!(PeerName::new(&s).is_ok(), is_valid_name(&s));
    }

    #[test]
    fn sanitize_always_gives_a_valid_stable_name(s in any::<String>()) {
        let n = PeerName::sanitize(&s);
        prop_assert!(is_valid_name(n.as_str()), "{:?} -> {:?}", s, n);
        prop_assert_eq!(PeerName::sanitize(n.as_str()), n.clone());
        // A name that is already valid and has no separator at its ends is kept.
        if is_valid_name(&s) && !s.starts_with(['-', '.']) && !s.ends_with(['-', '.']) {
            prop_assert_eq!(n.as_str(), s.as_str());
        }
    }

    #[test]
    fn suffixes_stay_valid_and_distinct(s in "[a-z0-9]{1,64}", n in 2u32..100_000) {
        let base = PeerName::new(&s).unwrap();
        let suffixed = base.with_suffix(n);
        prop_assert!(is_valid_name(suffixed.as_str()));
        let tail = format!("-{n}");
        prop_assert!(suffixed.as_str().ends_with(&tail));
        prop_assert_ne!(suffixed, base.with_suffix(n + 1));
    }

    #[test]
    fn a_send_validates_exactly_when_it_keeps_the_rules(
        to in prop::collection::vec("[a-z./ ]{0,6}", 0..4),
        text in "[ a\n]{0,8}",
        // A message id (a UUID) or something that is not one.
        reply in prop::option::of(prop_oneof![
            "[0-9a-f-]{0,3}",
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ]),
        from in prop::option::of("[a-z/]{0,3}"),
    ) {
        let limits = Limits::default();
        let send = Send { key: None, to: to.clone(), text: text.clone(), in_reply_to: reply.clone(), from: from.clone() };
        // It goes over the wire and back first, as from a real client.
        let bytes = serde_json::to_vec(&ClientFrame { id: Some(1), request: Request::Send(send) }).unwrap();
        let frame = frame::decode(&bytes).unwrap().unwrap();
        let verdict = frame::validate(&frame.request, &limits);
        let expected_ok = !to.is_empty()
            && to.iter().all(|t| is_valid_name(t))
            && !text.trim().is_empty()
            && reply.as_ref().is_none_or(|r| claude_peers::protocol::is_message_id(r))
            && from.as_ref().is_none_or(|f| is_valid_name(f));
        prop_assert_eq!(verdict.is_ok(), expected_ok, "{:?}", verdict);
        if let Err(e) = verdict {
            prop_assert!(matches!(e.code, ErrorCode::BadName | ErrorCode::BadRequest | ErrorCode::EmptyMessage));
        }
    }
}

/// One step against the store and the model.
#[derive(Debug, Clone)]
enum Op {
    /// A new message for these recipients (indexes into RECIPIENTS), kept `ttl` ms.
    Send { to: Vec<usize>, ttl: i64 },
    /// An ack by `recipient` of the message `nth` sent (mod how many exist).
    Ack { nth: usize, recipient: usize },
    /// Steps inside a transaction that is rolled back, as when a commit fails.
    RolledBack(Vec<(Vec<usize>, usize)>),
    /// Closes and reopens the database.
    Reopen,
    /// A retention sweep at `now` for messages sent before `before`.
    Sweep { now: i64, before: i64 },
}

const RECIPIENTS: [&str; 4] = ["a", "b", "c", "d"];

fn op() -> impl Strategy<Value = Op> {
    let to = prop::collection::btree_set(0..RECIPIENTS.len(), 1..=RECIPIENTS.len())
        .prop_map(|s| s.into_iter().collect::<Vec<_>>());
    prop_oneof![
        4 => (to.clone(), 1i64..400).prop_map(|(to, ttl)| Op::Send { to, ttl }),
        4 => (any::<usize>(), 0..RECIPIENTS.len()).prop_map(|(nth, recipient)| Op::Ack { nth, recipient }),
        1 => prop::collection::vec((to, 0..RECIPIENTS.len()), 1..4).prop_map(Op::RolledBack),
        1 => Just(Op::Reopen),
        1 => (0i64..2000, 0i64..2000).prop_map(|(now, before)| Op::Sweep { now, before }),
    ]
}

/// A UUIDv7-shaped id that sorts by `sent_at` like the broker's, made unique by `n`.
fn id_at(sent_at: i64, n: usize) -> String {
    let ms = sent_at as u64;
    format!(
        "{:08x}-{:04x}-7000-8000-{n:012x}",
        (ms >> 16) & 0xffff_ffff,
        ms & 0xffff
    )
}

/// What the store should hold: per message, its times and who has not acked it yet.
#[derive(Default)]
struct Model {
    /// id → (sent_at, expires_at, recipients → delivered)
    messages: BTreeMap<String, (i64, i64, BTreeMap<&'static str, bool>)>,
    sent: usize,
}

impl Model {
    fn pending(&self, r: &str) -> Vec<String> {
        self.messages
            .iter()
            .filter(|(_, (_, _, to))| to.get(r) == Some(&false))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_delivery_state_machine_matches_its_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let mut store = Store::open(&path).unwrap();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Send { to, ttl } => {
                    model.sent += 1;
                    let sent_at = model.sent as i64 * 10;
                    let id = id_at(sent_at, model.sent);
                    let names: Vec<&str> = to.iter().map(|&i| RECIPIENTS[i]).collect();
                    store.insert_message(&NewMessage { key: None,
                        id: &id, sender: "s", text: "t", in_reply_to: None,
                        sent_at, expires_at: sent_at + ttl,
                    }, &names).unwrap();
                    model.messages.insert(id, (sent_at, sent_at + ttl, names.into_iter().map(|n| (n, false)).collect()));
                }
                Op::Ack { nth, recipient } => {
                    let r = RECIPIENTS[recipient];
                    let Some(id) = model.messages.keys().nth(nth % model.messages.len().max(1)).cloned() else { continue };
                    let marked = store.mark_delivered(&id, r, 1).unwrap();
                    let slot = model.messages.get_mut(&id).unwrap().2.get_mut(r);
                    let expected = slot.as_ref().is_some_and(|d| !**d);
                    prop_assert_eq!(marked, expected, "ack of {} by {}", id, r);
                    if let Some(d) = slot { *d = true; }
                }
                Op::RolledBack(steps) => {
                    store.begin().unwrap();
                    for (k, (to, _)) in steps.iter().enumerate() {
                        let id = id_at(1_000_000, model.sent * 100 + k);
                        let names: Vec<&str> = to.iter().map(|&i| RECIPIENTS[i]).collect();
                        store.insert_message(&NewMessage { key: None,
                            id: &id, sender: "s", text: "t", in_reply_to: None,
                            sent_at: 1_000_000, expires_at: 2_000_000,
                        }, &names).unwrap();
                    }
                    for (id, (_, _, to)) in &model.messages {
                        for r in to.keys() {
                            store.mark_delivered(id, r, 1).unwrap();
                        }
                    }
                    store.rollback();
                }
                Op::Reopen => {
                    drop(store);
                    store = Store::open(&path).unwrap();
                }
                Op::Sweep { now, before } => {
                    // In batches of 3, as the broker sweeps in batches between requests.
                    let mut removed = 0;
                    loop {
                        let swept = store.sweep(now, before, 0, &|_| true, 3).unwrap();
                        removed += swept.messages;
                        if swept.messages < 3 { break; }
                    }
                    let gone: Vec<String> = model.messages.iter()
                        .filter(|(_, (sent_at, expires_at, _))| *sent_at < before && *expires_at <= now)
                        .map(|(id, _)| id.clone())
                        .collect();
                    prop_assert_eq!(removed, gone.len() as u64);
                    for id in gone { model.messages.remove(&id); }
                }
            }
            // After every step the store answers exactly as the model says.
            let counts = store.queued_counts().unwrap();
            for r in RECIPIENTS {
                let pending: Vec<String> = store.pending_for(r, None, u32::MAX).unwrap().rows.into_iter().map(|p| p.id).collect();
                let expected = model.pending(r);
                prop_assert_eq!(counts.get(r).copied().unwrap_or(0), expected.len() as u64);
                prop_assert_eq!(pending, expected, "pending for {}", r);
            }
            prop_assert!(counts.keys().all(|k| RECIPIENTS.contains(&k.as_str())));
            let _: HashMap<String, u64> = counts;
        }
    }
}
