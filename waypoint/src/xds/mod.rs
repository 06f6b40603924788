//! The waypoint's xDS client: Envoy v3 delta ADS (LDS, RDS, CDS, EDS) from
//! any control plane, translated into the same configuration model the
//! YAML file fills and put in force through the same gate
//! ([`crate::config::Store::apply`], i.e. [`crate::config::validate::compile`]).
//!
//! One stream; Listeners and Clusters are subscribed as wildcards, route
//! configurations and load assignments by the names the listeners
//! (`rds.route_config_name`) and EDS clusters (`eds_cluster_config`)
//! refer to, updated as those change. Each response is applied to a copy of
//! the resource cache; the copy is translated ([`translate`]) and, once
//! every referenced resource is there, compiled and swapped in. Then it is
//! ACKed and the copy becomes the cache. A response that fails to decode,
//! translate or validate is NACKed with `error_detail` naming the resource
//! and field, and the cache and the configuration in force stay as they
//! were. While a referenced RDS/EDS resource is missing (warming), the
//! response is ACKed and the previous configuration stays in force.
//!
//! The stream reconnects with exponential backoff and resumes with
//! `initial_resource_versions`; the data path keeps its configuration
//! meanwhile. Readiness ([`crate::config::Store::synced`]) waits for the
//! first complete configuration. A referenced resource still missing after
//! [`XdsConfig::warming_timeout`] is taken as empty (as Envoy's
//! `initial_fetch_timeout`), so it cannot hold back every later update.

pub mod translate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use mesh_proto::core::Node;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::envoy::config::cluster::v3::Cluster;
use mesh_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use mesh_proto::envoy::config::listener::v3::Listener;
use mesh_proto::envoy::config::route::v3::RouteConfiguration;
use mesh_proto::rpc::Status as RpcStatus;
use mesh_proto::type_url;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::config::{model, Bootstrap, Store};

/// The four resource types, in the order Envoy asks for them.
pub const TYPES: [&str; 4] = [
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
];

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `http://host:port`, or `https://host:port` (with `root_cert`).
    pub address: String,
    /// PEM root the server's certificate must chain to (TLS).
    pub root_cert: Option<PathBuf>,
    /// Name expected in the server's certificate (default: the host).
    pub server_name: Option<String>,
    /// File holding a bearer token, re-read on each connect.
    pub token_file: Option<PathBuf>,
    /// `Node.id` (Istio's form: `router~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub node_id: String,
    /// The Kubernetes node the waypoint runs on, sent as
    /// `Node.metadata.NODE_NAME` (as Istio's proxies do): a control plane
    /// authenticating nodes checks the token against it, and serves the
    /// waypoint pod `node_id` names only if it runs there.
    pub node_name: Option<String>,
    pub node_cluster: String,
    /// How long a referenced route configuration or load assignment may
    /// stay missing before it is taken as empty (Envoy's
    /// `initial_fetch_timeout`, 15 s), so one absent resource cannot hold
    /// back every later update.
    pub warming_timeout: Duration,
}

impl XdsConfig {
    fn channel(&self) -> anyhow::Result<Channel> {
        let mut ep = Endpoint::from_shared(self.address.clone())
            .with_context(|| format!("xDS address {:?}", self.address))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(root) = &self.root_cert {
            let pem = std::fs::read_to_string(root)
                .with_context(|| format!("reading xDS root {}", root.display()))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(n) = &self.server_name {
                tls = tls.domain_name(n.clone());
            }
            ep = ep.tls_config(tls).context("xDS TLS")?;
        }
        Ok(ep.connect_lazy())
    }

    fn token(
        &self,
    ) -> anyhow::Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>> {
        let Some(p) = &self.token_file else {
            return Ok(None);
        };
        let tok =
            std::fs::read_to_string(p).with_context(|| format!("reading token {}", p.display()))?;
        let v = format!("Bearer {}", tok.trim())
            .parse()
            .map_err(|_| anyhow!("token in {} is not a valid header value", p.display()))?;
        Ok(Some(v))
    }
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

