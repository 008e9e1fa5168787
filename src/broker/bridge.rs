//! The bridge to brokers on other machines, through NATS JetStream (only when a NATS URL
//! is set).
//!
//! Out: the core writes each publication (mail to another machine, a receipt for mail from
//! one) to the store's outbox in the transaction of the change it tells of, and hands it
//! here after the commit; the bridge publishes it with `Nats-Msg-Id` (JetStream drops a
//! second copy inside its duplicate window) and, on JetStream's ack, tells the core to
//! remove it. NATS down, or the broker killed: the outbox still has it, and it goes out
//! when NATS is back.
//!
//! In: one durable pull consumer per machine (named after the host) reads the mail and
//! receipts for this host; each is handed to the core, and acked to JetStream only after
//! the core committed it. A message relayed twice is stored once: the core ignores a
//! message id it already has.
//!
//! Subjects, per user (`<user>` and `<host>` escaped, as NATS splits on `.`):
//! `cp.<user>.mail.<host>` and `cp.<user>.receipt.<host>`, in the stream `CP_<user>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::core::Command;
use crate::protocol::{DeliveryState, Millis};
use crate::store::OutboxRow;

/// How this broker reaches the others.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    pub url: String,
    /// A NATS credentials file (mode 0600).
    pub creds: Option<PathBuf>,
    /// Copies of the stream a JetStream cluster keeps (1 on a single server).
    pub replicas: usize,
    pub tls: Tls,
    /// This machine's name in addresses (`name@host`).
    pub host: String,
    /// Whose brokers these are: one user's brokers share subjects and see nothing of
    /// another's.
    pub user: String,
    /// This broker's run, in its listings.
    pub instance: String,
}

impl NetworkOptions {
    /// The options for a NATS `url` (none if unset or empty), with a credentials file and
    /// this machine's name (default: the host name).
    pub fn new(args: &crate::config::BrokerArgs) -> anyhow::Result<Option<Self>> {
        let Some(url) = args.nats_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let file = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        let creds = file(&args.nats_creds);
        let tls = Tls {
            ca: file(&args.nats_ca),
            client: match (file(&args.nats_cert), file(&args.nats_key)) {
                (Some(cert), Some(key)) => {
                    private(&key, "NATS client key")?;
                    Some((cert, key))
                }
                (None, None) => None,
                _ => anyhow::bail!(
                    "a NATS client certificate needs both --nats-cert and --nats-key (CLAUDE_PEERS_NATS_CERT, CLAUDE_PEERS_NATS_KEY)"
                ),
            },
        };
        let host = match args.host.as_deref().filter(|h| !h.is_empty()) {
            Some(h) => crate::names::PeerName::new(h)
                .map_err(|e| anyhow::anyhow!("host name {h:?} (CLAUDE_PEERS_HOST): {e}"))?
                .to_string(),
            None => crate::names::PeerName::sanitize(&crate::platform::host_name()).to_string(),
        };
        if let Some(creds) = &creds {
            private(creds, "NATS credentials")?;
        }
        Ok(Some(Self {
            url: url.to_string(),
            creds,
            tls,
            replicas: args.nats_replicas.max(1),
            host,
            user: user_name(),
            instance: uuid::Uuid::now_v7().to_string(),
        }))
    }

    pub fn mail_subject(&self, host: &str) -> String {
        format!("cp.{}.mail.{}", token(&self.user), token(host))
    }

    pub fn receipt_subject(&self, host: &str) -> String {
        format!("cp.{}.receipt.{}", token(&self.user), token(host))
    }

    /// The URL as logs and `status` show it: without a password or token.
    pub fn shown_url(&self) -> String {
        let shown: Vec<String> = self
            .url
            .split(',')
            .map(|url| match split_userinfo(url.trim()) {
                (bare, Some((user, Some(_)))) => {
                    bare.replacen("://", &format!("://{user}:***@"), 1)
                }
                (bare, Some((_, None))) => bare.replacen("://", "://***@", 1),
                (bare, None) => bare,
            })
            .collect();
        shown.join(",")
    }

