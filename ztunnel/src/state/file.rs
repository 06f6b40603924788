//! The local state file: workloads, services and policies in YAML, for
//! running ztunnel without a control plane.
//!
//! ```yaml
//! workloads:
//!   - name: echo-v1
//!     namespace: default
//!     serviceAccount: echo          # default: "default"
//!     node: node-b
//!     addresses: [10.244.2.10, "fd00:244:2::10"]
//!     protocol: HBONE               # HBONE (default) or TCP
//!     status: Healthy               # Healthy (default) or Unhealthy
//!     labels: {app: echo, version: v1}
//!     services: [default/echo]      # namespace/name (or namespace/hostname)
//!     waypoint: {service: default/waypoint}   # optional, as on services
//! services:
//!   - name: echo
//!     namespace: default
//!     addresses: [10.96.0.10]       # the VIPs
//!     ports: [{port: 80, targetPort: 8080}]
//!     # Optional: traffic to the VIPs goes through this waypoint over
//!     # HBONE; `service` (namespace/name or namespace/hostname) or
//!     # `address` (a VIP or workload IP); hbonePort defaults to 15008.
//!     waypoint: {service: default/waypoint, hbonePort: 15008}
//! policies:                         # Istio L4 AuthorizationPolicy semantics
//!   - name: only-client
//!     namespace: default
//!     scope: WorkloadSelector       # Global | Namespace | WorkloadSelector
//!     selector: {app: echo}
//!     action: Allow                 # Allow | Deny
//!     rules:                        # any rule
//!       - clauses:                  # all clauses
//!           - matches:              # any match; within a match, all fields
//!               - principals: ["cluster.local/ns/default/sa/client"]
//!                 notDestinationPorts: [9090]
//! ```
//!
//! The file is polled rather than watched with inotify: a poll also sees
//! the symlink swap Kubernetes uses for ConfigMaps and an editor's
//! write-to-temp-then-rename, and costs one `stat` per interval.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Deserialize;
use tracing::{error, info};

use super::model::{
    HealthStatus, Port, Protocol, Service, Waypoint, WaypointDestination, Workload,
    WAYPOINT_HBONE_PORT,
};
use super::{Snapshot, Store};
use crate::rbac::{Action, Authorization, Rule, Scope};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub status: HealthStatus,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<LocalWaypoint>,
}

/// A waypoint reference: exactly one of `service` and `address`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWaypoint {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default = "default_hbone_port")]
    pub hbone_port: u16,
}

fn default_hbone_port() -> u16 {
    WAYPOINT_HBONE_PORT
}

