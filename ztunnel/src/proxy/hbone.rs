//! HBONE framing parameters and the stream type carried over it.
//!
//! HBONE is an HTTP/2 `CONNECT` per tunnelled TCP connection, over mutual
//! TLS. Flow-control windows are sized for bulk throughput: a 4 MiB stream
//! window keeps a single flow from stalling on WINDOW_UPDATE round trips,
//! and the connection window leaves room for several such flows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::identity::Identity;
use crate::tls;

pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Capacity of the read buffer under each HBONE connection's TLS. rustls
/// asks its transport for at most 4 KiB at a time, so reading the socket
/// directly costs four or more `recvmsg` calls per 16 KiB record; through
/// this buffer one call takes in several records.
pub const TLS_READ_BUFFER: usize = 64 * 1024;
/// Headers larger than this are refused.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The header carrying the original client's address, as Istio sends it.
pub const FORWARDED: &str = "forwarded";

/// One tunnelled connection: the two halves of an HTTP/2 stream.
pub struct H2Stream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
}

/// How long a peer may take over the TLS and then the HTTP/2 handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A CONNECT request as the server receives it, and where its answer goes.
pub type Incoming = (
    http::Request<h2::RecvStream>,
    h2::server::SendResponse<Bytes>,
);

/// Terminates one HBONE connection (ztunnel's 15008, a waypoint's): TLS
/// with `server_config`, which requires a client certificate, then HTTP/2
/// with HBONE's windows. Every request is handed to `on_stream` with the
/// client's SPIFFE identity; once `stop` fires the peer gets GOAWAY and the
/// streams already open finish.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    server_config: Arc<rustls::ServerConfig>,
    max_streams: u32,
    stop: &CancellationToken,
    mut on_stream: impl FnMut(&Identity, Incoming),
) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(server_config)
            .accept(tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream)),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake timed out"))?
    .context("TLS handshake failed")?;
    let src_id = tls::peer_identity(tls.get_ref().1.peer_certificates())?;
    let mut conn = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(max_streams)
            .handshake::<_, Bytes>(tls),
    )
    .await
    .map_err(|_| anyhow!("HTTP/2 handshake timed out"))?
    .context("HTTP/2 handshake failed")?;
    debug!(%peer, identity = %src_id, "HBONE connection accepted");
    let mut draining = false;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled(), if !draining => {
                // GOAWAY: the peer opens no new streams here; open ones finish.
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            n = conn.accept() => n,
        };
        match next {
            None => return Ok(()),
            Some(Ok(incoming)) => on_stream(&src_id, incoming),
            Some(Err(e)) => {
                debug!(%peer, error = %e, "HBONE connection error");
                return Ok(());
            }
        }
    }
}

/// The client address in a `Forwarded: for=...` header.
pub fn parse_forwarded_for(v: &str) -> Option<std::net::IpAddr> {
    v.split(';')
        .flat_map(|p| p.split(','))
        .filter_map(|p| p.trim().strip_prefix("for="))
        .map(|s| s.trim_matches('"'))
        .map(|s| s.trim_start_matches('[').split(']').next().unwrap_or(s))
        .find_map(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded() {
        assert_eq!(
            parse_forwarded_for("for=10.0.0.1"),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("proto=https; for=\"[fd00::1]\""),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }
}