    /// Where network listings are asked (core NATS, not JetStream: no stream holds it).
    pub fn listing_subject(&self) -> String {
        format!("cp.{}.peers", token(&self.user))
    }

    pub fn stream_name(&self) -> String {
        format!("CP_{}", token(&self.user))
    }
}

/// Whose brokers these are, in subjects: `$USER`, else `uid<uid>`.
pub fn user_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| format!("uid{}", crate::platform::current_uid()))
}

/// TLS to the NATS server, beyond what a `tls://` URL asks for.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// The CA the server's certificate must chain to (TLS is then required).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Refuses a secret file others can read.
fn private(path: &std::path::Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{what} {} can be read by other users (mode {:o}); make them yours alone: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// `s` as one NATS subject token (and stream or consumer name): letters, digits, `_` and
/// `-` as they are, every other byte as `=` and two hex digits. Peer and host names may
/// hold `.`, which NATS would split on.
pub fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// What the core asks of the bridge.
#[derive(Debug)]
pub enum ToBridge {
    /// Publish this outbox row (its batch committed).
    Publish(OutboxRow),
    /// Ask the other machines who is online, and answer the core `Gathered { token }`.
    Gather { token: u64 },
}

/// A machine's answer to a network listing: its online sessions, as `name@host`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetworkListing {
    pub host: String,
    /// Which broker answered (a random id of its run): two machines given one host name
    /// are told apart, and warned of.
    #[serde(default)]
    pub instance: String,
    pub peers: Vec<crate::protocol::PeerInfo>,
}

/// How long a network listing waits for the other machines' answers.
const GATHER_WINDOW: Duration = Duration::from_millis(250);

/// What brokers publish to each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Relayed {
    /// Mail for sessions of the receiving host. `from` is `name@host`.
    Mail {
        id: String,
        from: String,
        to: Vec<String>,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<String>,
        sent_at: Millis,
    },
    /// What became of mail sent from the receiving host: `recipient` is `name@host`.
    Receipt {
        id: String,
        recipient: String,
        state: DeliveryState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<Millis>,
    },
}

