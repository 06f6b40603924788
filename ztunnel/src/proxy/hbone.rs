//! HBONE framing parameters and the stream type carried over it.
//!
//! HBONE is an HTTP/2 `CONNECT` per tunnelled TCP connection, over mutual
//! TLS. Flow-control windows are sized for bulk throughput: a 4 MiB stream
//! window keeps a single flow from stalling on WINDOW_UPDATE round trips,
//! and the connection window leaves room for several such flows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
pub fn parse_forwarded_for(v: &str) -> Option<IpAddr> {
    parse_forwarded_for_addr(v).map(|(ip, _)| ip)
}

/// The client address in a `Forwarded: for=...` header (RFC 7239), with
/// its port when the header gives one: `for=10.0.0.1`,
/// `for="10.0.0.1:4711"`, `for="[fd00::1]:4711"`. The first `for` that is
/// an address wins; `unknown` and obfuscated names are skipped.
pub fn parse_forwarded_for_addr(v: &str) -> Option<(IpAddr, Option<u16>)> {
    v.split([';', ','])
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then_some(v)
        })
        .find_map(|v| parse_node(v.trim().trim_matches('"')))
}

/// One RFC 7239 node: an IPv4 address or a bracketed IPv6 one, optionally
/// followed by `:port` (a non-numeric, obfuscated port is ignored). A bare
/// IPv6 address, which some senders write, is taken as well.
fn parse_node(s: &str) -> Option<(IpAddr, Option<u16>)> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = ip.parse().ok()?;
        let port = match after {
            "" => None,
            _ => port(after.strip_prefix(':')?),
        };
        return Some((IpAddr::V6(ip), port));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((ip, None));
    }
    let (ip, p) = s.rsplit_once(':')?;
    Some((IpAddr::V4(ip.parse::<Ipv4Addr>().ok()?), port(p)))
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

    #[test]
    fn forwarded_with_ports() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(parse_forwarded_for_addr("for=10.0.0.1"), Some((v4, None)));
        assert_eq!(
            parse_forwarded_for_addr("for=\"10.0.0.1:4711\""),
            Some((v4, Some(4711)))
        );
        assert_eq!(
            parse_forwarded_for_addr("proto=https;For=\"[fd00::1]:4711\""),
            Some((v6, Some(4711)))
        );
        assert_eq!(
            parse_forwarded_for_addr("for=\"[fd00::1]\""),
            Some((v6, None))
        );
        assert_eq!(parse_forwarded_for_addr("for=fd00::1"), Some((v6, None)));
        // The IP is what policy sees, with or without a port.
        assert_eq!(parse_forwarded_for("for=\"10.0.0.1:4711\""), Some(v4));
        // Obfuscated parts and unknown nodes are skipped, never a panic.
        assert_eq!(
            parse_forwarded_for_addr("for=\"10.0.0.1:_abc\""),
            Some((v4, None))
        );
        assert_eq!(
            parse_forwarded_for_addr("for=unknown, for=10.0.0.1"),
            Some((v4, None))
        );
        for bad in [
            "",
            "for=",
            "for=\"[fd00::1\"",
            "for=[::1]x",
            "for=1.2.3.4:99999:1",
            "=",
            "for",
        ] {
            let _ = parse_forwarded_for_addr(bad);
        }
        assert_eq!(parse_forwarded_for_addr("for=[zz]:1"), None);
    }
}
