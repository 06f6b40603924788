//! The ADS server: `envoy.service.discovery.v3.AggregatedDiscoveryService`,
//! delta and state-of-the-world, serving whatever [`Snapshot`] is current.
//!
//! Each stream tracks, per type URL, what the client subscribed to
//! (wildcard or names) and which version of each resource it holds. A new
//! snapshot is diffed against that: changed resources are sent, vanished
//! ones listed in `removed_resources`. Snapshots carry the names changed
//! since the previous one, so a stream that saw the previous snapshot only
//! looks at those (one that skipped a snapshot compares everything, delta
//! and SotW alike). A delta client subscribing to `*` late is sent all it
//! does not hold yet. A stream resuming with `initial_resource_versions` is
//! sent only what differs from what it already has (versions are content
//! hashes, stable across restarts). Bursts coalesce twice: the translator
//! debounces, and a stream busy sending simply sees the latest snapshot.
//!
//! Fan-out is what costs (100 clients each sent 12,500 resources), so the
//! per-client work is kept to pointers: what a client holds is a snapshot
//! map plus the few names where it differs (module `known`), and a new
//! wildcard client is sent the snapshot's resources as chunks encoded
//! once per snapshot and shared by every stream ([`Snapshot`]'s
//! `first_sync`).
//!
//! ACKs and NACKs are matched by nonce; a NACK is logged and counted and
//! nothing is resent until the next change (the client keeps its last good
//! config). The first request must carry a `Node`; its node name
//! (`metadata.NODE_NAME`, else `id`) must match the authenticated token.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use mesh_proto::core::Node;
use mesh_proto::discovery::encoded::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_proto::discovery::encoded::{
    EncodedDeltaDiscoveryResponse as DeltaDiscoveryResponse,
    EncodedDiscoveryResponse as DiscoveryResponse, EncodedResources, Run,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Auth, Caller};
use crate::envoy::Scope;
use crate::metrics::{Metrics, TypeLabel};
use crate::translate::{parse_version, Named, Resource, Resources};

mod known;
use known::Known;

/// One translation of the model.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub resources: Arc<Resources>,
    /// `(type_url, name)` changed since generation `generation - 1`;
    /// `None` when unknown (the first snapshot).
    pub changed: Option<HashSet<(&'static str, Arc<str>)>>,
    /// Per type, all its resources in chunks of [`CHUNK`], encoded once
    /// on first use: what every new wildcard client is sent.
    first_sync: Mutex<HashMap<String, Arc<[Run]>>>,
}

impl Snapshot {
    /// The first snapshot.
    pub fn first(resources: Resources) -> Snapshot {
        Snapshot {
            generation: 1,
            resources: Arc::new(resources),
            ..Default::default()
        }
    }

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
            ..Default::default()
        }
    }

    /// All resources of `type_url` (not a scoped one: those differ per
    /// client), chunked and encoded; the first stream to ask builds them
    /// while the others wait, then all share them.
    fn first_sync(&self, type_url: &str) -> Arc<[Run]> {
        let mut cache = self.first_sync.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(runs) = cache.get(type_url) {
            return runs.clone();
        }
        let all: Vec<&Arc<Resource>> = self
            .resources
            .get(type_url)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        let runs: Arc<[Run]> = all
            .chunks(CHUNK)
            .map(|c| EncodedResources::run(c.iter().map(|r| &r.delta)))
            .collect();
        cache.insert(type_url.to_string(), runs.clone());
        runs
    }
}

