//! Sending a request to a cluster: pick an endpoint ([`balancer`]), reach
//! it ([`connector`]: HBONE or TCP), speak HTTP/1.1 or HTTP/2 to it with
//! hyper's pooled client, and report the outcome back to the balancer.
//!
//! A request asking to switch protocols (`Connection: upgrade`, which
//! `serve` only lets through for WebSocket) goes over HTTP/1.1 whatever the
//! cluster's protocol, as HTTP/2 has no classic upgrade; after a 101 its
//! connection belongs to the tunnel (`hyper::upgrade::on` on the response)
//! and never goes back to a pool.

pub mod affinity;
pub mod balancer;
pub mod connector;
pub mod h2pool;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::model::UpstreamProtocol;
use crate::config::runtime::ClusterConfig;
use crate::out_of_line::out_of_line;
use balancer::{Balancer, Outcome};
use connector::{BoxError, Connector, Dialer, Target};

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// One worker's way to the endpoints: its connection pools are its own
/// (their connections are driven on its thread), the balancer's view of
/// the endpoints is shared by all workers.
pub struct Upstream {
    pub balancer: Arc<Balancer>,
    pub dialer: Arc<Dialer>,
    http1: Client<Connector, Body>,
    http2: h2pool::H2Pool,
}

/// Why an attempt produced no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cluster {0} has no endpoints")]
    NoEndpoint(String),
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, String),
    #[error("{0} reset or failed: {1}")]
    Reset(SocketAddr, String),
    /// The retry policy's per-try timeout ran out (Envoy's 504, `UT`).
    #[error("per-try timeout")]
    Timeout,
}

/// A response and the endpoint that gave it.
pub struct Attempt {
    pub response: Response<Incoming>,
    pub endpoint: Arc<balancer::EndpointState>,
}

impl Upstream {
    pub fn new(dialer: Arc<Dialer>, balancer: Arc<Balancer>) -> Self {
        let connector = Connector(dialer.clone());
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(connector);
        let http2 = h2pool::H2Pool::new(dialer.clone());
        Upstream {
            balancer,
            dialer,
            http1,
            http2,
        }
    }

    /// One attempt: an endpoint of `cluster` (not `avoid` if there is a
    /// choice) gets `req` (origin-form URI, the host in `Host`). HTTP/1.1
    /// goes on `affinity`'s connections when there is one (the downstream
    /// HTTP/1.1 connection's own), else through the shared pool (a request
    /// asking to switch protocols: on a connection of its own).
    // Not an `async fn`, for the reason [`crate::serve::handle`] gives.
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        &'a self,
        cluster: &'a ClusterConfig,
        mut req: Request<Body>,
        downstream_h2: bool,
        avoid: Option<SocketAddr>,
        affinity: Option<&'a affinity::Affinity>,
    ) -> impl Future<Output = Result<Attempt, SendError>> + 'a {
        async move {
            let picked = self
                .balancer
                .pick(cluster, avoid)
                .ok_or_else(|| SendError::NoEndpoint(cluster.name.clone()))?;
            let ep = &picked.endpoint.config;
            let target = || Target {
                identity: ep.identity.clone(),
                hbone_port: ep.hbone_port,
                connect_timeout: cluster.connect_timeout,
            };
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            let upgrade = is_upgrade(req.headers());
            let h2 = !upgrade
                && match cluster.protocol {
                    UpstreamProtocol::Http1 => false,
                    UpstreamProtocol::Http2 => true,
                    UpstreamProtocol::UseDownstream => downstream_h2,
                };
            let address = ep.address;
            let absolute = |authority: Authority| {
                Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(pq.clone())
                    .build()
                    .map_err(|e| SendError::Connect(address, e.to_string()))
            };
            let by_address = || {
                Authority::try_from(address.to_string())
                    .map_err(|e| SendError::Connect(address, e.to_string()))
            };
            let sent = if h2 {
                // `:authority` carries the host; no `Host` header in HTTP/2.
                let host = req
                    .headers_mut()
                    .remove(http::header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok());
                *req.uri_mut() = absolute(match host {
                    Some(h) => h,
                    None => by_address()?,
                })?;
                *req.version_mut() = http::Version::HTTP_2;
                let target = target();
                out_of_line(async move {
                    match self.http2.get(address, &target).await {
                        Err(e) => Err(SendError::Connect(address, e)),
                        Ok(mut s) => s
                            .send_request(req)
                            .await
                            .map_err(|e| SendError::Reset(address, error_chain(&e))),
                    }
                })
                .await
            } else if let Some(aff) = affinity {
                *req.uri_mut() = Uri::from(pq.clone());
                *req.version_mut() = http::Version::HTTP_11;
                self.send_affine(aff, address, &target(), req).await
            } else if upgrade {
                *req.uri_mut() = Uri::from(pq.clone());
                *req.version_mut() = http::Version::HTTP_11;
                Box::pin(self.send_dedicated(address, &target(), req)).await
            } else {
                // hyper's pool dials by URI: tell the connector what the
                // endpoint's address needs.
                self.dialer.set_target(address, target());
                *req.uri_mut() = absolute(by_address()?)?;
                *req.version_mut() = http::Version::HTTP_11;
                out_of_line(async move {
                    self.http1.request(req).await.map_err(|e| {
                        let why = error_chain(&e);
                        if e.is_connect() {
                            SendError::Connect(address, why)
                        } else {
                            SendError::Reset(address, why)
                        }
                    })
                })
                .await
            };
            match sent {
                Ok(response) => {
                    let outcome = if response.status().is_server_error() {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    self.balancer.record(cluster, &picked, outcome);
                    Ok(Attempt {
                        response,
                        endpoint: picked.endpoint.clone(),
                    })
                }
                Err(e) => {
                    self.balancer.record(cluster, &picked, Outcome::Failure);
                    Err(e)
                }
            }
        }
    }
}