/// Runs the bridge until the core goes away: publishes `waiting` and whatever `outbox`
/// brings, and hands what arrives for this host to the core.
pub async fn run(
    opts: NetworkOptions,
    waiting: Vec<OutboxRow>,
    mut outbox: mpsc::UnboundedReceiver<ToBridge>,
    core: mpsc::UnboundedSender<Command>,
) {
    let mut pending: BTreeMap<i64, OutboxRow> = waiting.into_iter().map(|r| (r.seq, r)).collect();
    let mut backoff =
        crate::client::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut said = false;
    loop {
        let session = match connect(&opts).await {
            Ok(s) => s,
            Err(e) => {
                if !said {
                    tracing::warn!(url = %opts.shown_url(), "cannot reach NATS: {e}; mail to other machines waits in the outbox");
                    said = true;
                }
                let _ = core.send(Command::Network { connected: false });
                // Keep taking what the core hands over while we wait.
                let wait = backoff.wait();
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        job = outbox.recv() => match job {
                            Some(ToBridge::Publish(r)) => { pending.insert(r.seq, r); }
                            // Not connected: no other machine answers.
                            Some(ToBridge::Gather { token }) => {
                                let _ = core.send(Command::Gathered { token, replies: Vec::new() });
                            }
                            None => return,
                        },
                    }
                }
                continue;
            }
        };
        said = false;
        backoff.reset();
        tracing::info!(url = %opts.shown_url(), host = %opts.host, "connected to NATS");
        let _ = core.send(Command::Network { connected: true });
        let (client, js, consumer, mut links) = session;
        let mut asked = match client.subscribe(opts.listing_subject()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot subscribe to NATS: {e}");
                backoff.wait().await;
                continue;
            }
        };
        let mut messages = match consumer
            .stream()
            .expires(Duration::from_secs(300))
            .heartbeat(Duration::from_secs(60))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("cannot read from NATS: {e}");
                backoff.wait().await;
                continue;
            }
        };
        // Publish what waits, oldest first, one at a time (JetStream acks each), while
        // listings and arrivals are served.
        let mut inflight: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Published>>>> =
            None;
        'connected: loop {
            if inflight.is_none()
                && let Some((&seq, row)) = pending.iter().next()
            {
                let (js, row) = (js.clone(), row.clone());
                inflight = Some(Box::pin(async move { (seq, publish(&js, &row).await) }));
            }
            tokio::select! {
                (seq, done) = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                    inflight = None;
                    if let Err(e) = done {
                        tracing::warn!("cannot publish to NATS: {e}");
                        break 'connected;
                    }
                    pending.remove(&seq);
                    let _ = core.send(Command::Published { seq });
                }
                // The connection dropped: start over with a new one (a pull consumer's
                // stream would only notice after missed heartbeats, minutes later).
                up = links.recv() => {
                    if up != Some(true) {
                        tracing::warn!("lost the connection to NATS; connecting again");
                        break 'connected;
                    }
                }
                job = outbox.recv() => match job {
                    Some(ToBridge::Publish(r)) => { pending.insert(r.seq, r); }
                    Some(ToBridge::Gather { token }) => {
                        let (client, core, subject) = (client.clone(), core.clone(), opts.listing_subject());
                        tokio::task::spawn_local(async move {
                            let replies = gather(&client, subject).await;
                            let _ = core.send(Command::Gathered { token, replies });
                        });
                    }
                    None => return,
                },
                req = asked.next() => match req {
                    Some(req) => {
                        let Some(to) = req.reply else { continue };
                        let (reply, listing) = oneshot::channel();
                        if core.send(Command::Listing { reply }).is_err() {
                            return;
                        }
                        if let Ok(listing) = listing.await {
                            let _ = client.publish(to, listing.into()).await;
                        }
                    }
                    None => break,
                },
                msg = messages.next() => match msg {
                    Some(Ok(msg)) => take(msg, &core).await,
                    Some(Err(e)) => {
                        tracing::warn!("NATS: {e}");
                        break;
                    }
                    None => break,
                },
            }
        }
        let _ = core.send(Command::Network { connected: false });
        backoff.wait().await;
    }
}

/// A URL's `user:password@` or `token@`, taken out of it (the client does not read them
/// from the URL).
fn split_userinfo(url: &str) -> (String, Option<(String, Option<String>)>) {
    // Without a scheme the client reads nats://.
    let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_string(), None);
    };
    let info = &rest[..at];
    let bare = format!("{scheme}://{}", &rest[at + 1..]);
    let auth = match info.split_once(':') {
        Some((user, pass)) => (user.to_string(), Some(pass.to_string())),
        None => (info.to_string(), None),
    };
    (bare, Some(auth))
}

type Session = (
    async_nats::Client,
    jetstream::Context,
    consumer::PullConsumer,
    // The client's own reconnections: up or down.
    mpsc::UnboundedReceiver<bool>,
);

/// A publication's sequence number and how publishing it went.
type Published = (i64, Result<(), async_nats::Error>);

/// Asks every machine who is online, and collects the answers that come within
/// [`GATHER_WINDOW`] (ours among them; the core leaves it out).
async fn gather(client: &async_nats::Client, subject: String) -> Vec<Vec<u8>> {
    let inbox = client.new_inbox();
    let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply(subject, inbox, Vec::new().into())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let deadline = tokio::time::Instant::now() + GATHER_WINDOW;
    let mut replies = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await {
        replies.push(m.payload.to_vec());
    }
    let _ = answers.unsubscribe().await;
    replies
}

