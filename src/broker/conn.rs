//! One client connection: checks who is calling, reads frames, answers what it can alone
//! (`hello`, malformed frames, rate limits) and hands every other request to the core.
//! A writer task sends the core's frames back, many per write when they queue up.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::core::{Command, ConnId, Outbound, Outbox};
use super::frame;
use crate::config::Limits;
use crate::platform;
use crate::protocol::*;
use crate::wire::{self, FrameReader, ReadError};

/// What every connection needs to know of its broker.
pub struct ConnContext {
    pub core: UnboundedSender<Command>,
    pub uid: u32,
    pub protocol: u32,
    pub pid: u32,
    /// Sizes checked before a request reaches the core; `send_rate` is enforced here too.
    pub limits: Limits,
}

/// Token bucket for sends: `rate` per second, bursts up to `2 * rate`.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        Self {
            rate: rate as f64,
            tokens: 2.0 * rate as f64,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(2.0 * self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn error_frame(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Outbound {
    Outbound::Frame(Box::new(ServerFrame::error(
        id,
        ErrorBody::new(code, message),
    )))
}

/// Back-pressure from the writer to the reader: while a write waits for the client to make
/// room (the socket buffer is full, so the client is not reading), no new request is read.
/// A client that floods the broker without reading the answers blocks itself instead of
/// growing the broker's memory.
#[derive(Default)]
struct WriteGate {
    blocked: Cell<bool>,
    opened: Notify,
}

impl WriteGate {
    async fn wait_open(&self) {
        while self.blocked.get() {
            self.opened.notified().await;
        }
    }
}

/// Serves one accepted connection until it closes.
pub async fn serve(stream: UnixStream, conn: ConnId, ctx: Rc<ConnContext>) {
    let (read, write) = stream.into_split();
    let (outbox, rx) = unbounded_channel();
    let gate = Rc::new(WriteGate::default());
    let writer = tokio::task::spawn_local(write_frames(write, rx, gate.clone()));
    match platform::peer_uid(read.as_ref()) {
        Ok(uid) if uid == ctx.uid => {}
        other => {
            let who = other.map_or_else(|e| format!("unknown ({e})"), |u| u.to_string());
            tracing::warn!(conn, uid = %who, "refused a connection from another user");
            let _ = outbox.send(error_frame(
                None,
                ErrorCode::Forbidden,
                format!(
                    "this broker serves uid {} only; connection refused",
                    ctx.uid
                ),
            ));
            let _ = outbox.send(Outbound::Close);
            let _ = writer.await;
            return;
        }
    }
    if ctx
        .core
        .send(Command::Connected {
            conn,
            outbox: outbox.clone(),
        })
        .is_err()
    {
        return;
    }
    read_frames(read, conn, &ctx, &outbox, &gate).await;
    let _ = ctx.core.send(Command::Disconnected { conn });
    drop(outbox);
    let _ = writer.await;
}

async fn read_frames(
    read: tokio::net::unix::OwnedReadHalf,
    conn: ConnId,
    ctx: &ConnContext,
    outbox: &Outbox,
    gate: &WriteGate,
) {
    let mut frames = FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES);
    let mut greeted = false;
    let mut mismatched = false;
    let mut rate = RateLimit::new(ctx.limits.send_rate);
    loop {
        gate.wait_open().await;
        let bytes = match frames.next().await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(ReadError::TooLarge(max)) => {
                tracing::warn!(conn, "frame over {max} bytes; closing");
                let _ = outbox.send(error_frame(
                    None,
                    ErrorCode::FrameTooLarge,
                    format!("frame over {max} bytes; the connection is closed. Keep each frame under 1 MiB"),
                ));
                let _ = outbox.send(Outbound::Close);
                return;
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!(conn, "read error: {e}");
                return;
            }
        };
        let frame = match frame::decode(bytes) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(bad) => {
                let _ = outbox.send(Outbound::Frame(Box::new(ServerFrame::error(
                    bad.id, bad.error,
                ))));
                continue;
            }
        };
        let id = frame.id;
        if let Err(e) = frame::validate(&frame.request, &ctx.limits) {
            let _ = outbox.send(Outbound::Frame(Box::new(ServerFrame::error(id, e))));
            continue;
        }
        match frame.request {
            Request::Hello(h) => {
                if greeted {
                    let _ = outbox.send(error_frame(
                        id,
                        ErrorCode::BadRequest,
                        "hello was already answered on this connection",
                    ));
                    continue;
                }
                greeted = true;
                mismatched = h.protocol != ctx.protocol;
                let reply = HelloReply {
                    protocol: ctx.protocol,
                    broker_version: env!("CARGO_PKG_VERSION").to_string(),
                    pid: ctx.pid,
                };
                let _ = outbox.send(Outbound::Frame(Box::new(ServerFrame::result(
                    id,
                    Reply::Hello(reply),
                ))));
                continue;
            }
            _ if !greeted => {
                let _ = outbox.send(error_frame(
                    id,
                    ErrorCode::HelloRequired,
                    "send hello first: {\"op\":\"hello\",\"protocol\":N,\"client\":\"…\",\"version\":\"…\"}",
                ));
                continue;
            }
            Request::Shutdown(_) => {}
            _ if mismatched => {
                let _ = outbox.send(error_frame(
                    id,
                    ErrorCode::ProtocolMismatch,
                    format!(
                        "this broker speaks protocol {}; only shutdown is accepted from another version. Use a matching claude-peers",
                        ctx.protocol
                    ),
                ));
                continue;
            }
            Request::Send(_) | Request::Broadcast(_) if !rate.allow() => {
                let _ = outbox.send(error_frame(
                    id,
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} sends per second on this connection; slow down and retry in a moment",
                        ctx.limits.send_rate
                    ),
                ));
                continue;
            }
            _ => {}
        }
        if ctx
            .core
            .send(Command::Request {
                conn,
                id,
                request: Box::new(frame.request),
            })
            .is_err()
        {
            let _ = outbox.send(error_frame(
                id,
                ErrorCode::ShuttingDown,
                "the broker is shutting down; reconnect in a moment",
            ));
            return;
        }
    }
}

async fn write_frames(
    write: OwnedWriteHalf,
    mut rx: UnboundedReceiver<Outbound>,
    gate: Rc<WriteGate>,
) {
    let mut write = write;
    let mut buf = Vec::with_capacity(8192);
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut close = false;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Outbound::Frame(f) => wire::encode(&*f, &mut buf),
                Outbound::Close => {
                    close = true;
                    break;
                }
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        gate.blocked.set(true);
        let written = write.write_all(&buf).await;
        gate.blocked.set(false);
        gate.opened.notify_waiters();
        if written.is_err() {
            return;
        }
        if close {
            let _ = write.shutdown().await;
            return;
        }
    }
}