    /// Applies one delta response (decoding every resource).
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        fn put<T: Message + Default>(
            m: &mut BTreeMap<String, (String, T)>,
            what: &str,
            resp: &DeltaDiscoveryResponse,
        ) -> Result<(), String> {
            for r in &resp.resources {
                let Some(a) = &r.resource else {
                    return Err(format!("{what} {:?}: resource has no body", r.name));
                };
                if a.type_url != resp.type_url {
                    return Err(format!(
                        "{what} {:?}: type {:?} in a {what} response",
                        r.name, a.type_url
                    ));
                }
                let v = T::decode(a.value.as_slice())
                    .map_err(|e| format!("{what} {:?}: cannot decode: {e}", r.name))?;
                m.insert(r.name.clone(), (r.version.clone(), v));
            }
            for n in &resp.removed_resources {
                m.remove(n);
            }
            Ok(())
        }
        match resp.type_url.as_str() {
            type_url::LISTENER => put(&mut self.listeners, "Listener", resp)?,
            type_url::ROUTE_CONFIGURATION => put(&mut self.routes, "RouteConfiguration", resp)?,
            type_url::CLUSTER => put(&mut self.clusters, "Cluster", resp)?,
            type_url::CLUSTER_LOAD_ASSIGNMENT => {
                put(&mut self.endpoints, "ClusterLoadAssignment", resp)?
            }
            other => return Err(format!("unexpected type {other:?}")),
        }
        self.answered.insert(resp.type_url.clone());
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

/// Runs the client until the process ends: connects, follows the stream,
/// reconnects with backoff. Marks the store not synced until the first
/// complete configuration is in force.
pub fn spawn(cfg: XdsConfig, store: Arc<Store>) -> tokio::task::JoinHandle<()> {
    store.set_synced(false);
    tokio::spawn(async move {
        let mut client = Client {
            cfg,
            store,
            cache: Cache::default(),
            rds: BTreeSet::new(),
            eds: BTreeSet::new(),
            needed_since: HashMap::new(),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match client.session().await {
                Ok(got_any) => {
                    info!("xDS stream closed by the server");
                    if got_any {
                        backoff = Duration::from_millis(100);
                    }
                }
                Err((got_any, e)) => {
                    warn!(address = %client.cfg.address, error = %format!("{e:#}"), "xDS stream failed");
                    if got_any {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
            // Full jitter, so a fleet of waypoints does not reconnect at once.
            let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            debug!(?wait, "xDS reconnecting");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    })
}

struct Client {
    cfg: XdsConfig,
    store: Arc<Store>,
    cache: Cache,
    /// Names subscribed by RDS and EDS on the current stream.
    rds: BTreeSet<String>,
    eds: BTreeSet<String>,
    /// (type, name) -> when it was first needed, for warming timeouts.
    needed_since: HashMap<(String, String), Instant>,
}

type Tx = mpsc::Sender<DeltaDiscoveryRequest>;

impl Client {
    fn node(&self) -> Node {
        Node {
            id: self.cfg.node_id.clone(),
            cluster: self.cfg.node_cluster.clone(),
            metadata: self.cfg.node_name.as_ref().map(|n| prost_types::Struct {
                fields: [(
                    "NODE_NAME".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(n.clone())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
            user_agent_name: "waypoint".into(),
        }
    }

    /// One stream. Returns whether any response arrived (to reset the
    /// backoff), with the error if it ended in one.
    async fn session(&mut self) -> Result<bool, (bool, anyhow::Error)> {
        let mut got_any = false;
        let r = self.session_inner(&mut got_any).await;
        r.map(|()| got_any).map_err(|e| (got_any, e))
    }

    async fn session_inner(&mut self, got_any: &mut bool) -> anyhow::Result<()> {
        let channel = self.cfg.channel()?;
        let (tx, rx) = mpsc::channel(16);
        // Resume: what we hold, and the names we need.
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
        let mut first = true;
        for t in TYPES {
            let names = match t {
                type_url::ROUTE_CONFIGURATION => &self.rds,
                type_url::CLUSTER_LOAD_ASSIGNMENT => &self.eds,
                // Empty on the first request: a wildcard subscription.
                _ => &BTreeSet::new(),
            };
            let wildcard = t == type_url::LISTENER || t == type_url::CLUSTER;
            if !wildcard && names.is_empty() {
                continue;
            }
            let req = DeltaDiscoveryRequest {
                node: first.then(|| self.node()),
                type_url: t.into(),
                resource_names_subscribe: names.iter().cloned().collect(),
                initial_resource_versions: self.cache.versions(t),
                ..Default::default()
            };
            first = false;
            tx.send(req)
                .await
                .map_err(|_| anyhow!("request channel closed"))?;
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(tok) = self.cfg.token()? {
            req.metadata_mut().insert("authorization", tok);
        }
        let mut ads = AggregatedDiscoveryServiceClient::new(channel);
        let mut stream = ads
            .delta_aggregated_resources(req)
            .await
            .context("opening the delta ADS stream")?
            .into_inner();
        info!(address = %self.cfg.address, "xDS stream open");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                m = stream.message() => {
                    let Some(resp) = m.context("reading the ADS stream")? else {
                        return Ok(());
                    };
                    *got_any = true;
                    self.handle(&tx, resp).await?;
                }
                _ = tick.tick() => self.warming_expired(),
            }
        }
    }

    async fn handle(&mut self, tx: &Tx, resp: DeltaDiscoveryResponse) -> anyhow::Result<()> {
        let t = resp.type_url.clone();
        let outcome = self.stage(&resp);
        let error_detail = match &outcome {
            Ok(_) => None,
            Err(msg) => {
                warn!(type_url = %t, nonce = %resp.nonce, error = %msg,
                      "xDS update rejected (NACK); the previous configuration stays in force");
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: msg.clone(),
                    details: Vec::new(),
                })
            }
        };
        let ack = DeltaDiscoveryRequest {
            type_url: t,
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        };
        tx.send(ack)
            .await
            .map_err(|_| anyhow!("request channel closed"))?;
        if let Ok((rds, eds)) = outcome {
            self.resubscribe(tx, type_url::ROUTE_CONFIGURATION, rds)
                .await?;
            self.resubscribe(tx, type_url::CLUSTER_LOAD_ASSIGNMENT, eds)
                .await?;
        }
        Ok(())
    }

    /// Applies a response to a copy of the cache and, when complete, puts
    /// the result in force; commits the copy only if all of that worked.
    /// Returns the RDS and EDS names now needed.
    fn stage(
        &mut self,
        resp: &DeltaDiscoveryResponse,
    ) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
        let mut next = self.cache.clone();
        next.apply(resp)?;
        let a = next.assemble(&|t, n| self.expired(t, n))?;
        if let Some(b) = &a.bootstrap {
            self.store.apply(b).map_err(|e| explain(b, &e))?;
            if !self.store.synced() {
                info!("first complete xDS configuration in force; ready");
            }
            self.store.set_synced(true);
            info!(type_url = %resp.type_url, version = %resp.system_version_info, "xDS configuration applied");
        } else {
            debug!(type_url = %resp.type_url, "xDS configuration warming: waiting for referenced resources");
        }
        self.cache = next;
        Ok((a.rds, a.eds))
    }

    fn expired(&self, t: &str, n: &str) -> bool {
        self.needed_since
            .get(&(t.to_string(), n.to_string()))
            .is_some_and(|since| since.elapsed() >= self.cfg.warming_timeout)
    }

    /// On a timer: if a configuration is held back only by resources that
    /// have been missing too long, put it in force without them.
    fn warming_expired(&mut self) {
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

    /// Subscribes to newly referenced names and drops ones no longer used.
    async fn resubscribe(
        &mut self,
        tx: &Tx,
        t: &str,
        want: BTreeSet<String>,
    ) -> anyhow::Result<()> {
        let have = if t == type_url::ROUTE_CONFIGURATION {
            &mut self.rds
        } else {
            &mut self.eds
        };
        if *have == want {
            return Ok(());
        }
        let sub: Vec<String> = want.difference(have).cloned().collect();
        let unsub: Vec<String> = have.difference(&want).cloned().collect();
        *have = want;
        let now = Instant::now();
        for n in &sub {
            self.needed_since
                .entry((t.to_string(), n.clone()))
                .or_insert(now);
        }
        for n in &unsub {
            self.needed_since.remove(&(t.to_string(), n.clone()));
        }
        if t == type_url::ROUTE_CONFIGURATION {
            for n in &unsub {
                self.cache.routes.remove(n);
            }
        } else {
            for n in &unsub {
                self.cache.endpoints.remove(n);
            }
        }
        let req = DeltaDiscoveryRequest {
            type_url: t.into(),
            resource_names_subscribe: sub,
            resource_names_unsubscribe: unsub,
            ..Default::default()
        };
        tx.send(req)
            .await
            .map_err(|_| anyhow!("request channel closed"))
    }
}
