//! The ADS server: `envoy.service.discovery.v3.AggregatedDiscoveryService`,
//! delta and state-of-the-world, serving whatever [`Snapshot`] is current.
//!
//! Each stream tracks, per type URL, what the client subscribed to
//! (wildcard or names) and which version of each resource it holds. A new
//! snapshot is diffed against that: changed resources are sent, vanished
//! ones listed in `removed_resources`. Snapshots carry the names changed
//! since the previous one, so a stream that saw the previous snapshot only
//! looks at those. A stream resuming with `initial_resource_versions` is
//! sent only what differs from what it already has (versions are content
//! hashes, stable across restarts). Bursts coalesce twice: the translator
//! debounces, and a stream busy sending simply sees the latest snapshot.
//!
//! ACKs and NACKs are matched by nonce; a NACK is logged and counted and
//! nothing is resent until the next change (the client keeps its last good
//! config). The first request must carry a `Node`; its node name
//! (`metadata.NODE_NAME`, else `id`) must match the authenticated token.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mesh_proto::core::Node;
use mesh_proto::discovery::encoded::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_proto::discovery::encoded::{
    EncodedDeltaDiscoveryResponse as DeltaDiscoveryResponse,
    EncodedDiscoveryResponse as DiscoveryResponse,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::Auth;
use crate::envoy::Scope;
use crate::metrics::{Metrics, TypeLabel};
use crate::translate::{parse_version, Resource, Resources};

/// One translation of the model.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub resources: Arc<Resources>,
    /// `(type_url, name)` changed since generation `generation - 1`;
    /// `None` when unknown (the first snapshot).
    pub changed: Option<HashSet<(&'static str, Arc<str>)>>,
}

impl Snapshot {
    /// The next snapshot after `prev`: `changed` names what differs (the
    /// translator knows, having retranslated only that).
    pub fn next(
        prev: &Snapshot,
        resources: Resources,
        changed: HashSet<(&'static str, Arc<str>)>,
    ) -> Snapshot {
        Snapshot {
            generation: prev.generation + 1,
            resources: Arc::new(resources),
            changed: Some(changed),
        }
    }
}

/// The resources of `type_url` a client may see: everything, but for the
/// waypoints' Envoy types only its own waypoint's (see [`Scope`]).
fn visible<'a>(
    snap: &'a Snapshot,
    type_url: &str,
    gateway: Option<&str>,
) -> Cow<'a, BTreeMap<Arc<str>, Arc<Resource>>> {
    static EMPTY: BTreeMap<Arc<str>, Arc<Resource>> = BTreeMap::new();
    let all = snap.resources.get(type_url).unwrap_or(&EMPTY);
    if Scope::is_scoped(type_url) {
        Cow::Owned(snap.resources.waypoints.view(type_url, all, gateway))
    } else {
        Cow::Borrowed(all)
    }
}

/// The waypoint Gateway a client is in `snap` (`None`: not a waypoint).
fn gateway_in(snap: &Snapshot, node_id: &str, node: &str) -> Option<String> {
    snap.resources
        .waypoints
        .gateway_of(node_id, node)
        .map(str::to_string)
}

#[derive(Clone)]
pub struct AdsServer {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
}

