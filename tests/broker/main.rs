//! The broker through its protocol: real broker processes, real sockets, real SQLite files.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::time::Duration;

use claude_peers::client::{Client, decode};
use claude_peers::protocol::*;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_between_two_clients() {
    let home = Home::new();
    let _b = home.broker(&["--ack-wait", "5s"]);
    let (a, a_name) = home.peer("alice", "/work/a").await;
    let (mut b, b_name) = home.peer("bob", "/work/b").await;
    assert_eq!((a_name.as_str(), b_name.as_str()), ("alice", "bob"));
    a.call(SetSummary {
        summary: "refactoring the parser".into(),
    })
    .await
    .unwrap();

    let answer = a.start(send("bob", "what are you editing?")).unwrap();
    let d = next_delivery(&mut b).await;
    assert_eq!(d.from, "alice");
    assert_eq!(d.to, "bob");
    assert_eq!(d.text, "what are you editing?");
    assert_eq!(d.from_cwd.as_deref(), Some("/work/a"));
    assert_eq!(d.from_summary.as_deref(), Some("refactoring the parser"));
    b.notify(Ack::delivered(vec![d.id.clone()])).unwrap();
    let sent: Sent = decode(answer.await).unwrap();
    assert_eq!(sent.message_id, d.id);
    assert_eq!(sent.recipients.len(), 1);
    assert_eq!(sent.recipients[0].state, DeliveryState::Delivered);

    // A threaded reply travels back the same way.
    let reply = b
        .start(Send {
            in_reply_to: Some(d.id.clone()),
            ..send("alice", "parser.rs")
        })
        .unwrap();
    let mut a = a;
    let r = next_delivery(&mut a).await;
    assert_eq!(r.in_reply_to.as_deref(), Some(d.id.as_str()));
    a.notify(Ack::delivered(vec![r.id])).unwrap();
    let sent: Sent = decode(reply.await).unwrap();
    assert_eq!(sent.recipients[0].state, DeliveryState::Delivered);
}

