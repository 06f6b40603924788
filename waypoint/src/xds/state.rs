//! What both wire protocols share: the resource cache, the names RDS and
//! EDS must ask for, the gate the cache goes through into the running
//! configuration, warming and its timeout. The delta and SotW adapters
//! ([`super::delta`], [`super::sotw`]) only turn responses into
//! [`Update`]s, and what [`State::apply`] returns into ACKs, NACKs and
//! subscription requests in their own wire form.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::envoy::config::cluster::v3::Cluster;
use mesh_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use mesh_proto::envoy::config::listener::v3::Listener;
use mesh_proto::envoy::config::route::v3::RouteConfiguration;
use mesh_proto::type_url;
use prost::Message;
use tracing::{debug, info, warn};

use super::translate;
use crate::config::{model, Bootstrap, Store};

/// One resource of a response.
#[derive(Debug)]
pub(super) struct Entry {
    /// Delta names every resource; a SotW response does not, and the
    /// name is the resource's own (`name`, or `cluster_name` for a load
    /// assignment).
    pub name: Option<String>,
    pub version: String,
    pub body: Option<prost_types::Any>,
}

/// One response, whatever the wire protocol, as the cache takes it.
pub(super) struct Update {
    pub type_url: String,
    /// Added or changed resources.
    pub resources: Vec<Entry>,
    /// Names removed (delta's `removed_resources`).
    pub removed: Vec<String>,
    /// The response is the whole set of its type (SotW LDS and CDS): a
    /// cached resource it does not hold is removed.
    pub replaces: bool,
    /// The response's version, for the log.
    pub version: String,
}

/// A change of what RDS or EDS must ask for.
pub(super) struct Resubscribe {
    pub type_url: &'static str,
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
}

/// The resource types whose resources are named by other resources
/// (the rest, LDS and CDS, are wildcard subscriptions).
pub(super) fn named(t: &str) -> bool {
    t == type_url::ROUTE_CONFIGURATION || t == type_url::CLUSTER_LOAD_ASSIGNMENT
}

/// name -> (version, resource), per type.
#[derive(Clone, Default)]
struct Cache {
    listeners: BTreeMap<String, (String, Listener)>,
    routes: BTreeMap<String, (String, RouteConfiguration)>,
    clusters: BTreeMap<String, (String, Cluster)>,
    endpoints: BTreeMap<String, (String, ClusterLoadAssignment)>,
    /// Types with at least one response: LDS and CDS must have answered
    /// (even with nothing) before a configuration is complete.
    answered: BTreeSet<String>,
}

/// What the cache translates to.
struct Assembled {
    /// `None` while warming: a referenced route configuration or load
    /// assignment has not arrived, or LDS/CDS have not answered yet.
    bootstrap: Option<Bootstrap>,
    rds: BTreeSet<String>,
    eds: BTreeSet<String>,
}

/// A resource's own name, for SotW responses that do not name them.
trait OwnName {
    fn own_name(&self) -> &str;
}

impl OwnName for Listener {
    fn own_name(&self) -> &str {
        &self.name
    }
}

impl OwnName for RouteConfiguration {
    fn own_name(&self) -> &str {
        &self.name
    }
}

impl OwnName for Cluster {
    fn own_name(&self) -> &str {
        &self.name
    }
}

impl OwnName for ClusterLoadAssignment {
    fn own_name(&self) -> &str {
        &self.cluster_name
    }
}

fn versions<T>(m: &BTreeMap<String, (String, T)>) -> HashMap<String, String> {
    m.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
}

impl Cache {
    fn versions(&self, t: &str) -> HashMap<String, String> {
        match t {
            type_url::LISTENER => versions(&self.listeners),
            type_url::ROUTE_CONFIGURATION => versions(&self.routes),
            type_url::CLUSTER => versions(&self.clusters),
            _ => versions(&self.endpoints),
        }
    }

