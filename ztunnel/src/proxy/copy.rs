//! Moving bytes between sockets and HBONE streams.
//!
//! Reads go into a buffer that starts small and doubles each time a read
//! fills it, so interactive flows stay cheap and bulk flows reach large
//! chunks (fewer syscalls, fewer HTTP/2 frames). A filled chunk is frozen
//! and handed to h2 without copying. Byte counters are bumped per chunk,
//! never per byte.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::hbone::H2Stream;

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Counters for one connection: `received` counts client-to-server bytes,
/// `sent` server-to-client, matching Istio's request/response naming.
#[derive(Clone, Default)]
pub struct ByteCounters {
    pub received: Counter,
    pub sent: Counter,
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

/// Reads from `rd` until EOF and sends it on the HTTP/2 stream, respecting
/// the peer's flow control; ends the stream on EOF.
async fn read_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut h2::SendStream<Bytes>,
    counter: &Counter,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = INITIAL_BUFFER;
    let mut buf = BytesMut::with_capacity(size);
    loop {
        if buf.capacity() < size / 2 {
            buf.reserve(size);
        }
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        if buf.len() == buf.capacity() && size < MAX_BUFFER {
            size *= 2;
        }
        total += n as u64;
        counter.inc_by(n as u64);
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?
                .map_err(h2_io)?;
            let part = chunk.split_to(granted.min(chunk.len()));
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

/// Writes everything received on the HTTP/2 stream to `wr`, returning
/// flow-control credit only after the bytes are written (backpressure).
async fn h2_to_write<W: AsyncWrite + Unpin>(
    recv: &mut h2::RecvStream,
    wr: &mut W,
    counter: &Counter,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        total += n as u64;
        counter.inc_by(n as u64);
        recv.flow_control().release_capacity(n).map_err(h2_io)?;
    }
    wr.shutdown().await?;
    Ok(total)
}

/// Copies both ways between a socket and an HBONE stream until both
/// directions have finished. `socket_is_client` says which side the
/// counters call the client.
pub async fn copy_hbone<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut S,
    stream: H2Stream,
    counters: &ByteCounters,
    socket_is_client: bool,
) -> io::Result<Transferred> {
    let H2Stream { mut send, mut recv } = stream;
    let (mut rd, mut wr) = tokio::io::split(socket);
    let (up_counter, down_counter) = if socket_is_client {
        (&counters.received, &counters.sent)
    } else {
        (&counters.sent, &counters.received)
    };
    let res = tokio::try_join!(
        read_to_h2(&mut rd, &mut send, up_counter),
        h2_to_write(&mut recv, &mut wr, down_counter)
    );
    match res {
        Ok((up, down)) => Ok(if socket_is_client {
            Transferred {
                from_client: up,
                to_client: down,
            }
        } else {
            Transferred {
                from_client: down,
                to_client: up,
            }
        }),
        Err(e) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(e)
        }
    }
}

/// Copies both ways between two sockets (plain TCP paths), `client` first.
pub async fn copy_tcp<A, B>(
    client: &mut A,
    server: &mut B,
    counters: &ByteCounters,
) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (from_client, to_client) =
        tokio::io::copy_bidirectional_with_sizes(client, server, MAX_BUFFER, MAX_BUFFER).await?;
    counters.received.inc_by(from_client);
    counters.sent.inc_by(to_client);
    Ok(Transferred {
        from_client,
        to_client,
    })
}
