//! Request metrics with Istio's standard names and labels
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`), and for opaque TCP
//! connections Istio's TCP metrics (`istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total`,
//! `istio_tcp_sent_bytes_total`), reported as `reporter="waypoint"`, so
//! existing Istio dashboards work unchanged.
//!
//! Recording a request is on every request's path, so it costs at most
//! one hash lookup (foldhash, randomly seeded per process, rather than
//! SipHash, which showed in profiles): the four metrics' handles are
//! cached per label set ([`Metrics::handles`]), and a connection keeps the
//! handles its last request used (`record::LastSeries`), which its next
//! request mostly reuses without building or hashing labels. The
//! labels that describe a peer (workload, namespace, principal, canonical
//! service) are built once per downstream connection or endpoint and
//! shared ([`PeerLabels`]). Labels that follow from others (the service's
//! name and namespace, from its host) or never vary here (the source's
//! canonical service, app, version, cluster) are only written out when
//! the metrics are encoded.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, RwLock};

use prometheus_client::encoding::{
    EncodeLabelKey, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::runtime::WorkloadMetadata;
use ztunnel::identity::Identity;
use ztunnel::state::Workload;

/// Istio's labels of the request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub peers: PeerPair,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Istio's labels of the TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub peers: PeerPair,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// The labels both label sets carry: who talked to whom, through which
/// service, reported by the waypoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PeerPair {
    pub source: PeerLabels,
    pub destination: PeerLabels,
    /// A service host (`name.ns.svc.<domain>`), or `unknown`.
    pub destination_service: String,
    pub request_protocol: &'static str,
}

fn label(e: &mut LabelSetEncoder, key: &str, value: &impl EncodeLabelValue) -> fmt::Result {
    let mut l = e.encode_label();
    let mut k = l.encode_label_key()?;
    EncodeLabelKey::encode(&key, &mut k)?;
    let mut v = k.encode_label_value()?;
    EncodeLabelValue::encode(value, &mut v)?;
    v.finish()
}

impl PeerPair {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        let (service_name, service_namespace) = service_name_namespace(&self.destination_service);
        let (src, dst) = (&self.source, &self.destination);
        label(e, "reporter", &"waypoint")?;
        label(e, "source_workload", &src.workload.as_str())?;
        label(e, "source_workload_namespace", &src.namespace.as_str())?;
        label(e, "source_principal", &src.principal.as_str())?;
        let c = &src.canonical;
        label(e, "source_canonical_service", &c.service.as_str())?;
        label(e, "source_canonical_revision", &c.revision.as_str())?;
        label(e, "source_app", &c.app.as_str())?;
        label(e, "source_version", &c.version.as_str())?;
        label(e, "source_cluster", &c.cluster.as_str())?;
        label(e, "destination_workload", &dst.workload.as_str())?;
        label(e, "destination_workload_namespace", &dst.namespace.as_str())?;
        label(e, "destination_principal", &dst.principal.as_str())?;
        let c = &dst.canonical;
        label(e, "destination_app", &c.app.as_str())?;
        label(e, "destination_version", &c.version.as_str())?;
        label(e, "destination_service", &self.destination_service)?;
        label(e, "destination_service_name", &service_name)?;
        label(e, "destination_service_namespace", &service_namespace)?;
        label(e, "destination_canonical_service", &c.service.as_str())?;
        label(e, "destination_canonical_revision", &c.revision.as_str())?;
        label(e, "destination_cluster", &c.cluster.as_str())?;
        label(e, "request_protocol", &self.request_protocol)
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, mut e: LabelSetEncoder) -> fmt::Result {
        self.peers.encode(&mut e)?;
        label(&mut e, "response_code", &self.response_code)?;
        label(&mut e, "grpc_response_status", &self.grpc_response_status)?;
        label(&mut e, "response_flags", &self.response_flags)?;
        label(
            &mut e,
            "connection_security_policy",
            &self.connection_security_policy,
        )
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, mut e: LabelSetEncoder) -> fmt::Result {
        self.peers.encode(&mut e)?;
        label(&mut e, "response_flags", &self.response_flags)?;
        label(
            &mut e,
            "connection_security_policy",
            &self.connection_security_policy,
        )
    }
}

/// The Service of an Istio cluster name (`outbound|80||echo.demo.svc.cluster.local`),
/// or the name itself.
pub fn service_of_cluster(name: &str) -> &str {
    let mut parts = name.splitn(4, '|');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("outbound" | "inbound"), Some(_), Some(_), Some(host)) if !host.is_empty() => host,
        _ => name,
    }
}

/// Istio's `destination_service_name` and `destination_service_namespace`
/// of a service host: a Kubernetes Service's `name.ns.svc.<domain>` gives
/// both; any other host (a ServiceEntry's, a cluster Istio did not name)
/// is its own name, in no known namespace.
pub fn service_name_namespace(host: &str) -> (&str, &str) {
    let mut parts = host.splitn(4, '.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        _ if host.is_empty() => ("unknown", "unknown"),
        (Some(name), Some(ns), Some("svc"), Some(domain))
            if !name.is_empty() && !ns.is_empty() && !domain.is_empty() =>
        {
            (name, ns)
        }
        _ => (host, "unknown"),
    }
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
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PeerLabels {
    pub workload: Arc<String>,
    pub namespace: Arc<String>,
    pub principal: Arc<String>,
    pub canonical: Arc<Canonical>,
}

/// Istio's canonical service and revision of a workload, and the labels
/// told with them: app, version, cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Canonical {
    pub service: String,
    pub revision: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl Canonical {
    /// A destination without metadata.
    fn unknown() -> Arc<Canonical> {
        static UNKNOWN: LazyLock<Arc<Canonical>> = LazyLock::new(|| {
            Arc::new(Canonical {
                service: "unknown".into(),
                revision: "unknown".into(),
                app: "unknown".into(),
                version: "unknown".into(),
                cluster: "unknown".into(),
            })
        });
        UNKNOWN.clone()
    }

    /// A client known by its certificate alone: what Istio's waypoint
    /// reports without the client's peer metadata.
    fn unknown_source() -> Arc<Canonical> {
        static UNKNOWN: LazyLock<Arc<Canonical>> = LazyLock::new(|| {
            Arc::new(Canonical {
                revision: "latest".into(),
                ..(*Canonical::unknown()).clone()
            })
        });
        UNKNOWN.clone()
    }
}

fn unknown(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("unknown").to_string()
}

fn or_unknown(s: Option<&str>) -> Arc<String> {
    Arc::new(unknown(s))
}

impl PeerLabels {
    /// A client known by its certificate: its service account stands for
    /// the workload, as Istio reports when it has no workload metadata.
    pub fn source(id: Option<&Identity>) -> Self {
        PeerLabels {
            workload: or_unknown(id.map(|s| s.service_account.as_str())),
            namespace: or_unknown(id.map(|s| s.namespace.as_str())),
            principal: or_unknown(id.map(ToString::to_string).as_deref()),
            canonical: Canonical::unknown_source(),
        }
    }

    /// A client known by the control plane's workload discovery (`id`:
    /// its certificate's identity, if it has one). App and version are
    /// its canonical service and revision, as Istio's waypoint derives
    /// them from the same source.
    pub fn source_workload(w: &Workload, id: Option<&Identity>) -> Self {
        let service = unknown(Some(&w.canonical_name));
        let revision = Some(w.canonical_revision.as_str())
            .filter(|r| !r.is_empty())
            .unwrap_or("latest")
            .to_string();
        PeerLabels {
            workload: or_unknown(Some(w.metrics_name())),
            namespace: or_unknown(Some(&w.namespace)),
            principal: or_unknown(id.map(ToString::to_string).as_deref()),
            canonical: Arc::new(Canonical {
                app: service.clone(),
                version: revision.clone(),
                service,
                revision,
                cluster: w.cluster().to_string(),
            }),
        }
    }

    /// An endpoint known by its metadata: `workload` and `namespace` as
    /// [`WorkloadMetadata::parse`] reads them. Its app and version are
    /// not in it: Istio reports them unknown from a waypoint too.
    pub fn destination(
        workload: Option<&str>,
        namespace: Option<&str>,
        id: Option<&Identity>,
    ) -> Self {
        let w = WorkloadMetadata::parse(workload, namespace);
        PeerLabels {
            workload: or_unknown(w.name),
            namespace: or_unknown(w.namespace),
            principal: or_unknown(id.map(ToString::to_string).as_deref()),
            canonical: Arc::new(Canonical {
                service: unknown(w.canonical_service),
                revision: unknown(w.canonical_revision),
                cluster: unknown(w.cluster),
                ..(*Canonical::unknown()).clone()
            }),
        }
    }

    /// Nothing known (no endpoint was reached).
    pub fn unknown() -> Self {
        Self::destination(None, None, None)
    }
}

/// The handles of one label set's metrics (clones share the values).
#[derive(Clone)]
pub struct Handles {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Handles {
    /// Counts one request and observes its duration and sizes.
    pub fn observe(&self, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.inc();
        self.duration_ms.observe(duration_ms);
        self.request_bytes.observe(req_bytes as f64);
        self.response_bytes.observe(resp_bytes as f64);
    }
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

    /// The handles of `labels`' series, created on first use.
    pub fn handles(&self, labels: RequestLabels) -> Handles {
        if let Some(h) = self.handles.read().expect("metrics lock").get(&labels) {
            return h.clone();
        }
        let h = Handles {
            requests: self.requests.get_or_create(&labels).clone(),
            duration_ms: self.duration_ms.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&labels).clone(),
        };
        self.handles
            .write()
            .expect("metrics lock")
            .insert(labels, h.clone());
        h
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn service_of_cluster() {
        use super::service_of_cluster as s;
        assert_eq!(
            s("outbound|80||echo.demo.svc.cluster.local"),
            "echo.demo.svc.cluster.local"
        );
        assert_eq!(
            s("outbound|80|v1|echo.demo.svc.cluster.local"),
            "echo.demo.svc.cluster.local"
        );
        assert_eq!(s("backend"), "backend");
        assert_eq!(s("a|b"), "a|b");
    }

    #[test]
    fn service_name_and_namespace_of_a_host() {
        let s = service_name_namespace;
        assert_eq!(s("echo.demo.svc.cluster.local"), ("echo", "demo"));
        assert_eq!(s("echo.demo.svc.example.org"), ("echo", "demo"));
        // Not a Kubernetes Service's host: the host is the name.
        assert_eq!(s("api.example.com"), ("api.example.com", "unknown"));
        assert_eq!(s("echo.demo.svc"), ("echo.demo.svc", "unknown"));
        assert_eq!(
            s(".demo.svc.cluster.local"),
            (".demo.svc.cluster.local", "unknown")
        );
        assert_eq!(s("backend"), ("backend", "unknown"));
        assert_eq!(s("unknown"), ("unknown", "unknown"));
        assert_eq!(s(""), ("unknown", "unknown"));
    }

    #[test]
    fn destination_labels_from_istios_endpoint_metadata() {
        let d = PeerLabels::destination(Some("echo-v1;demo;echo;v1;Kubernetes"), None, None);
        assert_eq!(
            (d.workload.as_str(), d.namespace.as_str()),
            ("echo-v1", "demo")
        );
        assert_eq!(
            (
                d.canonical.service.as_str(),
                d.canonical.revision.as_str(),
                d.canonical.cluster.as_str(),
                d.canonical.app.as_str()
            ),
            ("echo", "v1", "Kubernetes", "unknown")
        );
        let old = PeerLabels::destination(Some("echo-v1"), Some("demo"), None);
        assert_eq!(
            (old.workload.as_str(), old.namespace.as_str()),
            ("echo-v1", "demo")
        );
        assert_eq!(*old.canonical, *Canonical::unknown());
        let bad = PeerLabels::destination(Some("a;b"), Some("demo"), None);
        assert_eq!(
            (bad.workload.as_str(), bad.namespace.as_str()),
            ("unknown", "unknown")
        );
    }

    #[test]
    fn encoded_labels_include_istios_derived_and_fixed_ones() {
        let m = Metrics::new();
        let src = PeerLabels::source(None);
        // Built twice: equal labels in separate Arcs are one series.
        for _ in 0..2 {
            let dst = PeerLabels::destination(Some("echo-v1;demo;echo;v1;Kubernetes"), None, None);
            let labels = RequestLabels {
                peers: PeerPair {
                    source: src.clone(),
                    destination: dst,
                    destination_service: "echo.demo.svc.cluster.local".into(),
                    request_protocol: "http",
                },
                response_code: 200,
                grpc_response_status: String::new(),
                response_flags: "-",
                connection_security_policy: "mutual_tls",
            };
            m.handles(labels).observe(1.0, 0, 0);
        }
        let out = m.encode();
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        let line = lines[0];
        assert!(line.ends_with(" 2"), "{line}");
        for want in [
            "reporter=\"waypoint\"",
            "source_canonical_service=\"unknown\"",
            "source_canonical_revision=\"latest\"",
            "source_app=\"unknown\"",
            "source_version=\"unknown\"",
            "source_cluster=\"unknown\"",
            "destination_workload=\"echo-v1\"",
            "destination_workload_namespace=\"demo\"",
            "destination_service=\"echo.demo.svc.cluster.local\"",
            "destination_service_name=\"echo\"",
            "destination_service_namespace=\"demo\"",
            "destination_canonical_service=\"echo\"",
            "destination_canonical_revision=\"v1\"",
            "destination_app=\"unknown\"",
            "destination_version=\"unknown\"",
            "destination_cluster=\"Kubernetes\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
    }
}
