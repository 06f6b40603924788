//! One request's telemetry: the Istio metrics and the access-log line,
//! written once, when the response body ends (or is abandoned), so the
//! duration and byte counts cover the whole exchange.
//!
//! The record rides inside the response body ([`attach`]): it counts
//! bytes (and picks up `grpc-status` from trailers) as frames pass, and
//! its `Drop` writes everything out. A request that switched protocols
//! hands its record to the tunnel instead ([`TunnelRecord`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};

use crate::config::runtime::{ClusterConfig, Route};
use crate::metrics::{Handles, PeerPair, RequestLabels};
use crate::request_end::RouteTimeout;
use crate::serve::Downstream;
use crate::upstream::balancer::EndpointState;
use crate::upstream::connector::BoxError;
use crate::upstream::Body;

/// What is known of a request by the time its response starts. Shared
/// things (the connection, route, cluster, endpoint) are held, not copied:
/// names are only spelled out if the access log is on.
pub struct RequestInfo {
    pub start: Instant,
    pub method: Method,
    /// As received (the access log's path).
    pub uri: Uri,
    /// The request's host, lower-cased, without the port.
    pub authority: String,
    pub protocol: &'static str,
    pub downstream: Arc<Downstream>,
    pub route: Option<Arc<Route>>,
    pub cluster: Option<Arc<ClusterConfig>>,
    /// The endpoint that gave the response.
    pub endpoint: Option<Arc<EndpointState>>,
    pub flags: &'static str,
    pub attempts: u32,
    /// Bytes of the client's body, counted as they pass; made only for a
    /// request that has a body.
    pub request_bytes: Option<Arc<AtomicU64>>,
}

struct Record {
    info: RequestInfo,
    status: StatusCode,
    grpc_status: Option<String>,
    response_bytes: u64,
}

impl Drop for Record {
    fn drop(&mut self) {
        self.info.downstream.activity.end();
        let duration = self.info.start.elapsed();
        let req_bytes = self
            .info
            .request_bytes
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        self.access_log(duration, req_bytes);
        let i = &self.info;
        let grpc_status = self.grpc_status.take();
        i.downstream.last_series.observe(
            i,
            self.status,
            grpc_status,
            (
                duration.as_secs_f64() * 1000.0,
                req_bytes,
                self.response_bytes,
            ),
        );
    }
}

