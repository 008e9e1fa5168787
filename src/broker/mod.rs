//! `claude-peers broker`: the per-user daemon that owns the store and routes messages.
//!
//! Start-up: take the locks (one broker per runtime directory, and per database), clear a stale socket, bind
//! the socket 0600, open the store, start the [`core`] task, accept connections
//! ([`conn`]), which decode and check each request ([`frame`]) before the core sees it. Shutdown (asked for, idle, SIGTERM/SIGINT): the core finishes its batch and
//! answers, connections are closed, the socket is removed, then the lock is released.

pub mod bridge;
pub mod clock;
pub mod conn;
pub mod core;
pub mod frame;
pub mod outq;

use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;

use crate::config::Limits;
use crate::paths::Paths;
use crate::platform;
use crate::protocol::{PROTOCOL_VERSION, now_millis};
use crate::store::Store;
use conn::ConnContext;
use core::{BrokerInfo, Command, Core};

/// A broker that lost the race for the lock: its process exits with
/// [`crate::protocol::EXIT_ALREADY_RUNNING`], by which a client that started it knows to
/// try again instead of reporting it.
#[derive(Debug, thiserror::Error)]
#[error(
    "another broker is already running (pid {pid}) for {dir}; use `claude-peers status` to see it or `claude-peers stop` to stop it"
)]
pub struct AlreadyRunning {
    pub pid: String,
    pub dir: String,
}

/// How a broker run is set up.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub paths: Paths,
    pub limits: Limits,
    /// The protocol version to announce; only tests set another.
    pub protocol: u32,
    /// Other machines' brokers, through NATS.
    pub network: Option<bridge::NetworkOptions>,
}

impl BrokerOptions {
    pub fn new(paths: Paths, limits: Limits) -> Self {
        Self {
            paths,
            limits,
            protocol: PROTOCOL_VERSION,
            network: None,
        }
    }
}

/// The exclusive lock that makes a broker the only one for its runtime directory. Held
/// for the life of the process; the OS releases it when the process dies, however it dies.
pub struct BrokerLock {
    _file: File,
}

impl BrokerLock {
    /// Takes the lock, or returns `None` when another live broker holds it.
    pub fn acquire(paths: &Paths) -> Result<Option<Self>> {
        let mut file = crate::paths::private_file(&paths.lock)
            .with_context(|| format!("cannot open lock file {}", paths.lock.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", paths.lock.display()));
            }
        }
        // The pid is for people and error messages; the lock holds without it (a full
        // disk may refuse even these few bytes).
        if let Err(e) = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
        {
            tracing::warn!("cannot write our pid into {}: {e}", paths.lock.display());
        }
        Ok(Some(Self { _file: file }))
    }
}

/// Runs a broker until it is asked to stop, goes idle, or gets SIGTERM/SIGINT.
pub fn run(opts: BrokerOptions) -> Result<()> {
    let paths = &opts.paths;
    if opts.limits.max_message_bytes > crate::config::MAX_MESSAGE_BYTES_CEILING {
        bail!(
            "max message bytes {} is over the ceiling of {} (a message must fit in one frame); set CLAUDE_PEERS_MAX_MESSAGE_BYTES or --max-message-bytes to at most that",
            opts.limits.max_message_bytes,
            crate::config::MAX_MESSAGE_BYTES_CEILING
        );
    }
    paths.prepare()?;
    if let Some(files) = platform::raise_open_files_limit()
        && files < opts.limits.max_connections as u64 + 64
    {
        tracing::warn!(
            "this process may open {files} files, fewer than max connections ({}) need; connections past that fail to be accepted",
            opts.limits.max_connections
        );
    }
    let Some(lock) = BrokerLock::acquire(paths)? else {
        let pid = std::fs::read_to_string(&paths.lock).unwrap_or_default();
        return Err(AlreadyRunning {
            pid: pid.trim().to_string(),
            dir: paths.runtime_dir.display().to_string(),
        }
        .into());
    };
    // One broker per database too: two runtime directories can name one database (or
    // the runtime directory was removed under a running broker), and two brokers on one
    // database would each think the other's sessions offline.
    let db_lock = DatabaseLock::acquire(paths)?;
    let mut store = Store::open(&paths.db)?;
    let checkpointer = store.spawn_checkpointer(&paths.db)?;
    // One thread: connection tasks and the core hand work to each other without waking
    // other threads. SQLite's fsyncs happen on the checkpoint thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, serve(&opts, store));
    // Connections have written their last frames (or were given up on) in `serve`.
    runtime.shutdown_timeout(Duration::from_millis(10));
    checkpointer.stop();
    // The socket goes before the lock, so a new broker never sees a live-looking socket
    // it does not own.
    let _ = std::fs::remove_file(&paths.socket);
    drop(db_lock);
    drop(lock);
    result
}

/// The exclusive lock next to the database (`<db>.broker`), held for the broker's life,
/// with the holder's pid and socket in it for the error a second broker gives.
pub struct DatabaseLock {
    _file: File,
}

