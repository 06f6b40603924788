//! Istio's workload API -> ztunnel's state model.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use ipnet::IpNet;
use mesh_proto::security as sec;
use mesh_proto::workload as wl;

use crate::rbac;
use crate::state::{
    HealthStatus, Port, Protocol, Service, Snapshot, Waypoint, WaypointDestination, Workload,
    WAYPOINT_HBONE_PORT,
};

fn ip(b: &[u8]) -> anyhow::Result<IpAddr> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        n => bail!("address of {n} bytes is neither IPv4 nor IPv6"),
    }
}

fn string_match(m: &sec::StringMatch) -> String {
    use sec::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => s.clone(),
        Some(MatchType::Prefix(s)) => format!("{s}*"),
        Some(MatchType::Suffix(s)) => format!("*{s}"),
        Some(MatchType::Presence(())) | None => "*".into(),
    }
}

fn nets(a: &[sec::Address]) -> anyhow::Result<Vec<IpNet>> {
    a.iter()
        .map(|a| {
            let addr = ip(&a.address)?;
            IpNet::new(addr, a.length as u8).map_err(|e| anyhow!("{addr}/{}: {e}", a.length))
        })
        .collect()
}

fn ports(p: &[u32]) -> anyhow::Result<Vec<u16>> {
    p.iter()
        .map(|p| u16::try_from(*p).map_err(|_| anyhow!("{p} is not a port")))
        .collect()
}

fn policy(a: &sec::Authorization) -> anyhow::Result<rbac::Authorization> {
    let sm = |v: &[sec::StringMatch]| v.iter().map(string_match).collect::<Vec<_>>();
    let mut rules = Vec::new();
    for r in &a.rules {
        let mut clauses = Vec::new();
        for c in &r.clauses {
            let mut matches = Vec::new();
            for m in &c.matches {
                matches.push(rbac::Match {
                    principals: sm(&m.principals),
                    not_principals: sm(&m.not_principals),
                    namespaces: sm(&m.namespaces),
                    not_namespaces: sm(&m.not_namespaces),
                    source_ips: nets(&m.source_ips)?,
                    not_source_ips: nets(&m.not_source_ips)?,
                    destination_ips: nets(&m.destination_ips)?,
                    not_destination_ips: nets(&m.not_destination_ips)?,
                    destination_ports: ports(&m.destination_ports)?,
                    not_destination_ports: ports(&m.not_destination_ports)?,
                    ..Default::default()
                });
            }
            clauses.push(rbac::Clause { matches });
        }
        rules.push(rbac::Rule { clauses });
    }
    Ok(rbac::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match sec::Scope::try_from(a.scope) {
            Ok(sec::Scope::Global) => rbac::Scope::Global,
            Ok(sec::Scope::Namespace) => rbac::Scope::Namespace,
            Ok(sec::Scope::WorkloadSelector) => rbac::Scope::WorkloadSelector,
            Err(_) => bail!("unknown scope {}", a.scope),
        },
        action: match sec::Action::try_from(a.action) {
            Ok(sec::Action::Allow) => rbac::Action::Allow,
            Ok(sec::Action::Deny) => rbac::Action::Deny,
            Err(_) => bail!("unknown action {}", a.action),
        },
        rules,
    })
}

/// `GatewayAddress` -> waypoint. An empty destination means no waypoint;
/// a missing port means the standard HBONE port.
fn waypoint(g: Option<&wl::GatewayAddress>) -> anyhow::Result<Option<Waypoint>> {
    use wl::gateway_address::Destination;
    let Some(g) = g else { return Ok(None) };
    let destination = match &g.destination {
        Some(Destination::Hostname(h)) => {
            WaypointDestination::Service(format!("{}/{}", h.namespace, h.hostname))
        }
        Some(Destination::Address(a)) => {
            WaypointDestination::Address(ip(&a.address).context("waypoint address")?)
        }
        None => return Ok(None),
    };
    let hbone_port = match g.hbone_mtls_port {
        0 => WAYPOINT_HBONE_PORT,
        p => u16::try_from(p).map_err(|_| anyhow!("waypoint: bad hbone_mtls_port {p}"))?,
    };
    Ok(Some(Waypoint {
        destination,
        hbone_port,
    }))
}

