//! Giving memory back after a burst. glibc keeps what a burst of work freed (a thousand
//! tool calls in flight, a thousand deliveries) for later, so a `serve` that once took a
//! burst stayed at its peak: 18.5 MB after 5,000 messages against 8.5 MB before (issue
//! 16's floor group). Once 256 pieces of work have been done and a second has passed
//! without more, `malloc_trim` hands the free pages back: at most once per 256 pieces of
//! work, one timer while that work goes on, nothing while a session is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Work (tool calls and deliveries) that makes a burst.
const BURST: u64 = 256;

/// Quiet that ends a burst.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Trimmer {
    work: AtomicU64,
    burst: Notify,
}

impl Trimmer {
    /// One piece of work done.
    pub fn note(&self) {
        if self.work.fetch_add(1, Ordering::Relaxed) + 1 == BURST {
            self.burst.notify_one();
        }
    }

    /// Trims after each burst, forever.
    pub async fn run(&self) {
        loop {
            self.burst.notified().await;
            loop {
                let before = self.work.load(Ordering::Relaxed);
                tokio::time::sleep(QUIET).await;
                if self.work.load(Ordering::Relaxed) == before {
                    break;
                }
            }
            self.work.store(0, Ordering::Relaxed);
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