impl Record {
    /// The access-log line. Out of line: its two dozen fields are a lot of
    /// code, skipped at once when the log is off (the default), and inline
    /// they would sit among the metrics' code every request runs.
    #[inline(never)]
    fn access_log(&self, duration: std::time::Duration, req_bytes: u64) {
        let i = &self.info;
        let src = &i.downstream.source_labels;
        tracing::info!(
            target: "access",
            src_addr = %i.downstream.src_ip,
            src_principal = %src.principal,
            dst_addr = %i.downstream.dst,
            method = %i.method,
            authority = %i.authority,
            path = %i.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
            protocol = i.protocol,
            status = self.status.as_u16(),
            grpc_status = self.grpc_status.as_deref().unwrap_or("-"),
            route = %i.route.as_ref().map(|r| r.name.as_str()).unwrap_or("-"),
            cluster = %i.cluster.as_ref().map(|c| c.name.as_str()).unwrap_or("-"),
            upstream = %i.endpoint.as_ref().map(|e| e.config.address.to_string()).unwrap_or_else(|| "-".into()),
            attempts = i.attempts,
            flags = i.flags,
            bytes_received = req_bytes,
            bytes_sent = self.response_bytes,
            duration_ms = duration.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// The metric series a connection's requests went to last, and what chose
/// it. A connection's requests mostly share one label set, and telling
/// that by a few pointers spares hashing the labels' two dozen strings
/// per request. (Locked: a connection's HTTP/2 streams run as tasks of
/// their own, on its worker.)
#[derive(Default)]
pub struct LastSeries(Mutex<Option<(SeriesKey, Handles)>>);

/// What selects a request's labels besides its connection (the source
/// and the metrics): held, so that the same pointers mean the same
/// (immutable) values.
struct SeriesKey {
    endpoint: Option<Arc<EndpointState>>,
    cluster: Option<Arc<ClusterConfig>>,
    protocol: &'static str,
    code: StatusCode,
    grpc_status: Option<String>,
    flags: &'static str,
}

fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl LastSeries {
    /// Counts a request of this connection and observes its duration and
    /// sizes, in its series. Observed in place: a copy of the handles
    /// would take and release four references per request.
    fn observe(
        &self,
        i: &RequestInfo,
        code: StatusCode,
        grpc_status: Option<String>,
        (duration_ms, req_bytes, resp_bytes): (f64, u64, u64),
    ) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, h)) = last.as_ref() {
            if same(&k.endpoint, &i.endpoint)
                && same(&k.cluster, &i.cluster)
                && k.protocol == i.protocol
                && k.code == code
                && k.grpc_status == grpc_status
                && k.flags == i.flags
            {
                h.observe(duration_ms, req_bytes, resp_bytes);
                return;
            }
        }
        let metrics = &i.downstream.metrics;
        let dst = match &i.endpoint {
            Some(e) => &e.labels,
            None => &metrics.unknown_destination,
        };
        let labels = RequestLabels {
            peers: PeerPair {
                source: i.downstream.source_labels.clone(),
                destination: dst.clone(),
                // From the configuration, never from the client's Host: that
                // would let any client add series without bound.
                destination_service: i
                    .cluster
                    .as_ref()
                    .map(|c| crate::metrics::service_of_cluster(&c.name).to_string())
                    .unwrap_or_else(|| "unknown".into()),
                request_protocol: i.protocol,
            },
            response_code: code.as_u16(),
            grpc_response_status: grpc_status.clone().unwrap_or_default(),
            response_flags: i.flags,
            connection_security_policy: "mutual_tls",
        };
        let h = metrics.handles(labels);
        h.observe(duration_ms, req_bytes, resp_bytes);
        let key = SeriesKey {
            endpoint: i.endpoint.clone(),
            cluster: i.cluster.clone(),
            protocol: i.protocol,
            code,
            grpc_status,
            flags: i.flags,
        };
        *last = Some((key, h));
    }
}

/// Attaches the record to `body`; it is written when the body is done.
pub fn attach(
    info: RequestInfo,
    status: StatusCode,
    grpc_status: Option<String>,
    body: Body,
) -> Body {
    Recorded {
        inner: body,
        rec: Record {
            info,
            status,
            grpc_status,
            response_bytes: 0,
        },
    }
    .boxed_unsync()
}

/// A response body with its request's record: counts the bytes, picks up
/// `grpc-status` from trailers, and notes a body cut by the route timeout.
struct Recorded {
    inner: Body,
    rec: Record,
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let rec = &mut this.rec;
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    rec.response_bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    if let Some(g) = t
                        .get(crate::serve::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                    {
                        rec.grpc_status = Some(g.to_string());
                    }
                }
            }
            Poll::Ready(Some(Err(e))) if e.is::<RouteTimeout>() => rec.info.flags = "UT",
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The record of a request that switched protocols (WebSocket): written
/// when its tunnel ends, so its duration and bytes cover the tunnel.
pub struct TunnelRecord(Record);

impl TunnelRecord {
    /// Bytes the tunnel carried: to the backend, and to the client.
    pub fn add(&mut self, to_upstream: u64, to_client: u64) {
        self.0
            .info
            .request_bytes
            .get_or_insert_with(Default::default)
            .fetch_add(to_upstream, Ordering::Relaxed);
        self.0.response_bytes += to_client;
    }
}

pub fn for_tunnel(info: RequestInfo, status: StatusCode) -> TunnelRecord {
    TunnelRecord(Record {
        info,
        status,
        grpc_status: None,
        response_bytes: 0,
    })
}
