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
            source_workload: or_unknown(src.map(|w| w.name.as_str())),
            source_canonical_service: or_unknown(src.map(|w| w.canonical_name.as_str())),
            source_canonical_revision: or_unknown(src.map(|w| w.canonical_revision.as_str())),
            source_workload_namespace: or_unknown(src.map(|w| w.namespace.as_str())),
            source_principal: principal(src_id),
            source_app: or_unknown(src.and_then(|w| w.labels.get("app")).map(String::as_str)),
            source_version: or_unknown(
                src.and_then(|w| w.labels.get("version"))
                    .map(String::as_str),
            ),
            source_cluster: or_unknown(src.map(|_| "Kubernetes")),
            destination_service: or_unknown(svc.map(|s| s.hostname.as_str())),
            destination_service_namespace: or_unknown(svc.map(|s| s.namespace.as_str())),
            destination_service_name: or_unknown(svc.map(|s| s.name.as_str())),
            destination_workload: or_unknown(dst.map(|w| w.name.as_str())),
            destination_canonical_service: or_unknown(dst.map(|w| w.canonical_name.as_str())),
            destination_canonical_revision: or_unknown(dst.map(|w| w.canonical_revision.as_str())),
            destination_workload_namespace: or_unknown(dst.map(|w| w.namespace.as_str())),
            destination_principal: principal(dst_id),
            destination_app: or_unknown(dst.and_then(|w| w.labels.get("app")).map(String::as_str)),
            destination_version: or_unknown(
                dst.and_then(|w| w.labels.get("version"))
                    .map(String::as_str),
            ),
            destination_cluster: or_unknown(dst.map(|_| "Kubernetes")),
            request_protocol: "tcp",
            response_flags: "-",
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
}
