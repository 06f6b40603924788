//! Inbound HBONE (15008): mTLS connections from other ztunnels (and
//! waypoints), each carrying HTTP/2 CONNECT streams to a workload here.
//!
//! The connection's local address says which workload was dialled, so the
//! handshake presents that workload's certificate. Each stream is checked:
//! a non-CONNECT request gets 400, an authority that is not an address of
//! that workload 400, a policy denial 401, an unreachable upstream 503, and
//! success 200 followed by the bytes.
//!
//! Waypoints: a workload with a waypoint is not made unreachable by other
//! paths here. Traffic that bypassed the waypoint (a client whose ztunnel
//! does not know of it, or plain TCP) is allowed or denied by the L4
//! policies alone, as Istio's ztunnel does; to require the waypoint, allow
//! only the waypoint's identity in a policy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::connection::{log_refused, record_refused, ConnectionRecord, Parties};
use super::copy::copy_hbone;
use super::hbone::{self, H2Stream};
use super::{accept_loop, ProxyInputs};
use crate::identity::Identity;
use crate::metrics::{ResponseFlags, ServiceRef};
use crate::rbac::{self, Decision};
use crate::socket::canonical;
use crate::state::{Protocol, Workload};

pub async fn run(pi: Arc<ProxyInputs>, listener: TcpListener) {
    let drain = pi.drain.clone();
    accept_loop(listener, "HBONE", drain, move |stream, peer| {
        let pi = pi.clone();
        async move {
            if let Err(e) = serve_connection(pi, stream, peer).await {
                warn!(%peer, error = %format!("{e:#}"), "HBONE connection rejected");
            }
        }
    })
    .await;
}

async fn serve_connection(
    pi: Arc<ProxyInputs>,
    stream: TcpStream,
    peer: SocketAddr,
) -> anyhow::Result<()> {
    let local = canonical(stream.local_addr()?);
    let dst_w = pi
        .store
        .snapshot()
        .workload_by_ip(local.ip())
        .filter(|w| w.node == pi.node && w.protocol == Protocol::Hbone)
        .cloned()
        .ok_or_else(|| anyhow!("{} is not a mesh workload on node {}", local.ip(), pi.node))?;
    let cert = pi.secrets.fetch(&dst_w.identity()).await?;
    debug!(%peer, workload = %dst_w.uid, "HBONE connection for a local workload");
    let stop = pi.drain.stop.clone();
    hbone::serve(
        stream,
        peer,
        cert.server_config(),
        pi.max_streams as u32,
        &stop,
        |src_id, (req, respond)| {
            let pi = pi.clone();
            let ctx = StreamContext {
                peer,
                src_id: src_id.clone(),
                dst_w: dst_w.clone(),
            };
            let tracker = pi.drain.connections.clone();
            tracker.spawn(async move { serve_stream(pi, ctx, req, respond).await });
        },
    )
    .await
}

/// Who the tunnelled connection comes from. The original client is in the
/// Forwarded header, which only a verified peer in our trust domain can
/// have set; its port only if the header carries one. Without the header,
/// or when the client is the HBONE peer itself (in-pod mode dials from the
/// pod's address), the HBONE connection's own address is the real one.
fn client_addr(req: &Request<h2::RecvStream>, peer: SocketAddr) -> SocketAddr {
    let forwarded = req
        .headers()
        .get(hbone::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(hbone::parse_forwarded_for_addr)
        .map(|(ip, port)| (canonical(SocketAddr::new(ip, 0)).ip(), port));
    match forwarded {
        Some((ip, Some(port))) => SocketAddr::new(ip, port),
        Some((ip, None)) if ip != peer.ip() => SocketAddr::new(ip, 0),
        _ => peer,
    }
}

struct StreamContext {
    peer: SocketAddr,
    src_id: Identity,
    dst_w: Arc<Workload>,
}

fn status(respond: &mut h2::server::SendResponse<Bytes>, code: StatusCode) {
    let resp = Response::builder()
        .status(code)
        .body(())
        .expect("static response");
    let _ = respond.send_response(resp, true);
}

async fn serve_stream(
    pi: Arc<ProxyInputs>,
    ctx: StreamContext,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let start = Instant::now();
    if req.method() != Method::CONNECT {
        debug!(peer = %ctx.peer, method = %req.method(), "non-CONNECT request on HBONE");
        return status(&mut respond, StatusCode::BAD_REQUEST);
    }
    let target: SocketAddr = match req.uri().authority().and_then(|a| a.as_str().parse().ok()) {
        Some(t) => canonical(t),
        None => {
            log_refused(
                "inbound",
                ctx.peer,
                ctx.peer,
                &format!("authority {:?} is not an ip:port", req.uri().to_string()),
            );
            return status(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    let src = client_addr(&req, ctx.peer);
    let src_ip = src.ip();
    if !ctx.dst_w.addresses.contains(&target.ip()) {
        log_refused(
            "inbound",
            src,
            target,
            &format!("target is not an address of {}", ctx.dst_w.uid),
        );
        return status(&mut respond, StatusCode::BAD_REQUEST);
    }
    let snap = pi.store.snapshot();
    // Policy is taken from the current state, not the one the connection
    // started with.
    let Some(dst_w) = snap.workloads.get(&ctx.dst_w.uid).cloned() else {
        log_refused("inbound", src, target, "workload is gone");
        return status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
    };
    let conn = rbac::Connection {
        src_identity: Some(ctx.src_id.clone()),
        src_ip,
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    let src_w = snap.workload_by_ip(src_ip).cloned();
    let dst_id = dst_w.identity();
    let service: Option<ServiceRef> = snap
        .service_for_port(&dst_w, target.port())
        .map(|s| s.as_ref().into());
    let parties = || Parties {
        src,
        dst: target,
        src_workload: src_w.as_deref(),
        src_identity: Some(&ctx.src_id),
        dst_workload: Some(&dst_w),
        dst_identity: Some(&dst_id),
        service: service.as_ref(),
        mtls: true,
    };
    if let Decision::Deny(why) = rbac::authorize(snap.policies_for(&dst_w), &conn) {
        record_refused(
            &pi.metrics,
            "destination",
            parties(),
            ResponseFlags::Deny,
            start,
            &format!("{} ({})", why, ctx.src_id),
        );
        return status(&mut respond, StatusCode::UNAUTHORIZED);
    }
    let mut upstream = match pi.connect(target).await {
        Ok(s) => s,
        Err(e) => {
            record_refused(
                &pi.metrics,
                "destination",
                parties(),
                ResponseFlags::ConnectFailure,
                start,
                &format!("upstream connect failed: {e}"),
            );
            return status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let send = match respond.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response"),
        false,
    ) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    let record = ConnectionRecord::open(&pi.metrics, "destination", parties());
    let guard = pi.tracker.track(conn, dst_w.uid.clone());
    let stream = H2Stream {
        send,
        recv: req.into_body(),
    };
    let result = tokio::select! {
        r = copy_hbone(&mut upstream, stream, &record.counters, false) => r.map_err(|e| e.to_string()),
        _ = guard.cancel.cancelled() => Err("closed: no longer allowed by policy".to_string()),
    };
    record.close(result);
}
