//! Mail on its way to the model: per-sender queues paced under Claude Code's rate into
//! its inbox, messages in flight until their receipt window or their user's answer,
//! late receipts and retries, channel events, and what arrives on our reply sockets.

use std::sync::Arc;
use std::time::Duration;

use super::direct::local_delivery;
use super::inbox::{Inbound, Inbox};
use super::state::InboxJob;
use super::*;
use crate::protocol::{AckState, Delivery};

/// How long after writing into the inbox a message waits for a receipt (`held`,
/// `dropped`) before it counts as delivered. The session sends one at once, while it
/// reads the line.
const RECEIPT_WINDOW: Duration = Duration::from_millis(100);

/// How long an inbox message acked delivered is kept for a late receipt (under the
/// store's grace, `store::REOPEN_GRACE`).
const RECENT: Duration = Duration::from_secs(20);

/// How many times a message the session dropped for its rate is written, and the pause
/// before each new write (times the attempt): the session takes one message a sender
/// every 2 s past a burst of 30.
const MAX_INBOX_WRITES: u32 = 8;

const INBOX_RETRY: Duration = Duration::from_millis(2500);

/// A message on its way into the inbox: queued or waiting to be written again, or
/// written (`written`) and waiting for the receipt window or the user's answer.
pub(super) struct InFlight {
    d: Delivery,
    attempt: u32,
    written: bool,
}

/// The pace of one sender's mail into the inbox: a token bucket under Claude Code's own
/// limit (measured with 2.1.332: a burst of 30 from one sender, then one every 2 s; past
/// it, messages are dropped).
pub(super) struct SenderPace {
    tokens: f64,
    burst: f64,
    at: tokio::time::Instant,
}

impl SenderPace {
    /// The burst, unless `CLAUDE_PEERS_INBOX_BURST` says otherwise (should Claude Code's
    /// limit change).
    const BURST: f64 = 25.0;
    /// One message per this long, after the burst.
    const EVERY: Duration = Duration::from_millis(2200);

    fn new() -> Self {
        let burst = std::env::var("CLAUDE_PEERS_INBOX_BURST")
            .ok()
            .and_then(|b| b.parse::<u32>().ok())
            .filter(|b| *b > 0)
            .map_or(Self::BURST, f64::from);
        Self {
            tokens: burst,
            burst,
            at: tokio::time::Instant::now(),
        }
    }

    /// Returns when the next message may go.
    async fn wait(&mut self) {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() / Self::EVERY.as_secs_f64();
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            let short = (1.0 - self.tokens) * Self::EVERY.as_secs_f64();
            tokio::time::sleep(Duration::from_secs_f64(short)).await;
            self.tokens = 1.0;
            self.at = tokio::time::Instant::now();
        }
        self.tokens -= 1.0;
    }
}

impl Session {
    /// A channel event, acked as `pushed`: nothing tells whether the host shows it.
    pub(super) async fn push_channel(&self, d: Delivery) {
        let _ = self.initialized.subscribe().wait_for(|done| *done).await;
        let Some(peer) = self.state().peer.clone() else {
            return;
        };
        let notification = ServerNotification::CustomNotification(CustomNotification::new(
            "notifications/claude/channel",
            Some(tools::channel_params(&d)),
        ));
        // Returns once the line is written and flushed to stdout.
        match peer.send_notification(notification).await {
            Ok(()) => {
                self.state().seen.insert(&d.id);
                self.ack_as(vec![d.id], AckState::Pushed);
            }
            Err(e) => tracing::warn!("could not write a channel event: {e}"),
        }
    }

