//! What ztunnel knows about the mesh: workloads, services and policies.
//!
//! Sources (the local YAML file today, workload xDS later) build a complete
//! [`Snapshot`] and hand it to the [`Store`], which swaps it in atomically.
//! The data path reads the current snapshot without locks; anything that
//! must react to changes (certificates, open-connection policy re-checks)
//! subscribes to the store's version counter.

mod model;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

pub mod file;
pub use file::{load_file, watch_file, LocalConfig};
pub use model::{
    HealthStatus, Port, Protocol, Service, Waypoint, WaypointDestination, Workload,
    WAYPOINT_HBONE_PORT,
};

use crate::identity::Identity;
use crate::rbac::Authorization;

/// An immutable, indexed view of the mesh.
#[derive(Default, Debug, Serialize)]
pub struct Snapshot {
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub policies: BTreeMap<String, Arc<Authorization>>,
    #[serde(skip)]
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    #[serde(skip)]
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("address {ip} is claimed by both {first} and {second}")]
    DuplicateAddress {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("duplicate {kind} {key}")]
    Duplicate { kind: &'static str, key: String },
}

impl Snapshot {
    /// Indexes a consistent set of objects. Two objects claiming one address
    /// is an error rather than a silent last-wins: traffic would otherwise
    /// go to whichever happened to be read last.
    pub fn build(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Result<Snapshot, SnapshotError> {
        Snapshot::build_shared(
            workloads.into_iter().map(Arc::new),
            services.into_iter().map(Arc::new),
            policies.into_iter().map(Arc::new),
        )
    }

    /// [`Snapshot::build`] from objects that are already shared: a source
    /// that keeps its objects (the xDS client) rebuilds the indexes after a
    /// change without copying a single workload, so the previous and the
    /// new snapshot hold the same objects, once.
    pub fn build_shared(
        workloads: impl IntoIterator<Item = Arc<Workload>>,
        services: impl IntoIterator<Item = Arc<Service>>,
        policies: impl IntoIterator<Item = Arc<Authorization>>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut snap = Snapshot::default();
        for s in services {
            for ip in &s.addresses {
                if let Some(prev) = snap.services_by_vip.insert(*ip, s.clone()) {
                    return Err(SnapshotError::DuplicateAddress {
                        ip: *ip,
                        first: prev.key(),
                        second: s.key(),
                    });
                }
            }
            if snap.services.insert(s.key(), s.clone()).is_some() {
                return Err(SnapshotError::Duplicate {
                    kind: "service",
                    key: s.key(),
                });
            }
        }
        for w in workloads {
            for ip in &w.addresses {
                if let Some(prev) = snap.workloads_by_ip.insert(*ip, w.clone()) {
                    return Err(SnapshotError::DuplicateAddress {
                        ip: *ip,
                        first: prev.uid.clone(),
                        second: w.uid.clone(),
                    });
                }
                if let Some(svc) = snap.services_by_vip.get(ip) {
                    return Err(SnapshotError::DuplicateAddress {
                        ip: *ip,
                        first: svc.key(),
                        second: w.uid.clone(),
                    });
                }
            }
            for svc in &w.services {
                snap.endpoints
                    .entry(svc.clone())
                    .or_default()
                    .push(w.clone());
            }
            if snap.workloads.insert(w.uid.clone(), w.clone()).is_some() {
                return Err(SnapshotError::Duplicate {
                    kind: "workload",
                    key: w.uid.clone(),
                });
            }
        }
        for p in policies {
            let key = p.key();
            if snap.policies.insert(key.clone(), p).is_some() {
                return Err(SnapshotError::Duplicate {
                    kind: "policy",
                    key,
                });
            }
        }
        Ok(snap)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip)
    }

    /// A healthy endpoint of `svc` for `port`, chosen at random so that load
    /// spreads without shared counters on the hot path. Returns the workload
    /// and the port to reach it on.
    pub fn pick_endpoint(&self, svc: &Service, port: u16) -> Option<(Arc<Workload>, u16)> {
        let target = svc.target_port(port)?;
        let healthy: Vec<&Arc<Workload>> = self
            .endpoints
            .get(&svc.key())?
            .iter()
            .filter(|w| w.status == HealthStatus::Healthy && !w.addresses.is_empty())
            .collect();
        if healthy.is_empty() {
            return None;
        }
        let w = healthy[fastrand::usize(..healthy.len())];
        Some((w.clone(), target))
    }