impl DatabaseLock {
    pub fn acquire(paths: &Paths) -> Result<Self> {
        let path = {
            let mut p = paths.db.clone().into_os_string();
            p.push(".broker");
            std::path::PathBuf::from(p)
        };
        let mut file = crate::paths::private_file(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let mut lines = holder.lines();
                let pid = lines.next().unwrap_or("?").trim().to_string();
                let socket = lines.next().unwrap_or("?").trim().to_string();
                bail!(
                    "another broker (pid {pid}, socket {socket}) already uses the database {}; one broker per database. Use that broker (point CLAUDE_PEERS_HOME where its socket is), stop it (`claude-peers stop` with that home, or kill {pid}), or point CLAUDE_PEERS_DB elsewhere",
                    paths.db.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        if let Err(e) = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}\n{}", std::process::id(), paths.socket.display()))
        {
            tracing::warn!("cannot write our pid into {}: {e}", path.display());
        }
        Ok(Self { _file: file })
    }
}

async fn serve(opts: &BrokerOptions, store: Store) -> Result<()> {
    let paths = &opts.paths;
    // We hold the lock, so any socket file here belongs to a dead broker.
    match std::fs::remove_file(&paths.socket) {
        Ok(()) => tracing::info!("removed stale socket {}", paths.socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).context(format!(
                "cannot remove stale socket {}",
                paths.socket.display()
            ));
        }
    }
    let listener = UnixListener::bind(&paths.socket)
        .with_context(|| format!("cannot listen on {}", paths.socket.display()))?;
    std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))?;
    // Someone needed a broker after `claude-peers stop`: sessions waiting for one come
    // back (they watch for the socket), and the next stop starts over.
    match std::fs::remove_file(&paths.stopped) {
        Ok(()) => tracing::info!("started after `claude-peers stop`"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", paths.stopped.display()),
    }

    let info = BrokerInfo {
        pid: std::process::id(),
        protocol: opts.protocol,
        started_at: now_millis(),
        started: Instant::now(),
        socket: paths.socket.display().to_string(),
        database: paths.db.display().to_string(),
    };
    let mut core = Core::new(store, opts.limits.clone(), info)?;
    let (core_tx, core_rx) = tokio::sync::mpsc::unbounded_channel::<Command>();
    if let Some(network) = &opts.network {
        let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel::<bridge::ToBridge>();
        let waiting = core.connect_network(network.clone(), outbox_tx)?;
        tracing::info!(url = %network.shown_url(), host = %network.host, waiting = waiting.len(), "relaying to other machines through NATS");
        tokio::task::spawn_local(bridge::run(
            network.clone(),
            waiting,
            outbox_rx,
            core_tx.clone(),
        ));
    }
    let mut core_task = tokio::task::spawn_local(core.run(core_rx));

    let ctx = Rc::new(ConnContext {
        core: core_tx.clone(),
        uid: platform::current_uid(),
        protocol: opts.protocol,
        pid: std::process::id(),
        limits: opts.limits.clone(),
        frames: crate::wire::FrameBudget::new(
            crate::config::SMALL_FRAME_BYTES,
            crate::config::PARTIAL_FRAMES_BYTES,
        ),
    });
    let open = Rc::new(Cell::new(0usize));
    let max_connections = opts.limits.max_connections;
    // Each connection task holds a sender; when the last one is gone, every connection
    // has written its last frames (the receiver then reads `None`).
    let (conns_alive, mut conns_done) = tokio::sync::mpsc::channel::<()>(1);
    tracing::info!(
        pid = std::process::id(),
        socket = %paths.socket.display(),
        db = %paths.db.display(),
        "broker started"
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut next_conn = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if open.get() >= max_connections => {
                    tracing::warn!("refused a connection: {max_connections} are open, the limit");
                    conn::refuse_over_limit(stream, max_connections);
                }
                Ok((stream, _)) => {
                    next_conn += 1;
                    open.set(open.get() + 1);
                    let (ctx, open, alive) = (ctx.clone(), open.clone(), conns_alive.clone());
                    tokio::task::spawn_local(async move {
                        conn::serve(stream, next_conn, ctx).await;
                        open.set(open.get() - 1);
                        drop(alive);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            reason = &mut core_task => {
                let reason = reason.map_err(|_| anyhow::anyhow!("the broker core panicked"))?;
                tracing::info!("broker stopped: {reason}");
                break;
            }
            _ = sigterm.recv() => { let _ = core_tx.send(Command::Shutdown { reason: "SIGTERM".into() }); }
            _ = sigint.recv() => { let _ = core_tx.send(Command::Shutdown { reason: "SIGINT".into() }); }
        }
    }
    drop(listener);
    // The core told every connection to close after its last frames: wait for them to be
    // written (a client that does not read gets half a second).
    drop(conns_alive);
    let _ = tokio::time::timeout(Duration::from_millis(500), conns_done.recv()).await;
    Ok(())
}
