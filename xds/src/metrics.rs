//! Control-plane metrics (Prometheus text via prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub type_url: String,
}

pub struct Metrics {
    registry: Registry,
    /// Responses a client rejected (NACK).
    pub nacks: Family<TypeLabel, Counter>,
    pub acks: Family<TypeLabel, Counter>,
    /// Responses sent.
    pub pushes: Family<TypeLabel, Counter>,
    pub connected: Gauge,
    /// Objects (or files) a source reported as invalid.
    pub source_errors: Counter,
    pub certs_issued: Counter,
    pub certs_denied: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            nacks: Family::default(),
            acks: Family::default(),
            pushes: Family::default(),
            connected: Gauge::default(),
            source_errors: Counter::default(),
            certs_issued: Counter::default(),
            certs_denied: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "xds_nacks",
            "xDS responses rejected by a client",
            m.nacks.clone(),
        );
        registry.register("xds_acks", "xDS responses acknowledged", m.acks.clone());
        registry.register("xds_pushes", "xDS responses sent", m.pushes.clone());
        registry.register(
            "xds_connected_clients",
            "open ADS streams",
            m.connected.clone(),
        );
        registry.register(
            "xds_source_errors",
            "invalid objects or files reported by a source",
            m.source_errors.clone(),
        );
        registry.register(
            "citadel_certs_issued",
            "certificates signed",
            m.certs_issued.clone(),
        );
        registry.register(
            "citadel_certs_denied",
            "certificate requests refused",
            m.certs_denied.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn nack_count(&self, type_url: &str) -> u64 {
        self.nacks
            .get_or_create(&TypeLabel {
                type_url: type_url.into(),
            })
            .get()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
