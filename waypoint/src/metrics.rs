//! Request metrics with Istio's standard names and labels
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`), and for opaque TCP
//! connections Istio's TCP metrics (`istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total`,
//! `istio_tcp_sent_bytes_total`), reported as `reporter="waypoint"`, so
//! existing Istio dashboards work unchanged.
//!
//! Recording a request is on every request's path, so it costs one hash
//! lookup (foldhash, randomly seeded per process, rather than SipHash,
//! which showed in profiles): the four metrics' handles are cached per
//! label set, and the
//! labels that describe a peer (workload, namespace, principal) are built
//! once per downstream connection or endpoint and shared ([`PeerLabels`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use ztunnel::identity::Identity;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<String>,
    pub source_workload_namespace: Arc<String>,
    pub source_principal: Arc<String>,
    pub destination_workload: Arc<String>,
    pub destination_workload_namespace: Arc<String>,
    pub destination_principal: Arc<String>,
    pub destination_service: String,
    pub destination_cluster: &'static str,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Istio's labels of the TCP metrics: a connection's peers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<String>,
    pub source_workload_namespace: Arc<String>,
    pub source_principal: Arc<String>,
    pub destination_workload: Arc<String>,
    pub destination_workload_namespace: Arc<String>,
    pub destination_principal: Arc<String>,
    pub destination_service: String,
    pub destination_cluster: &'static str,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// The TCP metrics; a connection is counted opened when its upstream is
/// connected, closed with its byte counts when either side ends it.
#[derive(Default)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    /// From the client (Istio: "received during request").
    pub received_bytes: Family<TcpLabels, Counter>,
    /// To the client (Istio: "sent during response").
    pub sent_bytes: Family<TcpLabels, Counter>,
}

/// One side of a request as its labels name it; `unknown` where not known.
#[derive(Clone, Debug)]
pub struct PeerLabels {
    pub workload: Arc<String>,
    pub namespace: Arc<String>,
    pub principal: Arc<String>,
}

fn or_unknown(s: Option<&str>) -> Arc<String> {
    Arc::new(s.filter(|s| !s.is_empty()).unwrap_or("unknown").to_string())
}

impl PeerLabels {
    /// A client known by its certificate: its service account stands for
    /// the workload, as Istio reports when it has no workload metadata.
    pub fn source(id: Option<&Identity>) -> Self {
        PeerLabels {
            workload: or_unknown(id.map(|s| s.service_account.as_str())),
            namespace: or_unknown(id.map(|s| s.namespace.as_str())),
            principal: or_unknown(id.map(ToString::to_string).as_deref()),
        }
    }

    /// An endpoint known by its metadata.
    pub fn destination(
        workload: Option<&str>,
        namespace: Option<&str>,
        id: Option<&Identity>,
    ) -> Self {
        PeerLabels {
            workload: or_unknown(workload),
            namespace: or_unknown(namespace),
            principal: or_unknown(id.map(ToString::to_string).as_deref()),
        }
    }

    /// Nothing known (no endpoint was reached).
    pub fn unknown() -> Self {
        Self::destination(None, None, None)
    }
}

/// The handles of one label set's metrics (clones share the values).
#[derive(Clone)]
struct Handles {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration_ms: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    pub tcp: TcpMetrics,
    handles: RwLock<HashMap<RequestLabels, Handles, foldhash::quality::RandomState>>,
    /// Shared by requests whose endpoint is not known.
    pub unknown_destination: PeerLabels,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // Istio's default buckets for request duration.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("istio");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration_ms = Family::<RequestLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            bytes_histogram as fn() -> Histogram,
        );
        let response_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            bytes_histogram as fn() -> Histogram,
        );
        registry.register("requests", "Requests handled", requests.clone());
        registry.register(
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            duration_ms.clone(),
        );
        registry.register("request_bytes", "Request body sizes", request_bytes.clone());
        registry.register(
            "response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        let tcp = TcpMetrics::default();
        for (name, help, family) in [
            (
                "tcp_connections_opened",
                "TCP connections opened",
                &tcp.opened,
            ),
            (
                "tcp_connections_closed",
                "TCP connections closed",
                &tcp.closed,
            ),
            (
                "tcp_received_bytes",
                "Bytes received from TCP clients",
                &tcp.received_bytes,
            ),
            (
                "tcp_sent_bytes",
                "Bytes sent to TCP clients",
                &tcp.sent_bytes,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        Metrics {
            tcp,
            requests,
            duration_ms,
            request_bytes,
            response_bytes,
            handles: RwLock::default(),
            unknown_destination: PeerLabels::unknown(),
            registry,
        }
    }

    /// Counts one request and observes its duration and sizes.
    pub fn record(&self, labels: RequestLabels, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
        let observe = |h: &Handles| {
            h.requests.inc();
            h.duration_ms.observe(duration_ms);
            h.request_bytes.observe(req_bytes as f64);
            h.response_bytes.observe(resp_bytes as f64);
        };
        if let Some(h) = self.handles.read().expect("metrics lock").get(&labels) {
            return observe(h);
        }
        let h = Handles {
            requests: self.requests.get_or_create(&labels).clone(),
            duration_ms: self.duration_ms.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&labels).clone(),
        };
        observe(&h);
        self.handles
            .write()
            .expect("metrics lock")
            .insert(labels, h);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
