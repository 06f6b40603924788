//! The HBONE client: a pool of mTLS HTTP/2 connections, one stream per
//! tunnelled TCP connection.
//!
//! Connections are keyed by (source identity, expected destination
//! identities, next hop): a connection is only ever shared by tunnels that
//! would present the same certificate and accept the same peer. A key's
//! mutex is held while its first connection is set up, so a burst of new
//! tunnels waits for one handshake instead of starting one each. A
//! connection takes at most `max_streams` tunnels; beyond that a second one
//! opens. Connections idle for `idle_timeout` are closed by a sweeper.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tracing::debug;

use super::hbone::{self, H2Stream};
use crate::identity::{Identity, SecretManager, WorkloadCertificate};
use crate::{socket, tls};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    /// Sorted, so that the same set always makes the same key.
    pub dst: Vec<Identity>,
    pub next_hop: SocketAddr,
}

struct PooledConnection {
    /// The certificate this connection presented; after a rotation new
    /// tunnels go on a new connection with the new certificate.
    cert: Arc<WorkloadCertificate>,
    sender: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

impl PooledConnection {
    fn usable(&self, max_streams: usize) -> bool {
        !self.closed.load(Ordering::Acquire) && self.active.load(Ordering::Acquire) < max_streams
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<PooledConnection>>>>;

pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
    secrets: Arc<SecretManager>,
    mark: u32,
    max_streams: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// In-pod mode: dial from this pod's network namespace.
    netns: Option<Arc<crate::inpod::Netns>>,
}

/// Why opening a tunnel failed, as the HBONE peer said it.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("denied by the destination's policy (HTTP 401)")]
    Denied,
    #[error("the destination could not reach its upstream (HTTP 503)")]
    UpstreamFailed,
    #[error("unexpected HBONE response {0}")]
    Status(StatusCode),
}

/// Keeps a pooled connection's stream count while a tunnel is open.
pub struct StreamGuard(Arc<PooledConnection>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("idle lock") = Instant::now();
        }
    }
}

impl Pool {
    pub fn new(
        secrets: Arc<SecretManager>,
        mark: u32,
        max_streams: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Self::build(secrets, mark, max_streams, idle_timeout, None)
    }