impl Upstream {
    /// The same balancer with pools of its own (for another worker).
    pub fn fresh(&self) -> Self {
        Upstream::new(self.dialer.fresh(), self.balancer.clone())
    }

    /// HTTP/1.1 on the downstream connection's own upstream connection
    /// (opened, and handed to its driver, when there is none idle).
    async fn send_affine(
        &self,
        aff: &affinity::Affinity,
        address: SocketAddr,
        target: &Target,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = match aff.take(address) {
            Some(s) => s,
            // Boxed: dialing (HBONE included) is a large future, and inline
            // it would make every request's future that much larger, and
            // copied that much more on its way into its box.
            None => Box::pin(self.open_affine(aff, address, target)).await?,
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Reset(address, error_chain(&e)))?;
        // After a 101 the connection is the tunnel's.
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            aff.put(address, sender);
        }
        Ok(resp)
    }

    /// A request asking to switch protocols, without a downstream
    /// connection's own upstream (a mirror): on a connection of its own,
    /// outside hyper's pool, so a switched connection is never reused.
    async fn send_dedicated(
        &self,
        address: SocketAddr,
        target: &Target,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let (mut sender, conn) = self.open_http1(address, target).await?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Reset(address, error_chain(&e)))
    }
}

impl Upstream {
    /// A new upstream HTTP/1.1 connection for `aff`, handed to its driver.
    async fn open_affine(
        &self,
        aff: &affinity::Affinity,
        address: SocketAddr,
        target: &Target,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, SendError> {
        let (s, conn) = self.open_http1(address, target).await?;
        if let Err(e) = aff.driver.send(conn) {
            // The downstream connection is gone; drive it here.
            tokio::spawn(e.0);
        }
        Ok(s)
    }

    /// A new upstream HTTP/1.1 connection and the future driving it.
    async fn open_http1(
        &self,
        address: SocketAddr,
        target: &Target,
    ) -> Result<
        (
            hyper::client::conn::http1::SendRequest<Body>,
            affinity::ConnFuture,
        ),
        SendError,
    > {
        let io = self
            .dialer
            .dial_to(address, target)
            .await
            .map_err(|e| SendError::Connect(address, e.to_string()))?;
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(address, error_chain(&e)))?;
        // With upgrades: after a 101 the future ends, handing the
        // connection to the response's `OnUpgrade` (without, hyper fails it).
        let conn: affinity::ConnFuture = Box::pin(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok((s, conn))
    }
}

/// Whether `h` asks to switch protocols: an `Upgrade` header, nominated by
/// `Connection` (tokens case-insensitive).
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(UPGRADE)
        && h.get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
