//! Mail across machines, the core's side (the bridge is `broker/bridge.rs`): addresses
//! `name@host`, the outbox written in the transaction of each send to another machine and
//! of each receipt for mail from one, and what arrives from the bridge: mail (stored once
//! by id, then delivered as local mail is) and receipts (the state of our mail there).

use std::collections::BTreeMap;

use tokio::sync::mpsc::UnboundedSender;

use super::mail::Draft;
use super::*;
use crate::broker::bridge::{NetworkListing, NetworkOptions, Relayed, ToBridge};
use crate::names::PeerName;
use crate::store::{NewMessage, OutboxRow, QUEUED_THERE, RELAYING, UNDELIVERABLE};

/// The core's link to the bridge.
pub struct Network {
    pub opts: NetworkOptions,
    /// Publications for the bridge (handed over after their batch committed), and
    /// listings to gather.
    pub outbox: UnboundedSender<ToBridge>,
    pub connected: bool,
    /// The online peers each other machine listed when it last answered, by host: a
    /// machine that stops answering is shown `unreachable`, not gone.
    pub seen: HashMap<String, Vec<PeerInfo>>,
    /// Rows in the outbox (publications JetStream has not acked).
    pub waiting: u64,
}

/// What waits for the other machines' answers.
pub enum Gather {
    List(ListPeers),
    Broadcast(Broadcast),
}

/// `name@host` split in two; `None` for a plain name.
pub fn split_address(to: &str) -> Option<(&str, &str)> {
    to.rsplit_once('@')
}

impl Core {
    /// Links the core to the bridge; returns what waits in the outbox, for it to publish.
    pub fn connect_network(
        &mut self,
        opts: NetworkOptions,
        outbox: UnboundedSender<ToBridge>,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = self.store.outbox_all()?;
        self.network = Some(Network {
            opts,
            outbox,
            connected: false,
            seen: HashMap::new(),
            waiting: rows.len() as u64,
        });
        Ok(rows)
    }

    pub(super) fn network_status(&self) -> Option<Box<NetworkStatus>> {
        self.network.as_ref().map(|n| {
            Box::new(NetworkStatus {
                url: n.opts.shown_url(),
                host: n.opts.host.clone(),
                stream: n.opts.stream_name(),
                connected: n.connected,
                waiting: n.waiting,
            })
        })
    }

    /// A recipient as the store keeps it: a local name, or `name@host` on another
    /// machine. Our own host's addresses are local names.
    pub(super) fn recipient(&self, to: &str) -> Result<String, ErrorBody> {
        let Some((name, host)) = split_address(to) else {
            if !self.peers.contains_key(to) {
                return Err(self.unknown_peer(to));
            }
            return Ok(to.to_string());
        };
        PeerName::new(name).map_err(|e| err(ErrorCode::BadName, format!("{to}: {e}")))?;
        PeerName::new(host).map_err(|e| err(ErrorCode::BadName, format!("{to}: host {e}")))?;
        match &self.network {
            Some(n) if n.opts.host == host => {
                if !self.peers.contains_key(name) {
                    return Err(self.unknown_peer(name));
                }
                Ok(name.to_string())
            }
            Some(_) => Ok(to.to_string()),
            None => Err(err(
                ErrorCode::UnknownPeer,
                format!(
                    "{to} is on another machine, and this broker is not connected to others; set CLAUDE_PEERS_NATS_URL (see the README, \"Several machines\")"
                ),
            )),
        }
    }

    /// Queues the publication of a new message to its recipients on other machines (one
    /// per host), in the current transaction.
    pub(super) fn relay_out(
        &mut self,
        m: &NewMessage<'_>,
        remote: &[&str],
    ) -> Result<(), StoreError> {
        let Some(network) = &self.network else {
            return Ok(());
        };
        let from = format!("{}@{}", m.sender, network.opts.host);
        let mut by_host: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for r in remote {
            self.store.set_relaying(m.id, r)?;
            if let Some((name, host)) = split_address(r) {
                by_host.entry(host).or_default().push(name.to_string());
            }
        }
        for (host, to) in by_host {
            let relayed = Relayed::Mail {
                id: m.id.to_string(),
                from: from.clone(),
                to,
                text: m.text.to_string(),
                in_reply_to: m.in_reply_to.map(str::to_string),
                sent_at: m.sent_at,
            };
            let subject = network.opts.mail_subject(host);
            let payload = serde_json::to_vec(&relayed).expect("serializable");
            let row = self
                .store
                .outbox_push(&subject, &format!("{}:{host}", m.id), &payload)?;
            self.outbox_in_batch.push(row);
        }
        Ok(())
    }