    fn build(
        secrets: Arc<SecretManager>,
        mark: u32,
        max_streams: usize,
        idle_timeout: Duration,
        netns: Option<Arc<crate::inpod::Netns>>,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool {
            slots: Mutex::new(HashMap::new()),
            secrets,
            mark,
            max_streams: max_streams.max(1),
            idle_timeout,
            connect_timeout: Duration::from_secs(10),
            netns,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout.max(Duration::from_millis(100)) / 2);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.evict_idle();
            }
        });
        pool
    }

    /// A pool with the same settings whose connections start in a pod's
    /// network namespace (in-pod mode: the pod's HBONE traffic leaves from
    /// the pod, with its address, as Istio's does).
    pub fn in_netns(&self, netns: Arc<crate::inpod::Netns>) -> Arc<Self> {
        Self::build(
            self.secrets.clone(),
            self.mark,
            self.max_streams,
            self.idle_timeout,
            Some(netns),
        )
    }

    fn evict_idle(&self) {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("pool lock");
        slots.retain(|key, slot| {
            // A slot being connected right now is busy, not idle.
            let Ok(mut conns) = slot.try_lock() else {
                return true;
            };
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().expect("idle lock"))
                        >= self.idle_timeout;
                if idle {
                    debug!(next_hop = %key.next_hop, src = %key.src, "closing idle HBONE connection");
                }
                !idle && !c.closed.load(Ordering::Acquire)
            });
            !conns.is_empty()
        });
    }

    /// Number of open pooled connections (for tests and `/config_dump`).
    pub fn connections(&self) -> usize {
        let slots = self.slots.lock().expect("pool lock");
        slots
            .values()
            .map(|s| s.try_lock().map(|c| c.len()).unwrap_or(0))
            .sum()
    }

    /// Opens a tunnel to `target` through `key.next_hop`.
    pub async fn connect(
        &self,
        key: PoolKey,
        target: SocketAddr,
        forwarded_for: std::net::IpAddr,
    ) -> anyhow::Result<(H2Stream, StreamGuard)> {
        self.connect_with_data(key, target, forwarded_for, Bytes::new())
            .await
    }

    /// [`Pool::connect`], sending `first` (the client's first bytes, if it
    /// has sent any) right behind the CONNECT instead of after the answer:
    /// both go out in one TLS record, and the peer reads them together. The
    /// peer forwards them only once it has accepted the tunnel and reached
    /// the destination; if it refuses, it never forwards them, so they can
    /// be offered again to another peer.
    pub async fn connect_with_data(
        &self,
        key: PoolKey,
        target: SocketAddr,
        forwarded_for: std::net::IpAddr,
        first: Bytes,
    ) -> anyhow::Result<(H2Stream, StreamGuard)> {
        let conn = self.checkout(&key).await?;
        let guard = StreamGuard(conn.clone());
        let mut sender = conn.sender.clone();
        sender = sender
            .ready()
            .await
            .with_context(|| format!("HBONE connection to {} is not usable", key.next_hop))?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(
                hbone::FORWARDED,
                format!("for=\"{}\"", fmt_for(forwarded_for)),
            )
            .body(())
            .context("building CONNECT request")?;
        let (response, mut send) = sender
            .send_request(req, false)
            .with_context(|| format!("sending CONNECT to {}", key.next_hop))?;
        if !first.is_empty() {
            // Within the stream's initial window, so h2 sends it at once.
            send.send_data(first, false)
                .with_context(|| format!("sending the first bytes to {}", key.next_hop))?;
        }
        let response = response
            .await
            .with_context(|| format!("awaiting CONNECT response from {}", key.next_hop))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => bail!(TunnelError::Denied),
            StatusCode::SERVICE_UNAVAILABLE => bail!(TunnelError::UpstreamFailed),
            s => bail!(TunnelError::Status(s)),
        }
        let recv = response.into_body();
        Ok((H2Stream { send, recv }, guard))
    }

    async fn checkout(&self, key: &PoolKey) -> anyhow::Result<Arc<PooledConnection>> {
        let slot = {
            let mut slots = self.slots.lock().expect("pool lock");
            slots.entry(key.clone()).or_default().clone()
        };
        let cert = self.secrets.fetch(&key.src).await?;
        let mut conns = slot.lock().await;
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        if let Some(c) = conns
            .iter()
            .find(|c| c.usable(self.max_streams) && Arc::ptr_eq(&c.cert, &cert))
        {
            c.active.fetch_add(1, Ordering::AcqRel);
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.connect_timeout, self.dial(key, cert))
            .await
            .map_err(|_| anyhow!("HBONE handshake with {} timed out", key.next_hop))??;
        c.active.fetch_add(1, Ordering::AcqRel);
        conns.push(c.clone());
        Ok(c)
    }

    async fn dial(
        &self,
        key: &PoolKey,
        cert: Arc<WorkloadCertificate>,
    ) -> anyhow::Result<Arc<PooledConnection>> {
        let cfg = cert.client_config(key.dst.clone())?;
        let tcp = match &self.netns {
            Some(ns) => ns.connect(key.next_hop, self.mark).await,
            None => socket::connect(key.next_hop, self.mark).await,
        }
        .with_context(|| format!("connecting to {}", key.next_hop))?;
        let tcp = tokio::io::BufReader::with_capacity(hbone::TLS_READ_BUFFER, tcp);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(tls::server_name(key.next_hop.ip()), tcp)
            .await
            .with_context(|| format!("TLS handshake with {}", key.next_hop))?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(hbone::STREAM_WINDOW)
            .initial_connection_window_size(hbone::CONNECTION_WINDOW)
            .max_frame_size(hbone::MAX_FRAME_SIZE)
            .max_send_buffer_size(hbone::MAX_SEND_BUFFER)
            .max_header_list_size(hbone::MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls)
            .await
            .with_context(|| format!("HTTP/2 handshake with {}", key.next_hop))?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let peer = key.next_hop;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "HBONE connection ended");
            }
            done.store(true, Ordering::Release);
        });
        debug!(next_hop = %key.next_hop, src = %key.src, "opened HBONE connection");
        Ok(Arc::new(PooledConnection {
            cert,
            sender,
            active: AtomicUsize::new(0),
            closed,
            idle_since: Mutex::new(Instant::now()),
        }))
    }
}

fn fmt_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
