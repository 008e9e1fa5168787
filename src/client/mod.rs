//! The client side of the broker protocol, shared by the CLI and `serve`: connect (starting
//! a broker when none answers), typed calls matched by id, and a stream of events.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::paths::{PathError, Paths};
use crate::platform;
use crate::protocol::*;
use crate::wire::{self, FrameReader};

mod conn;
mod start;
#[cfg(test)]
mod tests;

use conn::{Pending, read_loop, write_loop};
pub use start::wait_socket_gone;
use start::{broker_error, full_disk, reap, spawn_broker};

/// Most brokers one connect attempt starts.
const MAX_SPAWNS: u32 = 5;
/// The socket read buffer of a connection.
const READ_BUFFER: usize = 64 * 1024;
/// How long a client waits for a broker it started to answer.
const START_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Paths(#[from] PathError),
    #[error(
        "no broker is running at {socket}; start one (`claude-peers broker`, or any claude-peers command but `status` and `stop`) and try again"
    )]
    NotRunning { socket: PathBuf },
    #[error("could not start a broker: {reason}. See its log at {log}")]
    StartFailed { reason: String, log: PathBuf },
    #[error("cannot connect to the broker at {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    #[error(
        "the socket {socket} is served by uid {uid}, not by you; refusing to talk to it. Remove it or set CLAUDE_PEERS_HOME"
    )]
    ForeignBroker { socket: PathBuf, uid: u32 },
    #[error(
        "the running broker speaks protocol {broker}, newer than this claude-peers ({ours}); use the newer claude-peers, or `claude-peers stop` first"
    )]
    BrokerNewer { broker: u32, ours: u32 },
    #[error("the broker closed the connection (it may have stopped or restarted); try again")]
    Disconnected,
    #[error(transparent)]
    Refused(#[from] ErrorBody),
    #[error("the broker sent something this client cannot read: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The broker's refusal code, when this is a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(e) => Some(e.code),
            _ => None,
        }
    }
}

/// What arrives without being asked for.
#[derive(Debug, Clone)]
pub enum Event {
    Deliver(Delivery),
    Log(LogEvent),
    /// A session came, went or changed (after `subscribe` with `peers`).
    Peer(PeerEvent),
    /// This subscriber read too slowly and missed this many log events.
    Lagged(u64),
    /// The broker closed the connection, saying why (`replaced`, `shutting_down`, …).
    Closed(ErrorBody),
}

/// How many times a `send` with an idempotency key is tried when the connection drops
/// before its answer.
pub const SEND_TRIES: u32 = 3;

/// Waits that double from `first` up to `max`: for trying again after a failure.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            next: first,
            max,
        }
    }

    /// Sleeps the next wait, and doubles the one after.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// Back to the first wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Sent in `hello`, e.g. `claude-peers-cli`.
    pub client: String,
    /// Start a broker when none answers.
    pub autostart: bool,
    /// The protocol version to speak; only tests set another.
    pub protocol: u32,
    /// The program to run as `<exe> broker` when starting one [default: this executable].
    pub broker_exe: Option<PathBuf>,
}

impl ConnectOptions {
    pub fn new(client: &str) -> Self {
        Self {
            client: client.to_string(),
            autostart: true,
            protocol: PROTOCOL_VERSION,
            broker_exe: None,
        }
    }
}

/// An answer as the read loop hands it to its caller: the result still encoded, or the
/// broker's refusal.
pub type Answer = Result<Encoded, ErrorBody>;

/// A result as it came from the broker, decoded only by the caller, into the type it
/// asked for: a large answer (a listing of hundreds of peers) is read once, not once to
/// find its end and again to decode it.
#[derive(Debug)]
pub struct Encoded {
    bytes: Vec<u8>,
    at: Range<usize>,
}