/// The node name a client gives: `metadata.NODE_NAME` (as Istio's ztunnel
/// sends it), else `id`.
pub fn node_name(n: &Node) -> String {
    n.metadata
        .as_ref()
        .and_then(|m| m.fields.get("NODE_NAME"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| n.id.clone())
}

#[allow(clippy::result_large_err)]
fn check_node(authed: &Option<String>, node: Option<&Node>) -> Result<String, Status> {
    let Some(n) = node else {
        return Err(Status::invalid_argument(
            "the first request of a stream must carry node",
        ));
    };
    let name = node_name(n);
    match authed {
        Some(a) if *a != name => Err(Status::permission_denied(format!(
            "token is for node {a:?} but the request names node {name:?}"
        ))),
        _ if name.is_empty() => Err(Status::invalid_argument("node has no name")),
        _ => Ok(name),
    }
}

/// What one stream wants and holds for one type URL.
#[derive(Default)]
struct Watch {
    wildcard: bool,
    names: HashSet<String>,
    /// name -> version the client holds (as far as we sent it). Names are
    /// shared with the snapshot's resources, so 100 clients holding 12,500
    /// resources each cost little more than the pointers.
    known: HashMap<Arc<str>, u64>,
}

impl Watch {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Resources to send and names to remove. `only`: look at these names
    /// only; `force`: send even when the client has the version.
    fn diff(
        &mut self,
        res: &BTreeMap<Arc<str>, Arc<Resource>>,
        only: Option<&mut dyn Iterator<Item = &Arc<str>>>,
        force: &HashSet<String>,
    ) -> (Vec<Arc<Resource>>, Vec<String>) {
        let candidates: Vec<Arc<str>> = match only {
            Some(it) => it.cloned().collect(),
            None if self.wildcard => res
                .values()
                .map(|r| r.name.clone())
                .chain(self.known.keys().filter(|k| !res.contains_key(*k)).cloned())
                .collect(),
            None => self
                .names
                .iter()
                .map(|n| Arc::from(n.as_str()))
                .chain(self.known.keys().cloned())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect(),
        };
        let mut send = Vec::new();
        let mut removed = Vec::new();
        let forced = force.iter().map(|n| Arc::from(n.as_str()));
        for name in candidates.into_iter().chain(forced) {
            if !self.wants(&name) {
                if self.known.remove(&name).is_some() {
                    removed.push(name.to_string());
                }
                continue;
            }
            match res.get(&*name) {
                Some(r) => {
                    if self.known.get(&name) != Some(&r.hash) || force.contains(&*name) {
                        self.known.insert(r.name.clone(), r.hash);
                        send.push(r.clone());
                    }
                }
                None => {
                    if self.known.remove(&name).is_some() || force.contains(&*name) {
                        removed.push(name.to_string());
                    }
                }
            }
        }
        send.sort_by(|a, b| a.name.cmp(&b.name));
        send.dedup_by(|a, b| a.name == b.name);
        removed.sort();
        removed.dedup();
        (send, removed)
    }
}

/// Most resources in one delta response.
pub const CHUNK: usize = 500;

type Out<T> = mpsc::Sender<Result<T, Status>>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct ConnGuard(Arc<Metrics>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connected.dec();
    }
}

fn label(t: &str) -> TypeLabel {
    TypeLabel {
        type_url: t.to_string(),
    }
}

