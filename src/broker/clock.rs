//! The store's clock: the time the broker stamps on message ids and expiries, which must
//! not move when the wall clock does.
//!
//! A wall clock that is set back and forth (a machine that booted without network time,
//! a VM resumed from a snapshot, a user fixing the date) would otherwise reorder the
//! backlog (ids are UUIDv7, ordered by their time) and let a retention sweep delete
//! seconds-old unread mail that was stamped while the clock was behind. So the store keeps
//! its own clock: it starts where the wall clock is (or past the newest message, if that
//! is later) and then advances only by the boot clock (`CLOCK_BOOTTIME`: it never jumps
//! and counts suspended time), across broker restarts on the same boot. Its anchor lives
//! in the database's `meta` table. After a reboot it starts again from the wall clock:
//! the boot clock says nothing about the time the machine was off.
//!
//! Wall time is still what people see (`sent_at`, `delivered_at`): the store clock only
//! orders and expires.

use uuid::{ContextV7, Timestamp, Uuid};

use crate::platform;
use crate::protocol::{Millis, now_millis};
use crate::store::{ClockAnchor, Store, StoreError};

pub struct StoreClock {
    /// Store time at `boot_at` on the boot clock.
    at: Millis,
    boot_at: Millis,
    /// Keeps ids made in the same millisecond in order.
    ids: ContextV7,
}

impl StoreClock {
    /// Takes up the clock where the last broker of this boot left it, or starts it from
    /// the wall clock; never behind the newest stored message. Saves the anchor.
    pub fn start(store: &Store) -> Result<Self, StoreError> {
        let boot_id = platform::boot_id();
        let boot_now = platform::boot_clock_ms();
        let continued = store.clock_anchor()?.and_then(|a| {
            (boot_id.is_some() && a.boot_id == boot_id && boot_now >= a.boot_at)
                .then(|| a.at + (boot_now - a.boot_at))
        });
        let newest = store.newest_message_ms()?.map_or(0, |ms| ms + 1);
        let at = continued.unwrap_or_else(now_millis).max(newest);
        store.set_clock_anchor(&ClockAnchor {
            boot_id,
            boot_at: boot_now,
            at,
        })?;
        Ok(Self {
            at,
            boot_at: boot_now,
            ids: ContextV7::new(),
        })
    }

    /// The store's time now.
    pub fn now(&self) -> Millis {
        self.at + (platform::boot_clock_ms() - self.boot_at).max(0)
    }

    /// A new message id (UUIDv7, later than every id before it) and the store time it
    /// carries.
    pub fn new_id(&self) -> (String, Millis) {
        let ms = self.now().max(0) as u64;
        let ts = Timestamp::from_unix(&self.ids, ms / 1000, (ms % 1000) as u32 * 1_000_000);
        (Uuid::new_v7(ts).to_string(), ms as Millis)
    }
}
