//! An HBONE tunnel (one HTTP/2 stream) as a byte stream, so hyper can speak
//! HTTP/1.1 or HTTP/2 inside it.
//!
//! Reads hand out DATA frames and return flow-control credit once a frame
//! is consumed; writes wait for send capacity and send at most what the
//! peer's window allows. Shutdown ends the stream (END_STREAM).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ztunnel::proxy::hbone::H2Stream;

pub struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    pending: Bytes,
    eof: bool,
    end_on_drop: bool,
}

impl H2Io {
    pub fn new(s: H2Stream) -> Self {
        H2Io {
            send: s.send,
            recv: s.recv,
            pending: Bytes::new(),
            eof: false,
            end_on_drop: false,
        }
    }

    /// Dropped, the stream is to end as a closed TCP socket does (a FIN),
    /// not be reset. For HTTP: hyper drops a connection it closes after a
    /// response (`Connection: close`) without shutting it down, and a
    /// reset would lose the response still queued; HTTP's own framing
    /// tells the client of a response cut short. Opaque TCP keeps the
    /// reset, which is how a failure reaches the client.
    pub fn end_on_drop(&mut self) {
        self.end_on_drop = true;
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"))
    } else if e.reason() == Some(h2::Reason::NO_ERROR) {
        io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() && !this.eof {
            match ready!(this.recv.poll_data(cx)) {
                None => this.eof = true,
                Some(Ok(b)) => {
                    let _ = this.recv.flow_control().release_capacity(b.len());
                    this.pending = b;
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        this.send.reserve_capacity(buf.len());
        let mut cap = this.send.capacity();
        while cap == 0 {
            match ready!(this.send.poll_capacity(cx)) {
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream closed",
                    )))
                }
                Some(Ok(n)) => cap = n,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = cap.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Already ended (or reset) is fine: shutdown is idempotent.
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// With [`H2Io::end_on_drop`], what was written still reaches the client,
/// and h2 then resets the client's side, if still open, with NO_ERROR
/// (RFC 9113 8.1: the response is complete).
impl Drop for H2Io {
    fn drop(&mut self) {
        if self.end_on_drop {
            let _ = self.send.send_data(Bytes::new(), true);
        }
    }
}
