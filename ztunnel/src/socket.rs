//! Socket helpers shared by every listener and upstream connection.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Addresses from a dual-stack listener arrive as `::ffff:a.b.c.d`; the rest
/// of ztunnel speaks plain IPv4 for those.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Connects with ztunnel's socket mark set, so the capture layer lets the
/// connection through instead of sending it back to ztunnel.
pub async fn connect(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        SockRef::from(&sock).set_mark(mark)?;
    }
    sock.set_nodelay(true)?;
    let stream = sock.connect(addr).await?;
    Ok(stream)
}

/// Binds a listener. `[::]` listens on IPv4 as well (dual stack).
pub fn listen(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    // Accepted sockets inherit it (Linux copies the listener's TCP options
    // into each connection): one `setsockopt` less per connection.
    sock.set_nodelay(true)?;
    if let SocketAddr::V6(a) = addr {
        if a.ip().is_unspecified() {
            SockRef::from(&sock).set_only_v6(false)?;
        }
    }
    if transparent {
        // Lets the listener accept connections addressed to any IP (TPROXY),
        // whose local address is then the original destination.
        SockRef::from(&sock).set_ip_transparent(true)?;
    }
    sock.bind(addr)?;
    sock.listen(1024)
}
