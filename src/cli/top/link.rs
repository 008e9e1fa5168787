//! `top`'s side of the broker: one task that holds a subscribed connection, follows the
//! broker through restarts, and hands the view what changed. It waits on the socket and
//! nothing else, so an idle `top` costs nothing.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::client::{Client, ClientError, Event};
use crate::paths::Paths;
use crate::protocol::*;

/// How many recent messages a (re)connection reads.
const HISTORY: u32 = 500;

/// What the view learns.
pub enum Update {
    /// A broker answers: its pid and version, whether it is bridged to other machines,
    /// and whether we started it.
    Connected {
        pid: u32,
        version: String,
        network: bool,
        started: bool,
    },
    /// The broker went away; waiting for the next one.
    Lost,
    /// The sessions in the scope asked for, offline ones too.
    Peers(Vec<PeerInfo>),
    /// Recent history, oldest first (after a (re)connection, or after missing events).
    History(Vec<LogEntry>),
    /// A message sent, or a later state of one.
    Entry(LogEntry),
    /// What became of a send from the view: a line to show.
    Said(String),
    /// Something failed; a line to show.
    Failed(String),
}

/// What the view asks.
pub enum Ask {
    Scope(Scope),
    Send {
        to: String,
        text: String,
        in_reply_to: Option<String>,
    },
}

/// Runs until the view goes (`asks` closes).
pub async fn run(
    paths: Paths,
    mut asks: mpsc::UnboundedReceiver<Ask>,
    view: mpsc::UnboundedSender<Update>,
) {
    let mut scope = Scope::Machine;
    let mut first = true;
    loop {
        let client = if first {
            super::super::open(&paths, true)
                .await
                .map_err(anyhow::Error::from)
        } else {
            super::super::log::reconnect(&paths, false).await
        };
        first = false;
        let mut client = match client {
            Ok(c) => c,
            Err(e) => {
                let _ = view.send(Update::Failed(format!("{e:#}")));
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        match follow(&paths, &mut client, &mut scope, &mut asks, &view).await {
            Ok(Gone::View) => return,
            Ok(Gone::Broker) => {}
            Err(e) => {
                let _ = view.send(Update::Failed(e.to_string()));
            }
        }
        if view.send(Update::Lost).is_err() {
            return;
        }
    }
}

enum Gone {
    View,
    Broker,
}

/// Follows one broker until it or the view goes.
async fn follow(
    paths: &Paths,
    client: &mut Client,
    scope: &mut Scope,
    asks: &mut mpsc::UnboundedReceiver<Ask>,
    view: &mpsc::UnboundedSender<Update>,
) -> Result<Gone, ClientError> {
    let status = client.call(StatusCall).await?;
    let _ = view.send(Update::Connected {
        pid: status.pid,
        version: status.version,
        network: status.network.is_some(),
        started: client.started_broker(),
    });
    // Subscribe first so nothing falls between what is read and what streams.
    client.call(Subscribe { peers: true }).await?;
    reload(client, *scope, view).await?;
    // Sessions are listed again once events stop coming for a moment, not once per event.
    let mut stale_since: Option<tokio::time::Instant> = None;
    loop {
        let relist = async {
            match stale_since {
                Some(t) => tokio::time::sleep_until(t + Duration::from_millis(50)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = client.next_event() => match event {
                None | Some(Event::Closed(_)) => return Ok(Gone::Broker),
                Some(Event::Log(e)) => {
                    let _ = view.send(Update::Entry(e.entry));
                    stale_since.get_or_insert_with(tokio::time::Instant::now);
                }
                Some(Event::Peer(_)) => {
                    stale_since.get_or_insert_with(tokio::time::Instant::now);
                }
                Some(Event::Lagged(_)) => reload(client, *scope, view).await?,
                Some(Event::Deliver(_)) => {}
            },
            ask = asks.recv() => match ask {
                None => return Ok(Gone::View),
                Some(Ask::Scope(s)) => {
                    *scope = s;
                    list(client, s, view).await?;
                }
                Some(Ask::Send { to, text, in_reply_to }) => {
                    // On a connection of its own: a send's answer waits for the reader's
                    // receipt, and events keep coming meanwhile.
                    tokio::spawn(send(paths.clone(), to, text, in_reply_to, view.clone()));
                }
            },
            () = relist => {
                stale_since = None;
                list(client, *scope, view).await?;
            }
        }
    }
}

async fn reload(
    client: &Client,
    scope: Scope,
    view: &mpsc::UnboundedSender<Update>,
) -> Result<(), ClientError> {
    list(client, scope, view).await?;
    let history = client
        .log(LogQuery {
            limit: Some(HISTORY),
            ..LogQuery::default()
        })
        .await?;
    let _ = view.send(Update::History(history));
    Ok(())
}

async fn list(
    client: &Client,
    scope: Scope,
    view: &mpsc::UnboundedSender<Update>,
) -> Result<(), ClientError> {
    let (cwd, git_common_dir) = super::super::here();
    let peers = client
        .list_peers(ListPeers {
            scope,
            include_offline: scope != Scope::Network,
            cwd,
            git_common_dir,
            after: None,
        })
        .await;
    match peers {
        Ok(peers) => {
            let _ = view.send(Update::Peers(peers));
        }
        // A scope the broker cannot list (network without a bridge) is the view's to say.
        Err(ClientError::Refused(e)) => {
            let _ = view.send(Update::Failed(e.message));
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

async fn send(
    paths: Paths,
    to: String,
    text: String,
    in_reply_to: Option<String>,
    view: mpsc::UnboundedSender<Update>,
) {
    let request = Send {
        to: vec![to.clone()],
        text,
        in_reply_to,
        from: Some("cli".into()),
        key: Some(uuid::Uuid::now_v7().to_string()),
    };
    let said = async {
        let client = super::super::open(&paths, false).await?;
        client.call(request).await
    }
    .await;
    let _ = view.send(match said {
        Ok(sent) => Update::Said(format!(
            "sent to {to}: {}",
            sent.recipients.first().map_or("sent", |r| r.state.as_str())
        )),
        Err(e) => Update::Failed(e.to_string()),
    });
}
