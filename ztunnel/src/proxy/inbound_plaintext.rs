//! Inbound plaintext (15006): connections to a workload on this node that
//! arrive without HBONE (from outside the mesh). There is no verified peer,
//! so only policies that do not require an identity can allow them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::connection::{log_refused, record_refused, ConnectionRecord, Parties};
use super::copy::copy_tcp;
use super::{accept_loop, ProxyInputs};
use crate::metrics::{ResponseFlags, ServiceRef};
use crate::rbac::{self, Decision};
use crate::socket::canonical;

pub async fn run(pi: Arc<ProxyInputs>, listener: TcpListener) {
    let local = listener.local_addr().ok().map(canonical);
    let drain = pi.drain.clone();
    accept_loop(listener, "inbound plaintext", drain, move |stream, src| {
        let pi = pi.clone();
        async move {
            match pi.orig_dst.original_destination(&stream, src) {
                Ok(dst) if Some(dst) != local => handle(pi, stream, src, dst).await,
                Ok(dst) => log_refused(
                    "inbound",
                    src,
                    dst,
                    "connection was not captured: no original destination",
                ),
                Err(e) => log_refused(
                    "inbound",
                    src,
                    src,
                    &format!("no original destination: {e}"),
                ),
            }
        }
    })
    .await;
}

async fn handle(pi: Arc<ProxyInputs>, mut stream: TcpStream, src: SocketAddr, dst: SocketAddr) {
    let start = Instant::now();
    let snap = pi.store.snapshot();
    let Some(dst_w) = snap
        .workload_by_ip(dst.ip())
        .filter(|w| w.node == pi.node)
        .cloned()
    else {
        return log_refused(
            "inbound",
            src,
            dst,
            "destination is not a workload on this node",
        );
    };
    let conn = rbac::Connection {
        src_identity: None,
        src_ip: src.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let src_w = snap.workload_by_ip(src.ip()).cloned();
    let dst_id = dst_w.identity();
    let service: Option<ServiceRef> = snap
        .service_for_port(&dst_w, dst.port())
        .map(|s| s.as_ref().into());
    let parties = || Parties {
        src,
        dst,
        src_workload: src_w.as_deref(),
        src_identity: None,
        dst_workload: Some(&dst_w),
        dst_identity: Some(&dst_id),
        service: service.as_ref(),
        mtls: false,
    };
    let refused = |flags, reason: &str| {
        record_refused(&pi.metrics, "destination", parties(), flags, start, reason)
    };
    if let Decision::Deny(why) = rbac::authorize(snap.policies_for(&dst_w), &conn) {
        return refused(ResponseFlags::Deny, &why);
    }
    let mut upstream = match pi.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            return refused(
                ResponseFlags::ConnectFailure,
                &format!("upstream connect failed: {e}"),
            )
        }
    };
    let record = ConnectionRecord::open(&pi.metrics, "destination", parties());
    let guard = pi.tracker.track(conn, dst_w.uid.clone());
    let result = tokio::select! {
        r = copy_tcp(&mut stream, &mut upstream, &record.counters) => r.map_err(|e| e.to_string()),
        _ = guard.cancel.cancelled() => Err("closed: no longer allowed by policy".to_string()),
    };
    record.close(result);
}