fn workload(w: &wl::Workload, trust_domain: &str) -> anyhow::Result<Workload> {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("app".to_string(), w.canonical_name.clone());
    labels.insert("version".to_string(), w.canonical_revision.clone());
    let mut services: Vec<String> = w.services.keys().cloned().collect();
    services.sort();
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: if w.service_account.is_empty() {
            "default".into()
        } else {
            w.service_account.clone()
        },
        trust_domain: if w.trust_domain.is_empty() {
            trust_domain.to_string()
        } else {
            w.trust_domain.clone()
        },
        node: w.node.clone(),
        addresses: w
            .addresses
            .iter()
            .map(|a| ip(a))
            .collect::<anyhow::Result<_>>()?,
        protocol: if w.tunnel_protocol == wl::TunnelProtocol::Hbone as i32 {
            Protocol::Hbone
        } else {
            Protocol::Tcp
        },
        status: if w.status == wl::WorkloadStatus::Unhealthy as i32 {
            HealthStatus::Unhealthy
        } else {
            HealthStatus::Healthy
        },
        labels,
        services,
        authorization_policies: w.authorization_policies.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        cluster_id: w.cluster_id.clone(),
        waypoint: waypoint(w.waypoint.as_ref())?,
    })
}

/// One `istio.workload.Address` in ztunnel's model. This is all the client
/// keeps of a resource (plus its version): no copy of the proto.
#[derive(Clone, Debug)]
pub enum Address {
    Workload {
        workload: Arc<Workload>,
        /// Named target ports this workload resolves for its services:
        /// (index into `workload.services`, service port, target port).
        targets: Box<[(u32, u32, u32)]>,
    },
    /// A service; a port with `target_port` 0 is a named target port,
    /// resolved from the workloads when the snapshot is built.
    Service(Arc<Service>),
}

