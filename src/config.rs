//! The broker's limits and timers, with their defaults. Each is also a flag of
//! `claude-peers broker` and an environment variable (see the README's configuration table);
//! a broker started on demand inherits the environment of the client that started it.

use std::time::Duration;

/// The largest `max_message_bytes` a broker accepts: a message must fit in one frame
/// however its text is escaped (a control character takes 6 bytes in JSON), with its
/// sender's details around it, in a delivery as in a page of history.
pub const MAX_MESSAGE_BYTES_CEILING: usize = 128 * 1024;

/// The most bytes all connections together may hold in frames still arriving, beyond
/// the first [`SMALL_FRAME_BYTES`] of each: 300 clients that each send most of a 1 MiB
/// frame and stall would otherwise hold 300 MiB.
pub const PARTIAL_FRAMES_BYTES: usize = 64 << 20;

/// What every connection may hold of a frame still arriving without drawing on
/// [`PARTIAL_FRAMES_BYTES`].
pub const SMALL_FRAME_BYTES: usize = 64 * 1024;

/// The defaults, each written once: for [`Limits::default`] and for the flags' help.
pub(crate) mod defaults {
    pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
    pub const MAILBOX_LIMIT: u64 = 10_000;
    pub const SEND_RATE: u32 = 100;
    pub const BROADCAST_LIMIT: usize = 256;
    pub const ACK_WAIT: &str = "250ms";
    pub const IDLE_TIMEOUT: &str = "30m";
    pub const RETENTION: &str = "7d";
    pub const MAX_CONNECTIONS: usize = 1024;
}

/// Limits and timers of one broker: also the flags of `claude-peers broker` (the doc
/// comments are their help), each with its environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Longest message text, in bytes (at most 128 KiB).
    #[arg(long, env = "CLAUDE_PEERS_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Most unread messages one recipient may have waiting.
    #[arg(long, env = "CLAUDE_PEERS_MAILBOX_LIMIT", default_value_t = defaults::MAILBOX_LIMIT)]
    pub mailbox_limit: u64,
    /// Sends per second per connection (bursts of twice this); 0 = unlimited.
    #[arg(long, env = "CLAUDE_PEERS_SEND_RATE", default_value_t = defaults::SEND_RATE)]
    pub send_rate: u32,
    /// Most recipients of one message or broadcast.
    #[arg(long, env = "CLAUDE_PEERS_BROADCAST_LIMIT", default_value_t = defaults::BROADCAST_LIMIT)]
    pub broadcast_limit: usize,
    /// How long a send waits for acks before answering "pushed".
    #[arg(long, env = "CLAUDE_PEERS_ACK_WAIT", default_value = defaults::ACK_WAIT, value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Exit after this long with no connections; 0 = never.
    #[arg(long, env = "CLAUDE_PEERS_IDLE_TIMEOUT", default_value = defaults::IDLE_TIMEOUT, value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Keep mail and forget offline peers after this long.
    #[arg(long, env = "CLAUDE_PEERS_RETENTION", default_value = defaults::RETENTION, value_parser = parse_duration)]
    pub retention: Duration,
    /// Most open connections (sessions, CLI commands, hooks); more are refused.
    #[arg(long, env = "CLAUDE_PEERS_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let duration = |s| parse_duration(s).expect("a default duration parses");
        Self {
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            mailbox_limit: defaults::MAILBOX_LIMIT,
            send_rate: defaults::SEND_RATE,
            broadcast_limit: defaults::BROADCAST_LIMIT,
            ack_wait: duration(defaults::ACK_WAIT),
            idle_timeout: duration(defaults::IDLE_TIMEOUT),
            retention: duration(defaults::RETENTION),
            max_connections: defaults::MAX_CONNECTIONS,
        }
    }
}

/// Parses a duration such as `250ms`, `30s`, `30m`, `12h`, `7d`, `1d 12h` (jiff's
/// friendly format, or ISO 8601; a day is 24 hours), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let unclear = |why: String| {
        format!("{s:?} is not a duration ({why}); write e.g. 250ms, 30s, 30m, 12h or 7d")
    };
    let span: jiff::Span = s.parse().map_err(|e: jiff::Error| unclear(e.to_string()))?;
    let signed = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| unclear(e.to_string()))?;
    Duration::try_from(signed).map_err(|_| unclear("it is negative".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1d 12h"), Ok(Duration::from_secs(36 * 3600)));
        assert!(parse_duration("-5s").is_err());
        assert!(
            parse_duration("1 month").is_err(),
            "a month has no fixed length"
        );
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}

/// `claude-peers broker`'s arguments.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    #[command(flatten)]
    pub limits: Limits,
    /// Protocol version to announce (for testing handover).
    #[arg(long, hide = true, default_value_t = crate::protocol::PROTOCOL_VERSION)]
    pub protocol_version: u32,
    /// A NATS server (with JetStream) through which to reach the brokers of other
    /// machines, e.g. nats://10.0.0.5:4222. Unset or empty: this machine only.
    #[arg(long, env = "CLAUDE_PEERS_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// A NATS credentials file (keep it mode 0600).
    #[arg(long, env = "CLAUDE_PEERS_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// This machine's name in addresses (`name@host`) [default: the host name].
    #[arg(long = "host-name", env = "CLAUDE_PEERS_HOST", value_name = "NAME")]
    pub host: Option<String>,
    /// How many copies of the shared stream a JetStream cluster keeps (set 3 on a
    /// cluster of three or more; 1 on a single server). Used by the broker that creates
    /// the stream.
    #[arg(
        long,
        env = "CLAUDE_PEERS_NATS_REPLICAS",
        value_name = "N",
        default_value_t = 1
    )]
    pub nats_replicas: usize,
    /// The CA certificate (PEM) the NATS server's certificate must chain to; TLS is then
    /// required (as it is for a tls:// URL).
    #[arg(long, env = "CLAUDE_PEERS_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for servers that ask for one, with --nats-key.
    #[arg(long, env = "CLAUDE_PEERS_NATS_CERT", value_name = "FILE")]
    pub nats_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM; keep it mode 0600).
    #[arg(long, env = "CLAUDE_PEERS_NATS_KEY", value_name = "FILE")]
    pub nats_key: Option<std::path::PathBuf>,
}

impl BrokerArgs {
    /// How to reach other machines, if a NATS URL is set.
    pub fn network(&self) -> anyhow::Result<Option<crate::broker::bridge::NetworkOptions>> {
        crate::broker::bridge::NetworkOptions::new(self)
    }
}