#[tokio::test(flavor = "multi_thread")]
async fn unacked_push_answers_pushed_after_the_wait() {
    let home = Home::new();
    let _b = home.broker(&["--ack-wait", "50ms"]);
    let (a, _) = home.peer("alice", "/a").await;
    let (mut b, _) = home.peer("bob", "/b").await;
    let sent = a.call(send("bob", "hi")).await.unwrap();
    assert_eq!(sent.recipients[0].state, DeliveryState::Pushed);
    assert_eq!(next_delivery(&mut b).await.id, sent.message_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn held_and_pushed_acks_are_what_the_sender_sees_and_are_not_pushed_again() {
    let home = Home::new();
    let _b = home.broker(&["--ack-wait", "5s"]);
    let (a, _) = home.peer("alice", "/a").await;
    let (mut b, _) = home.peer("bob", "/b").await;
    let (mut c, _) = home.peer("carol", "/c").await;

    // bob's session holds the message for its user; carol's wrote it as a channel event.
    // What the recipient acks is what the sender is answered.
    let acked_as = async |to: &mut Client, name: &str, text: &str, state: AckState| {
        let sent = a.start(send(name, text)).unwrap();
        let d = next_delivery(to).await;
        let ids = vec![d.id.clone()];
        to.notify(Ack { ids, state }).unwrap();
        let sent: Sent = decode(sent.await).unwrap();
        (d, sent.recipients[0].state)
    };
    let (d, answered) = acked_as(&mut b, "bob", "held for approval", AckState::Held).await;
    assert_eq!(answered, DeliveryState::Held);
    let (e, answered) = acked_as(&mut c, "carol", "as a channel event", AckState::Pushed).await;
    assert_eq!(answered, DeliveryState::Pushed);

    let log = a.call(LogQuery::default()).await.unwrap();
    let state_of = |id: &str| log.messages.iter().find(|x| x.id == id).unwrap().state;
    assert_eq!(state_of(&d.id), DeliveryState::Held);
    assert_eq!(state_of(&e.id), DeliveryState::Pushed);
    assert_eq!(b.call(WhoamiCall).await.unwrap().unread, 0);

    // Neither is pushed again when the sessions come back.
    drop((b, c));
    let w = home.client().await;
    wait_offline(&w, "bob").await;
    wait_offline(&w, "carol").await;
    let mut b = home.client().await;
    assert_eq!(b.call(register("bob", "/b")).await.unwrap().queued, 0);
    let mut c = home.client().await;
    assert_eq!(c.call(register("carol", "/c")).await.unwrap().queued, 0);
    assert_no_delivery(&mut b, Duration::from_millis(200)).await;
    assert_no_delivery(&mut c, Duration::from_millis(50)).await;

    // The user approves: bob's session confirms, and the log says delivered.
    b.call(Ack::delivered(vec![d.id.clone()])).await.unwrap();
    let log = a.call(LogQuery::default()).await.unwrap();
    let entry = log.messages.iter().find(|x| x.id == d.id).unwrap();
    assert_eq!(entry.state, DeliveryState::Delivered);
}

/// A session may tell late that it dropped what it seemed to take (Claude Code's drop
/// notices come seconds after): a `returned` ack soon after `delivered` queues the
/// message again, and it is delivered again on the next registration.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_returned_ack_queues_a_delivered_message_again() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (a, _) = home.peer("alice", "/a").await;
    let (mut b, _) = home.peer("bob", "/b").await;
    let sent = a.call(send("bob", "dropped after all")).await.unwrap();
    let d = next_delivery(&mut b).await;
    b.call(Ack::delivered(vec![d.id.clone()])).await.unwrap();
    assert_eq!(b.call(WhoamiCall).await.unwrap().unread, 0);
    b.call(Ack {
        ids: vec![d.id.clone()],
        state: AckState::Returned,
    })
    .await
    .unwrap();
    assert_eq!(b.call(WhoamiCall).await.unwrap().unread, 1);
    drop(b);
    let w = home.client().await;
    wait_offline(&w, "bob").await;
    let mut b = home.client().await;
    assert_eq!(b.call(register("bob", "/b")).await.unwrap().queued, 1);
    assert_eq!(next_delivery(&mut b).await.id, sent.message_id);
}

/// No session may register under a name that poses as the user, the model or the CLI,
/// in any case: its mail would arrive "from user".
#[tokio::test(flavor = "multi_thread")]
async fn names_that_pose_as_the_user_or_the_model_cannot_be_registered() {
    let home = Home::new();
    let _b = home.broker(&[]);
    for name in ["user", "Claude", "SYSTEM", "cli", "Assistant", "human"] {
        let c = home.client().await;
        let err = c.call(register(name, "/w")).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("reserved"), "{name}: {text}");
    }
    // Names that merely contain them are fine.
    let c = home.client().await;
    assert_eq!(
        c.call(register("user-api", "/w")).await.unwrap().name,
        "user-api"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_mail_is_delivered_on_reconnect() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (a, _) = home.peer("alice", "/a").await;
    let (b, _) = home.peer("bob", "/b").await;
    drop(b);
    let c = home.client().await;
    wait_offline(&c, "bob").await;
    let sent = a.call(send("bob", "are you there?")).await.unwrap();
    assert_eq!(sent.recipients[0].state, DeliveryState::Queued);

    let mut b = home.client().await;
    let reg = b.call(register("bob", "/b")).await.unwrap();
    assert_eq!(reg.name, "bob");
    assert!(reg.reclaimed);
    assert_eq!(reg.queued, 1);
    let d = next_delivery(&mut b).await;
    assert_eq!(
        (d.id.as_str(), d.text.as_str()),
        (sent.message_id.as_str(), "are you there?")
    );
    b.call(Ack::delivered(vec![d.id])).await.unwrap();
    let me = b.call(WhoamiCall).await.unwrap();
    assert_eq!(me.unread, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unacked_message_is_redelivered_once() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (a, _) = home.peer("alice", "/a").await;
    let (mut b, _) = home.peer("bob", "/b").await;
    let sent = a.call(send("bob", "ack me")).await.unwrap();
    let first = next_delivery(&mut b).await;
    assert_eq!(first.id, sent.message_id);
    drop(b); // gone before acking

    let mut b = home.client().await;
    let reg = b.call(register("bob", "/b")).await.unwrap();
    assert_eq!(reg.queued, 1);
    let again = next_delivery(&mut b).await;
    assert_eq!(again, first);
    b.call(Ack::delivered(vec![again.id.clone()]))
        .await
        .unwrap();
    // A second ack of the same id changes nothing and is not an error.
    b.call(Ack::delivered(vec![again.id])).await.unwrap();
    assert_no_delivery(&mut b, Duration::from_millis(200)).await;
    drop(b);

    let mut b = home.client().await;
    let reg = b.call(register("bob", "/b")).await.unwrap();
    assert_eq!(reg.queued, 0);
    assert_no_delivery(&mut b, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_broker_loses_no_answered_send() {
    let home = Home::new();
    let mut broker = home.broker(&["--send-rate", "0"]);
    let (a, _) = home.peer("alice", "/a").await;
    let (mut b, _) = home.peer("bob", "/b").await;

    // Sends in flight when the broker dies: those answered must survive.
    let mut answered = HashSet::new();
    let mut acked = HashSet::new();
    let mut waiting = Vec::new();
    for i in 0..300 {
        waiting.push(a.start(send("bob", &format!("m{i}"))).unwrap());
    }
    // Bob reads and acks part of it.
    for _ in 0..50 {
        let d = next_delivery(&mut b).await;
        b.notify(Ack::delivered(vec![d.id.clone()])).unwrap();
        acked.insert(d.id);
    }
    // The first hundred are answered (acked ones at once, the rest after the ack wait);
    // the rest are in flight when the broker dies.
    let mut waiting = waiting.into_iter();
    for w in waiting.by_ref().take(100) {
        answered.insert(decode::<Sent>(w.await).unwrap().message_id);
    }
    broker.kill9();
    for w in waiting {
        match decode::<Sent>(w.await) {
            Ok(s) => {
                answered.insert(s.message_id);
            }
            Err(e) => assert!(
                matches!(e, claude_peers::client::ClientError::Disconnected),
                "{e}"
            ),
        }
    }
    assert!(answered.len() >= 100, "{} answered", answered.len());
    drop((a, b));

    let _broker = home.broker(&["--send-rate", "0"]);
    let (a, _) = home.peer("alice", "/a").await;
    let (mut b, _) = home.peer("bob", "/b").await;
    let mut received = HashSet::new();
    let expected: HashSet<_> = answered.difference(&acked).cloned().collect();
    // Every answered send not yet acked arrives, each once. (Sends stored but not yet
    // answered when the broker died may arrive too: the sender was told nothing.)
    while !expected.is_subset(&received) {
        let d = next_delivery(&mut b).await;
        assert!(
            !acked.contains(&d.id),
            "{} was acked before the crash",
            d.id
        );
        assert!(received.insert(d.id.clone()), "{} delivered twice", d.id);
        b.notify(Ack::delivered(vec![d.id])).unwrap();
    }
    // The clients carry on with the new broker.
    let sent = a.call(send("bob", "after restart")).await.unwrap();
    loop {
        let d = next_delivery(&mut b).await;
        assert!(received.insert(d.id.clone()), "{} delivered twice", d.id);
        if d.id == sent.message_id {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn names_collide_and_are_reclaimed() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (web1, n1) = home.peer("web", "/x").await;
    let (_web2, n2) = home.peer("web", "/y").await;
    let (_web3, n3) = home.peer("web", "/z").await;
    assert_eq!(
        (n1.as_str(), n2.as_str(), n3.as_str()),
        ("web", "web-2", "web-3")
    );

    drop(web1);
    let c = home.client().await;
    wait_offline(&c, "web").await;
    // Offline "web" belongs to /x: another directory does not take it...
    let (other, n) = home.peer("web", "/elsewhere").await;
    assert_eq!(n, "web-4");
    drop(other);
    // ...but the same directory does, and so does an explicit name.
    let back = home.client().await;
    let reg = back.call(register("web", "/x")).await.unwrap();
    assert_eq!((reg.name.as_str(), reg.reclaimed), ("web", true));
    drop(back);
    wait_offline(&c, "web").await;
    let explicit = home.client().await;
    let reg = explicit
        .call(Register {
            explicit: true,
            ..register("web", "/anywhere")
        })
        .await
        .unwrap();
    assert_eq!((reg.name.as_str(), reg.reclaimed), ("web", true));

    // Listing changes nothing: twice the same answer.
    let l1 = c
        .call(ListPeers {
            include_offline: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let l2 = c
        .call(ListPeers {
            include_offline: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&l1.peers).unwrap(),
        serde_json::to_value(&l2.peers).unwrap()
    );
}

/// Listings are written from records the broker keeps between listings; every kind of
/// change to a peer must still show in the next one.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_follows_every_change_to_a_peer() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let (alice, _) = home.peer("alice", "/a").await;
    let (bob, _) = home.peer("bob", "/b").await;
    let c = home.client().await;
    let bob_now = || async {
        let all = ListPeers {
            include_offline: true,
            ..Default::default()
        };
        let peers = c.call(all).await.unwrap().peers;
        peers
            .into_iter()
            .find(|p| p.name == "bob")
            .expect("bob is listed")
    };

    let first = bob_now().await;
    assert!(first.online && first.summary.is_empty() && first.unread == 0);
    assert_eq!(bob_now().await, first, "nothing changed, nothing differs");

    bob.call(SetSummary {
        summary: "fixing the parser".into(),
    })
    .await
    .unwrap();
    assert_eq!(bob_now().await.summary, "fixing the parser");

    drop(bob);
    wait_offline(&c, "bob").await;
    let offline = bob_now().await;
    assert!(!offline.online);
    assert!(offline.last_seen >= first.last_seen);

    alice.call(send("bob", "are you there?")).await.unwrap();
    assert_eq!(bob_now().await.unread, 1);

    let mut back = home.client().await;
    let mut r = register("bob", "/b");
    r.context.branch = Some("feature".into());
    back.call(r).await.unwrap();
    let again = bob_now().await;
    assert!(again.online);
    assert_eq!(again.context.branch.as_deref(), Some("feature"));
    let d = next_delivery(&mut back).await;
    back.call(Ack::delivered(vec![d.id])).await.unwrap();
    assert_eq!(bob_now().await.unread, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn scopes_select_directory_and_repo() {
    let home = Home::new();
    let _b = home.broker(&[]);
    let c = home.client().await;
    let at = |name: &str, cwd: &str, common: Option<&str>| {
        let mut r = register(name, cwd);
        r.context.git_common_dir = common.map(str::to_string);
        r
    };
    let (mut keep, mut names) = (Vec::new(), Vec::new());
    for r in [
        at("main", "/src/app", Some("/src/app/.git")),
        at("wt", "/src/app-wt", Some("/src/app/.git")),
        at("same-dir", "/src/app", None),
        at("other", "/src/lib", Some("/src/lib/.git")),
    ] {
        let cl = home.client().await;
        names.push(cl.call(r).await.unwrap().name);
        keep.push(cl);
    }
    let list = |scope, cwd: &str, common: Option<&str>| ListPeers {
        after: None,
        scope,
        include_offline: false,
        cwd: Some(cwd.into()),
        git_common_dir: common.map(str::to_string),
    };
    let names_of = |l: PeerList| l.peers.into_iter().map(|p| p.name).collect::<Vec<_>>();
    let repo = c
        .call(list(Scope::Repo, "/x", Some("/src/app/.git")))
        .await
        .unwrap();
    assert_eq!(names_of(repo), ["main", "wt"]);
    let dir = c
        .call(list(Scope::Directory, "/src/app", None))
        .await
        .unwrap();
    assert_eq!(names_of(dir), ["main", "same-dir"]);
    let all = c.call(list(Scope::Machine, "/", None)).await.unwrap();
    assert_eq!(all.peers.len(), 4);
    let err = c.call(list(Scope::Repo, "/", None)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));

    // A broadcast reaches everyone in scope but the sender, with a state for each.
    let sent = keep[0]
        .call(Broadcast {
            key: None,
            scope: Scope::Repo,
            text: "I changed the API, rebase".into(),
            in_reply_to: None,
            from: None,
            cwd: None,
            git_common_dir: None,
        })
        .await
        .unwrap();
    let to: Vec<_> = sent.recipients.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(to, ["wt"]);
    let d = next_delivery(&mut keep[1]).await;
    assert_eq!(d.text, "I changed the API, rebase");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_clear_and_lose_nothing() {
    let home = Home::new();
    let _b = home.broker(&["--mailbox-limit", "3", "--send-rate", "5"]);
    let (a, _) = home.peer("alice", "/a").await;
    let (b, _) = home.peer("bob", "/b").await;
    drop(b);

    let refuse = |r: Result<Sent, claude_peers::client::ClientError>| {
        let e = r.unwrap_err();
        (e.code().unwrap(), e.to_string())
    };
    let (code, msg) = refuse(a.call(send("bobb", "hi")).await);
    assert_eq!(code, ErrorCode::UnknownPeer);
    assert!(msg.contains("did you mean bob"), "{msg}");
    let (code, msg) = refuse(a.call(send("bob", &"x".repeat(64 * 1024 + 1))).await);
    assert_eq!(code, ErrorCode::MessageTooLarge);
    assert!(
        msg.contains("65537 bytes") && msg.contains("65536"),
        "{msg}"
    );
    assert_eq!(
        refuse(a.call(send("bob", "  ")).await).0,
        ErrorCode::EmptyMessage
    );
    assert_eq!(
        refuse(a.call(send("../etc", "x")).await).0,
        ErrorCode::BadName
    );
    // Rate limit: a burst of 10 passes, then refusals that say to slow down.
    // (Mailbox of 3 fills first; count both kinds.)
    let mut codes = Vec::new();
    for i in 0..12 {
        match a.call(send("bob", &format!("m{i}"))).await {
            Ok(_) => codes.push(None),
            Err(e) => codes.push(e.code()),
        }
    }
    assert_eq!(codes.iter().filter(|c| c.is_none()).count(), 3, "{codes:?}");
    assert!(codes.contains(&Some(ErrorCode::MailboxFull)), "{codes:?}");
    assert!(codes.contains(&Some(ErrorCode::RateLimited)), "{codes:?}");

    // Nothing queued was lost: bob gets exactly the three accepted messages.
    let mut b = home.client().await;
    let reg = b.call(register("bob", "/b")).await.unwrap();
    assert_eq!(reg.queued, 3);
    for i in 0..3 {
        assert_eq!(next_delivery(&mut b).await.text, format!("m{i}"));
    }
}

mod process;