    /// Queues a message for the inbox behind the others from its sender. Each sender's
    /// mail is written in order by a task of its own, paced below the rate Claude Code
    /// takes from one sender ([`SenderPace`]): past it, the session drops messages and
    /// says so only seconds later, after we would have counted them delivered.
    pub(super) fn to_inbox(self: &Arc<Self>, inbox: Arc<Inbox>, d: Delivery, attempt: u32) {
        // In flight from here: a redelivery meanwhile is not queued again.
        let mut st = self.state();
        st.in_inbox.insert(
            d.id.clone(),
            InFlight {
                d: d.clone(),
                attempt,
                written: false,
            },
        );
        let tx = st.outboxes.entry(d.from.clone()).or_insert_with(|| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<InboxJob>();
            let me = self.clone();
            tokio::spawn(async move {
                let mut pace = SenderPace::new();
                while let Some((inbox, d, attempt)) = rx.recv().await {
                    pace.wait().await;
                    me.write_inbox(&inbox, d, attempt).await;
                }
            });
            tx
        });
        let _ = tx.send((inbox, d, attempt));
    }

    /// Into Claude Code's inbox. The session answers nothing on the connection; what it
    /// does with the message it tells by a receipt, at once, on another connection:
    /// `held` (for its user), or `dropped` (past its per-sender rate, or its queue is
    /// full). So the message is settled a moment after the write ([`RECEIPT_WINDOW`]):
    /// `delivered` if no receipt said otherwise. A dropped message is written again
    /// later; one the inbox cannot take waits for `check_messages` or a hook instead.
    /// `attempt` counts the writes of this message so far.
    pub(super) async fn write_inbox(self: &Arc<Self>, inbox: &Inbox, d: Delivery, attempt: u32) {
        let id = d.id.clone();
        // In flight from here: a redelivery meanwhile is not written again, and a receipt
        // that comes before the write returns finds it.
        let relay = {
            let mut st = self.state();
            st.seen.insert(&id);
            st.last_from.insert(d.from.clone(), id.clone());
            st.in_inbox.insert(
                id.clone(),
                InFlight {
                    d: d.clone(),
                    attempt,
                    written: false,
                },
            );
            st.use_relay
        };
        let written = if relay {
            match self.relay_write(inbox, &d).await {
                Ok(true) => {
                    self.state().held.insert(id.clone());
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(e) => Err(std::io::Error::other(e)),
            }
        } else {
            // An answer from a Claude Code session without claude-peers is signed with
            // that session's own address: the model's SendMessage reply then goes to it,
            // not back to us.
            let native = self.state().native_sockets.get(&d.from).cloned();
            let reply = match native {
                Some(socket) => Ok(socket),
                None => self.replies.socket(inbox.dir(), &d.from, &self.inbound),
            };
            match reply {
                Ok(reply) => inbox.write(&d, &reply).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            tracing::warn!(%id, "the inbox did not take a message, keeping it for check_messages: {e}");
            {
                let mut st = self.state();
                st.in_inbox.remove(&id);
                st.seen.remove(&id);
            }
            self.keep_unread(d);
            return;
        }
        match self.state().in_inbox.get_mut(&id) {
            // Still this write's: now it waits for the receipt window.
            Some(f) if f.attempt == attempt => f.written = true,
            // A receipt already settled it (or it is waiting to be written again).
            _ => return,
        }
        // The relay already waited for the session's word.
        let window = if relay {
            Duration::ZERO
        } else {
            RECEIPT_WINDOW
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            me.settle(&id, attempt);
        });
    }

    /// After the receipt window of write `attempt`: `held` if the session said so (it
    /// stays in flight for the user's answer), else `delivered`; nothing if a receipt
    /// settled it meanwhile or it is waiting to be written again.
    pub(super) fn settle(&self, id: &str, attempt: u32) {
        let held = {
            let mut st = self.state();
            let current = matches!(
                st.in_inbox.get(id),
                Some(f) if f.written && f.attempt == attempt
            );
            if !current {
                return;
            }
            let held = st.held.contains(id);
            if !held && let Some(f) = st.in_inbox.remove(id) {
                let now = tokio::time::Instant::now();
                let recent = &mut st.recent;
                while recent.front().is_some_and(|(at, _, _)| {
                    now.duration_since(*at) > RECENT || recent.len() >= 512
                }) {
                    recent.pop_front();
                }
                recent.push_back((now, f.d, f.attempt));
            }
            held
        };
        if held {
            self.ack_as(vec![id.to_string()], AckState::Held);
        } else {
            self.ack(vec![id.to_string()]);
        }
    }

    /// A message acked delivered a moment ago, taken back for a late receipt.
    pub(super) fn take_recent(&self, id: &str) -> Option<(Delivery, u32)> {
        let recent = &mut self.state().recent;
        let at = recent.iter().position(|(_, d, _)| d.id == id)?;
        recent.remove(at).map(|(_, d, attempt)| (d, attempt))
    }

    /// A message the session dropped or let go unshown: written again after a pause
    /// while it was for its rate or a full queue, else kept for `check_messages` and the
    /// hooks. It is queued again at the broker if it had been acked as held.
    pub(super) fn retry_or_keep(self: &Arc<Self>, id: &str, reason: Option<&str>) {
        let in_flight = self
            .state()
            .in_inbox
            .remove(id)
            .map(|f| (f.d, f.attempt, false));
        // Or acked delivered a moment ago, and dropped after all.
        let Some((d, attempt, was_delivered)) =
            in_flight.or_else(|| self.take_recent(id).map(|(d, a)| (d, a, true)))
        else {
            return;
        };
        let was_held = self.state().held.remove(id);
        if was_held || was_delivered {
            self.ack_as(vec![id.to_string()], AckState::Returned);
        }
        let transient = matches!(reason, Some("rate-limited" | "queue-full"));
        if let (true, Route::Inbox(inbox)) = (transient && attempt < MAX_INBOX_WRITES, self.route())
        {
            tracing::info!(%id, attempt, "the session dropped a message; writing it again later");
            // Still in flight while it waits: a redelivery is not written meanwhile.
            self.state().in_inbox.insert(
                id.to_string(),
                InFlight {
                    d: d.clone(),
                    attempt,
                    written: false,
                },
            );
            let me = self.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(INBOX_RETRY * attempt.max(1)).await;
                me.state().in_inbox.remove(&id);
                me.to_inbox(inbox, d, attempt + 1);
            });
            return;
        }
        self.state().seen.remove(id);
        self.keep_unread(d);
    }

    /// A receipt or a reply from one of the inbox's reply sockets.
    pub(super) async fn on_inbound(self: &Arc<Self>, ev: Inbound) {
        match ev {
            Inbound::Receipt {
                message_id,
                status,
                reason,
            } => {
                tracing::info!(id = %message_id, %status, ?reason, "inbox receipt");
                match status.as_str() {
                    "held" => {
                        self.state().held.insert(message_id.clone());
                        // Acked delivered a moment ago: held after all, in flight again
                        // until its user answers.
                        if let Some((d, attempt)) = self.take_recent(&message_id) {
                            self.state().in_inbox.insert(
                                message_id.clone(),
                                InFlight {
                                    d,
                                    attempt,
                                    written: true,
                                },
                            );
                            self.ack_as(vec![message_id], AckState::Held);
                        }
                    }
                    "delivered" | "denied" => {
                        let known = {
                            let mut st = self.state();
                            st.held.remove(&message_id);
                            st.in_inbox.remove(&message_id).is_some()
                        };
                        if known {
                            let state = if status == "denied" {
                                AckState::Denied
                            } else {
                                AckState::Delivered
                            };
                            self.ack_as(vec![message_id], state);
                        }
                    }
                    "expired" | "dropped" => self.retry_or_keep(&message_id, reason.as_deref()),
                    _ => {}
                }
            }
            Inbound::Reply { peer, text } => {
                let in_reply_to = self.state().last_from.get(&peer).cloned();
                if peer.starts_with("cc:") {
                    // A Claude Code session without claude-peers answered us: shown to our
                    // model by our own path (not through the broker, which does not know it).
                    let me = self.name().unwrap_or_default();
                    self.deliver(local_delivery(peer, me, text, in_reply_to))
                        .await;
                    return;
                }
                if peer.starts_with(crate::peer_channel::PREFIX) {
                    // To a peer-channel session: over its socket, as send_message does.
                    match self.send_pc(&peer, &text, in_reply_to.as_deref()).await {
                        Ok(id) => tracing::info!(to = %peer, %id, "relayed a reply from the inbox"),
                        Err(e) => {
                            tracing::warn!(to = %peer, "could not relay a reply from the inbox: {e}")
                        }
                    }
                    return;
                }
                let sent = match self.client().await {
                    Ok(c) => c
                        .call(crate::protocol::Send {
                            key: None,
                            to: vec![peer.clone()],
                            text,
                            in_reply_to,
                            from: None,
                        })
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(s) => {
                        tracing::info!(to = %peer, id = %s.message_id, "relayed a reply from the inbox")
                    }
                    Err(e) => {
                        tracing::warn!(to = %peer, "could not relay a reply from the inbox: {e}")
                    }
                }
            }
        }
    }
}
