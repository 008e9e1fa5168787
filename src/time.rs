//! Times as people read them: one place for the formats every part shows.

use crate::protocol::Millis;

/// A timestamp in local time (`TZ`, else the system's zone) with its offset, to the
/// second, for tables: `2026-12-01 17:30:45 +01:00`.
pub fn timestamp(ms: Millis) -> String {
    local(ms, "%Y-%m-%d %H:%M:%S %:z")
}

/// The time of day of [`timestamp`], for narrow columns: `17:30:45`.
pub fn clock(ms: Millis) -> String {
    local(ms, "%H:%M:%S")
}

/// `ms` in local time, formatted.
fn local(ms: Millis, format: &str) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(jiff::tz::TimeZone::system())
                .strftime(format)
                .to_string()
        })
        .unwrap_or_else(|_| ms.to_string())
}

/// A timestamp as RFC 3339 in UTC, to the millisecond.
pub fn timestamp_rfc3339(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}