/// Resolves a waypoint reference against the file's services; `what` names
/// the referring object for errors.
fn resolve_waypoint(
    wp: Option<&LocalWaypoint>,
    services: &[Service],
    what: &str,
) -> anyhow::Result<Option<Waypoint>> {
    let Some(wp) = wp else { return Ok(None) };
    let destination = match (&wp.service, wp.address) {
        (Some(reference), None) => {
            let svc = services
                .iter()
                .find(|s| {
                    *reference == format!("{}/{}", s.namespace, s.name) || *reference == s.key()
                })
                .ok_or_else(|| anyhow!("{what}: waypoint: no service {reference:?}"))?;
            WaypointDestination::Service(svc.key())
        }
        (None, Some(ip)) => WaypointDestination::Address(ip),
        _ => anyhow::bail!("{what}: waypoint: give exactly one of service and address"),
    };
    if wp.hbone_port == 0 {
        anyhow::bail!("{what}: waypoint: hbonePort must not be 0");
    }
    Ok(Some(Waypoint {
        destination,
        hbone_port: wp.hbone_port,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub hostname: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<Port>,
    #[serde(default)]
    pub waypoint: Option<LocalWaypoint>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

fn default_sa() -> String {
    "default".into()
}

impl LocalConfig {
    /// Resolves references and builds a snapshot. `trust_domain` and
    /// `cluster_domain` fill what the file leaves implicit.
    pub fn into_snapshot(self, trust_domain: &str) -> anyhow::Result<Snapshot> {
        let mut services: Vec<Service> = Vec::with_capacity(self.services.len());
        let mut service_waypoints = Vec::with_capacity(self.services.len());
        for s in self.services {
            services.push(Service {
                hostname: s
                    .hostname
                    .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", s.name, s.namespace)),
                name: s.name,
                namespace: s.namespace,
                addresses: s.addresses,
                ports: s.ports,
                waypoint: None,
            });
            service_waypoints.push(s.waypoint);
        }
        // Waypoints refer to services, so resolve them once all are known.
        for (i, wp) in service_waypoints.iter().enumerate() {
            let what = format!("services[{i}] ({})", services[i].key());
            services[i].waypoint = resolve_waypoint(wp.as_ref(), &services, &what)?;
        }
        let mut workloads = Vec::with_capacity(self.workloads.len());
        for (i, w) in self.workloads.into_iter().enumerate() {
            let mut svc_keys = Vec::new();
            for reference in &w.services {
                let svc = services
                    .iter()
                    .find(|s| {
                        *reference == format!("{}/{}", s.namespace, s.name) || *reference == s.key()
                    })
                    .ok_or_else(|| {
                        anyhow!(
                            "workloads[{i}] ({}/{}): services: no service {reference:?}",
                            w.namespace,
                            w.name
                        )
                    })?;
                svc_keys.push(svc.key());
            }
            let policies = self
                .policies
                .iter()
                .filter(|p| {
                    p.scope == Scope::WorkloadSelector
                        && p.namespace == w.namespace
                        && p.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            let waypoint = resolve_waypoint(
                w.waypoint.as_ref(),
                &services,
                &format!("workloads[{i}] ({}/{})", w.namespace, w.name),
            )?;
            workloads.push(Workload {
                waypoint,
                uid: w
                    .uid
                    .unwrap_or_else(|| format!("{}/{}", w.namespace, w.name)),
                canonical_name: w
                    .labels
                    .get("app")
                    .cloned()
                    .unwrap_or_else(|| w.name.clone()),
                canonical_revision: w
                    .labels
                    .get("version")
                    .cloned()
                    .unwrap_or_else(|| "latest".into()),
                // The file names pods only; metrics use the pod name and
                // the default cluster.
                workload_name: String::new(),
                cluster_id: String::new(),
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                trust_domain: trust_domain.to_string(),
                node: w.node,
                addresses: w.addresses,
                protocol: w.protocol,
                status: w.status,
                labels: w.labels,
                services: svc_keys,
                authorization_policies: policies,
            });
        }
        let policies = self
            .policies
            .into_iter()
            .map(|p| Authorization {
                name: p.name,
                namespace: p.namespace,
                scope: p.scope,
                action: p.action,
                rules: p.rules,
            })
            .collect();
        Ok(Snapshot::build(workloads, services, policies)?)
    }
}

/// Reads and validates the file; an error names the file and what in it
/// was wrong.
pub fn load_file(path: &Path, trust_domain: &str) -> anyhow::Result<Snapshot> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: LocalConfig = if text.trim().is_empty() {
        LocalConfig::default()
    } else {
        serde_yaml::from_str(&text).with_context(|| format!("{}: invalid", path.display()))?
    };
    cfg.into_snapshot(trust_domain)
        .with_context(|| format!("{}: invalid", path.display()))
}

/// The outcome of the last attempt to load the file, for `/config_dump`.
pub type LoadStatus = Arc<Mutex<Option<String>>>;

/// Loads `path` into `store` now (failing if it is bad: there is no last
/// good state to fall back to yet) and then on every change. A bad edit is
/// logged and recorded in `status`; the last good snapshot stays in force.
pub async fn watch_file(
    path: PathBuf,
    trust_domain: String,
    store: Arc<Store>,
    status: LoadStatus,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let snap = load_file(&path, &trust_domain)?;
    info!(file = %path.display(), workloads = snap.workloads.len(), services = snap.services.len(), policies = snap.policies.len(), "loaded local state");
    store.replace(snap);
    let mut last = std::fs::read(&path).ok();
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let Ok(now) = tokio::fs::read(&path).await else {
                continue;
            };
            if last.as_deref() == Some(now.as_slice()) {
                continue;
            }
            last = Some(now);
            match load_file(&path, &trust_domain) {
                Ok(snap) => {
                    info!(file = %path.display(), workloads = snap.workloads.len(), services = snap.services.len(), policies = snap.policies.len(), "reloaded local state");
                    *status.lock().expect("status lock") = None;
                    store.replace(snap);
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "rejected local state change; keeping the previous state");
                    *status.lock().expect("status lock") = Some(format!("{e:#}"));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
  - name: echo
    namespace: default
    serviceAccount: echo
    node: b
    addresses: [10.0.0.2]
    labels: {app: echo}
    services: [default/echo]
services:
  - name: echo
    namespace: default
    addresses: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}]
policies:
  - name: p
    namespace: default
    scope: WorkloadSelector
    selector: {app: echo}
    action: Deny
    rules:
      - clauses:
          - matches:
              - destinationPorts: [9]
"#;

    #[test]
    fn parses_and_resolves() {
        let cfg: LocalConfig = serde_yaml::from_str(GOOD).unwrap();
        let snap = cfg.into_snapshot("cluster.local").unwrap();
        let w = snap.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(w.services, vec!["default/echo.default.svc.cluster.local"]);
        assert_eq!(w.authorization_policies, vec!["default/p"]);
        let svc = snap.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let (ep, port) = snap.pick_endpoint(svc, 80).unwrap();
        assert_eq!((ep.name.as_str(), port), ("echo", 8080));
        assert!(snap.pick_endpoint(svc, 81).is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let bad = GOOD.replace("10.0.0.2", "10.0.0.300");
        let err = format!(
            "{:#}",
            serde_yaml::from_str::<LocalConfig>(&bad).unwrap_err()
        );
        assert!(err.contains("workloads[0].addresses[0]"), "{err}");
        let typo = GOOD.replace("serviceAccount", "serviceAcount");
        let err = format!(
            "{:#}",
            serde_yaml::from_str::<LocalConfig>(&typo).unwrap_err()
        );
        assert!(err.contains("serviceAcount"), "{err}");
        let dangling = GOOD.replace("services: [default/echo]", "services: [default/nope]");
        let cfg: LocalConfig = serde_yaml::from_str(&dangling).unwrap();
        let err = format!("{:#}", cfg.into_snapshot("td").unwrap_err());
        assert!(err.contains("default/nope"), "{err}");
    }

    #[test]
    fn duplicate_address_is_rejected() {
        let dup = GOOD.replace("addresses: [10.96.0.1]", "addresses: [10.0.0.2]");
        let cfg: LocalConfig = serde_yaml::from_str(&dup).unwrap();
        let err = format!("{:#}", cfg.into_snapshot("td").unwrap_err());
        assert!(err.contains("10.0.0.2"), "{err}");
    }

    const WAYPOINTS: &str = r#"
workloads:
  - {name: wp-1, namespace: default, serviceAccount: wp, node: a, addresses: [10.0.0.11], services: [default/wp]}
  - {name: wp-2, namespace: default, serviceAccount: wp, node: b, addresses: [10.0.0.12], services: [default/wp]}
  - {name: echo, namespace: default, node: b, addresses: [10.0.0.2], services: [default/echo], waypoint: {address: 10.96.0.9}}
services:
  - {name: wp, namespace: default, addresses: [10.96.0.9], ports: [{port: 15008}]}
  - {name: echo, namespace: default, addresses: [10.96.0.1], ports: [{port: 80}], waypoint: {service: default/wp}}
"#;

    #[test]
    fn waypoints_resolve_and_spread_across_replicas() {
        let cfg: LocalConfig = serde_yaml::from_str(WAYPOINTS).unwrap();
        let snap = cfg.into_snapshot("cluster.local").unwrap();
        let svc = snap.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let wp = svc.waypoint.as_ref().unwrap();
        assert_eq!(
            wp.destination,
            WaypointDestination::Service("default/wp.default.svc.cluster.local".into())
        );
        assert_eq!(wp.hbone_port, WAYPOINT_HBONE_PORT);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (w, addr) = snap
                .pick_waypoint(wp, "10.96.0.1".parse().unwrap())
                .unwrap();
            assert_eq!(addr.port(), 15008);
            seen.insert(w.name.clone());
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        // Every healthy replica is a candidate, each once, in random order.
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let all = snap.waypoint_replicas(wp, "10.96.0.1".parse().unwrap());
            let mut names: Vec<&str> = all.iter().map(|(w, _)| w.name.as_str()).collect();
            firsts.insert(names[0].to_string());
            names.sort();
            assert_eq!(names, ["wp-1", "wp-2"]);
        }
        assert_eq!(firsts.len(), 2, "{firsts:?}");
        let replica = snap.workload_by_ip("10.0.0.11".parse().unwrap()).unwrap();
        assert!(snap.is_waypoint_of(replica, wp));
        let echo = snap.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert!(!snap.is_waypoint_of(echo, wp));
        // The workload's waypoint by VIP resolves to the same replicas.
        assert_eq!(
            snap.waypoint_workloads(echo.waypoint.as_ref().unwrap())
                .len(),
            2
        );

        // A replica that is gone is no longer picked.
        let gone = WAYPOINTS.replace(
            "  - {name: wp-1, namespace: default, serviceAccount: wp, node: a, addresses: [10.0.0.11], services: [default/wp]}\n",
            "",
        );
        let snap = serde_yaml::from_str::<LocalConfig>(&gone)
            .unwrap()
            .into_snapshot("cluster.local")
            .unwrap();
        for _ in 0..50 {
            let (w, _) = snap
                .pick_waypoint(wp, "10.96.0.1".parse().unwrap())
                .unwrap();
            assert_eq!(w.name, "wp-2");
        }
    }

    #[test]
    fn bad_waypoint_references_are_errors() {
        for (from, to, needle) in [
            (
                "waypoint: {service: default/wp}",
                "waypoint: {service: default/nope}",
                "default/nope",
            ),
            (
                "waypoint: {service: default/wp}",
                "waypoint: {}",
                "exactly one",
            ),
            (
                "waypoint: {address: 10.96.0.9}",
                "waypoint: {address: 10.96.0.9, hbonePort: 0}",
                "hbonePort",
            ),
        ] {
            let cfg: LocalConfig = serde_yaml::from_str(&WAYPOINTS.replace(from, to)).unwrap();
            let err = format!("{:#}", cfg.into_snapshot("td").unwrap_err());
            assert!(err.contains(needle), "{err}");
        }
    }
}