/// The resources of `type_url` a client may see: everything, but for the
/// waypoints' Envoy types only its own waypoint's (see [`Scope`]).
fn visible(snap: &Snapshot, type_url: &str, gateway: Option<&str>) -> Arc<Named> {
    match snap.resources.get(type_url) {
        Some(all) if Scope::is_scoped(type_url) => {
            Arc::new(snap.resources.waypoints.view(type_url, all, gateway))
        }
        Some(all) => all.clone(),
        None => Arc::default(),
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
fn check_node(authed: &Option<Caller>, node: Option<&Node>) -> Result<String, Status> {
    let Some(n) = node else {
        return Err(Status::invalid_argument(
            "the first request of a stream must carry node",
        ));
    };
    let name = node_name(n);
    match authed {
        Some(a) if a.node != name => Err(Status::permission_denied(format!(
            "token is for node {:?} but the request names node {name:?}",
            a.node
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
    /// name -> version the client holds (as far as we sent it).
    known: Known,
}

/// Resources to send and names to remove.
type Diff = (Vec<Arc<Resource>>, Vec<String>);

/// What a request's (un)subscriptions call for comparing now; the set
/// holds names newly subscribed to, sent even when the client has them.
#[derive(Debug, PartialEq)]
enum Compare {
    /// Nothing new is wanted.
    Nothing,
    /// Only the names subscribed to.
    Names(HashSet<String>),
    /// Everything the client may see: a new watch, or a late `*`
    /// subscription (a wildcard client must get what does not change too).
    All(HashSet<String>),
}

impl Watch {
    /// Applies one request's `subscribe` and `unsubscribe` lists (`first`:
    /// the watch's first request, where no names means wildcard).
    fn subscribe(&mut self, first: bool, subscribe: &[String], unsubscribe: &[String]) -> Compare {
        let was_wildcard = self.wildcard;
        if first && subscribe.is_empty() {
            self.wildcard = true;
        }
        let mut force = HashSet::new();
        for n in subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
                force.insert(n.clone());
            }
        }
        for n in unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n);
            }
        }
        if !unsubscribe.is_empty() {
            // The client forgets what it no longer wants.
            let (wildcard, names) = (self.wildcard, &self.names);
            self.known.retain(|k| wildcard || names.contains(k));
        }
        if first || (self.wildcard && !was_wildcard) {
            Compare::All(force)
        } else if !force.is_empty() {
            Compare::Names(force)
        } else {
            Compare::Nothing
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// A wildcard client that holds nothing: its full diff is everything.
    fn holds_nothing_wants_all(&self) -> bool {
        self.wildcard && self.known.as_base().is_some_and(|b| b.is_empty())
    }

    /// Compares everything: `res` is what the client may see of snapshot
    /// `generation`. `force`: send these even when the client has the
    /// version. A wildcard client holds exactly `res` afterwards.
    fn diff_all(&mut self, res: &Arc<Named>, generation: u64, force: &HashSet<String>) -> Diff {
        let out = match (self.wildcard, self.known.as_base()) {
            (true, Some(held)) => walk(held, res, force),
            (true, None) => {
                let candidates: Vec<Arc<str>> = res
                    .keys()
                    .chain(self.known.names().filter(|k| !res.contains_key(*k)))
                    .cloned()
                    .collect();
                self.diff_names(res, candidates.into_iter(), force)
            }
            (false, _) => {
                let candidates: HashSet<Arc<str>> = self
                    .names
                    .iter()
                    .map(|n| Arc::from(n.as_str()))
                    .chain(self.known.names().cloned())
                    .collect();
                self.diff_names(res, candidates.into_iter(), force)
            }
        };
        if self.wildcard {
            self.known.rebase(res.clone(), generation);
        }
        out
    }

    /// Compares only `changed`: what differs between snapshot `from`, the
    /// one this stream compared last, and `res` of snapshot `generation`.
    fn diff_changed(
        &mut self,
        from: u64,
        res: &Arc<Named>,
        generation: u64,
        changed: impl Iterator<Item = Arc<str>>,
    ) -> Diff {
        // A wildcard client that held all of `from` then holds all of `res`.
        let synced = self.wildcard && self.known.in_sync_with(from);
        let out = self.diff_names(res, changed, &HashSet::new());
        if synced {
            self.known.rebase(res.clone(), generation);
        }
        out
    }

    /// Compares `candidates` (and `force`d names) only.
    fn diff_names(
        &mut self,
        res: &Named,
        candidates: impl Iterator<Item = Arc<str>>,
        force: &HashSet<String>,
    ) -> Diff {
        let mut send = Vec::new();
        let mut removed = Vec::new();
        let forced = force.iter().map(|n| Arc::from(n.as_str()));
        for name in candidates.chain(forced) {
            if !self.wants(&name) {
                if self.known.remove(&name) {
                    removed.push(name.to_string());
                }
                continue;
            }
            match res.get(&*name) {
                Some(r) => {
                    if self.known.get(&name) != Some(r.hash) || force.contains(&*name) {
                        self.known.insert(r.name.clone(), r.hash);
                        send.push(r.clone());
                    }
                }
                None => {
                    if self.known.remove(&name) || force.contains(&*name) {
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

/// The full diff of a wildcard client holding exactly `held`: one walk
/// of both maps in name order, no per-name lookups. A new client holds
/// nothing, so its first sync is `res` as it is.
fn walk(held: &Named, res: &Named, force: &HashSet<String>) -> Diff {
    use std::cmp::Ordering;
    let mut send = Vec::new();
    let mut removed = Vec::new();
    if !std::ptr::eq(held, res) {
        let (mut a, mut b) = (held.iter().peekable(), res.iter().peekable());
        loop {
            let order = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((ka, _)), Some((kb, _))) if Arc::ptr_eq(ka, kb) => Ordering::Equal,
                (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
            };
            match order {
                Ordering::Less => {
                    let (k, _) = a.next().expect("peeked");
                    removed.push(k.to_string());
                }
                Ordering::Greater => {
                    let (_, r) = b.next().expect("peeked");
                    send.push(r.clone());
                }
                Ordering::Equal => {
                    let ((_, old), (k, r)) = (a.next().expect("peeked"), b.next().expect("peeked"));
                    if old.hash != r.hash || force.contains(&**k) {
                        send.push(r.clone());
                    }
                }
            }
        }
    } else {
        send.extend(force.iter().filter_map(|n| res.get(n.as_str())).cloned());
    }
    if !force.is_empty() {
        removed.extend(
            force
                .iter()
                .filter(|n| !res.contains_key(n.as_str()))
                .cloned(),
        );
        send.sort_by(|a, b| a.name.cmp(&b.name));
        send.dedup_by(|a, b| a.name == b.name);
        removed.sort();
        removed.dedup();
    }
    (send, removed)
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
        authed: Option<Caller>,
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
                    if first {
                        w.known = Known::from_versions(
                            req.initial_resource_versions
                                .iter()
                                .map(|(k, v)| (Arc::from(k.as_str()), parse_version(v))),
                        );
                    }
                    let compare = w.subscribe(
                        first,
                        &req.resource_names_subscribe,
                        &req.resource_names_unsubscribe,
                    );
                    match compare {
                        Compare::All(force) if first && force.is_empty()
                            && w.holds_nothing_wants_all() && !Scope::is_scoped(&t) =>
                        {
                            // A new client: everything, as encoded for all.
                            let res = visible(&cur, &t, gateway.as_deref());
                            w.known.rebase(res, cur.generation);
                            let chunks = cur.first_sync(&t).iter().map(|run| {
                                let mut r = EncodedResources::default();
                                r.push_run(run);
                                r
                            }).collect();
                            self.send_chunks(&tx, &t, cur.generation, &mut nonce, chunks, vec![]).await?;
                        }
                        Compare::All(force) => {
                            let res = visible(&cur, &t, gateway.as_deref());
                            let (send, removed) = w.diff_all(&res, cur.generation, &force);
                            self.send_delta(&tx, &t, cur.generation, &mut nonce, send, removed).await?;
                        }
                        Compare::Names(force) => {
                            let res = visible(&cur, &t, gateway.as_deref());
                            let (send, removed) = w.diff_names(&res, std::iter::empty(), &force);
                            self.send_delta(&tx, &t, cur.generation, &mut nonce, send, removed).await?;
                        }
                        Compare::Nothing => {}
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
                        let none = HashSet::new();
                        let (send, removed) = match (&next.changed, contiguous) {
                            (Some(ch), true) => {
                                let it = ch.iter().filter(|(ct, _)| ct == t).map(|(_, n)| n.clone());
                                w.diff_changed(cur.generation, &res, next.generation, it)
                            }
                            _ => w.diff_all(&res, next.generation, &none),
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
    /// message would pin megabytes per client.
    async fn send_delta(
        &self,
        tx: &Out<DeltaDiscoveryResponse>,
        type_url: &str,
        generation: u64,
        nonce: &mut u64,
        send: Vec<Arc<Resource>>,
        removed: Vec<String>,
    ) -> Result<(), Status> {
        let chunks = send
            .chunks(CHUNK)
            .map(|chunk| {
                let mut r = EncodedResources::default();
                for res in chunk {
                    r.push(res.delta.clone());
                }
                r
            })
            .collect();
        self.send_chunks(tx, type_url, generation, nonce, chunks, removed)
            .await
    }

    /// Sends `chunks` (none: one empty response), `removed` with the last.
    /// Every chunk but the last has `system_version_info`
    /// `<generation>/partial` (the field is for debugging; clients that do
    /// not know this apply each chunk as any delta response), which lets
    /// our ztunnel hold readiness until the whole first sync is in.
    async fn send_chunks(
        &self,
        tx: &Out<DeltaDiscoveryResponse>,
        type_url: &str,
        generation: u64,
        nonce: &mut u64,
        mut chunks: Vec<EncodedResources>,
        mut removed: Vec<String>,
    ) -> Result<(), Status> {
        if chunks.is_empty() {
            chunks.push(EncodedResources::default());
        }
        let last = chunks.len() - 1;
        for (i, resources) in chunks.into_iter().enumerate() {
            *nonce += 1;
            self.metrics.pushes.get_or_create(&label(type_url)).inc();
            let resp = DeltaDiscoveryResponse {
                system_version_info: if i == last {
                    generation.to_string()
                } else {
                    format!("{generation}/partial")
                },
                resources,
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
        authed: Option<Caller>,
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
                    let next = snaps.borrow_and_update().clone();
                    // `changed` is relative to the snapshot just before
                    // `next`: if this stream skipped one (published back to
                    // back), its changes are not in there, so every type
                    // is touched.
                    let contiguous = next.generation == cur.generation + 1;
                    cur = next;
                    let changed = cur.changed.as_ref().filter(|_| contiguous);
                    let gateway = node.as_deref().and_then(|n| gateway_in(&cur, &node_id, n));
                    for (t, names) in &watches {
                        let touched = match changed {
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
        let authed = self.auth.authenticate(req.metadata()).await?;
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
        let authed = self.auth.authenticate(req.metadata()).await?;
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use mesh_proto::discovery::encoded::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
    use mesh_proto::discovery::{DeltaDiscoveryResponse, DiscoveryResponse as SotwResponse};
    use mesh_proto::type_url::{ADDRESS, AUTHORIZATION};

    use super::*;

    const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

    /// xorshift: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        fn name(&mut self) -> &'static str {
            NAMES[self.below(NAMES.len())]
        }
    }

    fn resource(name: &str, hash: u64) -> Arc<Resource> {
        Arc::new(Resource {
            name: Arc::from(name),
            hash,
            type_url: "t",
            value: Default::default(),
            any: Default::default(),
            delta: Default::default(),
        })
    }

    /// The next snapshot: some resources changed (perhaps to the same
    /// bytes), some gone, some new; unchanged ones shared, as the
    /// translator does.
    fn evolve(rng: &mut Rng, prev: &Named) -> Named {
        let mut next = prev.clone();
        for _ in 0..rng.below(4) {
            let n = rng.name();
            if rng.below(3) == 0 {
                next.remove(n);
            } else {
                next.insert(Arc::from(n), resource(n, rng.below(3) as u64));
            }
        }
        next
    }

    /// What the translator reports as changed from `a` to `b`.
    fn changed(a: &Named, b: &Named) -> Vec<Arc<str>> {
        NAMES
            .iter()
            .filter(|n| a.get(**n).map(|r| r.hash) != b.get(**n).map(|r| r.hash))
            .map(|n| Arc::from(*n))
            .collect()
    }

    /// The client applying a response.
    fn apply(client: &mut BTreeMap<String, u64>, (send, removed): &Diff) {
        for r in send {
            client.insert(r.name.to_string(), r.hash);
        }
        for n in removed {
            client.remove(n);
        }
    }

    fn wanted(w: &Watch, res: &Named) -> BTreeMap<String, u64> {
        res.values()
            .filter(|r| w.wants(&r.name))
            .map(|r| (r.name.to_string(), r.hash))
            .collect()
    }

    /// The diff a request's (un)subscriptions call for, as the delta
    /// stream computes it.
    fn on_request(
        w: &mut Watch,
        first: bool,
        subscribe: &[&str],
        unsubscribe: &[&str],
        snap: &Arc<Named>,
        generation: u64,
    ) -> Diff {
        let list = |l: &[&str]| l.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        match w.subscribe(first, &list(subscribe), &list(unsubscribe)) {
            Compare::All(force) => w.diff_all(snap, generation, &force),
            Compare::Names(force) => w.diff_names(snap, std::iter::empty(), &force),
            Compare::Nothing => (vec![], vec![]),
        }
    }

    /// Random streams (wildcard or named, new or resuming) through random
    /// snapshots, contiguous or skipped, subscriptions and unsubscriptions
    /// (of names and of `*`): what the client holds after applying every
    /// diff is what the stream believes it holds, and exactly what it
    /// wants.
    #[test]
    fn client_holds_what_the_stream_believes() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for trial in 0..500 {
            let mut w = Watch::default();
            let mut client: BTreeMap<String, u64> = BTreeMap::new();
            if rng.below(2) == 0 {
                for _ in 0..rng.below(6) {
                    client.insert(rng.name().to_string(), rng.below(3) as u64);
                }
                w.known =
                    Known::from_versions(client.iter().map(|(k, v)| (Arc::from(k.as_str()), *v)));
            }
            let mut subscribe = Vec::new();
            if rng.below(2) == 0 {
                for _ in 0..=rng.below(3) {
                    subscribe.push(rng.name());
                }
            }
            let mut generation = 1;
            let first = evolve(&mut rng, &Named::new());
            let mut snap = Arc::new(evolve(&mut rng, &first));
            let d = on_request(&mut w, true, &subscribe, &[], &snap, generation);
            apply(&mut client, &d);
            for step in 0..40 {
                let ctx = format!("trial {trial} step {step}");
                let d = match rng.below(8) {
                    0..=2 => {
                        let next = Arc::new(evolve(&mut rng, &snap));
                        let ch = changed(&snap, &next);
                        let d = w.diff_changed(generation, &next, generation + 1, ch.into_iter());
                        (snap, generation) = (next, generation + 1);
                        d
                    }
                    3 => {
                        let between = evolve(&mut rng, &snap);
                        let next = Arc::new(evolve(&mut rng, &between));
                        let d = w.diff_all(&next, generation + 2, &HashSet::new());
                        (snap, generation) = (next, generation + 2);
                        d
                    }
                    4 => on_request(&mut w, false, &[rng.name()], &[], &snap, generation),
                    5 | 6 => {
                        let n = if rng.below(3) == 0 { "*" } else { rng.name() };
                        let d = on_request(&mut w, false, &[], &[n], &snap, generation);
                        let (wildcard, names) = (w.wildcard, &w.names);
                        client.retain(|k, _| wildcard || names.contains(k));
                        d
                    }
                    _ => on_request(&mut w, false, &["*"], &[], &snap, generation),
                };
                apply(&mut client, &d);
                let believed: BTreeMap<String, u64> = NAMES
                    .iter()
                    .filter_map(|n| Some((n.to_string(), w.known.get(n)?)))
                    .collect();
                assert_eq!(client, believed, "{ctx}");
                assert_eq!(client, wanted(&w, &snap), "{ctx}");
            }
        }
    }

    /// A client that subscribed by name and then to `*` is sent everything
    /// else it may see, though nothing changed.
    #[test]
    fn a_late_wildcard_subscription_sends_everything() {
        let snap: Arc<Named> = Arc::new(
            ["a", "b", "c"]
                .iter()
                .map(|n| (Arc::from(*n), resource(n, 1)))
                .collect(),
        );
        let mut w = Watch::default();
        let (send, _) = on_request(&mut w, true, &["a"], &[], &snap, 1);
        assert_eq!(send.len(), 1);
        let (send, removed) = on_request(&mut w, false, &["*"], &[], &snap, 1);
        let names: Vec<&str> = send.iter().map(|r| &*r.name).collect();
        assert_eq!(names, ["b", "c"], "`a` is held already");
        assert!(removed.is_empty());
        assert!(w.known.in_sync_with(1));
        // Already wildcard: nothing more.
        let again = w.subscribe(false, &["*".to_string()], &[]);
        assert_eq!(again, Compare::Nothing);
    }

    /// A new wildcard client's first sync is the snapshot in name order,
    /// and leaves the stream holding the snapshot itself, not a copy.
    #[test]
    fn first_sync_sends_all_and_records_the_snapshot() {
        let snap: Arc<Named> = Arc::new(
            ["b", "a", "c"]
                .iter()
                .map(|n| (Arc::from(*n), resource(n, 1)))
                .collect(),
        );
        let mut w = Watch {
            wildcard: true,
            ..Default::default()
        };
        let (send, removed) = w.diff_all(&snap, 5, &HashSet::new());
        let names: Vec<&str> = send.iter().map(|r| &*r.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(removed.is_empty());
        assert!(w.known.in_sync_with(5));
        // Nothing changed: nothing to send.
        let (send, removed) = w.diff_all(&snap, 6, &HashSet::new());
        assert!(send.is_empty() && removed.is_empty());
    }

    // ---------------------------------------------------------- served

    /// Resources of `type_url`, each name's body its version.
    fn named(type_url: &'static str, entries: &[(&str, i64)]) -> Arc<Named> {
        Arc::new(
            entries
                .iter()
                .map(|(n, v)| {
                    let body = prost_types::Duration {
                        seconds: *v,
                        nanos: 0,
                    };
                    let r = crate::translate::resource(type_url, n.to_string(), &body);
                    (r.name.clone(), r)
                })
                .collect(),
        )
    }

    fn resources(by_type: &[(&'static str, Arc<Named>)]) -> Resources {
        Resources {
            by_type: by_type.iter().cloned().collect(),
            ..Default::default()
        }
    }

    /// An ADS server (plain HTTP/2, no authentication) serving what `snaps`
    /// publishes, and a client of it.
    async fn serve(
        snaps: watch::Receiver<Arc<Snapshot>>,
    ) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ads = AdsServer {
            snapshots: snaps,
            auth: Auth::insecure(),
            metrics: Arc::new(Metrics::default()),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(ads))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        AggregatedDiscoveryServiceClient::new(ch)
    }

    fn node() -> Option<Node> {
        Some(Node {
            id: "node-a".into(),
            ..Default::default()
        })
    }

    async fn next<T>(st: &mut Streaming<T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(5), st.message())
            .await
            .unwrap_or_else(|_| panic!("no response with {what}"))
            .unwrap()
            .unwrap()
    }

    /// Two snapshots published back to back (the stream sees only the
    /// second): the first's removal still reaches a SotW client, though
    /// the second changed only another type.
    #[tokio::test]
    async fn sotw_gets_the_changes_of_a_skipped_snapshot() {
        let s1 = Snapshot::first(resources(&[
            (ADDRESS, named(ADDRESS, &[("a", 1), ("b", 1)])),
            (AUTHORIZATION, named(AUTHORIZATION, &[("p", 1)])),
        ]));
        let (snap_tx, snap_rx) = watch::channel(Arc::new(s1));
        let mut client = serve(snap_rx).await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(mesh_proto::discovery::DiscoveryRequest {
            node: node(),
            type_url: ADDRESS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut st = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let r: SotwResponse = next(&mut st, "the first sync").await;
        assert_eq!((r.version_info.as_str(), r.resources.len()), ("1", 2));

        // No await between the two: the stream wakes to the second only.
        let s1 = snap_tx.borrow().clone();
        let s2 = Snapshot::next(
            &s1,
            resources(&[
                (ADDRESS, named(ADDRESS, &[("b", 1)])),
                (AUTHORIZATION, named(AUTHORIZATION, &[("p", 1)])),
            ]),
            HashSet::from([(ADDRESS, Arc::from("a"))]),
        );
        let s3 = Snapshot::next(
            &s2,
            resources(&[
                (ADDRESS, named(ADDRESS, &[("b", 1)])),
                (AUTHORIZATION, named(AUTHORIZATION, &[("p", 2)])),
            ]),
            HashSet::from([(AUTHORIZATION, Arc::from("p"))]),
        );
        snap_tx.send_replace(Arc::new(s2));
        snap_tx.send_replace(Arc::new(s3));
        let r = next(&mut st, "`a` removed").await;
        assert_eq!((r.version_info.as_str(), r.resources.len()), ("3", 1));
    }

    /// A delta client that subscribed to a name, then to `*`, is sent the
    /// rest though nothing changed.
    #[tokio::test]
    async fn delta_late_wildcard_gets_everything() {
        let s1 = Snapshot::first(resources(&[(
            ADDRESS,
            named(ADDRESS, &[("a", 1), ("b", 1), ("c", 1)]),
        )]));
        let (_snap_tx, snap_rx) = watch::channel(Arc::new(s1));
        let mut client = serve(snap_rx).await;
        let (tx, rx) = mpsc::channel(4);
        let sub = |names: &[&str]| DeltaDiscoveryRequest {
            node: node(),
            type_url: ADDRESS.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        tx.send(sub(&["a"])).await.unwrap();
        let mut st = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let names = |r: &DeltaDiscoveryResponse| -> Vec<String> {
            r.resources.iter().map(|r| r.name.clone()).collect()
        };
        let r = next(&mut st, "`a`").await;
        assert_eq!(names(&r), ["a"]);
        tx.send(sub(&["*"])).await.unwrap();
        let r = next(&mut st, "the rest after `*`").await;
        assert_eq!(names(&r), ["b", "c"]);
        assert!(r.removed_resources.is_empty());
    }
}