    /// Applies one response (decoding every resource). `only`: for RDS
    /// and EDS, the names subscribed; others are ignored, as Envoy does
    /// (a SotW server may answer an empty name list with everything).
    fn apply(&mut self, u: &Update, only: Option<&BTreeSet<String>>) -> Result<(), String> {
        fn put<T: Message + Default + OwnName>(
            m: &mut BTreeMap<String, (String, T)>,
            what: &str,
            u: &Update,
            only: Option<&BTreeSet<String>>,
        ) -> Result<(), String> {
            let mut seen = BTreeSet::new();
            for (i, r) in u.resources.iter().enumerate() {
                let label = match &r.name {
                    Some(n) => format!("{n:?}"),
                    None => format!("resources[{i}]"),
                };
                let Some(a) = &r.body else {
                    return Err(format!("{what} {label}: resource has no body"));
                };
                if a.type_url != u.type_url {
                    return Err(format!(
                        "{what} {label}: type {:?} in a {what} response",
                        a.type_url
                    ));
                }
                let v = T::decode(a.value.as_slice())
                    .map_err(|e| format!("{what} {label}: cannot decode: {e}"))?;
                let name = match &r.name {
                    Some(n) => n.clone(),
                    None if v.own_name().is_empty() => {
                        return Err(format!("{what} {label}: no name"))
                    }
                    None => v.own_name().to_string(),
                };
                if !seen.insert(name.clone()) {
                    return Err(format!("{what} {name:?}: twice in one response"));
                }
                if only.is_some_and(|o| !o.contains(&name)) {
                    continue;
                }
                m.insert(name, (r.version.clone(), v));
            }
            for n in &u.removed {
                m.remove(n);
            }
            if u.replaces {
                m.retain(|n, _| seen.contains(n));
            }
            Ok(())
        }
        match u.type_url.as_str() {
            type_url::LISTENER => put(&mut self.listeners, "Listener", u, only)?,
            type_url::ROUTE_CONFIGURATION => put(&mut self.routes, "RouteConfiguration", u, only)?,
            type_url::CLUSTER => put(&mut self.clusters, "Cluster", u, only)?,
            type_url::CLUSTER_LOAD_ASSIGNMENT => {
                put(&mut self.endpoints, "ClusterLoadAssignment", u, only)?
            }
            other => return Err(format!("unexpected type {other:?}")),
        }
        self.answered.insert(u.type_url.clone());
        Ok(())
    }

    /// Translates the cache into one configuration (not yet validated).
    /// `expired(type, name)`: a referenced resource that has been missing
    /// for too long, taken as empty instead of holding the update back.
    fn assemble(&self, expired: &dyn Fn(&str, &str) -> bool) -> Result<Assembled, String> {
        let mut listeners = Vec::new();
        let mut route_configurations = Vec::new();
        for (_, l) in self.listeners.values() {
            let t = translate::listener(l).map_err(|e| e.to_string())?;
            listeners.push(t.listener);
            route_configurations.extend(t.inline_routes);
        }
        let inline: BTreeSet<String> = route_configurations
            .iter()
            .map(|r| r.name.clone())
            .collect();
        let rds = translate::route_names(&listeners, &inline);
        let mut complete =
            self.answered.contains(type_url::LISTENER) && self.answered.contains(type_url::CLUSTER);
        for name in &rds {
            match self.routes.get(name) {
                Some((_, rc)) => route_configurations
                    .push(translate::route_configuration(rc).map_err(|e| e.to_string())?),
                // Warming gave up: an empty route configuration (404s).
                None if expired(type_url::ROUTE_CONFIGURATION, name) => {
                    route_configurations.push(model::RouteConfiguration {
                        name: name.clone(),
                        virtual_hosts: Vec::new(),
                    })
                }
                None => complete = false,
            }
        }
        let mut clusters: Vec<model::Cluster> = Vec::new();
        let mut eds = BTreeSet::new();
        for (_, c) in self.clusters.values() {
            let assignment = match translate::eds_name(c) {
                Some(n) => {
                    let a = self.endpoints.get(&n).map(|(_, a)| a);
                    if a.is_none() && !expired(type_url::CLUSTER_LOAD_ASSIGNMENT, &n) {
                        complete = false;
                    }
                    eds.insert(n);
                    // Until it arrives the cluster has no endpoints.
                    Some(a.cloned().unwrap_or_default())
                }
                None => None,
            };
            clusters.push(translate::cluster(c, assignment.as_ref()).map_err(|e| e.to_string())?);
        }
        // As in Envoy, a route to a cluster CDS does not (or no longer)
        // have is not an error: that cluster has no endpoints (503). Other
        // control planes order updates differently from ours.
        let known: BTreeSet<String> = clusters.iter().map(|c| c.name.clone()).collect();
        for name in translate::cluster_refs(&listeners, &route_configurations) {
            if !known.contains(&name) {
                clusters.push(model::Cluster {
                    name,
                    ..Default::default()
                });
            }
        }
        let bootstrap = complete.then_some(Bootstrap {
            listeners,
            route_configurations,
            clusters,
        });
        Ok(Assembled {
            bootstrap,
            rds,
            eds,
        })
    }
}

