//! Prometheus metrics with Istio's standard TCP names and labels, so that
//! existing Istio dashboards work unchanged.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::state::Workload;

/// Istio's `istio_tcp_*` label set. Values Istio would leave unknown are
/// "unknown".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

/// Istio's `response_flags`: why a connection was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlags {
    None,
    /// Denied by an authorization policy.
    Deny,
    /// The upstream connection could not be established.
    ConnectFailure,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::ConnectFailure => "CONNECT",
        }
    }
}

fn or_unknown(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or(UNKNOWN).to_string()
}

/// The service a connection was addressed to, when it went through a VIP.
#[derive(Clone, Debug, Default)]
pub struct ServiceRef {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

impl From<&crate::state::Service> for ServiceRef {
    fn from(s: &crate::state::Service) -> Self {
        ServiceRef {
            hostname: s.hostname.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }
    }
}

impl TcpLabels {
    pub fn new(
        reporter: &'static str,
        src: Option<&Workload>,
        src_id: Option<&Identity>,
        dst: Option<&Workload>,
        dst_id: Option<&Identity>,
        svc: Option<&ServiceRef>,
        mtls: bool,
    ) -> Self {
        let principal = |id: Option<&Identity>| or_unknown(id.map(|i| i.to_string()).as_deref());
        TcpLabels {
            reporter,
            source_workload: or_unknown(src.map(Workload::metrics_name)),
            source_canonical_service: or_unknown(src.map(|w| w.canonical_name.as_str())),
            source_canonical_revision: or_unknown(src.map(|w| w.canonical_revision.as_str())),
            source_workload_namespace: or_unknown(src.map(|w| w.namespace.as_str())),
            source_principal: principal(src_id),
            source_app: or_unknown(src.and_then(|w| w.labels.get("app")).map(String::as_str)),
            source_version: or_unknown(
                src.and_then(|w| w.labels.get("version"))
                    .map(String::as_str),
            ),
            source_cluster: or_unknown(src.map(Workload::cluster)),
            destination_service: or_unknown(svc.map(|s| s.hostname.as_str())),
            destination_service_namespace: or_unknown(svc.map(|s| s.namespace.as_str())),
            destination_service_name: or_unknown(svc.map(|s| s.name.as_str())),
            destination_workload: or_unknown(dst.map(Workload::metrics_name)),
            destination_canonical_service: or_unknown(dst.map(|w| w.canonical_name.as_str())),
            destination_canonical_revision: or_unknown(dst.map(|w| w.canonical_revision.as_str())),
            destination_workload_namespace: or_unknown(dst.map(|w| w.namespace.as_str())),
            destination_principal: principal(dst_id),
            destination_app: or_unknown(dst.and_then(|w| w.labels.get("app")).map(String::as_str)),
            destination_version: or_unknown(
                dst.and_then(|w| w.labels.get("version"))
                    .map(String::as_str),
            ),
            destination_cluster: or_unknown(dst.map(Workload::cluster)),
            request_protocol: "tcp",
            response_flags: ResponseFlags::None.as_str(),
            connection_security_policy: if mtls { "mutual_tls" } else { "unknown" },
        }
    }
}

/// The four `istio_tcp_*` counters of one label set.
#[derive(Clone)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
}

