//! The connection's two tasks and what they share: the writer ([`write_loop`]), the
//! reader that routes each answer to its caller ([`read_loop`], [`split_answer`]), and the
//! calls waiting for an answer ([`Pending`]).

use super::*;

/// The calls waiting for their answer, shared by the callers and the connection's two
/// tasks. Once either task finds the connection gone, it is closed: every waiting call
/// and every later one fails with [`ClientError::Disconnected`], none waits forever.
#[derive(Clone)]
pub(super) struct Pending(Arc<Mutex<Option<Calls>>>);

/// Answers awaited, by request id.
type Calls = HashMap<u64, oneshot::Sender<Answer>>;

impl Pending {
    pub(super) fn new() -> Self {
        Self(Arc::new(Mutex::new(Some(HashMap::new()))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Calls>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for the answer to `id`; `false` once the connection is gone.
    pub(super) fn insert(&self, id: u64, tx: oneshot::Sender<Answer>) -> bool {
        match self.lock().as_mut() {
            Some(calls) => {
                calls.insert(id, tx);
                true
            }
            None => false,
        }
    }

    pub(super) fn take(&self, id: u64) -> Option<oneshot::Sender<Answer>> {
        self.lock().as_mut()?.remove(&id)
    }

    /// Every waiting call, taken out (the connection stays open).
    fn drain(&self) -> Vec<oneshot::Sender<Answer>> {
        let mut calls = self.lock();
        calls
            .as_mut()
            .map(|c| c.drain().map(|(_, tx)| tx).collect())
            .unwrap_or_default()
    }

    /// The connection is gone: dropping the senders fails every waiting call.
    fn close(&self) {
        *self.lock() = None;
    }
}

/// The id and the result's place in a frame of the form `{"id":<n>,"result":<result>}`,
/// which is how the broker writes every successful answer (`ServerFrame` serializes its
/// fields in that order), found without reading the result. `None` for any other frame,
/// which then takes the general way. Whether the result is well-formed is found when it
/// is decoded: a frame with more after the result fails there, not silently.
pub(super) fn split_answer(frame: &[u8]) -> Option<(u64, Range<usize>)> {
    let rest = frame.strip_prefix(b"{\"id\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    // Ids are u64s; more digits than that is not ours.
    if digits == 0 || digits > 20 {
        return None;
    }
    let id = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let result = rest[digits..].strip_prefix(b",\"result\":")?;
    let start = frame.len() - result.len();
    let end = frame.len() - 1;
    (frame[end] == b'}' && start < end).then_some((id, start..end))
}

/// Writes the frames the client's callers hand over, gathered as the broker's
/// connections do it ([`wire::gather`]). It ends, closing our side of the connection,
/// when the [`Client`] is dropped (after writing what is queued) or a write fails.
pub(super) async fn write_loop(
    mut write: crate::quiet::SocketWriter,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    pending: Pending,
) {
    let mut buf = Vec::with_capacity(8192);
    while let Some(first) = rx.recv().await {
        buf.clear();
        wire::gather(first, &mut rx, &mut buf, |frame, buf| {
            buf.extend_from_slice(&frame);
            true
        });
        if write.write_all(&buf).await.is_err() {
            // What was written in vain will never be answered.
            pending.close();
            return;
        }
        if buf.capacity() > 1 << 20 {
            buf = Vec::with_capacity(8192);
        }
    }
}

pub(super) async fn read_loop(
    read: crate::quiet::ReadHalf,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
) {
    // Room for a listing of hundreds of peers in a few reads, not dozens; pages of it
    // that are never written to cost no memory.
    let mut frames = FrameReader::new(BufReader::with_capacity(READ_BUFFER, read), MAX_FRAME_BYTES);
    while let Ok(Some(bytes)) = frames.next().await {
        if let Some((id, at)) = split_answer(bytes) {
            if let Some(tx) = pending.take(id) {
                let _ = tx.send(Ok(Encoded {
                    bytes: bytes.to_vec(),
                    at,
                }));
            }
            continue;
        }
        let message = serde_json::from_slice::<ServerFrame<Box<RawValue>>>(bytes)
            .map_err(|e| e.to_string())
            .and_then(ServerFrame::into_message);
        match message {
            Err(e) => {
                // Its id, if that much can be read.
                #[derive(serde::Deserialize)]
                struct Id {
                    id: Option<u64>,
                }
                let id = serde_json::from_slice::<Id>(bytes).ok().and_then(|f| f.id);
                tracing::warn!("unreadable frame from the broker: {e}");
                // An answer, if unreadable, still ends the call that waits for it.
                if let Some(tx) = id.and_then(|id| pending.take(id)) {
                    let _ = tx.send(Err(ErrorBody::new(
                        ErrorCode::Internal,
                        format!("the broker's answer could not be read: {e}"),
                    )));
                }
            }
            Ok(ServerMessage::Deliver(d)) => {
                let _ = events.send(Event::Deliver(d));
            }
            Ok(ServerMessage::Event(ev)) => {
                let _ = events.send(Event::Log(ev));
            }
            Ok(ServerMessage::Peer(p)) => {
                let _ = events.send(Event::Peer(p));
            }
            Ok(ServerMessage::Lagged(l)) => {
                let _ = events.send(Event::Lagged(l.missed));
            }
            Ok(ServerMessage::Answer { id, result }) => {
                if let Some(tx) = pending.take(id) {
                    let _ = tx.send(result.map(Encoded::from));
                }
            }
            Ok(ServerMessage::Refused(e)) => {
                // An error about the connection itself (refused, frame too large).
                tracing::warn!("broker: {}", e.message);
                for tx in pending.drain() {
                    let _ = tx.send(Err(e.clone()));
                }
                let _ = events.send(Event::Closed(e));
            }
        }
    }
    pending.close();
}
