//! The tools' texts and shapes.

use super::listing::Listed;
use super::*;
use crate::protocol::{PeerContext, PeerInfo, PeerList};

fn peer(name: &str, online: bool) -> PeerInfo {
    PeerInfo {
        name: name.into(),
        online,
        summary: "line\nbreak".into(),
        first_seen: 1,
        last_seen: 1_700_000_000_000,
        unread: 3,
        unreachable: false,
        context: PeerContext {
            pid: 7,
            cwd: "/w/a \"quoted\"".into(),
            git_root: Some("/w".into()),
            git_common_dir: Some("/w/.git".into()),
            branch: None,
            git_remote: None,
            tty: None,
            host: Some("h".into()),
            client_name: None,
            client_version: None,
            push: true,
        },
    }
}

#[test]
fn a_listing_reads_the_brokers_records() {
    let list = PeerList {
        next: None,
        peers: vec![peer("bob", true), peer("carol", false)],
    };
    let json = serde_json::to_string(&list).unwrap();
    let listed: Listed<'_> = serde_json::from_str(&json).unwrap();
    let out = PeersOut {
        peers: listed.peers.into_iter().map(PeerOut::from).collect(),
        notice: None,
    };
    let value = serde_json::to_value(&out).unwrap();
    assert_eq!(
        value["peers"][0],
        serde_json::json!({"name": "bob", "state": "online", "kind": "claude-peers", "cwd": "/w/a \"quoted\"",
            "repo": "/w", "branch": null, "summary": "line\nbreak", "last_seen": "now"})
    );
    assert_eq!(value["peers"][1]["state"], "offline");
    assert_eq!(
        value["peers"][1]["last_seen"],
        timestamp_rfc3339(1_700_000_000_000)
    );
    assert_eq!(
        PeerListing::text(&out),
        format!(
            "2 other sessions:\n- bob (online) in /w/a \"quoted\": line\nbreak\n- carol (offline, last seen {}) in /w/a \"quoted\": line\nbreak",
            timestamp_rfc3339(1_700_000_000_000)
        )
    );
}