pub struct Metrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    /// The counters of every label set seen, so that a connection hashes
    /// its labels once rather than once per family (the label set is two
    /// dozen strings; hashing it four times was a few percent of the CPU a
    /// short connection costs). It holds what the families hold already:
    /// label sets are never dropped from either.
    tcp: Mutex<HashMap<TcpLabels, TcpCounters>>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("istio");
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent_bytes = Family::<TcpLabels, Counter>::default();
        let received_bytes = Family::<TcpLabels, Counter>::default();
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            sent_bytes.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            received_bytes.clone(),
        );
        Metrics {
            opened,
            closed,
            sent_bytes,
            received_bytes,
            tcp: Mutex::default(),
            registry,
        }
    }

    /// The counters of `labels`, created at first use.
    pub fn tcp(&self, labels: TcpLabels) -> TcpCounters {
        let mut cache = self.tcp.lock().expect("metrics lock");
        if let Some(c) = cache.get(&labels) {
            return c.clone();
        }
        let c = TcpCounters {
            opened: self.opened.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            sent_bytes: self.sent_bytes.get_or_create(&labels).clone(),
            received_bytes: self.received_bytes.get_or_create(&labels).clone(),
        };
        cache.insert(labels, c.clone());
        c
    }

    /// Counts a connection refused with `flags`: opened under `labels`,
    /// and closed under the same labels with `flags` set, as Istio's
    /// ztunnel does (its byte counters are never created: it moved none).
    pub fn count_refused(&self, mut labels: TcpLabels, flags: ResponseFlags) {
        self.opened.get_or_create(&labels).inc();
        labels.response_flags = flags.as_str();
        self.closed.get_or_create(&labels).inc();
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
    use super::*;

    fn labels(dst: &str) -> TcpLabels {
        let mut l = TcpLabels::new("source", None, None, None, None, None, true);
        l.destination_workload = dst.into();
        l
    }

    #[test]
    fn a_label_set_gets_the_same_counters_each_time_and_they_are_exported() {
        let m = Metrics::new();
        m.tcp(labels("a")).opened.inc();
        m.tcp(labels("a")).opened.inc();
        m.tcp(labels("b")).closed.inc();
        m.tcp(labels("a")).received_bytes.inc_by(5);
        assert_eq!(m.opened.get_or_create(&labels("a")).get(), 2);
        assert_eq!(m.opened.get_or_create(&labels("b")).get(), 0);
        assert_eq!(m.closed.get_or_create(&labels("b")).get(), 1);
        assert_eq!(m.received_bytes.get_or_create(&labels("a")).get(), 5);
        let text = m.encode();
        assert!(
            text.contains("destination_workload=\"a\"") && text.contains("} 2"),
            "{text}"
        );
    }

    /// Runs `f` with the access log captured; returns what was logged.
    fn capture_log(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, f);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    fn parties<'a>(id: &'a Identity) -> crate::proxy::connection::Parties<'a> {
        crate::proxy::connection::Parties {
            src: "10.0.0.1:4711".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            src_workload: None,
            src_identity: Some(id),
            dst_workload: None,
            dst_identity: None,
            service: None,
            mtls: true,
        }
    }

    #[test]
    fn a_connection_dropped_without_its_close_is_still_closed_and_logged() {
        use crate::proxy::connection::ConnectionRecord;
        let m = std::sync::Arc::new(Metrics::new());
        let id = Identity::new("cluster.local", "ns", "sa");
        let labels = parties(&id).labels("destination");
        let log = capture_log(|| {
            let record = ConnectionRecord::open(&m, "destination", parties(&id));
            record.counters.add_from_client(3);
            // The drain timeout ends the task: the record is dropped.
            drop(record);
        });
        assert_eq!(m.opened.get_or_create(&labels).get(), 1);
        assert_eq!(m.closed.get_or_create(&labels).get(), 1);
        assert!(
            log.contains("connection complete")
                && log.contains("bytes_recv=3")
                && log.contains("cut by the drain timeout"),
            "{log}"
        );
        // Outbound, the client's bytes are the ones sent on (Istio's
        // orientation).
        let log = capture_log(|| {
            let record = ConnectionRecord::open(&m, "source", parties(&id));
            record.counters.add_from_client(5);
            record.counters.add_to_client(7);
            record.close(Ok(()));
        });
        assert!(
            log.contains("direction=\"outbound\"")
                && log.contains("bytes_sent=5")
                && log.contains("bytes_recv=7"),
            "{log}"
        );
        // A close recorded explicitly is not recorded again on drop.
        let log = capture_log(|| {
            ConnectionRecord::open(&m, "destination", parties(&id)).close(Ok(()));
        });
        assert_eq!(m.closed.get_or_create(&labels).get(), 2);
        assert_eq!(log.matches("connection complete").count(), 1, "{log}");
    }

    #[test]
    fn refused_connections_count_with_istio_response_flags() {
        use crate::proxy::connection::record_refused;
        let m = Metrics::new();
        let id = Identity::new("cluster.local", "ns", "sa");
        let log = capture_log(|| {
            for flags in [ResponseFlags::Deny, ResponseFlags::ConnectFailure] {
                record_refused(
                    &m,
                    "destination",
                    parties(&id),
                    flags,
                    std::time::Instant::now(),
                    "no ALLOW policy matched",
                );
            }
        });
        let text = m.encode();
        let opened = |flags: &str| {
            text.lines()
                .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
                .filter(|l| l.contains(&format!("response_flags=\"{flags}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        let closed = |flags: &str| {
            text.lines()
                .filter(|l| l.starts_with("istio_tcp_connections_closed_total"))
                .filter(|l| l.contains(&format!("response_flags=\"{flags}\"")))
                .filter(|l| l.contains("source_principal=\"spiffe://cluster.local/ns/ns/sa/sa\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        // As Istio: opened without a flag, closed with it.
        assert_eq!(opened("-"), 2, "{text}");
        assert_eq!(closed("DENY"), 1, "{text}");
        assert_eq!(closed("CONNECT"), 1, "{text}");
        assert_eq!(closed("-"), 0, "{text}");
        assert!(
            log.contains("connection refused")
                && log.contains("response_flags=\"DENY\"")
                && log.contains("src.identity=spiffe://cluster.local/ns/ns/sa/sa")
                && log.contains("no ALLOW policy matched"),
            "{log}"
        );
    }

    fn pod(name: &str, workload_name: &str, cluster_id: &str) -> Workload {
        Workload {
            uid: format!("c//Pod/ns/{name}"),
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            trust_domain: "cluster.local".into(),
            node: "n".into(),
            addresses: vec![],
            protocol: Default::default(),
            status: Default::default(),
            labels: Default::default(),
            services: vec![],
            authorization_policies: vec![],
            canonical_name: "echo".into(),
            canonical_revision: "v1".into(),
            workload_name: workload_name.into(),
            cluster_id: cluster_id.into(),
            waypoint: None,
        }
    }

    #[test]
    fn workload_labels_name_the_controller_and_cluster_as_istio_does() {
        let src = pod("client-7d4b9c-x2x9q", "client", "east");
        let dst = pod("echo-0", "", "");
        let l = TcpLabels::new("source", Some(&src), None, Some(&dst), None, None, true);
        assert_eq!(l.source_workload, "client");
        assert_eq!(l.source_cluster, "east");
        // Not known: the pod name and Istio's default cluster.
        assert_eq!(l.destination_workload, "echo-0");
        assert_eq!(l.destination_cluster, "Kubernetes");
        let none = TcpLabels::new("source", None, None, None, None, None, true);
        assert_eq!(none.source_workload, "unknown");
        assert_eq!(none.source_cluster, "unknown");
    }
}
