//! One client connection: checks who is calling, reads frames, answers what it can alone
//! (`hello`, malformed frames, rate limits) and hands every other request to the core.
//! A writer task sends the core's frames back, many per write when they queue up.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::quiet::SocketWriter;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::core::{Command, ConnId};
use super::frame;
use super::outq::{Outbound, Outq};
use crate::config::Limits;
use crate::platform;
use crate::protocol::*;
use crate::wire::{self, FrameBudget, FrameReader, ReadError};

/// What every connection needs to know of its broker.
pub struct ConnContext {
    pub core: UnboundedSender<Command>,
    pub uid: u32,
    pub protocol: u32,
    pub pid: u32,
    /// Sizes checked before a request reaches the core; `send_rate` is enforced here too.
    pub limits: Limits,
    /// Shared by every connection's reader: frames still arriving.
    pub frames: Arc<FrameBudget>,
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
    answer(&ServerFrame::<Reply>::error(
        id,
        ErrorBody::new(code, message),
    ))
}

fn answer(frame: &ServerFrame<Reply>) -> Outbound {
    let mut buf = Vec::new();
    wire::encode(frame, &mut buf);
    Outbound::Answer(buf)
}

/// Refuses a connection over the limit: one error frame, written without waiting (the
/// socket's buffer is empty), then closed.
pub fn refuse_over_limit(stream: UnixStream, limit: usize) {
    let ErrorBody { code, message, .. } = ErrorBody::new(
        ErrorCode::TooManyConnections,
        format!(
            "the broker has {limit} connections open, its limit; the connection is closed. Close sessions you do not use, or raise CLAUDE_PEERS_MAX_CONNECTIONS"
        ),
    );
    let Outbound::Answer(bytes) = error_frame(None, code, message) else {
        return;
    };
    let _ = stream.try_write(&bytes);
}

/// Serves one accepted connection until it closes.
pub async fn serve(stream: UnixStream, conn: ConnId, ctx: Rc<ConnContext>) {
    let peer = platform::peer_uid(&stream);
    let (read, write) = match crate::quiet::split(stream) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::warn!(conn, "cannot watch the connection: {e}");
            return;
        }
    };
    let (outq, rx) = Outq::new();
    let outq = Rc::new(outq);
    let writer = tokio::task::spawn_local(write_frames(
        write,
        rx,
        outq.clone(),
        conn,
        ctx.core.clone(),
    ));
    match peer {
        Ok(uid) if uid == ctx.uid => {}
        other => {
            let who = other.map_or_else(|e| format!("unknown ({e})"), |u| u.to_string());
            tracing::warn!(conn, uid = %who, "refused a connection from another user");
            outq.send_now(error_frame(
                None,
                ErrorCode::Forbidden,
                format!(
                    "this broker serves uid {} only; connection refused",
                    ctx.uid
                ),
            ));
            outq.send_now(Outbound::Close);
            drop(outq);
            let _ = writer.await;
            return;
        }
    }
    if ctx
        .core
        .send(Command::Connected {
            conn,
            outq: outq.clone(),
        })
        .is_err()
    {
        return;
    }
    read_frames(read, conn, &ctx, &outq).await;
    let _ = ctx.core.send(Command::Disconnected { conn });
    drop(outq);
    let _ = writer.await;
}

