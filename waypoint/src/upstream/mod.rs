//! Sending a request to a cluster: pick an endpoint ([`balancer`]), reach
//! it ([`connector`]: HBONE or TCP), speak HTTP/1.1 or HTTP/2 to it with
//! hyper's pooled client, and report the outcome back to the balancer.

pub mod affinity;
pub mod balancer;
pub mod connector;
pub mod h2pool;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::model::UpstreamProtocol;
use crate::config::runtime::ClusterConfig;
use balancer::{Balancer, Outcome};
use connector::{BoxError, Connector, Dialer, Target};

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub struct Upstream {
    pub balancer: Balancer,
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
    pub endpoint: SocketAddr,
}

impl Upstream {
    pub fn new(dialer: Arc<Dialer>) -> Self {
        let connector = Connector(dialer.clone());
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(connector);
        let http2 = h2pool::H2Pool::new(dialer.clone());
        Upstream {
            balancer: Balancer::default(),
            dialer,
            http1,
            http2,
        }
    }

    /// One attempt: an endpoint of `cluster` (not `avoid` if there is a
    /// choice) gets `req`, whose URI is rewritten to that endpoint.
    pub async fn send(
        &self,
        cluster: &ClusterConfig,
        mut req: Request<Body>,
        downstream_h2: bool,
        avoid: Option<SocketAddr>,
    ) -> Result<Attempt, SendError> {
        let picked = self
            .balancer
            .pick(cluster, avoid)
            .ok_or_else(|| SendError::NoEndpoint(cluster.name.clone()))?;
        let ep = &picked.endpoint.config;
        self.dialer.set_target(
            ep.address,
            Target {
                identity: ep.identity.clone(),
                hbone_port: ep.hbone_port,
                connect_timeout: cluster.connect_timeout,
            },
        );
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let h2 = match cluster.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::UseDownstream => downstream_h2,
        };
        let address = ep.address;
        let sent = if h2 {
            // `:authority` carries the host; no `Host` header in HTTP/2.
            let host = req.headers_mut().remove(http::header::HOST);
            let uri = host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .and_then(|h| format!("http://{h}{pq}").parse::<Uri>().ok());
            *req.uri_mut() = match uri {
                Some(u) => u,
                None => format!("http://{address}{pq}")
                    .parse::<Uri>()
                    .map_err(|e| SendError::Connect(address, e.to_string()))?,
            };
            *req.version_mut() = http::Version::HTTP_2;
            match self.http2.get(address).await {
                Err(e) => Err(SendError::Connect(address, e)),
                Ok(mut s) => s
                    .send_request(req)
                    .await
                    .map_err(|e| SendError::Reset(address, error_chain(&e))),
            }
        } else if let Some(aff) = req.extensions_mut().remove::<Arc<affinity::Affinity>>() {
            *req.uri_mut() = pq
                .parse::<Uri>()
                .map_err(|e| SendError::Connect(address, e.to_string()))?;
            *req.version_mut() = http::Version::HTTP_11;
            self.send_affine(&aff, address, req).await
        } else {
            *req.uri_mut() = format!("http://{address}{pq}")
                .parse::<Uri>()
                .map_err(|e| SendError::Connect(address, e.to_string()))?;
            *req.version_mut() = http::Version::HTTP_11;
            self.http1.request(req).await.map_err(|e| {
                let why = error_chain(&e);
                if e.is_connect() {
                    SendError::Connect(address, why)
                } else {
                    SendError::Reset(address, why)
                }
            })
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
                    endpoint: address,
                })
            }
            Err(e) => {
                self.balancer.record(cluster, &picked, Outcome::Failure);
                Err(e)
            }
        }
    }
}

impl Upstream {
    /// HTTP/1.1 on the downstream connection's own upstream connection
    /// (opened, and handed to its driver, when there is none idle).
    async fn send_affine(
        &self,
        aff: &affinity::Affinity,
        address: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = match aff.take(address) {
            Some(s) => s,
            None => {
                let io = self
                    .dialer
                    .dial(address)
                    .await
                    .map_err(|e| SendError::Connect(address, e.to_string()))?;
                let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| SendError::Connect(address, error_chain(&e)))?;
                let conn: affinity::ConnFuture = Box::pin(async move {
                    let _ = conn.await;
                });
                if let Err(e) = aff.driver.send(conn) {
                    // The downstream connection is gone; drive it here.
                    tokio::spawn(e.0);
                }
                s
            }
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Reset(address, error_chain(&e)))?;
        aff.put(address, sender);
        Ok(resp)
    }
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
