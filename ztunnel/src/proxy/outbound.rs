//! Outbound: a connection leaving a workload on this node.
//!
//! The destination decides the path. A service VIP is resolved to one of
//! its healthy endpoints; an endpoint in the mesh is reached over HBONE
//! through its node's ztunnel, presenting the source workload's certificate
//! and accepting only the destination workload's identity; a known workload
//! that does not speak HBONE gets plain TCP; anything else (outside the
//! mesh) is passed through unchanged.
//!
//! Waypoints: when the service dialled (by VIP) or the workload dialled (by
//! its own IP) has a waypoint, the connection goes over HBONE to one of the
//! waypoint's replicas instead, accepting only the waypoint's identity; the
//! CONNECT authority stays the original destination so the waypoint can
//! route it. A connection from the waypoint itself goes straight on, or it
//! would loop. Each connection picks a healthy replica at random (so
//! connections spread across them); when the tunnel to that replica cannot
//! be opened (the replica is gone, restarting, or not answering), the next
//! healthy replica is tried before the client's connection fails, so losing
//! a replica loses no new connections. A replica refusing by policy is an
//! answer, not a failure: no other replica is asked.
//!
//! First bytes: a captured client's bytes that are already waiting when the
//! tunnel opens go with the CONNECT rather than after its answer (one TLS
//! record and one read on the peer instead of two per connection; most
//! clients speak first). The peer forwards nothing before it has accepted
//! the tunnel, so on a failure the same bytes go to the next replica.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::connection::{log_refused, record_refused, ConnectionRecord, Parties};
use super::copy::{copy_hbone, copy_tcp};
use super::hbone::H2Stream;
use super::pool::{PoolKey, StreamGuard, TunnelError};
use super::{accept_loop, ProxyInputs};
use crate::metrics::{ResponseFlags, ServiceRef};
use crate::socket::canonical;
use crate::state::{Protocol, Snapshot, Waypoint, Workload};

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
    /// Where the connection goes: the endpoint, or for a waypoint the
    /// original destination (the CONNECT authority).
    target: SocketAddr,
    dst: Option<Arc<Workload>>,
    service: Option<ServiceRef>,
    /// When the traffic goes through a waypoint: its healthy replicas and
    /// their HBONE addresses, in the order to try them. Empty otherwise.
    waypoint: Vec<(Arc<Workload>, SocketAddr)>,
}

/// The waypoint replicas to send `src_w`'s traffic to, in the order to try
/// them, if `wp` applies; empty if it does not.
fn via_waypoint(
    snap: &Snapshot,
    wp: Option<&Waypoint>,
    src_w: Option<&Workload>,
    dst: SocketAddr,
    what: &str,
) -> Result<Vec<(Arc<Workload>, SocketAddr)>, OutboundError> {
    let Some(wp) = wp else {
        return Ok(Vec::new());
    };
    if src_w.is_some_and(|w| snap.is_waypoint_of(w, wp)) {
        return Ok(Vec::new());
    }
    let replicas = snap.waypoint_replicas(wp, dst.ip());
    if replicas.is_empty() {
        return Err(OutboundError::NoRoute(format!(
            "waypoint of {what} has no healthy replica"
        )));
    }
    Ok(replicas)
}

/// Same family as the original destination where the endpoint has one.
fn address_like(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or(w.addresses.first())
        .copied()
}

fn route(
    snap: &Snapshot,
    src_w: Option<&Workload>,
    dst: SocketAddr,
) -> Result<Route, OutboundError> {
    if let Some(svc) = snap.service_by_vip(dst.ip()) {
        let wp = via_waypoint(snap, svc.waypoint.as_ref(), src_w, dst, &svc.hostname)?;
        if !wp.is_empty() {
            return Ok(Route {
                target: dst,
                dst: None,
                service: Some(svc.as_ref().into()),
                waypoint: wp,
            });
        }
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
            waypoint: Vec::new(),
        });
    }
    let dst_w = snap.workload_by_ip(dst.ip()).cloned();
    let waypoint = match &dst_w {
        Some(w) => via_waypoint(snap, w.waypoint.as_ref(), src_w, dst, &w.uid)?,
        None => Vec::new(),
    };
    Ok(Route {
        target: dst,
        dst: dst_w,
        service: None,
        waypoint,
    })
}