async fn connect(opts: &NetworkOptions) -> Result<Session, async_nats::Error> {
    // The client's connection events: a drop ends this session of the bridge, which
    // connects again itself (to any server of the URL).
    let (link, links) = mpsc::unbounded_channel();
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("claude-peers broker {}", opts.host))
        .event_callback(move |event| {
            let link = link.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        let _ = link.send(true);
                    }
                    async_nats::Event::Disconnected => {
                        let _ = link.send(false);
                    }
                    _ => {}
                }
            }
        });
    // One server, or several of a cluster (comma-separated): the client tries them in turn.
    let mut auth = None;
    let mut servers = Vec::new();
    for url in opts.url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (bare, a) = split_userinfo(url);
        auth = auth.or(a);
        servers.push(bare.parse::<async_nats::ServerAddr>()?);
    }
    match auth {
        Some((user, Some(pass))) => connect = connect.user_and_password(user, pass),
        Some((token, None)) => connect = connect.token(token),
        None => {}
    }
    if let Some(creds) = &opts.creds {
        connect = connect.credentials_file(creds).await?;
    }
    if let Some(ca) = &opts.tls.ca {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    if opts.url.contains("tls://") {
        connect = connect.require_tls(true);
    }
    if let Some((cert, key)) = &opts.tls.client {
        connect = connect.add_client_certificate(cert.clone(), key.clone());
    }
    let client = connect.connect(servers).await?;
    let js = jetstream::new(client.clone());
    let user = token(&opts.user);
    js.create_or_update_stream(stream::Config {
        name: opts.stream_name(),
        subjects: vec![format!("cp.{user}.mail.*"), format!("cp.{user}.receipt.*")],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        num_replicas: opts.replicas,
        // A message goes once its machine acked it (each host reads its own subjects);
        // what a machine that never comes back would have had goes after a week.
        retention: stream::RetentionPolicy::WorkQueue,
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..Default::default()
    })
    .await?;
    let stream = js.get_stream(opts.stream_name()).await?;
    let durable = token(&opts.host);
    let consumer = stream
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!("cp.{user}.*.{durable}"),
                ack_policy: consumer::AckPolicy::Explicit,
                // What a broker killed before its ack had is redelivered after this.
                ack_wait: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await?;
    Ok((client, js, consumer, links))
}

async fn publish(js: &jetstream::Context, row: &OutboxRow) -> Result<(), async_nats::Error> {
    let ack = js
        .send_publish(
            row.subject.clone(),
            PublishMessage::build()
                .payload(row.payload.clone().into())
                .message_id(&row.msg_id),
        )
        .await?;
    ack.await?;
    Ok(())
}

/// Hands one arrival to the core and acks it to JetStream once the core committed it
/// (or could not read it: such a message would never read better).
async fn take(msg: jetstream::Message, core: &mpsc::UnboundedSender<Command>) {
    let relayed = match serde_json::from_slice::<Relayed>(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, "dropped an unreadable message from NATS: {e}");
            let _ = msg.ack().await;
            return;
        }
    };
    let (done, committed) = oneshot::channel();
    if core.send(Command::Relayed { relayed, done }).is_err() {
        return;
    }
    match committed.await {
        Ok(true) => {
            if let Err(e) = msg.double_ack().await {
                // Redelivered later, and stored once.
                tracing::warn!("cannot ack to NATS: {e}");
            }
        }
        _ => {
            let _ = msg
                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url() {
        assert_eq!(
            split_userinfo("nats://ann:s3cret@10.0.0.5:4222"),
            (
                "nats://10.0.0.5:4222".to_string(),
                Some(("ann".to_string(), Some("s3cret".to_string())))
            )
        );
        assert_eq!(
            split_userinfo("nats://tok@h:1"),
            ("nats://h:1".to_string(), Some(("tok".to_string(), None)))
        );
        assert_eq!(
            split_userinfo("nats://h:1"),
            ("nats://h:1".to_string(), None)
        );
        assert_eq!(
            split_userinfo("ann:pw@devbox:4222"),
            (
                "nats://devbox:4222".to_string(),
                Some(("ann".to_string(), Some("pw".to_string())))
            )
        );
    }

    #[test]
    fn tokens_keep_nats_separators_out() {
        assert_eq!(token("api.v2"), "api=2Ev2");
        assert_eq!(token("a*b>c d"), "a=2Ab=3Ec=20d");
        assert_eq!(token("dev-box_1"), "dev-box_1");
    }
}
