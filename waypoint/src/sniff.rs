//! Protocol sniffing, as Envoy's http_inspector does it: when the filter
//! chains for a destination differ by `application_protocols`, the first
//! bytes of the tunnel decide: the HTTP/2 connection preface is `h2c`, a
//! request line (`METHOD ` in capitals) is `http/1.1`, anything else (or
//! nothing within [`SNIFF_TIMEOUT`], as with server-first protocols) is not
//! HTTP. The bytes read are replayed to whoever handles the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long to wait for the client's first bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longer than any method name worth recognising.
const MAX_METHOD: usize = 20;

/// `None`: need more bytes; `Some(p)`: decided (`p` is `None` if not HTTP).
fn classify(b: &[u8]) -> Option<Option<&'static str>> {
    if b.is_empty() {
        return None;
    }
    let n = b.len().min(PREFACE.len());
    if b[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Some("h2c"));
    }
    let token = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if token == b.len() {
        return (token > MAX_METHOD).then_some(None);
    }
    Some((token >= 3 && b[token] == b' ').then_some("http/1.1"))
}

/// Reads the first bytes of `io` and says what they are. Returns the bytes
/// read, to be replayed with [`Prefixed`].
pub async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<(Bytes, Option<&'static str>)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        if let Some(verdict) = classify(&buf) {
            return Ok((buf.freeze(), verdict));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok((buf.freeze(), None)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream with bytes already read put back in front.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(PREFACE), Some(Some("h2c")));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Some("http/1.1")));
        assert_eq!(classify(b"POST "), Some(Some("http/1.1")));
        assert_eq!(classify(b"\x16\x03\x01"), Some(None));
        assert_eq!(classify(b"hello"), Some(None));
        assert_eq!(classify(b"PRIX"), None);
        assert_eq!(classify(b"PRI*"), Some(None));
    }
}
