//! `claude-peers log`: the history, and with `-f` each message as it is sent and its
//! receipts as they come, following the broker through restarts.

use std::io::Write;

use anyhow::Result;

use super::{connect, print_json, table};
use crate::client::{Client, ClientError, Event};
use crate::paths::Paths;
use crate::protocol::*;

/// One message to one recipient, on one line: when, who to whom, its state, what it
/// answers, and its text.
fn print_entry(e: &LogEntry, json: bool) -> Result<()> {
    if json {
        let e = super::json_times(serde_json::to_value(e)?);
        outln!("{}", serde_json::to_string(&e)?);
        return Ok(());
    }
    let reply = e
        .in_reply_to
        .as_ref()
        .map(|r| format!(" (re {})", table::clip(r, 13)))
        .unwrap_or_default();
    outln!(
        "{}  {} -> {}  [{}]{}  {}",
        table::timestamp(e.sent_at),
        e.from,
        e.to,
        e.state.as_str(),
        reply,
        table::clip(&e.text, 100)
    );
    Ok(())
}

/// A later state of a message already shown, compactly: when, the new state and who,
/// and the start of the text to tell which message.
fn print_change(e: &LogEntry) -> Result<()> {
    let at = e.delivered_at.unwrap_or(e.sent_at);
    outln!(
        "{}  ↳ {} {} \"{}\"",
        table::timestamp(at),
        e.state.as_str(),
        e.to,
        table::clip(&e.text, 40)
    );
    Ok(())
}

pub async fn run(
    paths: &Paths,
    follow: bool,
    limit: u32,
    peer: Option<String>,
    json: bool,
) -> Result<()> {
    let query = LogQuery {
        limit: Some(limit),
        peer: peer.clone(),
        before: None,
    };
    let mut client = connect(paths, true).await?;
    if !follow {
        let history = client.log(query).await?;
        if json {
            return print_json(&history);
        }
        for e in &history {
            print_entry(e, false)?;
        }
        if history.is_empty() && limit > 0 {
            let _ = writeln!(
                std::io::stderr(),
                "no messages yet{}",
                peer.map(|p| format!(" from or to {p}")).unwrap_or_default()
            );
        }
        return Ok(());
    }
    // The state each message was last shown in, per recipient: a message is one line,
    // and a later state one short line under it; history read again after a reconnect
    // shows only what changed.
    let mut shown = std::collections::HashMap::new();
    loop {
        // Subscribe first so nothing falls between the history and the live tail.
        client.call(Subscribe::default()).await?;
        let history = match client.log(query.clone()).await {
            // Following a peer that has not come yet (nor had mail) is waiting for it.
            Err(ClientError::Refused(e)) if e.code == ErrorCode::UnknownPeer => {
                if shown.is_empty() {
                    let _ = writeln!(
                        std::io::stderr(),
                        "claude-peers: no peer is named {:?} yet; following until one is",
                        peer.as_deref().unwrap_or_default()
                    );
                }
                Vec::new()
            }
            other => other?,
        };
        for e in history {
            show(&mut shown, &e, json)?;
        }
        while let Some(event) = client.next_event().await {
            let e = match event {
                Event::Log(ev) => ev.entry,
                Event::Lagged(missed) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "claude-peers: {missed} events were missed because this reader fell behind; `claude-peers log` shows them"
                    );
                    continue;
                }
                Event::Deliver(_) | Event::Peer(_) | Event::Closed(_) => continue,
            };
            if peer.as_ref().is_some_and(|p| *p != e.from && *p != e.to) {
                continue;
            }
            show(&mut shown, &e, json)?;
        }
        let _ = writeln!(
            std::io::stderr(),
            "claude-peers: the broker went away; following again when it is back (Ctrl-C ends)"
        );
        client = reconnect(paths, true).await?;
    }
}

/// Shows `e` unless it was shown in this state or a later one: the whole line the first
/// time, a short one for a later state (JSON: the entry again). A message sent while the
/// history was read comes twice, in the history (perhaps delivered already) and as the
/// live `sent` event after it: the event, older news, is not shown.
fn show(
    shown: &mut std::collections::HashMap<(String, String), DeliveryState>,
    e: &LogEntry,
    json: bool,
) -> Result<()> {
    let key = (e.id.clone(), e.to.clone());
    match shown.get(&key) {
        None => {
            shown.insert(key, e.state);
            print_entry(e, json)
        }
        Some(&before) if e.state.progress() <= before.progress() => Ok(()),
        Some(_) => {
            shown.insert(key, e.state);
            if json {
                print_entry(e, json)
            } else {
                print_change(e)
            }
        }
    }
}

/// A connection to the broker after the last one was lost: after `claude-peers stop`, the
/// next broker someone starts (waiting asleep for its socket); otherwise one started now.
/// `loud`: say on stderr when it started one.
pub(super) async fn reconnect(paths: &Paths, loud: bool) -> Result<Client> {
    let mut backoff = crate::client::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    loop {
        let stopped = paths.stopped.exists();
        if stopped {
            crate::platform::wait_until_exists(&paths.socket).await?;
        }
        let client = if loud {
            connect(paths, !stopped).await
        } else {
            super::open(paths, !stopped).await
        };
        match client {
            Ok(c) => return Ok(c),
            Err(ClientError::NotRunning { .. }) | Err(ClientError::Disconnected) => {
                backoff.wait().await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: DeliveryState) -> LogEntry {
        LogEntry {
            id: "019ad3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d".into(),
            from: "cli".into(),
            to: "bob".into(),
            text: "hi".into(),
            in_reply_to: None,
            sent_at: 0,
            state,
            delivered_at: None,
        }
    }

    /// A `sent` event read after the history showed the message delivered is older news:
    /// the state shown stays delivered.
    #[test]
    fn a_state_never_goes_back() {
        let mut shown = std::collections::HashMap::new();
        let key = (entry(DeliveryState::Queued).id, "bob".to_string());
        show(&mut shown, &entry(DeliveryState::Delivered), true).unwrap();
        show(&mut shown, &entry(DeliveryState::Queued), true).unwrap();
        assert_eq!(shown[&key], DeliveryState::Delivered);
        let mut shown = std::collections::HashMap::new();
        show(&mut shown, &entry(DeliveryState::Queued), true).unwrap();
        show(&mut shown, &entry(DeliveryState::Held), true).unwrap();
        show(&mut shown, &entry(DeliveryState::Delivered), true).unwrap();
        assert_eq!(shown[&key], DeliveryState::Delivered);
    }
}