async fn read_frames(read: crate::quiet::ReadHalf, conn: ConnId, ctx: &ConnContext, outbox: &Outq) {
    let mut frames =
        FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES).with_budget(ctx.frames.clone());
    let mut greeted = false;
    let mut mismatched = false;
    let mut rate = RateLimit::new(ctx.limits.send_rate);
    loop {
        // A client that does not read its answers stops being read: its queue, not the
        // broker's memory, is what fills.
        if !outbox.wait_for_writer(|q| !q.reader_must_wait()).await {
            return;
        }
        // A connection the broker closed (its writer stopped) is read no more, even if
        // the client keeps its end open.
        let next = tokio::select! {
            next = frames.next() => next,
            () = outbox.writer_gone() => return,
        };
        let bytes = match next {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(ReadError::TooLarge(max)) => {
                tracing::warn!(conn, "frame over {max} bytes; closing");
                outbox.send_now(error_frame(
                    None,
                    ErrorCode::FrameTooLarge,
                    format!("frame over {max} bytes; the connection is closed. Keep each frame under 1 MiB"),
                ));
                outbox.send_now(Outbound::Close);
                return;
            }
            Err(ReadError::Busy) => {
                tracing::warn!(conn, "too many large frames arriving at once; closing");
                outbox.send_now(error_frame(
                    None,
                    ErrorCode::Busy,
                    "the broker is receiving too many large frames at once; the connection is closed. Connect again and retry",
                ));
                outbox.send_now(Outbound::Close);
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
                outbox.request_in();
                outbox.send_now(answer(&ServerFrame::error(bad.id, bad.error)));
                continue;
            }
        };
        let id = frame.id;
        if matches!(frame.request, Request::Log(_) | Request::ListPeers(_)) {
            // An answer of up to a page (1 MiB): one at a time, once what came before
            // is written.
            if !outbox.wait_for_writer(|q| q.unanswered() == 0).await {
                return;
            }
        }
        // Counted as owed an answer; an ack without id that reaches the core is not
        // answered, and is uncounted there (below). Any refusal here is an answer.
        outbox.request_in();
        let unanswered = id.is_none() && matches!(frame.request, Request::Ack(_));
        if let Err(e) = frame::validate(&frame.request, &ctx.limits) {
            outbox.send_now(answer(&ServerFrame::error(id, e)));
            continue;
        }
        match frame.request {
            Request::Hello(h) => {
                if greeted {
                    outbox.send_now(error_frame(
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
                outbox.send_now(answer(&ServerFrame::result(id, Reply::Hello(reply))));
                continue;
            }
            _ if !greeted => {
                outbox.send_now(error_frame(
                    id,
                    ErrorCode::HelloRequired,
                    "send hello first: {\"op\":\"hello\",\"protocol\":N,\"client\":\"…\",\"version\":\"…\"}",
                ));
                continue;
            }
            Request::Shutdown(_) => {}
            _ if mismatched => {
                outbox.send_now(error_frame(
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
                outbox.send_now(error_frame(
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
        if unanswered {
            outbox.request_out();
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
            outbox.send_now(error_frame(
                id,
                ErrorCode::ShuttingDown,
                "the broker is shutting down; reconnect in a moment",
            ));
            return;
        }
    }
}

async fn write_frames(
    write: SocketWriter,
    rx: UnboundedReceiver<Outbound>,
    outq: Rc<Outq>,
    conn: ConnId,
    core: UnboundedSender<Command>,
) {
    write_until_done(write, rx, &outq, conn, core).await;
    // However it ended, a reader waiting for room must not wait for a writer that is gone.
    outq.writer_stopped();
}

async fn write_until_done(
    mut write: SocketWriter,
    mut rx: UnboundedReceiver<Outbound>,
    outq: &Outq,
    conn: ConnId,
    core: UnboundedSender<Command>,
) {
    let mut buf = Vec::with_capacity(8192);
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut answers = 0;
        let close = !wire::gather(first, &mut rx, &mut buf, |out, buf| match out {
            Outbound::Answer(b) => {
                answers += 1;
                buf.extend_from_slice(&b);
                true
            }
            Outbound::Push(b) => {
                buf.extend_from_slice(&b);
                true
            }
            Outbound::Close => false,
        });
        if write.write_all(&buf).await.is_err() {
            return;
        }
        if outq.written(buf.len(), answers) {
            let _ = core.send(Command::Drained { conn });
        }
        if buf.capacity() > 1 << 20 {
            // A page or a burst made it large; an idle connection keeps a small one.
            buf = Vec::with_capacity(8192);
        }
        if close {
            let _ = write.shutdown().await;
            return;
        }
    }
}
