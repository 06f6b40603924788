//! The data plane: ztunnel's listeners and the paths between them.
//!
//! | port  | listener                         | module                |
//! |-------|----------------------------------|-----------------------|
//! | 15001 | outbound capture                 | [`outbound`]          |
//! | 15006 | inbound plaintext capture        | [`inbound_plaintext`] |
//! | 15008 | inbound HBONE (mTLS, HTTP/2)     | [`inbound`]           |
//! | 15080 | SOCKS5 (opt-in)                  | [`socks5`]            |
//!
//! Every listener shares one [`ProxyInputs`]: the state store, the
//! certificates, the HBONE pool, metrics and the open-connection tracker.

pub mod connection;
pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod inbound_plaintext;
pub mod orig_dst;
pub mod outbound;
pub mod pool;
pub mod socks5;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::identity::SecretManager;
use crate::metrics::Metrics;
use crate::state::Store;

pub use connection::ConnectionTracker;
pub use orig_dst::{OriginalDestination, SocketOriginalDst};
pub use pool::Pool;

/// What every listener needs.
pub struct ProxyInputs {
    /// This node's name: workloads with this `node` are ours.
    pub node: String,
    pub store: Arc<Store>,
    pub secrets: Arc<SecretManager>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub tracker: Arc<ConnectionTracker>,
    pub orig_dst: Arc<dyn OriginalDestination>,
    /// `SO_MARK` on ztunnel's own upstream sockets, so capture skips them.
    pub mark: u32,
    /// The port HBONE peers listen on.
    pub hbone_port: u16,
    /// HTTP/2 streams per HBONE connection.
    pub max_streams: usize,
    pub drain: Drain,
    /// For in-pod capture: the pod's network namespace, where connections
    /// to the app and passthrough connections start (see [`crate::inpod`]).
    /// `None`: ztunnel's own namespace.
    pub netns: Option<Arc<crate::inpod::Netns>>,
}

impl ProxyInputs {
    /// Opens a marked upstream connection from [`ProxyInputs::netns`].
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        match &self.netns {
            Some(ns) => ns.connect(addr, self.mark).await,
            None => crate::socket::connect(addr, self.mark).await,
        }
    }
}

/// Graceful shutdown: `stop` tells listeners to stop accepting (and HBONE
/// connections to send GOAWAY); `connections` tracks every proxied
/// connection so shutdown can wait for them to finish.
#[derive(Clone, Default)]
pub struct Drain {
    pub stop: tokio_util::sync::CancellationToken,
    pub connections: tokio_util::task::TaskTracker,
}

impl Drain {
    /// Stops accepting and waits up to `timeout` for open connections to
    /// end. Returns how many were still open when it gave up.
    pub async fn run(&self, timeout: Duration) -> usize {
        self.stop.cancel();
        self.connections.close();
        match tokio::time::timeout(timeout, self.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => self.connections.len(),
        }
    }
}

/// Where each listener is bound; `None` means disabled.
#[derive(Clone, Debug)]
pub struct ListenAddrs {
    pub outbound: Option<SocketAddr>,
    pub inbound_plaintext: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub socks5: Option<SocketAddr>,
}

/// Bound listeners, before they start accepting.
pub struct Listeners {
    outbound: Option<TcpListener>,
    inbound_plaintext: Option<TcpListener>,
    inbound: Option<TcpListener>,
    socks5: Option<TcpListener>,
}

fn bind(
    addr: Option<SocketAddr>,
    what: &str,
    transparent: bool,
) -> anyhow::Result<Option<TcpListener>> {
    addr.map(|a| {
        crate::socket::listen(a, transparent)
            .with_context(|| format!("binding {what} listener on {a}"))
    })
    .transpose()
}

impl Listeners {
    /// Binds everything up front so that a port conflict fails start-up
    /// with a clear error rather than later.
    pub fn bind(addrs: &ListenAddrs, transparent: bool) -> anyhow::Result<Self> {
        Ok(Listeners {
            outbound: bind(addrs.outbound, "outbound", transparent)?,
            inbound_plaintext: bind(addrs.inbound_plaintext, "inbound plaintext", transparent)?,
            inbound: bind(addrs.inbound, "HBONE", false)?,
            socks5: bind(addrs.socks5, "SOCKS5", false)?,
        })
    }

    pub fn spawn(self, pi: Arc<ProxyInputs>) {
        if let Some(l) = self.outbound {
            tokio::spawn(outbound::run(pi.clone(), l));
        }
        if let Some(l) = self.inbound_plaintext {
            tokio::spawn(inbound_plaintext::run(pi.clone(), l));
        }
        if let Some(l) = self.inbound {
            tokio::spawn(inbound::run(pi.clone(), l));
        }
        if let Some(l) = self.socks5 {
            tokio::spawn(socks5::run(pi.clone(), l));
        }
    }
}

/// Accepts on `listener` until the drain starts, handing each
/// connection and its peer address to `handle` on a task of its own. An
/// accept error (for example out of file descriptors) is logged and retried
/// after a pause rather than in a busy loop.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    drain: Drain,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = drain.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                // TCP_NODELAY comes from the listener (see
                // `crate::socket::listen`).
                drain
                    .connections
                    .spawn(handle(stream, crate::socket::canonical(peer)));
            }
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
