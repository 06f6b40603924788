//! Outbound: a connection leaving a workload on this node.
//!
//! The destination decides the path. A service VIP is resolved to one of
//! its healthy endpoints; an endpoint in the mesh is reached over HBONE
//! through its node's ztunnel, presenting the source workload's certificate
//! and accepting only the destination workload's identity; a known workload
//! that does not speak HBONE gets plain TCP; anything else (outside the
//! mesh) is passed through unchanged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::connection::{log_refused, ConnectionRecord, Parties};
use super::copy::{copy_hbone, copy_tcp};
use super::hbone::H2Stream;
use super::pool::{PoolKey, StreamGuard, TunnelError};
use super::{accept_loop, ProxyInputs};
use crate::metrics::ServiceRef;
use crate::socket::canonical;
use crate::state::{Protocol, Snapshot, Workload};

/// The far side of an outbound connection, once established.
pub enum Upstream {
    Tcp(TcpStream),
    Hbone(H2Stream, StreamGuard),
}

/// An established outbound connection waiting for its bytes.
pub struct Outbound {
    upstream: Upstream,
    record: ConnectionRecord,
}

/// Why an outbound connection could not be set up; SOCKS5 maps these to
/// reply codes.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("denied: {0}")]
    Denied(String),
    #[error("no route: {0}")]
    NoRoute(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

struct Route {
    target: SocketAddr,
    dst: Option<Arc<Workload>>,
    service: Option<ServiceRef>,
}

/// Same family as the original destination where the endpoint has one.
fn address_like(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or(w.addresses.first())
        .copied()
}

fn route(snap: &Snapshot, dst: SocketAddr) -> Result<Route, OutboundError> {
    if let Some(svc) = snap.service_by_vip(dst.ip()) {
        let (w, port) = snap.pick_endpoint(svc, dst.port()).ok_or_else(|| {
            OutboundError::NoRoute(format!(
                "service {} has no healthy endpoint for port {}",
                svc.hostname,
                dst.port()
            ))
        })?;
        let ip = address_like(&w, dst.ip())
            .ok_or_else(|| OutboundError::NoRoute(format!("endpoint {} has no address", w.uid)))?;
        return Ok(Route {
            target: SocketAddr::new(ip, port),
            dst: Some(w),
            service: Some(svc.as_ref().into()),
        });
    }
    Ok(Route {
        target: dst,
        dst: snap.workload_by_ip(dst.ip()).cloned(),
        service: None,
    })
}

/// Sets up the upstream side for a connection from `src` to `dst`.
pub async fn connect(
    pi: &ProxyInputs,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Outbound, OutboundError> {
    let snap = pi.store.snapshot();
    let src_w = snap.workload_by_ip(src.ip()).cloned();
    let route = route(&snap, dst)?;
    match &route.dst {
        Some(dst_w) if dst_w.protocol == Protocol::Hbone => {
            let src_w = src_w
                .filter(|w| w.node == pi.node && w.protocol == Protocol::Hbone)
                .ok_or_else(|| {
                    OutboundError::Denied(format!(
                        "source {} is not a mesh workload on node {}; it has no identity to tunnel to {dst} with",
                        src.ip(),
                        pi.node
                    ))
                })?;
            let src_id = src_w.identity();
            let dst_id = dst_w.identity();
            let key = PoolKey {
                src: src_id.clone(),
                dst: vec![dst_id.clone()],
                next_hop: SocketAddr::new(route.target.ip(), pi.hbone_port),
            };
            let (stream, guard) =
                pi.pool
                    .connect(key, route.target, src.ip())
                    .await
                    .map_err(|e| match e.downcast_ref::<TunnelError>() {
                        Some(TunnelError::Denied) => OutboundError::Denied(format!(
                            "{} refused {src_id} to {}",
                            dst_id, route.target
                        )),
                        _ => OutboundError::Failed(e),
                    })?;
            let record = ConnectionRecord::open(
                &pi.metrics,
                "source",
                Parties {
                    src,
                    dst: route.target,
                    src_workload: Some(&src_w),
                    src_identity: Some(&src_id),
                    dst_workload: Some(dst_w),
                    dst_identity: Some(&dst_id),
                    service: route.service.as_ref(),
                    mtls: true,
                },
            );
            Ok(Outbound {
                upstream: Upstream::Hbone(stream, guard),
                record,
            })
        }
        _ => {
            let tcp = pi
                .connect(route.target)
                .await
                .with_context(|| format!("connecting to {}", route.target))
                .map_err(OutboundError::Failed)?;
            let record = ConnectionRecord::open(
                &pi.metrics,
                "source",
                Parties {
                    src,
                    dst: route.target,
                    src_workload: src_w.as_deref(),
                    src_identity: None,
                    dst_workload: route.dst.as_deref(),
                    dst_identity: None,
                    service: route.service.as_ref(),
                    mtls: false,
                },
            );
            Ok(Outbound {
                upstream: Upstream::Tcp(tcp),
                record,
            })
        }
    }
}

impl Outbound {
    /// Carries bytes between the client and the upstream until both close.
    pub async fn serve(self, client: &mut TcpStream) {
        let Outbound { upstream, record } = self;
        let result = match upstream {
            Upstream::Tcp(mut tcp) => copy_tcp(client, &mut tcp, &record.counters).await,
            Upstream::Hbone(stream, _guard) => {
                copy_hbone(client, stream, &record.counters, true).await
            }
        };
        record.close(result.map_err(|e| e.to_string()));
    }
}

/// Accepts captured connections on 15001.
pub async fn run(pi: Arc<ProxyInputs>, listener: TcpListener) {
    let local = listener.local_addr().ok().map(canonical);
    let drain = pi.drain.clone();
    accept_loop(listener, "outbound", drain, move |stream, src| {
        let pi = pi.clone();
        async move {
            let dst = match pi.orig_dst.original_destination(&stream) {
                Ok(d) if Some(d) != local => d,
                Ok(d) => {
                    log_refused(
                        "outbound",
                        src,
                        d,
                        "connection was not captured: no original destination",
                    );
                    return;
                }
                Err(e) => {
                    log_refused(
                        "outbound",
                        src,
                        src,
                        &format!("no original destination: {e}"),
                    );
                    return;
                }
            };
            handle(pi, stream, src, dst).await;
        }
    })
    .await;
}

async fn handle(pi: Arc<ProxyInputs>, mut stream: TcpStream, src: SocketAddr, dst: SocketAddr) {
    match connect(&pi, src, dst).await {
        Ok(out) => out.serve(&mut stream).await,
        Err(e) => {
            debug!(%src, %dst, error = %e, "outbound connection failed");
            log_refused("outbound", src, dst, &e.to_string());
        }
    }
}
