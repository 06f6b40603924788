//! Opaque TCP through the waypoint: the chain's network RBAC (principals,
//! namespaces, ports; L7 conditions never match) decides, then the bytes
//! go to an endpoint of the chain's cluster, picked like any request's.
//! Each connection writes an access-log line and Istio's TCP metrics.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use crate::config::runtime::{EndpointConfig, TcpChain};
use crate::metrics::{PeerLabels, PeerPair, TcpLabels};
use crate::rbac::{self, AuthzRequest, Decision};
use crate::serve::Downstream;
use crate::upstream::balancer::Outcome;
use crate::upstream::connector::{Target, UpstreamIo};
use crate::Proxy;

/// Authorizes and connects upstream; the status says why not.
async fn prepare(
    proxy: &Proxy,
    ds: &Downstream,
    chain: &TcpChain,
) -> Result<(UpstreamIo, EndpointConfig, PeerLabels), StatusCode> {
    let authz = AuthzRequest {
        source: ds.identity.as_ref(),
        destination_port: ds.dst.port(),
        http: None,
    };
    if let Decision::Deny(why) = rbac::authorize(&chain.rbac, &authz) {
        info!(target: "access", src_addr = %ds.src_ip, dst_addr = %ds.dst, error = %why, "tcp connection denied");
        return Err(StatusCode::UNAUTHORIZED);
    }
    let cluster = &chain.cluster;
    let picked = proxy
        .upstream
        .balancer
        .pick(cluster, None)
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let ep = picked.endpoint.config.clone();
    let target = Target {
        identity: ep.identity.clone(),
        hbone_port: ep.hbone_port,
        connect_timeout: cluster.connect_timeout,
    };
    match proxy.upstream.dialer.dial_to(ep.address, &target).await {
        Ok(u) => {
            proxy
                .upstream
                .balancer
                .record(cluster, &picked, Outcome::Success);
            Ok((u, ep, picked.endpoint.labels.clone()))
        }
        Err(e) => {
            proxy
                .upstream
                .balancer
                .record(cluster, &picked, Outcome::Failure);
            debug!(endpoint = %ep.address, error = %e, "tcp upstream connect failed");
            Err(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

/// Copies both ways and writes the access-log line and metrics.
async fn pipe<D>(
    proxy: &Proxy,
    ds: &Downstream,
    chain: &TcpChain,
    mut down: D,
    (mut up, ep, dst): (UpstreamIo, EndpointConfig, PeerLabels),
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let name = &chain.cluster.name;
    let labels = TcpLabels {
        peers: PeerPair {
            source: ds.source_labels.clone(),
            destination: dst,
            destination_service: crate::metrics::service_of_cluster(name).to_string(),
            request_protocol: "tcp",
        },
        response_flags: "-",
        connection_security_policy: "mutual_tls",
    };
    let m = &proxy.metrics.tcp;
    m.opened.get_or_create(&labels).inc();
    let start = std::time::Instant::now();
    let res = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    let (sent_up, sent_down) = res.as_ref().map(|r| *r).unwrap_or((0, 0));
    m.closed.get_or_create(&labels).inc();
    m.received_bytes.get_or_create(&labels).inc_by(sent_up);
    m.sent_bytes.get_or_create(&labels).inc_by(sent_down);
    info!(
        target: "access",
        src_addr = %ds.src_ip,
        src_principal = %ds.identity.as_ref().map(ToString::to_string).unwrap_or_default(),
        dst_addr = %ds.dst,
        cluster = %chain.cluster.name,
        upstream = %ep.address,
        bytes_received = sent_up,
        bytes_sent = sent_down,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        error = %res.err().map(|e| e.to_string()).unwrap_or_default(),
        "tcp connection"
    );
}

/// A CONNECT stream not yet answered: refusals are HBONE statuses (401,
/// 503), as ztunnel gives them.
pub async fn serve(
    proxy: Arc<Proxy>,
    ds: Arc<Downstream>,
    chain: Arc<TcpChain>,
    mut respond: h2::server::SendResponse<Bytes>,
    req: Request<h2::RecvStream>,
) {
    match prepare(&proxy, &ds, &chain).await {
        Err(code) => {
            if let Ok(r) = http::Response::builder().status(code).body(()) {
                let _ = respond.send_response(r, true);
            }
        }
        Ok(up) => {
            if let Some(down) = crate::inbound::accept(&mut respond, req) {
                pipe(&proxy, &ds, &chain, down, up).await;
            }
        }
    }
}

/// A stream already answered (after sniffing): a refusal closes it.
pub async fn serve_accepted<D>(
    proxy: Arc<Proxy>,
    ds: Arc<Downstream>,
    chain: Arc<TcpChain>,
    down: D,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    if let Ok(up) = prepare(&proxy, &ds, &chain).await {
        pipe(&proxy, &ds, &chain, down, up).await;
    }
}
