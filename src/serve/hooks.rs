//! The session socket (`hooks/<host pid>.sock`): mail lent to the hooks, `doctor`'s
//! questions, and the inbox relay's connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::inbox::{Inbound, Inbox};
use super::*;
use crate::protocol::Delivery;

impl Session {
    /// Serves the hooks of this session (`claude-peers hook prompt|wait`) on
    /// `hooks/<host pid>.sock`: lends them the unread mail, which their `shown` settles
    /// and their going away gives back.
    pub(super) async fn serve_hooks(self: Arc<Self>, path: PathBuf) {
        let listener = match path
            .parent()
            .map(crate::paths::secure_dir)
            .transpose()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|_| {
                // The newest `serve` of a host is its session's (an older one is being
                // replaced, or steps aside): it takes the socket of one still running.
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)?;
                let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path)?);
                Ok((listener, inode))
            }) {
            Ok((l, inode)) => {
                self.state().hook_sockets.push((path, inode));
                l
            }
            Err(e) => {
                tracing::warn!("no socket for hooks at {}: {e}", path.display());
                return;
            }
        };
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("the hook socket could not accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if platform::peer_uid(&stream).ok() != Some(platform::current_uid()) {
                tracing::warn!("refused a hook connection from another uid");
                continue;
            }
            tokio::spawn(self.clone().lend_to_hook(stream));
        }
    }

    /// One hook's connection: its request, the lent mail, and `shown` or going away.
    pub(super) async fn lend_to_hook(self: Arc<Self>, stream: tokio::net::UnixStream) {
        use crate::hook::{HookReply, HookRequest};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        if !matches!(stream.read_line(&mut line).await, Ok(n) if n > 0) {
            return;
        }
        let lent = match serde_json::from_str::<HookRequest>(&line) {
            Ok(HookRequest::Relay) => {
                self.serve_relay(stream).await;
                return;
            }
            Ok(HookRequest::Status) => {
                let parent = platform::parent_pid();
                let status = {
                    let st = self.state();
                    crate::hook::SessionStatus {
                        name: st.name().unwrap_or_default().to_string(),
                        pid: std::process::id(),
                        host_pid: parent,
                        host: platform::command_line(parent).unwrap_or_default(),
                        route: st.route.as_str().into(),
                        why: st.route_why.clone(),
                        unread: st.unread.len(),
                    }
                };
                let mut text = serde_json::to_string(&status).expect("serializable");
                text.push('\n');
                let _ = stream.get_mut().write_all(text.as_bytes()).await;
                return;
            }
            Ok(HookRequest::Take { session } | HookRequest::Wait { session })
                if self.serves_another_session(session.as_deref()) =>
            {
                let reply = HookReply {
                    name: String::new(),
                    messages: Vec::new(),
                    other_session: true,
                };
                let mut text = serde_json::to_string(&reply).expect("serializable");
                text.push('\n');
                let _ = stream.get_mut().write_all(text.as_bytes()).await;
                return;
            }
            Ok(HookRequest::Take { .. }) => self.lend(),
            Ok(HookRequest::Wait { .. }) => {
                // Until mail arrives, the hook goes away (its host ended it), or a newer
                // wait replaces this one: the host starts one after every turn and does
                // not end the older ones.
                let me = {
                    let mut st = self.state();
                    st.hook_waits += 1;
                    st.hook_waits
                };
                self.mail_arrived.notify_waiters();
                let mut probe = String::new();
                loop {
                    let arrived = self.mail_arrived.notified();
                    tokio::pin!(arrived);
                    // Registered before looking, so what happens in between still wakes us.
                    arrived.as_mut().enable();
                    let (newest, may_wake) = {
                        let st = self.state();
                        (st.hook_waits == me, st.may_wake)
                    };
                    if !newest {
                        return;
                    }
                    // A session whose inbox was withheld (it bypasses permissions, or its
                    // settings hold other sessions' mail) is not woken by mail either: it
                    // sees its mail when its user next prompts.
                    let lent = if may_wake { self.lend() } else { Vec::new() };
                    if !lent.is_empty() {
                        break lent;
                    }
                    tokio::select! {
                        _ = arrived => {}
                        _ = stream.read_line(&mut probe) => return,
                    }
                }
            }
            _ => return,
        };
        self.want_registration();
        let name = self.name().unwrap_or_default();
        let reply = HookReply {
            name,
            messages: lent,
            other_session: false,
        };
        let mut text = serde_json::to_string(&reply).expect("serializable");
        text.push('\n');
        let lent = reply.messages;
        if stream.get_mut().write_all(text.as_bytes()).await.is_err() {
            self.give_back(lent);
            return;
        }
        line.clear();
        match stream.read_line(&mut line).await {
            Ok(n) if n > 0 && matches!(serde_json::from_str(&line), Ok(HookRequest::Shown)) => {
                self.shown_by_hook(lent);
            }
            _ => self.give_back(lent),
        }
    }

    /// Whether a hook of the agent session `theirs` must look further: we know our session
    /// and it is another, or our host runs several sessions and we do not know ours yet
    /// (their mail is not ours to lend). A hook that says nothing of its session is ours.
    fn serves_another_session(&self, theirs: Option<&str>) -> bool {
        let st = self.state();
        match (st.agent_session.as_deref(), theirs) {
            (Some(ours), Some(theirs)) => ours != theirs,
            (None, Some(_)) => st.shared_host,
            (_, None) => false,
        }
    }

    /// The agent told us which of its sessions we serve (Codex: `sessionId` in a tool
    /// call's `_meta`): our hooks find us by it from now on, whichever process runs them.
    pub(crate) fn learn_agent_session(self: &Arc<Self>, id: &str) {
        {
            let mut st = self.state();
            if st.agent_session.is_some() {
                return;
            }
            st.agent_session = Some(id.to_string());
        }
        tracing::info!(session = id, "the agent named our session");
        if let Some(path) = crate::hook::session_socket_path(&self.paths, id) {
            tokio::spawn(self.clone().serve_hooks(path));
        }
    }

    /// The inbox relay's connection: jobs out, events in, until either side goes.
    pub(super) async fn serve_relay(
        self: Arc<Self>,
        stream: tokio::io::BufReader<tokio::net::UnixStream>,
    ) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (read, mut write) = stream.into_inner().into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if write.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        self.relay.send_replace(Some(tx));
        tracing::info!("the inbox relay is connected");
        let mut lines = tokio::io::BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(ev) = serde_json::from_str::<relay::Event>(&line) else {
                continue;
            };
            match ev {
                relay::Event::Taken { id, held } => self.relay_done(&id, Ok(held)),
                relay::Event::Failed { id, error } => self.relay_done(&id, Err(error)),
                relay::Event::Receipt {
                    message_id,
                    status,
                    reason,
                } => {
                    self.on_inbound(Inbound::Receipt {
                        message_id,
                        status,
                        reason,
                    })
                    .await
                }
                relay::Event::Reply { peer, text } => {
                    self.on_inbound(Inbound::Reply { peer, text }).await
                }
            }
        }
        tracing::warn!("the inbox relay went away");
        self.relay.send_replace(None);
        let pending: Vec<_> = self.state().relay_pending.drain().collect();
        for (_, done) in pending {
            let _ = done.send(Err("the inbox relay went away".into()));
        }
    }

    pub(super) fn relay_done(&self, id: &str, result: Result<bool, String>) {
        let done = self.state().relay_pending.remove(id);
        if let Some(done) = done {
            let _ = done.send(result);
        }
    }

    /// Has the relay write `d` into the inbox; whether the session holds it.
    pub(super) async fn relay_write(&self, inbox: &Inbox, d: &Delivery) -> Result<bool, String> {
        let (socket, session_id) = inbox.target().await.map_err(|e| e.to_string())?;
        let mut relay = self.relay.subscribe();
        let tx = match tokio::time::timeout(BROKER_WAIT, relay.wait_for(Option::is_some)).await {
            Ok(Ok(tx)) => tx.clone().expect("waited for Some"),
            _ => return Err("the inbox relay did not start".to_string()),
        };
        let (done, result) = tokio::sync::oneshot::channel();
        self.state().relay_pending.insert(d.id.clone(), done);
        let job = relay::Job {
            delivery: d.clone(),
            socket,
            session_id,
        };
        let mut line = serde_json::to_string(&job).expect("serializable");
        line.push('\n');
        tx.send(line)
            .map_err(|_| "the inbox relay went away".to_string())?;
        result
            .await
            .map_err(|_| "the inbox relay went away".to_string())?
    }

    /// Every unread message, for a hook to show.
    pub(super) fn lend(&self) -> Vec<Delivery> {
        let mut st = self.state();
        let lent: Vec<Delivery> = st.unread.drain(..).collect();
        st.lent.extend(lent.iter().map(|d| d.id.clone()));
        lent
    }

    /// Lent mail a hook showed: seen, and acked.
    pub(super) fn shown_by_hook(&self, lent: Vec<Delivery>) {
        let ids: Vec<String> = lent.into_iter().map(|d| d.id).collect();
        {
            let mut st = self.state();
            for id in &ids {
                st.seen.insert(id);
                st.lent.remove(id);
            }
        }
        self.ack(ids);
    }

    /// Lent mail a hook did not show, back at the front of the queue.
    pub(super) fn give_back(&self, lent: Vec<Delivery>) {
        if lent.is_empty() {
            return;
        }
        {
            let mut st = self.state();
            for d in lent.into_iter().rev() {
                st.lent.remove(&d.id);
                st.unread.push_front(d);
            }
        }
        self.mail_arrived.notify_waiters();
    }
}
