//! What happens around every proxied connection, whatever its path: the
//! Istio metrics, the access-log line, and (inbound) registration for
//! policy re-checks, so that a policy change closes connections it no
//! longer allows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::copy::ByteCounters;
use crate::identity::Identity;
use crate::metrics::{Metrics, ServiceRef, TcpLabels};
use crate::rbac::{self, Decision};
use crate::state::{Snapshot, Store, Workload};

/// One connection's metrics and access-log state, from the moment it is
/// established to its close.
pub struct ConnectionRecord {
    start: Instant,
    direction: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    src_identity: Option<Identity>,
    dst_identity: Option<Identity>,
    src_workload: Option<String>,
    dst_workload: Option<String>,
    service: Option<String>,
    /// `istio_tcp_connections_closed_total` of this connection's labels.
    closed: Counter,
    pub counters: ByteCounters,
}

/// The parties of a connection, as far as they are known.
pub struct Parties<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<&'a Workload>,
    pub src_identity: Option<&'a Identity>,
    pub dst_workload: Option<&'a Workload>,
    pub dst_identity: Option<&'a Identity>,
    pub service: Option<&'a ServiceRef>,
    pub mtls: bool,
}

impl ConnectionRecord {
    /// `reporter` is Istio's: "source" for outbound, "destination" for
    /// inbound.
    pub fn open(metrics: &Arc<Metrics>, reporter: &'static str, p: Parties<'_>) -> Self {
        let labels = TcpLabels::new(
            reporter,
            p.src_workload,
            p.src_identity,
            p.dst_workload,
            p.dst_identity,
            p.service,
            p.mtls,
        );
        let tcp = metrics.tcp(labels);
        tcp.opened.inc();
        let counters = ByteCounters::new(tcp.received_bytes.clone(), tcp.sent_bytes.clone());
        ConnectionRecord {
            start: Instant::now(),
            direction: if reporter == "source" {
                "outbound"
            } else {
                "inbound"
            },
            src: p.src,
            dst: p.dst,
            src_identity: p.src_identity.cloned(),
            dst_identity: p.dst_identity.cloned(),
            src_workload: p
                .src_workload
                .map(|w| format!("{}/{}", w.namespace, w.name)),
            dst_workload: p
                .dst_workload
                .map(|w| format!("{}/{}", w.namespace, w.name)),
            service: p.service.map(|s| s.hostname.clone()),
            closed: tcp.closed,
            counters,
        }
    }

    /// Counts the close and writes the access-log line.
    pub fn close(self, result: Result<(), String>) {
        self.closed.inc();
        let bytes = self.counters.totals();
        let error = result.err();
        info!(
            target: "access",
            direction = self.direction,
            src.addr = %self.src,
            src.workload = %OrDash(self.src_workload.as_ref()),
            src.identity = %OrDash(self.src_identity.as_ref()),
            dst.addr = %self.dst,
            dst.service = %OrDash(self.service.as_ref()),
            dst.workload = %OrDash(self.dst_workload.as_ref()),
            dst.identity = %OrDash(self.dst_identity.as_ref()),
            bytes_sent = bytes.to_client,
            bytes_recv = bytes.from_client,
            duration_ms = self.start.elapsed().as_millis() as u64,
            error = error.as_deref().unwrap_or("-"),
            "connection complete"
        );
    }
}

/// A value, or "-" for none, formatted straight into the log line.
struct OrDash<'a, T>(Option<&'a T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Logs a connection refused before it was established (denied, or no
/// route), so that every connection attempt leaves one line.
pub fn log_refused(direction: &'static str, src: SocketAddr, dst: SocketAddr, reason: &str) {
    info!(target: "access", direction, src.addr = %src, dst.addr = %dst, error = reason, "connection refused");
}

struct Tracked {
    conn: rbac::Connection,
    dst_uid: String,
    cancel: CancellationToken,
}

/// The open inbound connections, with what their authorization depended on.
#[derive(Default)]
pub struct ConnectionTracker {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

/// Removes the connection from the tracker when it ends.
pub struct TrackGuard {
    id: u64,
    tracker: Arc<ConnectionTracker>,
    pub cancel: CancellationToken,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        self.tracker
            .conns
            .lock()
            .expect("tracker lock")
            .remove(&self.id);
    }
}

impl ConnectionTracker {
    pub fn track(self: &Arc<Self>, conn: rbac::Connection, dst_uid: String) -> TrackGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.conns.lock().expect("tracker lock").insert(
            id,
            Tracked {
                conn,
                dst_uid,
                cancel: cancel.clone(),
            },
        );
        TrackGuard {
            id,
            tracker: self.clone(),
            cancel,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.lock().expect("tracker lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-authorizes every open connection against `snap`; closes those now
    /// denied. Returns how many were closed.
    pub fn recheck(&self, snap: &Snapshot) -> usize {
        let conns = self.conns.lock().expect("tracker lock");
        let mut closed = 0;
        for t in conns.values() {
            let Some(w) = snap.workloads.get(&t.dst_uid) else {
                continue;
            };
            if let Decision::Deny(why) = rbac::authorize(snap.policies_for(w), &t.conn) {
                info!(src = %t.conn.src_ip, dst = %t.conn.dst_ip, port = t.conn.dst_port, reason = %why, "closing connection no longer allowed by policy");
                t.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Re-checks on every state change, for as long as the store lives.
    pub async fn run(self: Arc<Self>, store: Arc<Store>) {
        let mut rx = store.subscribe();
        while rx.changed().await.is_ok() {
            self.recheck(&store.snapshot());
        }
    }
}
