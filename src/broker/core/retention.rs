//! Retention: the sweep that removes expired mail and forgotten peers, a batch at a time.

use std::time::{Duration, Instant};

use super::Core;
use crate::protocol::*;

pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Most messages one retention sweep removes before the core serves requests again.
const SWEEP_BATCH: u32 = 5000;

impl Core {
    pub(super) fn sweep(&mut self) {
        let now = now_millis();
        for name in self.online.keys() {
            if let Some(p) = self.peers.get_mut(name) {
                p.last_seen = now;
            }
            let _ = self.store.touch_peer(name, now);
        }
        let retention = self.limits.retention.as_millis() as Millis;
        // Mail by the store's clock (a wall clock that jumped must not expire it early);
        // peers by wall time, as `last_seen` is.
        let store_now = self.clock.now();
        let online = &self.online;
        match self.store.sweep(
            store_now,
            store_now.saturating_sub(retention),
            now.saturating_sub(retention),
            &|n| online.contains_key(n),
            SWEEP_BATCH,
        ) {
            Ok(swept) => {
                if swept.messages == u64::from(SWEEP_BATCH) {
                    // More may have expired: go on after serving what waits.
                    self.next_sweep = Instant::now() + Duration::from_millis(10);
                }
                if swept.messages > 0 || swept.peers > 0 {
                    tracing::info!(
                        messages = swept.messages,
                        peers = swept.peers,
                        "retention sweep"
                    );
                    self.reload();
                } else {
                    tracing::debug!("retention sweep: nothing expired");
                }
            }
            Err(e) => tracing::error!("retention sweep failed: {e}"),
        }
    }
}
