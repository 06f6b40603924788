//! Workloads and services, shaped after Istio's workload API
//! (`istio.workload.Workload` / `istio.workload.Service`) so that the xDS
//! client can fill them field for field.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Protocol {
    /// In the mesh: reached over HBONE through its node's ztunnel.
    #[default]
    #[serde(rename = "HBONE")]
    Hbone,
    /// Known but not captured: reached with plain TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub protocol: Protocol,
    pub status: HealthStatus,
    pub labels: BTreeMap<String, String>,
    /// Keys (`namespace/hostname`) of the services this workload backs.
    pub services: Vec<String>,
    /// Keys (`namespace/name`) of workload-scoped policies selecting it.
    pub authorization_policies: Vec<String>,
    pub canonical_name: String,
    pub canonical_revision: String,
    /// The workload's controller as Istio names it (a pod's Deployment,
    /// say); empty if unknown. Metrics fall back to `name`.
    pub workload_name: String,
    /// The cluster the workload runs in; empty if unknown. Metrics fall
    /// back to Istio's default, "Kubernetes".
    pub cluster_id: String,
    /// The waypoint traffic addressed to this workload goes through
    /// (`istio.workload.Workload.waypoint`).
    pub waypoint: Option<Waypoint>,
}

/// The cluster Istio reports when a workload does not name one.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// `workload_name`, or the pod name when that is not known.
    pub fn metrics_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }

    /// `cluster_id`, or Istio's default when that is not known.
    pub fn cluster(&self) -> &str {
        if self.cluster_id.is_empty() {
            DEFAULT_CLUSTER_ID
        } else {
            &self.cluster_id
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    pub port: u16,
    /// 0 means "same as `port`".
    #[serde(default)]
    pub target_port: u16,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<Port>,
    /// The waypoint traffic to this service's VIPs goes through
    /// (`istio.workload.Service.waypoint`).
    pub waypoint: Option<Waypoint>,
}

impl Service {
    /// Istio's service key: `namespace/hostname`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The workload port that `port` on the VIP maps to; `None` when the
    /// service does not expose `port`.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port == port).map(|p| {
            if p.target_port == 0 {
                p.port
            } else {
                p.target_port
            }
        })
    }
}

/// Where a waypoint is (`istio.workload.GatewayAddress`): a service named by
/// `namespace/hostname`, or an address (a service VIP or a workload IP),
/// reached over HBONE on `hbone_port`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Waypoint {
    pub destination: WaypointDestination,
    pub hbone_port: u16,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub enum WaypointDestination {
    /// A service key, `namespace/hostname`.
    Service(String),
    Address(IpAddr),
}

/// The port waypoints listen on for HBONE when none is given.
pub const WAYPOINT_HBONE_PORT: u16 = 15008;
