//! Moving bytes between sockets and HBONE streams.
//!
//! Reads go into a buffer that starts small and doubles each time a read
//! fills it, so interactive flows stay cheap and bulk flows reach large
//! chunks (fewer syscalls, fewer HTTP/2 frames). A filled chunk is frozen
//! and handed to h2 without copying. Byte counters are bumped per chunk,
//! never per byte, as the bytes flow: a connection that ends in an error
//! still reports what it moved.
//!
//! An abort crosses the tunnel as an abort: a socket that fails (the client
//! or server reset it) resets the HTTP/2 stream, and a stream the peer
//! resets (or whose HBONE connection dies) resets the socket here
//! (`SO_LINGER` 0) rather than closing it cleanly. The far end then sees
//! what really happened, not a clean end of stream that could pass for a
//! complete request; and one RST replaces the FIN exchange and the
//! TIME_WAIT socket of a close.

use std::future::poll_fn;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hbone::H2Stream;

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Byte counts of one connection. `received` is client-to-server,
/// `sent` server-to-client, matching Istio's request/response naming. Each
/// count goes to the shared Istio counter of the connection's labels and to
/// this connection's own total for its access-log line.
#[derive(Clone, Default)]
pub struct ByteCounters {
    received: Counter,
    sent: Counter,
    conn_received: Counter,
    conn_sent: Counter,
}

impl ByteCounters {
    pub fn new(received: Counter, sent: Counter) -> Self {
        ByteCounters {
            received,
            sent,
            ..Default::default()
        }
    }

    pub(crate) fn add_from_client(&self, n: u64) {
        self.received.inc_by(n);
        self.conn_received.inc_by(n);
    }

    pub(crate) fn add_to_client(&self, n: u64) {
        self.sent.inc_by(n);
        self.conn_sent.inc_by(n);
    }

    /// What this connection has moved so far.
    pub fn totals(&self) -> Transferred {
        Transferred {
            from_client: self.conn_received.get(),
            to_client: self.conn_sent.get(),
        }
    }
}

/// Which way bytes flow, for counting.
#[derive(Clone, Copy)]
enum Direction {
    FromClient,
    ToClient,
}

impl Direction {
    fn count(self, c: &ByteCounters, n: usize) {
        match self {
            Direction::FromClient => c.add_from_client(n as u64),
            Direction::ToClient => c.add_to_client(n as u64),
        }
    }
}

/// Totals a copy moved in each direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transferred {
    pub from_client: u64,
    pub to_client: u64,
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"))
    } else {
        io::Error::other(e)
    }
}

/// Which side of an HBONE copy failed.
enum CopyError {
    /// The socket: the stream is reset.
    Socket(io::Error),
    /// The HTTP/2 stream or its connection: the socket is reset, unless
    /// the peer only said it needs no more (`NO_ERROR`).
    Tunnel(h2::Error),
}

impl CopyError {
    /// h2 has no send capacity left to give: the stream was closed for
    /// sending without an error from the peer (a reset comes as an error),
    /// so nothing says the peer aborted; the socket is closed normally.
    fn stream_closed() -> Self {
        CopyError::Socket(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))
    }
}

impl From<io::Error> for CopyError {
    fn from(e: io::Error) -> Self {
        CopyError::Socket(e)
    }
}

impl From<h2::Error> for CopyError {
    fn from(e: h2::Error) -> Self {
        CopyError::Tunnel(e)
    }
}

/// Reads from `rd` until EOF and sends it on the HTTP/2 stream, respecting
/// the peer's flow control; ends the stream on EOF.
async fn read_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut h2::SendStream<Bytes>,
    counters: &ByteCounters,
    dir: Direction,
) -> Result<(), CopyError> {
    let mut size = INITIAL_BUFFER;
    let mut buf = BytesMut::with_capacity(size);
    loop {
        if buf.capacity() < size / 2 {
            buf.reserve(size);
        }
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        if buf.len() == buf.capacity() && size < MAX_BUFFER {
            size *= 2;
        }
        dir.count(counters, n);
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(CopyError::stream_closed)??;
            let part = chunk.split_to(granted.min(chunk.len()));
            send.send_data(part, false)?;
        }
    }
}

/// Writes everything received on the HTTP/2 stream to `wr`, returning
/// flow-control credit only after the bytes are written (backpressure).
async fn h2_to_write<W: AsyncWrite + Unpin>(
    recv: &mut h2::RecvStream,
    wr: &mut W,
    counters: &ByteCounters,
    dir: Direction,
) -> Result<(), CopyError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        dir.count(counters, n);
        recv.flow_control().release_capacity(n)?;
    }
    Ok(wr.shutdown().await?)
}

/// Copies `rd` to `wr` until EOF, then shuts `wr` down. One buffer per
/// direction, grown for bulk flows and reused for every read.
async fn read_to_write<R, W>(
    rd: &mut R,
    wr: &mut W,
    counters: &ByteCounters,
    dir: Direction,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&buf[..n]).await?;
        dir.count(counters, n);
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Copies both ways between a socket and an HBONE stream until both
/// directions have finished. `socket_is_client` says which side the
/// counters call the client. The socket is split with
/// [`TcpStream::split`], whose halves are plain references, rather than
/// `tokio::io::split`, which puts a lock around every read and write.
pub async fn copy_hbone(
    socket: &mut TcpStream,
    stream: H2Stream,
    counters: &ByteCounters,
    socket_is_client: bool,
) -> io::Result<()> {
    let H2Stream { mut send, mut recv } = stream;
    let (mut rd, mut wr) = socket.split();
    let (up, down) = if socket_is_client {
        (Direction::FromClient, Direction::ToClient)
    } else {
        (Direction::ToClient, Direction::FromClient)
    };
    let res = tokio::try_join!(
        read_to_h2(&mut rd, &mut send, counters, up),
        h2_to_write(&mut recv, &mut wr, counters, down)
    );
    match res {
        Ok(_) => Ok(()),
        Err(CopyError::Socket(e)) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(e)
        }
        Err(CopyError::Tunnel(e)) => {
            if e.reason() != Some(h2::Reason::NO_ERROR) {
                // Closed by the caller: with linger 0 that sends an RST.
                let _ = SockRef::from(&*socket).set_linger(Some(Duration::ZERO));
            }
            send.send_reset(h2::Reason::CANCEL);
            Err(h2_io(e))
        }
    }
}

/// Copies both ways between two sockets (plain TCP paths), `client` first;
/// split without locks, as in [`copy_hbone`].
pub async fn copy_tcp(
    client: &mut TcpStream,
    server: &mut TcpStream,
    counters: &ByteCounters,
) -> io::Result<()> {
    let (mut crd, mut cwr) = client.split();
    let (mut srd, mut swr) = server.split();
    tokio::try_join!(
        read_to_write(&mut crd, &mut swr, counters, Direction::FromClient),
        read_to_write(&mut srd, &mut cwr, counters, Direction::ToClient)
    )
    .map(|_| ())
}