/// Sets up the upstream side for a connection from `src` to `dst`.
pub async fn connect(
    pi: &ProxyInputs,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Outbound, OutboundError> {
    connect_from(pi, src, dst, None).await
}

/// [`connect`] for a captured `client`: whatever the client has sent
/// already goes to the HBONE peer along with the CONNECT (see
/// [`super::pool::Pool::connect_with_data`]), which saves a round of
/// writes, reads and wake-ups in both ztunnels per connection.
pub async fn connect_captured(
    pi: &ProxyInputs,
    src: SocketAddr,
    dst: SocketAddr,
    client: &TcpStream,
) -> Result<Outbound, OutboundError> {
    connect_from(pi, src, dst, Some(client)).await
}

/// How much of the client's first bytes travels with the CONNECT; the rest
/// is copied as usual.
const FIRST_BYTES: usize = 4 * 1024;

/// What the client has sent so far, without waiting (clients of most
/// protocols speak first, and their bytes are usually in by the time the
/// route is known). Empty if nothing came yet or the client half-closed.
fn first_bytes(client: &TcpStream) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; FIRST_BYTES];
    match (&*SockRef::from(client)).read(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(buf.into())
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(Bytes::new())
        }
        Err(e) => Err(e),
    }
}

/// Sets up the upstream side and accounts for a failure: one that happened
/// once the parties were known (the tunnel or connection could not be
/// opened, or the peer's policy refused it) is counted in the metrics with
/// its response flag; any other is logged. Callers only map the error.
async fn connect_from(
    pi: &ProxyInputs,
    src: SocketAddr,
    dst: SocketAddr,
    client: Option<&TcpStream>,
) -> Result<Outbound, OutboundError> {
    let start = Instant::now();
    let snap = pi.store.snapshot();
    let src_w = snap.workload_by_ip(src.ip()).cloned();
    let refused_early = |e: OutboundError| {
        log_refused("outbound", src, dst, &e.to_string());
        e
    };
    let route = route(&snap, src_w.as_deref(), dst).map_err(refused_early)?;
    // Over HBONE: to a waypoint replica if there is a waypoint, else to the
    // destination workload's node; the peer must prove the identity of
    // whichever it is.
    let hbone_peers: Vec<(Arc<Workload>, SocketAddr)> = match &route.dst {
        _ if !route.waypoint.is_empty() => route.waypoint.clone(),
        Some(w) if w.protocol == Protocol::Hbone => {
            vec![(w.clone(), SocketAddr::new(route.target.ip(), pi.hbone_port))]
        }
        _ => Vec::new(),
    };
    if hbone_peers.is_empty() {
        let parties = || Parties {
            src,
            dst: route.target,
            src_workload: src_w.as_deref(),
            src_identity: None,
            dst_workload: route.dst.as_deref(),
            dst_identity: None,
            service: route.service.as_ref(),
            mtls: false,
        };
        let tcp = match pi.connect(route.target).await {
            Ok(tcp) => tcp,
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("connecting to {}", route.target));
                let e = OutboundError::Failed(e);
                record_refused(
                    &pi.metrics,
                    "source",
                    parties(),
                    ResponseFlags::ConnectFailure,
                    start,
                    &e.to_string(),
                );
                return Err(e);
            }
        };
        return Ok(Outbound {
            upstream: Upstream::Tcp(tcp),
            record: ConnectionRecord::open(&pi.metrics, "source", parties()),
        });
    }
    let src_w = src_w
        .filter(|w| w.node == pi.node && w.protocol == Protocol::Hbone)
        .ok_or_else(|| {
            refused_early(OutboundError::Denied(format!(
                "source {} is not a mesh workload on node {}; it has no identity to tunnel to {dst} with",
                src.ip(),
                pi.node
            )))
        })?;
    let src_id = src_w.identity();
    let first = match client {
        Some(c) => first_bytes(c)
            .context("the client's connection failed before the tunnel opened")
            .map_err(|e| refused_early(OutboundError::Failed(e)))?,
        None => Bytes::new(),
    };
    let tunnel = open_tunnel(
        pi,
        &src_id,
        &hbone_peers,
        route.target,
        src.ip(),
        first.clone(),
    )
    .await;
    let parties = |dst_workload, dst_identity| Parties {
        src,
        dst: route.target,
        src_workload: Some(&src_w),
        src_identity: Some(&src_id),
        dst_workload,
        dst_identity,
        service: route.service.as_ref(),
        mtls: true,
    };
    let (dst_w, dst_id, stream, guard) = match tunnel {
        Ok(t) => t,
        Err(TunnelFailure { peer, error }) => {
            let dst_id = peer.as_ref().map(|w| w.identity());
            let flags = match error {
                OutboundError::Denied(_) => ResponseFlags::Deny,
                _ => ResponseFlags::ConnectFailure,
            };
            record_refused(
                &pi.metrics,
                "source",
                parties(peer.as_deref(), dst_id.as_ref()),
                flags,
                start,
                &error.to_string(),
            );
            return Err(error);
        }
    };
    let record =
        ConnectionRecord::open(&pi.metrics, "source", parties(Some(&dst_w), Some(&dst_id)));
    record.counters.add_from_client(first.len() as u64);
    Ok(Outbound {
        upstream: Upstream::Hbone(stream, guard),
        record,
    })
}

