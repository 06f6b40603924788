//! HBONE framing parameters and the stream type carried over it.
//!
//! HBONE is an HTTP/2 `CONNECT` per tunnelled TCP connection, over mutual
//! TLS. Flow-control windows are sized for bulk throughput: a 4 MiB stream
//! window keeps a single flow from stalling on WINDOW_UPDATE round trips,
//! and the connection window leaves room for several such flows.

use bytes::Bytes;

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
