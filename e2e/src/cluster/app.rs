//! An application pod of the cluster: a test-bed pod plus what Kubernetes
//! would know about it (namespace, service account, labels).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::Pod;

/// The trust domain of the cluster's identities.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// One application pod. Cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    pub name: String,
    pub namespace: String,
    /// Its service account (identity `spiffe://cluster.local/ns/<ns>/sa/<sa>`).
    pub sa: String,
    /// Its labels, as in its Pod manifest (services select on them).
    pub labels: BTreeMap<String, String>,
    pub pod: Pod,
}

impl App {
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ipv4()
    }
    pub fn node(&self) -> &str {
        self.pod.node()
    }
    /// `shop/frontend`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    pub fn spiffe(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.sa
        )
    }
    /// The pod's IPv4 address with `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip()), port)
    }
    /// The pod uid the CNI plugin passes on (`K8S_POD_UID`).
    pub fn uid(&self) -> String {
        format!("uid-{}-{}", self.namespace, self.name)
    }
    /// The value of label `k`, or "".
    pub fn label(&self, k: &str) -> &str {
        self.labels.get(k).map(String::as_str).unwrap_or("")
    }
}

/// `[("app", "x")]` as a label map.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
