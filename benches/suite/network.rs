//! Issue 14's figures: brokers on two "machines" (two homes, hosts `hosta` and `hostb`)
//! bridged through one local `nats-server` (JetStream, file storage), beside the same-host
//! figure measured in the same run. Skipped when `nats-server` is not on PATH.

use std::time::{Duration, Instant};

use claude_peers::client::Event;

use crate::common::Home;
use crate::common::nats::{Nats, free_port};
use crate::util::{self, Measured, Row, Target, percentile};

/// A broker of `home` bridged as machine `host` through `url`.
fn broker(home: &Home, host: &str, url: &str) -> crate::common::Broker {
    home.broker_with_env(
        &["--send-rate", "0", "--ack-wait", "30s"],
        &[
            ("CLAUDE_PEERS_LOG", "warn"),
            ("CLAUDE_PEERS_NATS_URL", url),
            ("CLAUDE_PEERS_HOST", host),
        ],
    )
}

/// Until `home`'s broker is connected to NATS.
async fn connected(home: &Home) {
    loop {
        let c = util::client(&home.paths).await;
        let s = c.call(claude_peers::protocol::StatusCall).await.unwrap();
        if s.network.is_some_and(|n| n.connected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(rows: &mut Vec<Row>) {
    if crate::common::agent::missing("nats-server") {
        return;
    }
    let js = tempfile::tempdir().unwrap();
    let nats = Nats::start(js.path(), free_port());
    let (a, b) = (Home::new(), Home::new());
    let mut broker_a = broker(&a, "hosta", &nats.url());
    let mut broker_b = broker(&b, "hostb", &nats.url());
    connected(&a).await;
    connected(&b).await;

    // One message at a time to a session like Claude Code with channels on hostb: from
    // a sender on hostb, and from one on hosta, taking turns.
    let bob = crate::serve::session(&b, "bob").await;
    bob.whoami_when_ready().await;
    let mut bob = bob;
    let mut events = bob.take_events();
    let near = util::peer(&b.paths, "near", false).await;
    let far = util::peer(&a.paths, "far", false).await;
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for i in 0..230 {
        for (who, to, times) in [(&near, "bob", &mut same), (&far, "bob@hostb", &mut cross)] {
            let t = Instant::now();
            who.call(crate::broker::send(to, format!("m{i}")))
                .await
                .unwrap();
            events.recv().await.expect("a channel event");
            if i >= 30 {
                times.push(t.elapsed());
            }
        }
    }
    bob.close().await;
    for (what, times) in [("same host", &mut same), ("across hosts", &mut cross)] {
        let p50 = util::p50(times);
        rows.push(Row::new(
            "network",
            format!("send -> channel event, {what}, p50"),
            Target::None,
            Measured::Time(p50),
        ));
        rows.push(Row::new(
            "network",
            format!("send -> channel event, {what}, p99"),
            Target::None,
            Measured::Time(percentile(times, 0.99)),
        ));
    }

    // Sustained: 3,000 messages from hosta to a reader on hostb, stored on both sides.
    const SUSTAINED: usize = 3_000;
    let mut sink = util::peer(&b.paths, "sink", true).await;
    let t = Instant::now();
    let sending = async {
        for i in 0..SUSTAINED {
            far.call(crate::broker::send("sink@hostb", format!("s{i}")))
                .await
                .unwrap();
        }
    };
    let receiving = async {
        let mut got = 0;
        while got < SUSTAINED {
            if let Some(Event::Deliver(d)) = sink.next_event().await {
                got += 1;
                let _ = sink.notify(claude_peers::protocol::Ack {
                    ids: vec![d.id],
                    state: claude_peers::protocol::AckState::Delivered,
                });
            }
        }
    };
    tokio::join!(sending, receiving);
    let rate = SUSTAINED as f64 / t.elapsed().as_secs_f64();
    rows.push(Row::new(
        "network",
        "sustained across hosts, stored on both (messages/s)",
        Target::None,
        Measured::PerSecond(rate),
    ));
    drop(sink);

    // Catch-up: hostb's broker down while 10,000 messages are sent to it; started again,
    // how long until it has them all.
    const BACKLOG: usize = 10_000;
    // `late` must be known on hostb for its mail to be stored there.
    drop(util::peer(&b.paths, "late", false).await);
    let before = util::client(&b.paths)
        .await
        .call(claude_peers::protocol::StatusCall)
        .await
        .unwrap()
        .queued as usize;
    broker_b.kill9();
    for i in 0..BACKLOG {
        far.call(crate::broker::send("late@hostb", format!("c{i}")))
            .await
            .unwrap();
    }
    // Until hosta's outbox is empty: the backlog waits in JetStream.
    loop {
        let s = util::client(&a.paths)
            .await
            .call(claude_peers::protocol::StatusCall)
            .await
            .unwrap();
        if s.network.is_some_and(|n| n.waiting == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    broker_b = broker(&b, "hostb", &nats.url());
    let watch = util::client(&b.paths).await;
    loop {
        let s = watch
            .call(claude_peers::protocol::StatusCall)
            .await
            .unwrap();
        if s.queued as usize >= before + BACKLOG {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rows.push(Row::new(
        "network",
        "catch-up of 10,000 queued messages (broker start to stored)",
        Target::None,
        Measured::Time(t.elapsed()),
    ));
    drop(watch);
    broker_a.kill9();
    broker_b.kill9();
}