/// The gate's error, with the list index turned into the resource's name
/// (`route_configurations[2]` → `route_configurations[2] (RouteConfiguration "echo")`).
fn explain(b: &Bootstrap, e: &crate::config::ConfigError) -> String {
    let head = e.path.split('.').next().unwrap_or_default();
    let idx = |p: &str| {
        head.strip_prefix(p)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.parse::<usize>().ok())
    };
    let name = if let Some(i) = idx("route_configurations") {
        b.route_configurations
            .get(i)
            .map(|r| format!("RouteConfiguration {:?}", r.name))
    } else if let Some(i) = idx("clusters") {
        b.clusters.get(i).map(|c| format!("Cluster {:?}", c.name))
    } else if let Some(i) = idx("listeners") {
        b.listeners.get(i).map(|l| format!("Listener {:?}", l.name))
    } else {
        None
    };
    match name {
        Some(n) => format!("{n}: {e}"),
        None => e.to_string(),
    }
}

/// The client's state across streams and protocols.
pub(super) struct State {
    store: Arc<Store>,
    warming_timeout: Duration,
    cache: Cache,
    /// Names RDS and EDS ask for.
    rds: BTreeSet<String>,
    eds: BTreeSet<String>,
    /// (type, name) -> when it was first needed, for warming timeouts.
    needed_since: HashMap<(String, String), Instant>,
}

impl State {
    /// Marks the store not synced until the first complete configuration.
    pub fn new(store: Arc<Store>, warming_timeout: Duration) -> State {
        store.set_synced(false);
        State {
            store,
            warming_timeout,
            cache: Cache::default(),
            rds: BTreeSet::new(),
            eds: BTreeSet::new(),
            needed_since: HashMap::new(),
        }
    }

    /// On (re)connect: the RDS and EDS names are those the cache refers
    /// to, so the first requests of the new stream ask for them.
    pub fn connect(&mut self) {
        let needed = self.cache.assemble(&|_, _| false).ok();
        self.rds = needed.as_ref().map(|a| a.rds.clone()).unwrap_or_default();
        self.eds = needed.as_ref().map(|a| a.eds.clone()).unwrap_or_default();
        let now = Instant::now();
        for (t, names) in [
            (type_url::ROUTE_CONFIGURATION, &self.rds),
            (type_url::CLUSTER_LOAD_ASSIGNMENT, &self.eds),
        ] {
            for n in names {
                self.needed_since
                    .entry((t.to_string(), n.clone()))
                    .or_insert(now);
            }
        }
    }

    /// The names to ask for: empty for LDS and CDS (wildcards).
    pub fn names(&self, t: &str) -> &BTreeSet<String> {
        static NONE: BTreeSet<String> = BTreeSet::new();
        match t {
            type_url::ROUTE_CONFIGURATION => &self.rds,
            type_url::CLUSTER_LOAD_ASSIGNMENT => &self.eds,
            _ => &NONE,
        }
    }

    /// name -> version held, for delta's resume.
    pub fn versions(&self, t: &str) -> HashMap<String, String> {
        self.cache.versions(t)
    }

