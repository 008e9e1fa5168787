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

/// Limits and timers of one broker.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest message text, in bytes.
    pub max_message_bytes: usize,
    /// Most unacked messages one recipient may have waiting.
    pub mailbox_limit: u64,
    /// Sends (and broadcasts) per second allowed on one connection; bursts of up to twice
    /// this are absorbed. 0 turns the limit off.
    pub send_rate: u32,
    /// Most recipients of one broadcast.
    pub broadcast_limit: usize,
    /// How long a send waits for online recipients to ack before it answers `pushed`.
    pub ack_wait: Duration,
    /// The broker exits after this long with no connection. Zero: never.
    pub idle_timeout: Duration,
    /// Mail (delivered or not) and offline peers without mail are kept this long.
    pub retention: Duration,
    /// Most open connections; one more is refused with `too_many_connections`.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            mailbox_limit: 10_000,
            send_rate: 100,
            broadcast_limit: 256,
            ack_wait: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(30 * 60),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_connections: 1024,
        }
    }
}

/// Parses a duration such as `250ms`, `30s`, `30m`, `12h`, `7d`, or a bare number of
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 250ms, 30s, 30m, 12h or 7d"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
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
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