    /// The service a connection to `w` on `port` most likely came through:
    /// one of `w`'s services that maps some port to `port`. The receiving
    /// side cannot see the VIP the client dialled, so metrics use this, as
    /// Istio's destination-side reporting does.
    pub fn service_for_port(&self, w: &Workload, port: u16) -> Option<&Arc<Service>> {
        w.services
            .iter()
            .filter_map(|key| self.services.get(key))
            .find(|s| s.ports.iter().any(|p| s.target_port(p.port) == Some(port)))
    }

    /// The workloads that make up waypoint `wp`: the endpoints of its
    /// service, or the one workload at its address.
    pub fn waypoint_workloads(&self, wp: &Waypoint) -> Vec<Arc<Workload>> {
        let svc = match &wp.destination {
            WaypointDestination::Service(key) => self.services.get(key),
            WaypointDestination::Address(ip) => self.services_by_vip.get(ip),
        };
        match (svc, &wp.destination) {
            (Some(svc), _) => self.endpoints(svc).to_vec(),
            (None, WaypointDestination::Address(ip)) => {
                self.workload_by_ip(*ip).cloned().into_iter().collect()
            }
            (None, WaypointDestination::Service(_)) => Vec::new(),
        }
    }

    /// A healthy replica of waypoint `wp` and where to reach it over HBONE,
    /// chosen at random so that connections spread across replicas; a
    /// replica gone from the snapshot is simply no longer a candidate.
    pub fn pick_waypoint(
        &self,
        wp: &Waypoint,
        like: IpAddr,
    ) -> Option<(Arc<Workload>, SocketAddr)> {
        self.waypoint_replicas(wp, like).into_iter().next()
    }

    /// Every healthy replica of waypoint `wp` with where to reach it over
    /// HBONE (the address of `like`'s family where it has one), in a fresh
    /// random order: the first is where a connection goes, so connections
    /// spread evenly; the rest are where it goes next if connecting to the
    /// first fails.
    pub fn waypoint_replicas(
        &self,
        wp: &Waypoint,
        like: IpAddr,
    ) -> Vec<(Arc<Workload>, SocketAddr)> {
        let mut healthy: Vec<(Arc<Workload>, SocketAddr)> = self
            .waypoint_workloads(wp)
            .into_iter()
            .filter(|w| w.status == HealthStatus::Healthy && w.protocol == Protocol::Hbone)
            .filter_map(|w| {
                let ip = w
                    .addresses
                    .iter()
                    .find(|a| a.is_ipv4() == like.is_ipv4())
                    .or(w.addresses.first())
                    .copied()?;
                Some((w, SocketAddr::new(ip, wp.hbone_port)))
            })
            .collect();
        fastrand::shuffle(&mut healthy);
        healthy
    }

    /// Whether `w` is one of the replicas of waypoint `wp`; traffic from the
    /// waypoint itself is not sent back to it.
    pub fn is_waypoint_of(&self, w: &Workload, wp: &Waypoint) -> bool {
        self.waypoint_workloads(wp).iter().any(|x| x.uid == w.uid)
    }

    pub fn endpoints(&self, svc: &Service) -> &[Arc<Workload>] {
        self.endpoints
            .get(&svc.key())
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The policies that apply to connections to `w`: global ones, those of
    /// its namespace, and those selecting it.
    pub fn policies_for<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Authorization> {
        self.policies
            .values()
            .filter(move |p| p.applies_to(w))
            .map(Arc::as_ref)
    }

    /// Identities with a workload on `node`: the ones ztunnel holds keys for.
    pub fn local_identities(&self, node: &str) -> HashSet<Identity> {
        self.workloads
            .values()
            .filter(|w| w.node == node && w.protocol == Protocol::Hbone)
            .map(|w| w.identity())
            .collect()
    }
}

/// The current snapshot plus a version that bumps on every change.
pub struct Store {
    current: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            current: ArcSwap::from_pointee(Snapshot::default()),
            version: watch::channel(0).0,
        }
    }
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Store::default())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn replace(&self, snap: Snapshot) {
        self.current.store(Arc::new(snap));
        self.version.send_modify(|v| *v += 1);
    }

    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
