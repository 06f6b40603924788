//! Sending a request to a cluster: pick an endpoint ([`balancer`]), reach
//! it ([`connector`]: HBONE or TCP), speak HTTP/1.1 or HTTP/2 to it with
//! hyper's pooled client, and report the outcome back to the balancer.

pub mod balancer;
pub mod connector;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::model::UpstreamProtocol;
use crate::config::runtime::ClusterConfig;
use balancer::{Balancer, Outcome};
use connector::{BoxError, Connector, Dialer, Target};

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub struct Upstream {
    pub balancer: Balancer,
    pub dialer: Arc<Dialer>,
    http1: Client<Connector, Body>,
    http2: Client<Connector, Body>,
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
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(connector);
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
        let uri = format!("http://{}{}", ep.address, pq);
        *req.uri_mut() = uri
            .parse::<Uri>()
            .map_err(|e| SendError::Connect(ep.address, e.to_string()))?;
        let h2 = match cluster.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::UseDownstream => downstream_h2,
        };
        *req.version_mut() = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let client = if h2 { &self.http2 } else { &self.http1 };
        let address = ep.address;
        match client.request(req).await {
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
                let why = error_chain(&e);
                if e.is_connect() {
                    Err(SendError::Connect(address, why))
                } else {
                    Err(SendError::Reset(address, why))
                }
            }
        }
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
