//! Where a captured connection was originally going.
//!
//! Capture layers differ in how they tell: with TPROXY or an in-namespace
//! listener the accepted socket's local address *is* the original
//! destination; with iptables REDIRECT it is kept in conntrack and read with
//! `SO_ORIGINAL_DST`; the eBPF capture keeps it in a map. The proxy asks
//! through this trait only, so a capture layer plugs in without changes to
//! the proxy.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::socket::canonical;

pub trait OriginalDestination: Send + Sync + 'static {
    /// `peer` is the client's address as `accept` returned it (canonical):
    /// asking the socket again would cost a syscall per connection.
    fn original_destination(&self, stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr>;
}

/// `SO_ORIGINAL_DST` when conntrack has the connection (REDIRECT), the
/// socket's local address otherwise (TPROXY, in-namespace listeners).
pub struct SocketOriginalDst;

impl OriginalDestination for SocketOriginalDst {
    fn original_destination(&self, stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
        let sock = SockRef::from(stream);
        // The local address has the peer's family. The listener is dual
        // stack: an IPv4 client shows up v4-mapped (canonical: IPv4), and
        // asking conntrack for IPv6 first would cost a failing syscall on
        // every such connection. The local address itself is only asked
        // for when conntrack has no answer, so REDIRECT costs one syscall.
        let redirected = match peer {
            SocketAddr::V6(_) => sock.original_dst_ipv6().or_else(|_| sock.original_dst()),
            SocketAddr::V4(_) => sock.original_dst(),
        };
        match redirected.ok().and_then(|a| a.as_socket()) {
            Some(a) => Ok(canonical(a)),
            None => Ok(canonical(stream.local_addr()?)),
        }
    }
}
