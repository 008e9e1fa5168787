//! claude-peers: coding-agent sessions on one machine find each other and exchange
//! messages, durably and privately.
//!
//! One binary plays three parts:
//! - [`broker`]: the per-user daemon. It owns the SQLite [`store`], knows who is online (an
//!   open connection), and routes, queues and redelivers messages over a private Unix
//!   socket. Clients start it on demand.
//! - [`serve`]: the MCP stdio server Claude Code runs per session; pushes deliveries
//!   into the session as channel events.
//! - [`cli`]: `status`, `peers`, `send`, `log`, `stop` for people and scripts.
//!
//! Shared pieces: [`protocol`] (the wire types, one definition for both ends), [`wire`]
//! (newline-delimited frames), [`client`] (connect, auto-start, typed calls, events),
//! [`peer_channel`] (peer-channel's sessions directory and wire, for a mixed fleet),
//! [`names`] (the peer name rules), [`time`] (how times are shown), [`paths`] (where files live, and the checks that keep
//! them private), [`config`] (limits), [`git`] (repository context), and [`platform`]
//! (every OS-specific call).
//!
//! `ARCHITECTURE.md` has the map and the invariants; `docs/PROTOCOL.md` the wire protocol.

pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod git;
pub mod hook;
pub mod names;
pub mod paths;
pub mod peer_channel;
pub mod platform;
pub mod protocol;
pub mod quiet;
pub mod serve;
pub mod store;
pub mod time;
pub mod wire;
