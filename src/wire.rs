//! Newline-delimited frames on a byte stream, with a size limit, for both ends.

use std::io;

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What reading a frame can end in, besides a frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("frame over {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one frame at a time, never holding more than `max` bytes of it.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(4096),
            max,
        }
    }

    /// The next frame without its newline, or `None` at end of stream. A last frame
    /// without a newline still counts. After [`ReadError::TooLarge`] the stream is out of
    /// step and should be closed.
    pub async fn next(&mut self) -> Result<Option<&[u8]>, ReadError> {
        self.buf.clear();
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
                    self.buf.extend_from_slice(&available[..pos]);
                    self.inner.consume(pos + 1);
                    return Ok(Some(&self.buf[..]));
                }
                None => {
                    let n = available.len();
                    if self.buf.len() + n > self.max {
                        return Err(ReadError::TooLarge(self.max));
                    }
                    self.buf.extend_from_slice(available);
                    self.inner.consume(n);
                }
            }
        }
    }
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
