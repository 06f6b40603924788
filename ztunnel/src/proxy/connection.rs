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
use crate::metrics::{Metrics, ResponseFlags, ServiceRef, TcpLabels};
use crate::rbac::{self, Decision};
use crate::state::{Snapshot, Store, Workload};

/// One connection's metrics and access-log state, from the moment it is
/// established to its close. Its close is recorded exactly once: by
/// [`ConnectionRecord::close`], or, for a connection cut without one (the
/// drain timeout ended it, or its task was aborted), when it is dropped.
pub struct ConnectionRecord {
    start: Instant,
    log: LogFields,
    /// `istio_tcp_connections_closed_total` of this connection's labels.
    closed: Counter,
    pub counters: ByteCounters,
    recorded: bool,
}

/// The access-log `error` of a connection that ended without its close
/// being recorded.
pub const ENDED_UNFINISHED: &str = "closed: cut by the drain timeout or aborted";

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

impl Parties<'_> {
    /// The Istio labels of a connection between these parties.
    pub(crate) fn labels(&self, reporter: &'static str) -> TcpLabels {
        TcpLabels::new(
            reporter,
            self.src_workload,
            self.src_identity,
            self.dst_workload,
            self.dst_identity,
            self.service,
            self.mtls,
        )
    }
}

/// What an access-log line names besides bytes and outcome.
struct LogFields {
    direction: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    src_identity: Option<Identity>,
    dst_identity: Option<Identity>,
    src_workload: Option<String>,
    dst_workload: Option<String>,
    service: Option<String>,
}

impl LogFields {
    fn new(reporter: &'static str, p: &Parties<'_>) -> Self {
        LogFields {
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
        }
    }
}

impl LogFields {
    /// The access-log line: `bytes` is (to the client, from the client).
    /// Istio's ztunnel logs them from the reporter's side: inbound,
    /// `bytes_sent` went to the client; outbound, `bytes_sent` is what the
    /// client sent on (to its destination).
    fn write(&self, what: &str, start: Instant, bytes: (u64, u64), flags: &str, error: &str) {
        let (sent, recv) = match self.direction {
            "outbound" => (bytes.1, bytes.0),
            _ => bytes,
        };
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
            bytes_sent = sent,
            bytes_recv = recv,
            duration_ms = start.elapsed().as_millis() as u64,
            response_flags = flags,
            error,
            "{what}"
        );
    }
}

impl ConnectionRecord {
    /// `reporter` is Istio's: "source" for outbound, "destination" for
    /// inbound.
    pub fn open(metrics: &Arc<Metrics>, reporter: &'static str, p: Parties<'_>) -> Self {
        let tcp = metrics.tcp(p.labels(reporter));
        tcp.opened.inc();
        let counters = ByteCounters::new(tcp.received_bytes.clone(), tcp.sent_bytes.clone());
        ConnectionRecord {
            start: Instant::now(),
            log: LogFields::new(reporter, &p),
            closed: tcp.closed,
            counters,
            recorded: false,
        }
    }

    /// Counts the close and writes the access-log line.
    pub fn close(mut self, result: Result<(), String>) {
        self.record(result);
    }

    fn record(&mut self, result: Result<(), String>) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.closed.inc();
        let bytes = self.counters.totals();
        self.log.write(
            "connection complete",
            self.start,
            (bytes.to_client, bytes.from_client),
            "-",
            result.as_ref().err().map_or("-", String::as_str),
        );
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(Err(ENDED_UNFINISHED.to_string()));
        }
    }
}

/// Records a connection refused once its parties were known: denied by
/// policy ([`ResponseFlags::Deny`]) or unable to reach its upstream
/// ([`ResponseFlags::ConnectFailure`]). As Istio does, it counts as opened
/// and closed, the close with `flags` in `response_flags`, and it gets a
/// `connection refused` access-log line. `start` is when handling began.
pub fn record_refused(
    metrics: &Metrics,
    reporter: &'static str,
    p: Parties<'_>,
    flags: ResponseFlags,
    start: Instant,
    reason: &str,
) {
    metrics.count_refused(p.labels(reporter), flags);
    LogFields::new(reporter, &p).write("connection refused", start, (0, 0), flags.as_str(), reason);
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

/// Logs a connection refused before its parties were known (no route, no
/// original destination, a malformed request), so that every connection
/// attempt leaves one line. Istio counts no metrics for these either.
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
