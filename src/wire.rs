//! Newline-delimited frames on a byte stream, with a size limit, for both ends.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What reading a frame can end in, besides a frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("frame over {0} bytes")]
    TooLarge(usize),
    /// The frame grew past its free share and the shared [`FrameBudget`] had no room.
    #[error("too many large frames are arriving at once")]
    Busy,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Bytes that the readers sharing it may hold, together, in frames still arriving, beyond
/// a free share each.
#[derive(Debug)]
pub struct FrameBudget {
    free_share: usize,
    total: usize,
    used: AtomicUsize,
}

impl FrameBudget {
    pub fn new(free_share: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            free_share,
            total,
            used: AtomicUsize::new(0),
        })
    }

    fn take(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + n > self.total {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Reads one frame at a time, never holding more than `max` bytes of it.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
    budget: Option<Arc<FrameBudget>>,
    /// Bytes taken from `budget` for the frame being read.
    taken: usize,
}

impl<R> Drop for FrameReader<R> {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(self.taken);
        }
    }
}

impl<R: AsyncBufRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(4096),
            max,
            budget: None,
            taken: 0,
        }
    }

    /// Frames past `budget`'s free share draw on it, and fail with [`ReadError::Busy`]
    /// when it has no room.
    pub fn with_budget(mut self, budget: Arc<FrameBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Makes room for `n` more bytes of the current frame.
    fn grow(&mut self, n: usize) -> Result<(), ReadError> {
        let Some(b) = &self.budget else {
            return Ok(());
        };
        let needed = (self.buf.len() + n).saturating_sub(b.free_share);
        if needed > self.taken {
            if !b.take(needed - self.taken) {
                return Err(ReadError::Busy);
            }
            self.taken = needed;
        }
        Ok(())
    }

    /// The next frame without its newline, or `None` at end of stream. A last frame
    /// without a newline still counts. After [`ReadError::TooLarge`] the stream is out of
    /// step and should be closed.
    pub async fn next(&mut self) -> Result<Option<&[u8]>, ReadError> {
        self.buf.clear();
        if let Some(b) = &self.budget {
            b.give_back(std::mem::take(&mut self.taken));
            if self.buf.capacity() > b.free_share {
                // A large frame made it large; an idle connection keeps a small one.
                self.buf = Vec::with_capacity(4096);
            }
        }
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                return Ok((!self.buf.is_empty()).then_some(&self.buf[..]));
            }
            match memchr::memchr(b'\n', available) {
                Some(pos) => {
                    if self.buf.len() + pos > self.max {
                        return Err(ReadError::TooLarge(self.max));
                    }
                    self.grow(pos)?;
                    let available = self.inner.fill_buf().await?;
                    self.buf.extend_from_slice(&available[..pos]);
                    self.inner.consume(pos + 1);
                    return Ok(Some(&self.buf[..]));
                }
                None => {
                    let n = available.len();
                    if self.buf.len() + n > self.max {
                        return Err(ReadError::TooLarge(self.max));
                    }
                    self.grow(n)?;
                    let available = self.inner.fill_buf().await?;
                    self.buf.extend_from_slice(&available[..n]);
                    self.inner.consume(n);
                }
            }
        }
    }
}

/// How many bytes one write gathers at most, so a large backlog goes out in steps.
pub const GATHER_BYTES: usize = 256 * 1024;

/// The writing half of a connection, on both sides: whoever has a frame hands it to a
/// channel, and one writer task per connection takes `first` and whatever else is
/// already waiting on `rx` into `buf` (up to [`GATHER_BYTES`]) for a single write.
/// `add` appends one item and says whether to go on; `false` (a close) stops after it.
/// Returns what the last `add` said.
pub fn gather<T>(
    first: T,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    buf: &mut Vec<u8>,
    mut add: impl FnMut(T, &mut Vec<u8>) -> bool,
) -> bool {
    let mut next = Some(first);
    while let Some(item) = next.take() {
        if !add(item, buf) {
            return false;
        }
        if buf.len() < GATHER_BYTES {
            next = rx.try_recv().ok();
        }
    }
    true
}

/// Appends `value` as one frame (JSON and a newline) to `out`.
pub fn encode<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Serializing our own types into memory cannot fail: no maps with non-string keys.
    serde_json::to_writer(&mut *out, value).expect("frame serializes");
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_and_limits() {
        let data: &[u8] = b"{\"a\":1}\n\n{\"b\":2}";
        let mut r = FrameReader::new(tokio::io::BufReader::new(data), 100);
        assert_eq!(r.next().await.unwrap(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(r.next().await.unwrap(), Some(&b""[..]));
        assert_eq!(r.next().await.unwrap(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(r.next().await.unwrap(), None);

        let big = vec![b'x'; 300];
        let mut r = FrameReader::new(tokio::io::BufReader::with_capacity(16, &big[..]), 100);
        assert!(matches!(r.next().await, Err(ReadError::TooLarge(100))));
    }
}