    /// Takes one response: `Ok` (ACK) with the subscription changes it
    /// leads to, or `Err` (NACK) naming the resource and field, with the
    /// cache and the configuration in force as they were.
    pub fn apply(&mut self, u: &Update) -> Result<Vec<Resubscribe>, String> {
        let (rds, eds) = match self.stage(u) {
            Ok(names) => names,
            Err(msg) => {
                warn!(type_url = %u.type_url, error = %msg,
                      "xDS update rejected (NACK); the previous configuration stays in force");
                return Err(msg);
            }
        };
        Ok([
            self.resubscribe(type_url::ROUTE_CONFIGURATION, rds),
            self.resubscribe(type_url::CLUSTER_LOAD_ASSIGNMENT, eds),
        ]
        .into_iter()
        .flatten()
        .collect())
    }

    /// Applies a response to a copy of the cache and, when complete, puts
    /// the result in force; commits the copy only if all of that worked.
    /// Returns the RDS and EDS names now needed.
    fn stage(&mut self, u: &Update) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
        let mut next = self.cache.clone();
        let only = named(&u.type_url).then(|| self.names(&u.type_url));
        next.apply(u, only)?;
        let a = next.assemble(&|t, n| self.expired(t, n))?;
        if let Some(b) = &a.bootstrap {
            self.store.apply(b).map_err(|e| explain(b, &e))?;
            if !self.store.synced() {
                info!("first complete xDS configuration in force; ready");
            }
            self.store.set_synced(true);
            info!(type_url = %u.type_url, version = %u.version, "xDS configuration applied");
        } else {
            // Warming: still check what has come, taking what is missing as
            // empty. A bad resource ACKed now would only fail once its
            // references arrive, and the server never resends what it saw
            // ACKed: every later update would then be refused.
            if let Ok(Assembled {
                bootstrap: Some(b), ..
            }) = next.assemble(&|_, _| true)
            {
                crate::config::compile(&b).map_err(|e| explain(&b, &e))?;
            }
            debug!(type_url = %u.type_url, "xDS configuration warming: waiting for referenced resources");
        }
        self.cache = next;
        Ok((a.rds, a.eds))
    }

    fn expired(&self, t: &str, n: &str) -> bool {
        self.needed_since
            .get(&(t.to_string(), n.to_string()))
            .is_some_and(|since| since.elapsed() >= self.warming_timeout)
    }

    /// On a timer: if a configuration is held back only by resources that
    /// have been missing too long, put it in force without them.
    pub fn warming_expired(&mut self) {
        let missing = self.needed_since.keys().any(|(t, n)| {
            let have = if t == type_url::ROUTE_CONFIGURATION {
                self.cache.routes.contains_key(n)
            } else {
                self.cache.endpoints.contains_key(n)
            };
            !have && self.expired(t, n)
        });
        if !missing {
            return;
        }
        let Ok(Assembled {
            bootstrap: Some(b), ..
        }) = self.cache.assemble(&|t, n| self.expired(t, n))
        else {
            return;
        };
        if b == self.store.get().source {
            return;
        }
        warn!("xDS: referenced resources did not arrive in time; applying without them");
        match self.store.apply(&b) {
            Ok(()) => self.store.set_synced(true),
            Err(e) => warn!(error = %explain(&b, &e), "xDS configuration rejected"),
        }
    }

    /// Records the names RDS or EDS now need; what to subscribe to and
    /// drop, if anything changed. Dropped names leave the cache.
    fn resubscribe(&mut self, t: &'static str, want: BTreeSet<String>) -> Option<Resubscribe> {
        let have = if t == type_url::ROUTE_CONFIGURATION {
            &mut self.rds
        } else {
            &mut self.eds
        };
        if *have == want {
            return None;
        }
        let subscribe: Vec<String> = want.difference(have).cloned().collect();
        let unsubscribe: Vec<String> = have.difference(&want).cloned().collect();
        *have = want;
        let now = Instant::now();
        for n in &subscribe {
            self.needed_since
                .entry((t.to_string(), n.clone()))
                .or_insert(now);
        }
        for n in &unsubscribe {
            self.needed_since.remove(&(t.to_string(), n.clone()));
            if t == type_url::ROUTE_CONFIGURATION {
                self.cache.routes.remove(n);
            } else {
                self.cache.endpoints.remove(n);
            }
        }
        Some(Resubscribe {
            type_url: t,
            subscribe,
            unsubscribe,
        })
    }
}
