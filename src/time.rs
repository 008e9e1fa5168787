//! Times as people read them: one place for the formats every part shows.

use crate::protocol::Millis;

/// A timestamp in UTC, to the second, for tables: `2026-12-01 16:30:45`.
pub fn timestamp(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// A timestamp as RFC 3339 in UTC, to the millisecond.
pub fn timestamp_rfc3339(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}