    /// Queues a receipt to the machine `from` (`name@host`) sent message `id` from: what
    /// became of it for our session `recipient`.
    pub(super) fn receipt(
        &mut self,
        id: &str,
        from: &str,
        recipient: &str,
        state: DeliveryState,
    ) -> Result<(), StoreError> {
        let (Some(network), Some((_, host))) = (&self.network, split_address(from)) else {
            return Ok(());
        };
        // Each receipt its own: a message may be queued, delivered, returned to the queue
        // and delivered again; the time orders them at the sender's.
        let at = now_millis();
        let relayed = Relayed::Receipt {
            id: id.to_string(),
            recipient: format!("{recipient}@{}", network.opts.host),
            state,
            at: Some(at),
        };
        let subject = network.opts.receipt_subject(host);
        let msg_id = format!("{id}:{recipient}:{}:{at}", state.as_str());
        let payload = serde_json::to_vec(&relayed).expect("serializable");
        let row = self.store.outbox_push(&subject, &msg_id, &payload)?;
        self.outbox_in_batch.push(row);
        Ok(())
    }

    /// Mail or a receipt from another machine; `done` hears, after the commit, whether
    /// it was saved.
    pub(super) fn relayed(&mut self, relayed: Relayed, done: tokio::sync::oneshot::Sender<bool>) {
        let outcome = match relayed {
            Relayed::Mail {
                id,
                from,
                to,
                text,
                in_reply_to,
                sent_at,
            } => self.relayed_mail(id, from, to, text, in_reply_to, sent_at),
            Relayed::Receipt {
                id,
                recipient,
                state,
                at,
            } => self.relayed_receipt(&id, &recipient, state, at),
        };
        if let Err(e) = outcome {
            self.batch_error.get_or_insert(e);
        }
        self.relayed_in_batch.push(done);
    }

    fn relayed_mail(
        &mut self,
        id: String,
        from: String,
        to: Vec<String>,
        text: String,
        in_reply_to: Option<String>,
        sent_at: Millis,
    ) -> Result<(), StoreError> {
        if split_address(&from).is_none() || self.store.has_message(&id)? {
            // Relayed again (JetStream redelivers what was not acked in time): stored once.
            return Ok(());
        }
        // Each name once (a repeated one would break the batch's insert), each a name.
        let mut to = to;
        to.sort();
        to.dedup();
        to.retain(|n| PeerName::new(n).is_ok());
        let (here, unknown): (Vec<String>, Vec<String>) =
            to.into_iter().partition(|n| self.peers.contains_key(n));
        for name in &unknown {
            self.receipt(&id, &from, name, DeliveryState::Undeliverable)?;
        }
        if here.is_empty() {
            return Ok(());
        }
        let expires_at = self
            .clock
            .now()
            .saturating_add(self.limits.retention.as_millis() as Millis);
        let refs: Vec<&str> = here.iter().map(String::as_str).collect();
        let new = NewMessage {
            id: &id,
            sender: &from,
            text: &text,
            in_reply_to: in_reply_to.as_deref(),
            sent_at,
            expires_at,
            key: None,
        };
        self.store.insert_message(&new, &refs)?;
        for r in &here {
            *self.queued.entry(r.clone()).or_default() += 1;
            // Stored: what reaches the session is told when it acks.
            let state = DeliveryState::Queued;
            if let Some(to_conn) = self.online.get(r).copied()
                && self.may_push(to_conn)
            {
                self.push_new(to_conn, r, &new);
            }
            self.receipt(&id, &from, r, state)?;
            self.log_event(LogEventKind::Sent, || LogEntry {
                id: id.clone(),
                from: from.clone(),
                to: r.clone(),
                text: text.clone(),
                in_reply_to: in_reply_to.clone(),
                sent_at,
                state,
                delivered_at: None,
            });
        }
        Ok(())
    }

    fn relayed_receipt(
        &mut self,
        id: &str,
        recipient: &str,
        state: DeliveryState,
        at: Option<Millis>,
    ) -> Result<(), StoreError> {
        let code = match state {
            DeliveryState::Delivered => 1,
            DeliveryState::Pushed => 2,
            DeliveryState::Held => 3,
            DeliveryState::Denied => 4,
            DeliveryState::Damaged => 5,
            DeliveryState::Relaying => RELAYING,
            DeliveryState::Undeliverable => UNDELIVERABLE,
            DeliveryState::Queued => QUEUED_THERE,
        };
        let acked = matches!(
            state,
            DeliveryState::Delivered | DeliveryState::Held | DeliveryState::Denied
        );
        if self
            .store
            .set_delivery_state(id, recipient, code, at.unwrap_or(0), acked)?
            && self.conns.values().any(|c| c.subscribed)
            && let Some(entry) = self.store.log_entry(id, recipient)?
        {
            self.log_event(LogEventKind::Delivered, || entry);
        }
        Ok(())
    }

