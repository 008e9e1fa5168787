//! Streams that wake their process only for input.
//!
//! tokio registers a socket or pipe for both reading and writing. Then every read the
//! other side makes frees room in our send buffer, the kernel signals "writable", and our
//! process wakes to find nothing to do: one spurious wake-up per frame on each side,
//! each costing a cross-CPU wake (25-37 us on the 2-core VM of issue 16, where the
//! broker spent a quarter of its CPU per message on them). These halves register for
//! reading only; a write goes straight to the file descriptor, and only when it would
//! block does the writer register (a duplicate of the descriptor) for room, dropping that
//! registration once a write goes through again.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The reading half: registered for input alone.
pub struct ReadHalf(Arc<AsyncFd<OwnedFd>>);

/// The writing half: it writes directly, and waits for room only when a write would
/// block.
pub struct WriteHalf<T: AsFd> {
    fd: T,
    room: Option<AsyncFd<OwnedFd>>,
}

/// The writing half of a socket split by [`split`].
pub type SocketWriter = WriteHalf<Arc<AsyncFd<OwnedFd>>>;

/// Splits a connected Unix socket into quiet halves.
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, SocketWriter)> {
    // Leaves the reactor (the socket stays non-blocking), to come back for input only.
    let fd = OwnedFd::from(stream.into_std()?);
    let read = Arc::new(register(fd, Interest::READABLE)?);
    Ok((
        ReadHalf(read.clone()),
        WriteHalf {
            fd: read,
            room: None,
        },
    ))
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor, and stays the same one until it is
    // dropped with the AsyncFd that owns it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Drained: wait for the next edge.
                Err(_would_block) => continue,
            }
        }
    }
}

impl<T: AsFd> Drop for WriteHalf<T> {
    /// Shuts the socket for sending, as tokio's own write half does: the reading half
    /// may live on, and the other side must still see the end of what we send.
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Write);
    }
}

impl<T: AsFd + Unpin> AsyncWrite for WriteHalf<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match rustix::io::write(&self.fd, data) {
                Ok(n) => {
                    // The buffer had room for all of it: stop watching for room.
                    if n == data.len() {
                        self.room = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => {
                    if self.room.is_none() {
                        let dup = self.fd.as_fd().try_clone_to_owned()?;
                        // Registering reports the descriptor at once if it is writable
                        // already, so room made in between is not missed.
                        self.room = Some(register(dup, Interest::WRITABLE)?);
                    }
                    let room = self.room.as_ref().expect("registered above");
                    ready!(room.poll_write_ready(cx))?.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Write).map_err(Into::into),
        )
    }
}
