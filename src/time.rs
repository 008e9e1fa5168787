//! Times as people read them: one place for the formats every part shows.

use crate::protocol::Millis;

/// A timestamp in local time (`TZ`, else the system's zone) with its offset, to the
/// second, for tables: `2026-12-01 17:30:45 +01:00`.
pub fn timestamp(ms: Millis) -> String {
    timestamp_in(ms, &jiff::tz::TimeZone::system())
}

/// [`timestamp`] in the zone `tz`.
pub fn timestamp_in(ms: Millis, tz: &jiff::tz::TimeZone) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S %:z")
                .to_string()
        })
        .unwrap_or_else(|_| ms.to_string())
}

/// The time of day of [`timestamp`], for narrow columns: `17:30:45`.
pub fn clock(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(jiff::tz::TimeZone::system())
                .strftime("%H:%M:%S")
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
