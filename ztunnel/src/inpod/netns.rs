//! Making sockets inside a pod's network namespace.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life, whichever thread uses it later. So ztunnel switches the
//! *current* thread into the pod's namespace just for the `socket()` call
//! and switches straight back (no `.await` in between), then uses the socket
//! from tokio like any other. This is how Istio's ztunnel does in-pod mode.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// ztunnel's own network namespace, opened once: where threads go back to.
fn host_netns() -> io::Result<&'static File> {
    static HOST: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOST.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOST.get_or_init(|| f))
}

/// Call once at start-up, from the main thread, before any thread switches.
pub fn remember_host_netns() -> io::Result<()> {
    host_netns().map(|_| ())
}

/// An open handle on a pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    ino: u64,
}

impl Netns {
    pub fn from_file(file: File) -> io::Result<Netns> {
        let ino = file.metadata()?.ino();
        Ok(Netns { file, ino })
    }

    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening network namespace {}: {e}", path.display()),
            )
        })?;
        Netns::from_file(file)
    }

    /// The namespace's inode: its identity (paths can be reused).
    pub fn inode(&self) -> u64 {
        self.ino
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` (which must not block) with the current thread in this
    /// namespace, then moves the thread back to ztunnel's.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let host = host_netns()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let r = f();
        if let Err(e) = setns(host, CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's namespace would make later
            // sockets there: nothing sane can continue.
            tracing::error!(error = %e, "cannot return to ztunnel's network namespace");
            std::process::abort();
        }
        r
    }

    /// A dual-stack listener on `[::]:port` inside the namespace.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        let std: StdListener = self.run(|| {
            let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            // Inherited by every accepted connection.
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
            s.bind(&SockAddr::from(addr))?;
            s.listen(1024)?;
            Ok(s.into())
        })?;
        TcpListener::from_std(std)
    }

    /// Connects to `addr` from inside the namespace, with ztunnel's mark.
    pub async fn connect(&self, addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = self.run(|| {
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
        if mark != 0 {
            s.set_mark(mark)?;
        }
        s.set_nodelay(true)?;
        let sock = TcpSocket::from_std_stream(s.into());
        sock.connect(addr).await
    }
}
