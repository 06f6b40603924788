//! How hyper's client reaches an endpoint: over HBONE to the endpoint's
//! ztunnel (mesh endpoints, with the waypoint's own certificate, accepting
//! only the endpoint's identity), or plain TCP (endpoints outside the mesh).
//!
//! hyper's pooled client asks for connections by URI; the URI authority is
//! the endpoint address, and what that address needs (identity, HBONE
//! port, connect timeout) is looked up in a table the router keeps
//! current. HBONE connections themselves are pooled per (identity, next
//! hop) by ztunnel's pool, so many HTTP connections share one mTLS
//! connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use ztunnel::identity::{Identity, SecretManager};
use ztunnel::proxy::pool::{Pool, PoolKey};

use crate::h2io::H2Io;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What it takes to reach one endpoint address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub identity: Option<Identity>,
    pub hbone_port: u16,
    pub connect_timeout: Duration,
}

pub struct Dialer {
    pub pool: Arc<Pool>,
    /// The waypoint's own identity, presented to endpoints' ztunnels.
    pub identity: Identity,
    /// Sent as `Forwarded: for=` on upstream tunnels.
    pub own_ip: IpAddr,
    pub mark: u32,
    /// HBONE streams per pooled connection.
    max_streams: usize,
    secrets: Arc<SecretManager>,
    targets: Mutex<HashMap<SocketAddr, Target>>,
}

/// How long a pooled HBONE connection without streams stays open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Dialer {
    /// A dialer with its own HBONE connection pool (whose eviction task
    /// runs on the current runtime).
    pub fn new(
        secrets: Arc<SecretManager>,
        identity: Identity,
        own_ip: IpAddr,
        mark: u32,
        max_streams: usize,
    ) -> Arc<Self> {
        Arc::new(Dialer {
            pool: Pool::new(secrets.clone(), mark, max_streams, POOL_IDLE_TIMEOUT),
            identity,
            own_ip,
            mark,
            max_streams,
            secrets,
            targets: Mutex::new(HashMap::new()),
        })
    }

    /// Another dialer with the same settings and its own pool, for a
    /// worker thread: its connections are driven on that thread only.
    pub fn fresh(&self) -> Arc<Self> {
        Dialer::new(
            self.secrets.clone(),
            self.identity.clone(),
            self.own_ip,
            self.mark,
            self.max_streams,
        )
    }

    pub fn set_target(&self, addr: SocketAddr, t: Target) {
        let mut map = self.targets.lock().expect("targets lock");
        if map.get(&addr) != Some(&t) {
            map.insert(addr, t);
        }
    }

    /// Forgets addresses that are no longer endpoints.
    pub fn retain(&self, live: &std::collections::HashSet<SocketAddr>) {
        self.targets
            .lock()
            .expect("targets lock")
            .retain(|a, _| live.contains(a));
    }

    /// Opens a byte stream to `addr` as the table of targets says.
    pub async fn dial(&self, addr: SocketAddr) -> Result<UpstreamIo, BoxError> {
        let target = self
            .targets
            .lock()
            .expect("targets lock")
            .get(&addr)
            .cloned()
            .unwrap_or(Target {
                identity: None,
                hbone_port: 15008,
                connect_timeout: Duration::from_secs(5),
            });
        self.dial_to(addr, &target).await
    }

    /// Opens a byte stream to `addr`: an HBONE tunnel or a TCP connection.
    pub async fn dial_to(&self, addr: SocketAddr, target: &Target) -> Result<UpstreamIo, BoxError> {
        let connect = async {
            match &target.identity {
                Some(id) => {
                    let key = PoolKey {
                        src: self.identity.clone(),
                        dst: vec![id.clone()],
                        next_hop: SocketAddr::new(addr.ip(), target.hbone_port),
                    };
                    let (stream, guard) =
                        self.pool.connect(key, addr, self.own_ip).await.map_err(
                            |e| -> BoxError { format!("HBONE to {addr}: {e:#}").into() },
                        )?;
                    Ok(UpstreamIo::Hbone(Box::new(H2Io::new(stream)), guard))
                }
                None => {
                    let s = ztunnel::socket::connect(addr, self.mark).await?;
                    Ok(UpstreamIo::Tcp(s))
                }
            }
        };
        tokio::time::timeout(target.connect_timeout, connect)
            .await
            .map_err(|_| -> BoxError { format!("connect to {addr} timed out").into() })?
    }
}

/// A connection to an endpoint. The HBONE variant holds the pool's stream
/// guard so the pooled connection counts this tunnel while it is open.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Hbone(Box<H2Io>, ztunnel::proxy::pool::StreamGuard),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Hbone(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Hbone(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Hbone(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Hbone(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// The connector handed to hyper's client.
#[derive(Clone)]
pub struct Connector(pub Arc<Dialer>);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| -> BoxError { format!("{uri} has no ip:port authority").into() })?;
            Ok(TokioIo::new(dialer.dial(addr).await?))
        })
    }
}