/// Why no tunnel could be opened, and the (last) peer that was asked.
struct TunnelFailure {
    peer: Option<Arc<Workload>>,
    error: OutboundError,
}

/// Opens an HBONE tunnel to `target` through the first of `peers` that
/// takes it: each peer is a workload and its HBONE address, and must prove
/// that workload's identity. A peer that cannot be reached (connect, TLS or
/// HTTP/2 failure, or a CONNECT it could not serve) is skipped for the
/// next, which gets the same `first` bytes; a policy refusal ends the
/// attempt. Returns the peer used.
async fn open_tunnel(
    pi: &ProxyInputs,
    src_id: &crate::identity::Identity,
    peers: &[(Arc<Workload>, SocketAddr)],
    target: SocketAddr,
    forwarded_for: IpAddr,
    first: Bytes,
) -> Result<
    (
        Arc<Workload>,
        crate::identity::Identity,
        H2Stream,
        StreamGuard,
    ),
    TunnelFailure,
> {
    let mut last = None;
    for (i, (dst_w, next_hop)) in peers.iter().enumerate() {
        let dst_id = dst_w.identity();
        let key = PoolKey {
            src: src_id.clone(),
            dst: vec![dst_id.clone()],
            next_hop: *next_hop,
        };
        match pi
            .pool
            .connect_with_data(key, target, forwarded_for, first.clone())
            .await
        {
            Ok((stream, guard)) => return Ok((dst_w.clone(), dst_id, stream, guard)),
            Err(e) => {
                if let Some(TunnelError::Denied) = e.downcast_ref::<TunnelError>() {
                    return Err(TunnelFailure {
                        peer: Some(dst_w.clone()),
                        error: OutboundError::Denied(format!(
                            "{dst_id} refused {src_id} to {target}"
                        )),
                    });
                }
                if i + 1 < peers.len() {
                    debug!(peer = %next_hop, workload = %dst_w.uid, error = %format!("{e:#}"),
                        "HBONE peer failed; trying the next replica");
                }
                last = Some((dst_w.clone(), e));
            }
        }
    }
    let Some((peer, e)) = last else {
        return Err(TunnelFailure {
            peer: None,
            error: OutboundError::NoRoute(format!("no HBONE peer to {target}")),
        });
    };
    let e = if peers.len() > 1 {
        e.context(format!("all {} waypoint replicas failed", peers.len()))
    } else {
        e
    };
    Err(TunnelFailure {
        peer: Some(peer),
        error: OutboundError::Failed(e),
    })
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
            let dst = match pi.orig_dst.original_destination(&stream, src) {
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
    // A failure has been logged (and counted) by `connect_captured`.
    if let Ok(out) = connect_captured(&pi, src, dst, &stream).await {
        out.serve(&mut stream).await;
    }
}