impl Encoded {
    /// Decodes the result as `R`, which may borrow from it. (The text is checked to be
    /// UTF-8 in one pass first, which is much faster than string by string.)
    pub fn read<'de, R: serde::Deserialize<'de>>(&'de self) -> Result<R, ClientError> {
        let text = std::str::from_utf8(&self.bytes[self.at.clone()])
            .map_err(|e| ClientError::Protocol(format!("an answer is not UTF-8: {e}")))?;
        serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl From<Box<RawValue>> for Encoded {
    fn from(raw: Box<RawValue>) -> Self {
        let bytes = Box::<str>::from(raw).into_string().into_bytes();
        Self {
            at: 0..bytes.len(),
            bytes,
        }
    }
}

/// A connection to the broker. Calls may be made concurrently from many tasks; events
/// are read by one owner with [`Client::next_event`].
pub struct Client {
    /// Encoded frames for [`write_loop`].
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
    events: mpsc::UnboundedReceiver<Event>,
    hello: HelloReply,
    /// The broker answering is one this connect started.
    started_broker: bool,
}

impl Client {
    /// Connects to the broker of `paths`, starting one if none answers (when allowed),
    /// and says hello. A broker of an older protocol is asked to hand over and replaced.
    pub async fn connect(paths: &Paths, opts: &ConnectOptions) -> Result<Self, ClientError> {
        paths.prepare()?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut started: Option<std::process::Child> = None;
        let mut spawned = 0;
        // Where the broker log ended when we last started a broker: what it writes after.
        let mut log_from = 0;
        let mut delay = Backoff::new(Duration::from_millis(2), Duration::from_millis(50));
        loop {
            match UnixStream::connect(&paths.socket).await {
                Ok(stream) => {
                    let uid =
                        platform::peer_uid(&stream).map_err(|source| ClientError::Connect {
                            socket: paths.socket.clone(),
                            source,
                        })?;
                    if uid != platform::current_uid() {
                        return Err(ClientError::ForeignBroker {
                            socket: paths.socket.clone(),
                            uid,
                        });
                    }
                    match Self::handshake(stream, &paths.socket, opts).await {
                        Ok(mut client) if client.hello.protocol == opts.protocol => {
                            client.started_broker =
                                started.as_ref().is_some_and(|c| c.id() == client.hello.pid);
                            reap(started);
                            return Ok(client);
                        }
                        Ok(client) if client.hello.protocol > opts.protocol => {
                            return Err(ClientError::BrokerNewer {
                                broker: client.hello.protocol,
                                ours: opts.protocol,
                            });
                        }
                        Ok(mut client) => {
                            tracing::info!(
                                broker = client.hello.protocol,
                                ours = opts.protocol,
                                "asking an older broker to hand over"
                            );
                            let _ = client
                                .call(Shutdown {
                                    reason: Some("handover to a newer protocol".into()),
                                })
                                .await;
                            while client.next_event().await.is_some() {}
                            wait_socket_gone(paths, deadline).await;
                        }
                        // A broker that closes on us mid-hello is stopping; try again.
                        Err(ClientError::Disconnected) => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if !opts.autostart {
                        return Err(ClientError::NotRunning {
                            socket: paths.socket.clone(),
                        });
                    }
                    // A broker we started has exited. If it lost the race for the lock (to
                    // a broker that is stopping, or one starting that will answer soon),
                    // start another; any other failure will not go away by retrying, so
                    // report what the broker said.
                    if let Some(child) = started.as_mut()
                        && let Ok(Some(status)) = child.try_wait()
                    {
                        let lost_race = status.code() == Some(i32::from(EXIT_ALREADY_RUNNING));
                        if !status.success() && !lost_race {
                            // Its last error line says why; a broker that could not write
                            // its log (a full disk) says nothing there, and then the disk
                            // is what to look at.
                            if let Some(reason) =
                                broker_error(paths, log_from).or_else(|| full_disk(paths))
                            {
                                return Err(ClientError::StartFailed {
                                    reason,
                                    log: paths.log.clone(),
                                });
                            }
                        }
                        if spawned < MAX_SPAWNS {
                            started = None;
                        }
                    }
                    if started.is_none() {
                        log_from = std::fs::metadata(&paths.log).map_or(0, |m| m.len());
                        started = Some(spawn_broker(paths, opts.broker_exe.as_deref())?);
                        spawned += 1;
                    }
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        socket: paths.socket.clone(),
                        source,
                    });
                }
            }
            if Instant::now() >= deadline {
                reap(started);
                return Err(ClientError::StartFailed {
                    reason: full_disk(paths).unwrap_or_else(|| {
                        format!(
                            "no broker answered at {} within {}s",
                            paths.socket.display(),
                            START_TIMEOUT.as_secs()
                        )
                    }),
                    log: paths.log.clone(),
                });
            }
            delay.wait().await;
        }
    }

    async fn handshake(
        stream: UnixStream,
        socket: &std::path::Path,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let (read, write) = crate::quiet::split(stream).map_err(|source| ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        let (out, outgoing) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let pending = Pending::new();
        tokio::spawn(write_loop(write, outgoing, pending.clone()));
        tokio::spawn(read_loop(read, pending.clone(), events_tx));
        let mut client = Self {
            out,
            pending,
            next_id: AtomicU64::new(1),
            events,
            hello: HelloReply {
                protocol: 0,
                broker_version: String::new(),
                pid: 0,
            },
            started_broker: false,
        };
        client.hello = client
            .call(Hello {
                protocol: opts.protocol,
                client: opts.client.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .await?;
        Ok(client)
    }

    /// Whether connecting started the broker that answered (none was running).
    pub fn started_broker(&self) -> bool {
        self.started_broker
    }

    /// What the broker said in answer to hello.
    pub fn broker(&self) -> &HelloReply {
        &self.hello
    }

    /// Sends a request and waits for its answer.
    pub async fn call<C: Call>(&self, request: C) -> Result<C::Reply, ClientError> {
        decode(self.start(request)?.await)
    }

    /// Sends a request and waits for its answer, left encoded for the caller to read in
    /// whatever shape it needs (borrowing from it, or skipping fields it does not use).
    pub async fn call_encoded<C: Call>(&self, request: C) -> Result<Encoded, ClientError> {
        Ok(self
            .start(request)?
            .await
            .map_err(|_| ClientError::Disconnected)??)
    }

    /// Every page of a peer listing, each left encoded (see [`Client::call_encoded`]).
    /// A listing too large for one frame comes in pages; this asks for each in turn.
    pub async fn list_peers_pages(&self, mut l: ListPeers) -> Result<Vec<Encoded>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Next {
            next: Option<String>,
        }
        let mut pages = Vec::new();
        loop {
            let page = self.call_encoded(l.clone()).await?;
            let next = page.read::<Next>()?.next;
            pages.push(page);
            match next {
                Some(after) => l.after = Some(after),
                None => return Ok(pages),
            }
        }
    }

    /// A whole peer listing, every page of it. (A peer that went online or offline
    /// between two pages may be in both: it is listed once.)
    pub async fn list_peers(&self, l: ListPeers) -> Result<Vec<PeerInfo>, ClientError> {
        let mut peers: Vec<PeerInfo> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for page in self.list_peers_pages(l).await? {
            let page = page.read::<PeerList>()?.peers;
            peers.extend(page.into_iter().filter(|p| names.insert(p.name.clone())));
        }
        Ok(peers)
    }

    /// History, oldest first: the newest `limit` entries (as [`LogQuery`] says), from as
    /// many pages as they take.
    pub async fn log(&self, mut q: LogQuery) -> Result<Vec<LogEntry>, ClientError> {
        let mut left = q.limit.unwrap_or(LOG_DEFAULT).min(LOG_MAX);
        let mut pages = Vec::new();
        loop {
            q.limit = Some(left);
            let page = self.call(q.clone()).await?;
            left = left.saturating_sub(page.messages.len() as u32);
            pages.push(page.messages);
            match page.next {
                Some(before) if left > 0 => q.before = Some(before),
                _ => break,
            }
        }
        Ok(pages.into_iter().rev().flatten().collect())
    }

    /// Sends a request and returns a future of its answer, so many can be in flight.
    pub fn start<C: Call>(&self, request: C) -> Result<oneshot::Receiver<Answer>, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if !self.pending.insert(id, tx) {
            return Err(ClientError::Disconnected);
        }
        let mut buf = Vec::with_capacity(128);
        wire::encode(
            &ClientFrame {
                id: Some(id),
                request: request.into(),
            },
            &mut buf,
        );
        // The broker would close the connection on a frame this long: refuse it here,
        // and keep the connection.
        if buf.len() > MAX_FRAME_BYTES + 1 {
            self.pending.take(id);
            return Err(ClientError::Refused(ErrorBody::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "the request is {} bytes, and one may be at most {MAX_FRAME_BYTES}; a message may be as long as the broker's CLAUDE_PEERS_MAX_MESSAGE_BYTES ({} by default, {} at most). Send a shorter message, or put the content in a file and send its path",
                    buf.len() - 1,
                    crate::config::defaults::MAX_MESSAGE_BYTES,
                    crate::config::MAX_MESSAGE_BYTES_CEILING
                ),
            )));
        }
        if self.out.send(buf).is_err() {
            self.pending.take(id);
            return Err(ClientError::Disconnected);
        }
        Ok(rx)
    }

    /// Sends a request that wants no answer (an ack).
    pub fn notify(&self, request: impl Into<Request>) -> Result<(), ClientError> {
        let mut buf = Vec::with_capacity(128);
        wire::encode(
            &ClientFrame {
                id: None,
                request: request.into(),
            },
            &mut buf,
        );
        self.out.send(buf).map_err(|_| ClientError::Disconnected)
    }

    /// Takes the event stream out, so the client can be shared for calls while one task
    /// reads events. Afterwards [`Client::next_event`] returns `None`.
    pub fn take_events(&mut self) -> mpsc::UnboundedReceiver<Event> {
        let (_, empty) = mpsc::unbounded_channel();
        std::mem::replace(&mut self.events, empty)
    }

    /// A delivery or log event that has already arrived, without waiting.
    pub fn try_next_event(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// The next delivery or log event; `None` once the connection is closed.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

/// Turns a ready decoded answer into a typed reply (for [`Client::start`] users).
pub fn decode<R: serde::de::DeserializeOwned>(
    answer: Result<Answer, oneshot::error::RecvError>,
) -> Result<R, ClientError> {
    answer.map_err(|_| ClientError::Disconnected)??.read()
}