/// Translates one Address resource, checking everything that does not
/// depend on other resources.
pub fn address(name: &str, a: &wl::Address, trust_domain: &str) -> anyhow::Result<Address> {
    match &a.r#type {
        Some(wl::address::Type::Workload(w)) => {
            let workload = workload(w, trust_domain).with_context(|| format!("workload {name}"))?;
            let mut targets = Vec::new();
            for (i, svc) in workload.services.iter().enumerate() {
                for p in w.services.get(svc).iter().flat_map(|pl| pl.ports.iter()) {
                    if p.target_port != 0 {
                        targets.push((i as u32, p.service_port, p.target_port));
                    }
                }
            }
            Ok(Address::Workload {
                workload: Arc::new(workload),
                targets: targets.into(),
            })
        }
        Some(wl::address::Type::Service(s)) => {
            let key = format!("{}/{}", s.namespace, s.hostname);
            let svc = Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                addresses: s
                    .addresses
                    .iter()
                    .map(|a| ip(&a.address))
                    .collect::<anyhow::Result<_>>()
                    .with_context(|| format!("service {key}"))?,
                ports: s
                    .ports
                    .iter()
                    .map(|p| {
                        Ok(Port {
                            port: u16::try_from(p.service_port)
                                .map_err(|_| anyhow!("service {key}: bad port"))?,
                            target_port: u16::try_from(p.target_port)
                                .map_err(|_| anyhow!("service {key}: bad target port"))?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
                waypoint: waypoint(s.waypoint.as_ref())
                    .with_context(|| format!("service {key}"))?,
            };
            Ok(Address::Service(Arc::new(svc)))
        }
        None => bail!("address {name} is neither a workload nor a service"),
    }
}

/// Translates one Authorization resource.
pub fn authorization(
    name: &str,
    a: &sec::Authorization,
) -> anyhow::Result<Arc<rbac::Authorization>> {
    policy(a)
        .map(Arc::new)
        .with_context(|| format!("authorization {name}"))
}

/// Everything the client holds as a ztunnel snapshot: the objects are
/// shared, only the indexes are built. Fails (so the response is NACKed)
/// on conflicts between resources, e.g. two claiming one address.
pub fn snapshot<'a>(
    addresses: impl Iterator<Item = &'a Address>,
    authorizations: impl Iterator<Item = &'a Arc<rbac::Authorization>>,
) -> anyhow::Result<Snapshot> {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    // Named target ports are resolved per workload; remember them.
    let mut targets: HashMap<(&str, u32), u32> = HashMap::new();
    for a in addresses {
        match a {
            Address::Workload {
                workload,
                targets: t,
            } => {
                for (i, port, target) in t.iter() {
                    if let Some(svc) = workload.services.get(*i as usize) {
                        targets.insert((svc.as_str(), *port), *target);
                    }
                }
                workloads.push(workload.clone());
            }
            Address::Service(s) => services.push(s),
        }
    }
    let services = services
        .into_iter()
        .map(|s| {
            if s.ports.iter().all(|p| p.target_port != 0) {
                return Ok(s.clone());
            }
            let key = s.key();
            let mut resolved = Service::clone(s);
            for p in &mut resolved.ports {
                if p.target_port == 0 {
                    let t = targets
                        .get(&(key.as_str(), u32::from(p.port)))
                        .copied()
                        .unwrap_or(u32::from(p.port));
                    p.target_port =
                        u16::try_from(t).map_err(|_| anyhow!("service {key}: bad target port"))?;
                }
            }
            Ok(Arc::new(resolved))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Snapshot::build_shared(
        workloads,
        services,
        authorizations.cloned(),
    )?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn gateway_addresses_become_waypoints() {
        use wl::gateway_address::Destination;
        assert_eq!(waypoint(None).unwrap(), None);
        let by_name = wl::GatewayAddress {
            destination: Some(Destination::Hostname(wl::NamespacedHostname {
                namespace: "app".into(),
                hostname: "wp.app.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 0,
        };
        assert_eq!(
            waypoint(Some(&by_name)).unwrap(),
            Some(Waypoint {
                destination: WaypointDestination::Service("app/wp.app.svc.cluster.local".into()),
                hbone_port: WAYPOINT_HBONE_PORT,
            })
        );
        let by_address = wl::GatewayAddress {
            destination: Some(Destination::Address(wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 20],
            })),
            hbone_mtls_port: 15009,
        };
        assert_eq!(
            waypoint(Some(&by_address)).unwrap(),
            Some(Waypoint {
                destination: WaypointDestination::Address("10.96.0.20".parse().unwrap()),
                hbone_port: 15009,
            })
        );
        // Bad input is an error (the response is NACKed), never a panic.
        let bad_port = wl::GatewayAddress {
            hbone_mtls_port: 70000,
            ..by_address.clone()
        };
        assert!(waypoint(Some(&bad_port)).is_err());
        let bad_ip = wl::GatewayAddress {
            destination: Some(Destination::Address(wl::NetworkAddress {
                network: String::new(),
                address: vec![1, 2, 3],
            })),
            hbone_mtls_port: 0,
        };
        assert!(waypoint(Some(&bad_ip)).is_err());
    }

    #[test]
    fn workload_name_and_cluster_are_kept() {
        let w = wl::Workload {
            uid: "Kubernetes//Pod/ns/echo-5d8f9-abcde".into(),
            name: "echo-5d8f9-abcde".into(),
            namespace: "ns".into(),
            workload_name: "echo".into(),
            cluster_id: "east".into(),
            ..Default::default()
        };
        let w = workload(&w, "cluster.local").unwrap();
        assert_eq!(w.workload_name, "echo");
        assert_eq!(w.cluster_id, "east");
        assert_eq!(w.metrics_name(), "echo");
        assert_eq!(w.cluster(), "east");
    }
}