impl AdsServer {
    async fn run_delta(
        self,
        authed: Option<String>,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        tx: Out<DeltaDiscoveryResponse>,
    ) -> Result<(), Status> {
        self.metrics.connected.inc();
        let _guard = ConnGuard(self.metrics.clone());
        let mut snaps = self.snapshots.clone();
        let mut cur = snaps.borrow_and_update().clone();
        let mut watches: BTreeMap<String, Watch> = BTreeMap::new();
        let mut node: Option<String> = None;
        let mut node_id = String::new();
        let mut gateway: Option<String> = None;
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(req) = msg? else { break };
                    if node.is_none() {
                        let n = check_node(&authed, req.node.as_ref())?;
                        info!(node = %n, "delta ADS stream opened");
                        node_id = req.node.as_ref().map(|x| x.id.clone()).unwrap_or_default();
                        gateway = gateway_in(&cur, &node_id, &n);
                        node = Some(n);
                    }
                    if req.type_url.is_empty() {
                        return Err(Status::invalid_argument("type_url is required"));
                    }
                    let t = req.type_url.clone();
                    if !req.response_nonce.is_empty() {
                        if let Some(err) = &req.error_detail {
                            self.metrics.nacks.get_or_create(&label(&t)).inc();
                            warn!(node = ?node, type_url = %t, nonce = %req.response_nonce,
                                  error = %err.message, "NACK: client rejected a response");
                        } else {
                            self.metrics.acks.get_or_create(&label(&t)).inc();
                            debug!(node = ?node, type_url = %t, nonce = %req.response_nonce, "ACK");
                        }
                    }
                    let first = !watches.contains_key(&t);
                    let w = watches.entry(t.clone()).or_default();
                    let mut force = HashSet::new();
                    if first {
                        w.known = req
                            .initial_resource_versions
                            .iter()
                            .map(|(k, v)| (Arc::from(k.as_str()), parse_version(v)))
                            .collect();
                        if req.resource_names_subscribe.is_empty() {
                            w.wildcard = true;
                        }
                    }
                    for n in &req.resource_names_subscribe {
                        if n == "*" {
                            w.wildcard = true;
                        } else {
                            w.names.insert(n.clone());
                            force.insert(n.clone());
                        }
                    }
                    let mut dropped = false;
                    for n in &req.resource_names_unsubscribe {
                        if n == "*" {
                            w.wildcard = false;
                        } else {
                            w.names.remove(n);
                        }
                        dropped = true;
                    }
                    if dropped {
                        // The client forgets what it no longer wants.
                        let keep: HashSet<Arc<str>> =
                            w.known.keys().filter(|k| w.wants(k)).cloned().collect();
                        w.known.retain(|k, _| keep.contains(k));
                    }
                    if first || !force.is_empty() {
                        let res = visible(&cur, &t, gateway.as_deref());
                        let (send, removed) = if first {
                            w.diff(&res, None, &force)
                        } else {
                            w.diff(&res, Some(&mut std::iter::empty()), &force)
                        };
                        self.send_delta(&tx, &t, cur.generation, &mut nonce, send, removed).await?;
                    }
                }
                r = snaps.changed() => {
                    if r.is_err() { break }
                    let next = snaps.borrow_and_update().clone();
                    // A waypoint whose pod changed Gateway (or appeared)
                    // sees other resources: compare everything.
                    let next_gateway = node
                        .as_deref()
                        .and_then(|n| gateway_in(&next, &node_id, n));
                    let contiguous =
                        next.generation == cur.generation + 1 && next_gateway == gateway;
                    gateway = next_gateway;
                    for (t, w) in watches.iter_mut() {
                        let res = visible(&next, t, gateway.as_deref());
                        let (send, removed) = match (&next.changed, contiguous) {
                            (Some(ch), true) => {
                                let mut it = ch.iter().filter(|(ct, _)| ct == t).map(|(_, n)| n);
                                w.diff(&res, Some(&mut it), &HashSet::new())
                            }
                            _ => w.diff(&res, None, &HashSet::new()),
                        };
                        if send.is_empty() && removed.is_empty() {
                            continue;
                        }
                        self.send_delta(&tx, t, next.generation, &mut nonce, send, removed).await?;
                    }
                    cur = next;
                }
            }
        }
        info!(node = ?node, "delta ADS stream closed");
        Ok(())
    }

    /// Sends resources and removals, in chunks of at most [`CHUNK`]
    /// resources: each stream's encode buffer grows to its largest message
    /// and keeps that memory, so a 12,500-resource initial sync in one
    /// message would pin megabytes per client. Every chunk but the last
    /// has `system_version_info` `<generation>/partial` (the field is for
    /// debugging; clients that do not know this apply each chunk as any
    /// delta response), which lets our ztunnel hold readiness until the
    /// whole first sync is in.
    async fn send_delta(
        &self,
        tx: &Out<DeltaDiscoveryResponse>,
        type_url: &str,
        generation: u64,
        nonce: &mut u64,
        send: Vec<Arc<Resource>>,
        mut removed: Vec<String>,
    ) -> Result<(), Status> {
        let chunks: Vec<&[Arc<Resource>]> = if send.is_empty() {
            vec![&[]]
        } else {
            send.chunks(CHUNK).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            *nonce += 1;
            self.metrics.pushes.get_or_create(&label(type_url)).inc();
            let resp = DeltaDiscoveryResponse {
                system_version_info: if i == last {
                    generation.to_string()
                } else {
                    format!("{generation}/partial")
                },
                resources: chunk.iter().map(|r| r.delta.clone()).collect(),
                type_url: type_url.to_string(),
                nonce: nonce.to_string(),
                removed_resources: if i == last {
                    std::mem::take(&mut removed)
                } else {
                    vec![]
                },
            };
            tx.send(Ok(resp))
                .await
                .map_err(|_| Status::cancelled("client went away"))?;
        }
        Ok(())
    }

    async fn run_sotw(
        self,
        authed: Option<String>,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: Out<DiscoveryResponse>,
    ) -> Result<(), Status> {
        self.metrics.connected.inc();
        let _guard = ConnGuard(self.metrics.clone());
        let mut snaps = self.snapshots.clone();
        let mut cur = snaps.borrow_and_update().clone();
        // type -> requested names (empty: all).
        let mut watches: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut node: Option<String> = None;
        let mut node_id = String::new();
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(req) = msg? else { break };
                    if node.is_none() {
                        node = Some(check_node(&authed, req.node.as_ref())?);
                        node_id = req.node.as_ref().map(|x| x.id.clone()).unwrap_or_default();
                    }
                    let gateway = node.as_deref().and_then(|n| gateway_in(&cur, &node_id, n));
                    let t = req.type_url.clone();
                    if !req.response_nonce.is_empty() {
                        if let Some(err) = &req.error_detail {
                            self.metrics.nacks.get_or_create(&label(&t)).inc();
                            warn!(node = ?node, type_url = %t, error = %err.message, "NACK");
                        } else {
                            self.metrics.acks.get_or_create(&label(&t)).inc();
                        }
                    }
                    let mut names = req.resource_names.clone();
                    names.sort();
                    if watches.get(&t) != Some(&names) {
                        watches.insert(t.clone(), names.clone());
                        nonce += 1;
                        self.send_sotw(&tx, &cur, &t, &names, gateway.as_deref(), nonce).await?;
                    }
                }
                r = snaps.changed() => {
                    if r.is_err() { break }
                    cur = snaps.borrow_and_update().clone();
                    let gateway = node.as_deref().and_then(|n| gateway_in(&cur, &node_id, n));
                    for (t, names) in &watches {
                        let touched = match &cur.changed {
                            Some(ch) => ch.iter().any(|(ct, n)| ct == t
                                && (names.is_empty() || names.iter().any(|x| **x == **n))),
                            None => true,
                        } || Scope::is_scoped(t);
                        if touched {
                            nonce += 1;
                            self.send_sotw(&tx, &cur, t, names, gateway.as_deref(), nonce).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn send_sotw(
        &self,
        tx: &Out<DiscoveryResponse>,
        snap: &Snapshot,
        type_url: &str,
        names: &[String],
        gateway: Option<&str>,
        nonce: u64,
    ) -> Result<(), Status> {
        self.metrics.pushes.get_or_create(&label(type_url)).inc();
        let resources = visible(snap, type_url, gateway)
            .values()
            .filter(|r| names.is_empty() || names.iter().any(|n| **n == *r.name))
            .map(|r| r.any.clone())
            .collect();
        tx.send(Ok(DiscoveryResponse {
            version_info: snap.generation.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.to_string(),
        }))
        .await
        .map_err(|_| Status::cancelled("client went away"))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let authed = self.auth.authenticate(req.metadata())?;
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            if let Err(s) = this.run_sotw(authed, inbound, tx.clone()).await {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let authed = self.auth.authenticate(req.metadata())?;
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let inbound = req.into_inner();
        tokio::spawn(async move {
            if let Err(s) = this.run_delta(authed, inbound, tx.clone()).await {
                debug!(status = %s, "delta ADS stream ended with an error");
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