    /// After a batch: what it relayed in hears whether it was saved, and its publications
    /// go to the bridge (only if saved).
    pub(super) fn after_commit(&mut self, saved: bool) {
        for done in self.relayed_in_batch.drain(..) {
            let _ = done.send(saved);
        }
        let published = std::mem::take(&mut self.published_in_batch);
        if saved {
            if let Some(n) = &mut self.network {
                n.waiting = n.waiting.saturating_sub(published.len() as u64);
            }
        } else {
            self.published_retry.extend(published);
        }
        let rows = std::mem::take(&mut self.outbox_in_batch);
        if saved && let Some(n) = &mut self.network {
            n.waiting += rows.len() as u64;
            for row in rows {
                let _ = n.outbox.send(ToBridge::Publish(row));
            }
        }
    }

    /// `list_peers` in scope network: the other machines are asked (the answer waits for
    /// them, a fraction of a second), this machine's peers are listed as in scope machine.
    pub(super) fn list_network(&mut self, conn: ConnId, id: Option<u64>, l: ListPeers) -> Outcome {
        self.ask_network(conn, id, Gather::List(l))
    }

    /// `broadcast` in scope network: to every online peer here and on every machine that
    /// answers (the answer waits for them), capped as any broadcast.
    pub(super) fn broadcast_network(
        &mut self,
        conn: ConnId,
        id: Option<u64>,
        b: Broadcast,
    ) -> Outcome {
        // A retry with a used key is answered at once, as any send's.
        if let Some(k) = &b.key {
            let from = match self.sender_name(conn, b.from.clone()) {
                Ok(from) => from,
                Err(e) => return Outcome::Answer(Err(e)),
            };
            match self.sent_before(&from, k) {
                Ok(Some(first)) => return Outcome::Answer(Ok(Reply::Sent(first))),
                Ok(None) => {}
                Err(e) => return Outcome::Answer(Err(e)),
            }
        }
        self.ask_network(conn, id, Gather::Broadcast(b))
    }

    /// The remote URL of `conn`'s repository, when `scope` is repo and this broker is
    /// bridged: the repo scope then spans machines.
    pub(super) fn repo_across(&self, conn: ConnId, scope: Scope) -> Option<String> {
        if scope != Scope::Repo || self.network.is_none() {
            return None;
        }
        let me = self.registered_name(conn)?;
        self.peers.get(me)?.context.git_remote.clone()
    }

    fn ask_network(&mut self, conn: ConnId, id: Option<u64>, what: Gather) -> Outcome {
        let Some(n) = &self.network else {
            return Outcome::Answer(Err(err(
                ErrorCode::BadRequest,
                "this broker is not bridged to other machines, so scope network is scope machine; set CLAUDE_PEERS_NATS_URL to bridge it (see the README, \"Several machines\")",
            )));
        };
        let token = self.next_gather;
        self.next_gather += 1;
        // Not connected: no machine can answer; this one's peers (and the others', as
        // unreachable) at once.
        if !n.connected {
            self.gathers.insert(token, (conn, id, what));
            self.gathered(token, Vec::new());
            return Outcome::Answered;
        }
        if n.outbox.send(ToBridge::Gather { token }).is_err() {
            return Outcome::Answer(Err(err(
                ErrorCode::Internal,
                "the broker's bridge to NATS stopped (see the broker's log); restart the broker with `claude-peers stop`, and the next command starts it again",
            )));
        }
        self.gathers.insert(token, (conn, id, what));
        Outcome::Deferred
    }

    /// The other machines answered listing `token`: this machine's peers, then theirs.
    pub(super) fn gathered(&mut self, token: u64, replies: Vec<Vec<u8>>) {
        let Some((conn, id, what)) = self.gathers.remove(&token) else {
            return;
        };
        if !self.conns.contains_key(&conn) {
            return;
        }
        let mut l = match what {
            Gather::List(l) => l,
            Gather::Broadcast(b) => return self.broadcast_gathered(conn, id, b, replies),
        };
        // Scope repo: this machine's repo peers, and the others' with the same remote.
        let repo = self.repo_across(conn, l.scope);
        if repo.is_none() {
            l.scope = Scope::Machine;
        }
        l.after = None;
        let mut remote = self.answered(replies);
        if let Some(repo) = &repo {
            remote.retain(|p| p.context.git_remote.as_ref() == Some(repo));
        }
        let answer = self.list_peers(conn, &l).and_then(|local| {
            let mut list: PeerList = serde_json::from_str(local.get())
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            list.peers.extend(remote);
            list.peers
                .sort_by(|a, b| b.online.cmp(&a.online).then_with(|| a.name.cmp(&b.name)));
            // One page, whatever the network holds: the first that fit.
            let mut raw = serde_json::value::to_raw_value(&list)
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            while raw.get().len() > MAX_PAGE_BYTES && !list.peers.is_empty() {
                let keep = list.peers.len() * 9 / 10;
                list.peers.truncate(keep);
                raw = serde_json::value::to_raw_value(&list)
                    .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            }
            Ok(raw)
        });
        self.answer(conn, id, answer.map(Reply::Peers));
    }

