//! One request's telemetry: the Istio metrics and the access-log line,
//! written once, when the response body ends (or is abandoned), so the
//! duration and byte counts cover the whole exchange.
//!
//! The record rides inside the response body's frame mapper: it counts
//! bytes (and picks up `grpc-status` from trailers) as frames pass, and
//! its `Drop` writes everything out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;

use crate::metrics::{Metrics, RequestLabels};
use crate::upstream::Body;
use ztunnel::identity::Identity;

/// What is known of a request by the time its response starts.
pub struct RequestInfo {
    pub start: Instant,
    pub method: Method,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub source: Option<Identity>,
    pub source_ip: std::net::IpAddr,
    pub destination: SocketAddr,
    pub route: String,
    pub cluster: String,
    pub endpoint: Option<SocketAddr>,
    pub destination_workload: Option<String>,
    pub destination_namespace: Option<String>,
    pub destination_principal: Option<Identity>,
    pub flags: &'static str,
    pub attempts: u32,
    pub request_bytes: Arc<AtomicU64>,
}

struct Record {
    info: RequestInfo,
    status: StatusCode,
    grpc_status: Option<String>,
    response_bytes: u64,
    metrics: Arc<Metrics>,
}

fn or_unknown(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("unknown").to_string()
}

impl Drop for Record {
    fn drop(&mut self) {
        let i = &self.info;
        let duration = i.start.elapsed();
        let src = i.source.as_ref();
        let labels = RequestLabels {
            reporter: "waypoint",
            source_workload: or_unknown(src.map(|s| s.service_account.as_str())),
            source_workload_namespace: or_unknown(src.map(|s| s.namespace.as_str())),
            source_principal: or_unknown(src.map(ToString::to_string).as_deref()),
            destination_workload: or_unknown(i.destination_workload.as_deref()),
            destination_workload_namespace: or_unknown(i.destination_namespace.as_deref()),
            destination_principal: or_unknown(
                i.destination_principal
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref(),
            ),
            destination_service: or_unknown(Some(i.authority.as_str())),
            destination_cluster: "unknown".into(),
            request_protocol: i.protocol,
            response_code: self.status.as_u16(),
            grpc_response_status: self.grpc_status.clone().unwrap_or_default(),
            response_flags: i.flags,
            connection_security_policy: "mutual_tls",
        };
        let req_bytes = i.request_bytes.load(Ordering::Relaxed);
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .duration_ms
            .get_or_create(&labels)
            .observe(duration.as_secs_f64() * 1000.0);
        self.metrics
            .request_bytes
            .get_or_create(&labels)
            .observe(req_bytes as f64);
        self.metrics
            .response_bytes
            .get_or_create(&labels)
            .observe(self.response_bytes as f64);
        tracing::info!(
            target: "access",
            src_addr = %i.source_ip,
            src_principal = %labels.source_principal,
            dst_addr = %i.destination,
            method = %i.method,
            authority = %i.authority,
            path = %i.path,
            protocol = i.protocol,
            status = self.status.as_u16(),
            grpc_status = self.grpc_status.as_deref().unwrap_or("-"),
            route = %i.route,
            cluster = %i.cluster,
            upstream = %i.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            attempts = i.attempts,
            flags = i.flags,
            bytes_received = req_bytes,
            bytes_sent = self.response_bytes,
            duration_ms = duration.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// Attaches the record to `body`; it is written when the body is done.
pub fn attach(
    metrics: Arc<Metrics>,
    info: RequestInfo,
    status: StatusCode,
    grpc_status: Option<String>,
    body: Body,
) -> Body {
    let mut rec = Record {
        info,
        status,
        grpc_status,
        response_bytes: 0,
        metrics,
    };
    body.map_frame(move |f: Frame<Bytes>| {
        // Names `rec` whole, so the closure owns it (and its Drop).
        let rec = &mut rec;
        if let Some(d) = f.data_ref() {
            rec.response_bytes += d.len() as u64;
        } else if let Some(t) = f.trailers_ref() {
            if let Some(g) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                rec.grpc_status = Some(g.to_string());
            }
        }
        f
    })
    .boxed_unsync()
}
