//! The session's side of peer-channel interop ([`crate::peer_channel`]): once registered,
//! it holds its name in peer-channel's sessions directory too (the lock directory,
//! refreshed every 5 s) and answers `ping` and `deliver` on the name's socket. A
//! delivered message enters the broker as mail to us from `pc:<from>`, on a connection of
//! its own, and is answered with our message id only once the broker stored it; it
//! then reaches the model by the session's route, like any mail.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use super::*;
use crate::client::SEND_TRIES;
use crate::peer_channel::rpc::{self, Call, RpcError};
use crate::peer_channel::{Claim, Holder, PREFIX, Sessions};

/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections answered at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 32;
/// Suffixes tried when peer-channel sessions hold the name wanted.
const MAX_SUFFIX: u32 = 20;
/// How long a claim waits between looks at a lock it may not take yet.
const WAIT_STEP: Duration = Duration::from_secs(1);
/// How long a `deliver` may take here: less than a sender of ours waits.
const DELIVER_WITHIN: Duration = Duration::from_secs(4);

/// What a session keeps for peer-channel: the directory (none when turned off), the
/// name held there and the task serving it, and the connection delivered mail goes in by.
#[derive(Default)]
pub(super) struct PcLink {
    pub sessions: Option<Sessions>,
    held: Mutex<Option<(Arc<Claim>, tokio::task::AbortHandle)>>,
    /// One claim at a time (a claim waits for pings).
    claiming: tokio::sync::Mutex<()>,
    /// Set as the session ends: no claim is made or kept after.
    closing: std::sync::atomic::AtomicBool,
    sender: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl PcLink {
    pub fn new(sessions: Option<Sessions>) -> Self {
        Self {
            sessions,
            ..Self::default()
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<(Arc<Claim>, tokio::task::AbortHandle)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the name back for good: the session ends.
    pub fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.release();
    }

    fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Gives the name back (a registration under another name, stepping aside, exit).
    pub fn release(&self) {
        if let Some((claim, task)) = self.held().take() {
            task.abort();
            claim.release();
        }
    }
}

impl Session {
    /// The name to register under: `wanted`, or the first `wanted-N` no peer-channel
    /// session holds, so that no name is held twice across the two systems. A name held
    /// by one of our own sessions is left for the broker to settle.
    pub(super) async fn pc_free_name(&self, wanted: &str) -> String {
        let (Some(pc), Ok(name)) = (&self.pc.sessions, PeerName::new(wanted)) else {
            return wanted.to_string();
        };
        if self
            .pc
            .held()
            .as_ref()
            .is_some_and(|(c, _)| c.name == name && c.held())
        {
            return wanted.to_string();
        }
        for n in 1..=MAX_SUFFIX {
            let candidate = if n == 1 {
                name.clone()
            } else {
                name.with_suffix(n)
            };
            if pc.holder(&candidate, &self.paths.socket).await != Holder::Theirs {
                return candidate.to_string();
            }
        }
        wanted.to_string()
    }

    /// After registering as `name`: holds the name in peer-channel's directory and serves
    /// its socket, unless that is already done. A failure is logged and leaves the
    /// session without peer-channel, never without claude-peers.
    pub(super) async fn pc_claim(self: &Arc<Self>, name: &str) {
        let Some(pc) = &self.pc.sessions else { return };
        let Ok(name) = PeerName::new(name) else {
            return;
        };
        let _one = self.pc.claiming.lock().await;
        if self.name().as_deref() != Some(name.as_str()) {
            return; // stepped aside, or registered again under another name, since
        }
        if self
            .pc
            .held()
            .as_ref()
            .is_some_and(|(c, task)| c.name == name && c.held() && !task.is_finished())
        {
            return;
        }
        self.pc.release();
        if let Err(e) = pc.prepare() {
            tracing::warn!("not joining peer-channel's sessions: {e}");
            return;
        }
        let Some(mut claim) = self.pc_take(pc, &name).await else {
            return;
        };
        let len = claim.socket.as_os_str().len();
        let listener = if len > crate::platform::MAX_SOCKET_PATH {
            Err(std::io::Error::other(format!(
                "the socket path is {len} bytes, too long for this OS"
            )))
        } else {
            tokio::net::UnixListener::bind(&claim.socket)
        };
        let listener = match listener.and_then(|l| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&claim.socket, std::fs::Permissions::from_mode(0o600))?;
            Ok(l)
        }) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%name, socket = %claim.socket.display(), "cannot listen for peer-channel: {e}");
                claim.release();
                return;
            }
        };
        claim.bound();
        let claim = Arc::new(claim);
        let mut held = self.pc.held();
        // Stepped aside, or ending, while this was being made: not kept.
        if self.pc.closing() || self.name().as_deref() != Some(name.as_str()) {
            claim.release();
            return;
        }
        let task = tokio::spawn(self.clone().pc_listen(listener, claim.clone()));
        tracing::info!(%name, socket = %claim.socket.display(), "joined peer-channel's sessions");
        *held = Some((claim, task.abort_handle()));
    }

    /// [`Session::pc_claim`] from the task serving the name (boxed: the two futures
    /// would otherwise contain each other).
    fn pc_claim_again(
        self: Arc<Self>,
        name: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.pc_claim(&name).await })
    }

    /// Takes `name`'s lock by the convention: a free or stale one; one held by an older
    /// `serve` of our broker (the broker gave the name to us); one whose socket is
    /// silent, once it is stale (at most 10 s). Never one a peer-channel session holds.
    async fn pc_take(&self, pc: &Sessions, name: &PeerName) -> Option<Claim> {
        let deadline = tokio::time::Instant::now() + crate::peer_channel::STALE + WAIT_STEP;
        loop {
            if self.pc.closing() || self.name().as_deref() != Some(name.as_str()) {
                return None;
            }
            let holder = pc.holder(name, &self.paths.socket).await;
            let take_over = match holder {
                Holder::Free => None,
                Holder::Ours(id) => Some(id),
                // An older `serve` of ours stepping aside may be closing its socket as we
                // look, and a silent holder may be dead: looked at again until a lock left
                // alone would be stale.
                Holder::Theirs | Holder::Silent => {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(%name, "a peer-channel session holds this name there; this session is not reachable from peer-channel");
                        return None;
                    }
                    tokio::time::sleep(WAIT_STEP).await;
                    continue;
                }
            };
            match pc.claim(name, take_over) {
                Ok(c) => return Some(c),
                // Someone else claimed it in between: look again.
                Err(e)
                    if e.kind() == std::io::ErrorKind::AlreadyExists
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(WAIT_STEP).await;
                }
                Err(e) => {
                    tracing::warn!(%name, "not reachable from peer-channel: {e}");
                    return None;
                }
            }
        }
    }

    /// Answers connections on the name's socket and keeps its lock fresh, until the lock
    /// is no longer ours or the task is aborted.
    async fn pc_listen(self: Arc<Self>, listener: tokio::net::UnixListener, claim: Arc<Claim>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut refresh = tokio::time::interval(crate::peer_channel::REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = refresh.tick() => {
                    if !claim.refresh() {
                        // Reclaimed while this process was stopped for over 10 s, say. Claimed
                        // again once this task is over, if no one else holds it by then.
                        tracing::warn!(name = %claim.name, "the peer-channel lock of this name is no longer ours; claiming it again");
                        tokio::spawn(self.clone().pc_claim_again(claim.name.to_string()));
                        return;
                    }
                }
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            // Out of descriptors, say: not a busy loop.
                            tracing::warn!("peer-channel socket: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                    let session = self.clone();
                    tokio::spawn(async move {
                        session.pc_answer(stream).await;
                        drop(slot);
                    });
                }
            }
        }
    }

    /// One connection: one request, one answer. Another uid's process gets nothing.
    async fn pc_answer(&self, mut stream: UnixStream) {
        if platform::peer_uid(&stream).ok() != Some(platform::current_uid()) {
            return;
        }
        let (read, mut write) = stream.split();
        let line = match tokio::time::timeout(READ_TIMEOUT, rpc::read_line(read)).await {
            Ok(Ok(Some(line))) => line,
            // Gone without a request, an I/O error, or too slow.
            _ => return,
        };
        let (id, result) = match line {
            Err(too_long) => (Value::Null, Err(too_long)),
            Ok(line) => {
                let (id, call) = rpc::parse(&line);
                let result = match call {
                    Ok(Call::Ping) => Ok(self.pc_ping()),
                    Ok(Call::Deliver(d)) => {
                        // Answered before the sender gives up on us.
                        tokio::time::timeout(DELIVER_WITHIN, self.pc_deliver(d))
                            .await
                            .unwrap_or_else(|_| {
                                Err(RpcError::new(
                                    rpc::INTERNAL_ERROR,
                                    "the broker did not store the message in time; it may still have it: check `claude-peers log` before sending again",
                                ))
                            })
                    }
                    Err(e) => Err(e),
                };
                (id, result)
            }
        };
        let _ = write.write_all(&rpc::answer(&id, result)).await;
        let _ = write.shutdown().await;
    }

    fn pc_ping(&self) -> Value {
        json!({
            "name": self.name_or_wanted(),
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": crate::peer_channel::PROTOCOL,
            "server": crate::peer_channel::SERVER,
            "broker": self.paths.socket,
        })
    }

    /// A `deliver`: stored by the broker as mail to us from `pc:<from>` (its idempotency
    /// key kept across a reconnection, so a retry never stores it twice), answered with
    /// our message id.
    async fn pc_deliver(&self, d: rpc::Deliver) -> Result<Value, RpcError> {
        let Some(me) = self.name() else {
            return Err(RpcError::new(
                rpc::INTERNAL_ERROR,
                "this session is not registered yet; try again in a moment",
            ));
        };
        let from = PeerName::new(&d.from).unwrap_or_else(|_| PeerName::sanitize(&d.from));
        let request = crate::protocol::Send {
            to: vec![me],
            text: d.text,
            // Our ids only: a peer-channel id would not name any message of ours.
            in_reply_to: d.in_reply_to.filter(|r| crate::protocol::is_message_id(r)),
            from: Some(format!("{PREFIX}{from}")),
            key: Some(uuid::Uuid::now_v7().to_string()),
        };
        let internal =
            |e: &dyn std::fmt::Display| RpcError::new(rpc::INTERNAL_ERROR, e.to_string());
        for _ in 0..SEND_TRIES {
            let client = self.pc_sender().await.map_err(|e| internal(&e))?;
            match client.call(request.clone()).await {
                Ok(sent) => return Ok(json!({ "message_id": sent.message_id })),
                Err(ClientError::Disconnected) => {
                    self.pc.sender.lock().await.take();
                }
                Err(ClientError::Refused(e)) => {
                    let code = match e.code {
                        ErrorCode::EmptyMessage
                        | ErrorCode::MessageTooLarge
                        | ErrorCode::BadName
                        | ErrorCode::BadRequest => rpc::INVALID_PARAMS,
                        _ => rpc::INTERNAL_ERROR,
                    };
                    return Err(RpcError::new(code, e.message));
                }
                Err(e) => return Err(internal(&e)),
            }
        }
        Err(internal(&ClientError::Disconnected))
    }

    /// Sends as this session to the peer-channel session `to` (`pc:<name>`), over its
    /// socket; answers the id it gave the message.
    pub(super) async fn send_pc(
        &self,
        to: &str,
        text: &str,
        in_reply_to: Option<&str>,
    ) -> Result<String, String> {
        let pc = self.pc.sessions.as_ref().ok_or_else(|| {
            format!("{to} is a peer-channel session, and this session has peer-channel turned off (CLAUDE_PEERS_PEER_CHANNEL=off)")
        })?;
        pc.deliver(to, &self.name_or_wanted(), text, in_reply_to)
            .await
    }

    /// The connection delivered mail goes in by: not registered, so that it may send as
    /// `pc:<from>`.
    async fn pc_sender(&self) -> Result<Arc<Client>, ClientError> {
        let mut sender = self.pc.sender.lock().await;
        if let Some(c) = &*sender {
            return Ok(c.clone());
        }
        let mut opts = ConnectOptions::new("claude-peers-serve");
        opts.broker_exe = self.broker_exe.clone();
        let client = Arc::new(Client::connect(&self.paths, &opts).await?);
        *sender = Some(client.clone());
        Ok(client)
    }
}