    /// The peers of the machines that answered, and (kept from earlier answers, marked
    /// `unreachable`) of those that did not.
    fn answered(&mut self, replies: Vec<Vec<u8>>) -> Vec<PeerInfo> {
        let Some(n) = &mut self.network else {
            return Vec::new();
        };
        let mut answered = std::collections::HashSet::new();
        for r in replies {
            match serde_json::from_slice::<NetworkListing>(&r) {
                Ok(theirs) if theirs.host != n.opts.host => {
                    answered.insert(theirs.host.clone());
                    n.seen.insert(theirs.host, theirs.peers);
                }
                Ok(theirs) if theirs.instance != n.opts.instance => tracing::warn!(
                    host = %theirs.host,
                    "another broker uses this machine's host name: they share one inbox on NATS and each takes part of the other's mail; give each machine its own name (CLAUDE_PEERS_HOST)"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("an unreadable listing from another machine: {e}"),
            }
        }
        let mut peers = Vec::new();
        for (host, listed) in &n.seen {
            let reachable = answered.contains(host);
            peers.extend(listed.iter().cloned().map(|mut p| {
                if !reachable {
                    p.online = false;
                    p.unreachable = true;
                }
                p
            }));
        }
        peers
    }

    fn broadcast_gathered(
        &mut self,
        conn: ConnId,
        id: Option<u64>,
        b: Broadcast,
        replies: Vec<Vec<u8>>,
    ) {
        let repo = self.repo_across(conn, b.scope);
        let remote: Vec<String> = self
            .answered(replies)
            .into_iter()
            .filter(|p| p.online)
            .filter(|p| repo.is_none() || p.context.git_remote == repo)
            .map(|p| p.name)
            .collect();
        let here = match repo {
            Some(_) => match self.scope_filter(conn, Scope::Repo, None, None) {
                Ok(f) => Some(f),
                Err(e) => return self.answer(conn, id, Err(e)),
            },
            None => None,
        };
        let draft = Draft {
            text: b.text,
            in_reply_to: b.in_reply_to,
            key: b.key,
        };
        let outcome = self.submit(conn, id, b.from, draft, move |core, from| {
            let mut recipients: Vec<String> = core
                .online
                .keys()
                .filter(|n| **n != from)
                .filter(|n| {
                    here.as_ref()
                        .is_none_or(|f| core.peers.get(*n).is_some_and(f))
                })
                .cloned()
                .collect();
            recipients.extend(remote);
            if recipients.is_empty() {
                return Err(err(
                    ErrorCode::NoRecipients,
                    "no other peer is online on any machine that answered",
                ));
            }
            if recipients.len() > core.limits.broadcast_limit {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "{} peers are online across the network; a broadcast reaches at most {}. Narrow the scope",
                        recipients.len(),
                        core.limits.broadcast_limit
                    ),
                ));
            }
            recipients.sort();
            Ok(recipients)
        });
        match outcome {
            Outcome::Answer(a) => self.answer(conn, id, a),
            Outcome::Deferred | Outcome::Answered | Outcome::Unanswered => {}
        }
    }

    /// This machine's online peers for another machine's network listing, as `name@host`.
    pub(super) fn network_listing(&self) -> Vec<u8> {
        let Some(n) = &self.network else {
            return Vec::new();
        };
        let host = &n.opts.host;
        let peers = self
            .online
            .keys()
            .filter_map(|name| self.peers.get(name))
            .map(|p| PeerInfo {
                name: format!("{}@{host}", p.name),
                online: true,
                context: PeerContext {
                    host: Some(host.clone()),
                    ..p.context.clone()
                },
                summary: p.summary.clone(),
                first_seen: p.first_seen,
                last_seen: p.last_seen,
                unread: 0,
                unreachable: false,
            })
            .collect();
        serde_json::to_vec(&NetworkListing {
            host: host.clone(),
            instance: n.opts.instance.clone(),
            peers,
        })
        .expect("serializable")
    }

    /// JetStream has publication `seq`: its row goes, in this batch. (If the batch fails,
    /// the next one removes it: the bridge does not hand it over again.)
    pub(super) fn published(&mut self, seq: i64) {
        match self.store.outbox_done(seq) {
            Ok(()) => self.published_in_batch.push(seq),
            Err(e) => {
                self.published_retry.push(seq);
                self.batch_error.get_or_insert(e);
            }
        }
    }

    /// At the start of a write batch: removes the rows of publications an earlier failed
    /// batch could not.
    pub(super) fn retry_published(&mut self) {
        for seq in std::mem::take(&mut self.published_retry) {
            self.published(seq);
        }
    }
}
