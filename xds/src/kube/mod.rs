//! The Kubernetes source (feature `kube`): kube-rs reflectors on
//! Namespaces, Pods, Services, EndpointSlices, ServiceAccounts and Istio's
//! AuthorizationPolicies and Gateway API Gateways (waypoints) and
//! HTTPRoutes, with in-cluster config or the kubeconfig (`KUBECONFIG`,
//! `~/.kube/config`). On every change the reflector stores are turned into
//! the same [`Model`] the manifest directory produces, each object through
//! the same [`validate`]; an invalid object is reported as
//! `cluster: Kind/ns/name: field ...`.
//!
//! # An invalid edit keeps the last valid version
//! As the manifest source does, an object whose current version is
//! invalid stays in the model as its last valid one (an object never valid
//! is left out): editing a DENY policy into a broken form must not lift
//! the DENY. The last valid version of each object is kept until the
//! object leaves its store; a version is only stood in for by one of the
//! same `uid`, so an object deleted and re-created broken between two
//! models does not come back.
//!
//! # Nothing is served from a partial view
//! [`run`] returns only once every kind has been listed in full, with the
//! first model published. A model built while, say, Pods were listed and
//! AuthorizationPolicies not yet would reach ztunnels as "no policies":
//! a DENY would not hold until the list came in, and a restarted control
//! plane would briefly tell every ztunnel that the mesh is empty. So the
//! server does not start (and is not ready) until then. A kind the API
//! server does not serve (its CRD is not installed, e.g. Gateway API on a
//! cluster without waypoints) counts as listed and empty; it is picked up
//! when it appears. Within a kind, kube-rs swaps a relist into the store
//! whole, so a re-list after a broken watch never shows half a list either.
//!
//! Beside the model, [`deploy`] deploys a waypoint for every Gateway of
//! class `istio-waypoint`, as istiod does.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::manifest::{parse_object, validate, ErrorList};
use crate::metrics::Metrics;
use crate::model::{Model, Object};

pub mod deploy;
#[cfg(test)]
mod tests;

/// How often start-up says which kinds it is still waiting for.
const WAIT_REPORT: Duration = Duration::from_secs(10);

/// Kinds k8s-openapi does not type: watched as dynamic objects and typed by
/// the manifest parser, exactly as the manifest source types them.
const DYNAMIC_KINDS: [(&str, &str, &str); 3] = [
    ("security.istio.io", "v1", "AuthorizationPolicy"),
    ("gateway.networking.k8s.io", "v1", "Gateway"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute"),
];

/// Whether the error says the API server does not serve the kind at all.
fn not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// Runs one kind's reflector into `writer`: kicks the model builder on
/// every change, and fires the returned receiver once the first full list
/// is in the store (or the kind turns out not to be served).
fn reflect<K>(kind: &str, writer: Writer<K>, api: Api<K>, kick: mpsc::Sender<()>) -> Listed
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let (listed, rx) = oneshot::channel();
    let stream = reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
        .default_backoff();
    let name = kind.to_string();
    tokio::spawn(async move {
        let mut listed = Some(listed);
        let mut reported_absent = false;
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                // The store takes a (re)list whole at InitDone.
                Ok(Event::Init | Event::InitApply(_)) => continue,
                Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => reported_absent = false,
                Err(e) if not_served(&e) => {
                    // Every backoff retry fails the same way: only the
                    // first tells the model anything.
                    if reported_absent {
                        continue;
                    }
                    warn!("kubernetes: the API server does not serve {name} (CRD not installed?); none until it does");
                    reported_absent = true;
                }
                Err(e) => {
                    warn!("kubernetes watch ({name}): {e}");
                    continue;
                }
            }
            if let Some(l) = listed.take() {
                let _ = l.send(());
            }
            let _ = kick.try_send(());
        }
    });
    Listed {
        kind: kind.to_string(),
        rx,
    }
}

/// Fires once a kind's first full list is in its store.
struct Listed {
    kind: String,
    rx: oneshot::Receiver<()>,
}

/// A reflector on a typed kind, over the whole cluster.
fn typed<K>(
    client: &Client,
    kind: &str,
    kick: &mpsc::Sender<()>,
    listed: &mut Vec<Listed>,
) -> Store<K>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::<K>::default();
    let store = writer.as_reader();
    listed.push(reflect(
        kind,
        writer,
        Api::all(client.clone()),
        kick.clone(),
    ));
    store
}

/// Every kind's store.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    accounts: Store<ServiceAccount>,
    /// In [`DYNAMIC_KINDS`]' order.
    dynamic: Vec<(&'static str, Store<DynamicObject>)>,
    /// Object id (`Kind/ns/name`) -> its last valid version, for while
    /// the current one is invalid.
    last_valid: HashMap<String, Object>,
}

impl Stores {
    /// Starts a reflector per kind; returns their stores and when each is
    /// first listed.
    fn start(client: &Client, kick: &mpsc::Sender<()>) -> (Stores, Vec<Listed>) {
        let mut listed = Vec::new();
        let namespaces = typed(client, "Namespace", kick, &mut listed);
        let pods = typed(client, "Pod", kick, &mut listed);
        let services = typed(client, "Service", kick, &mut listed);
        let slices = typed(client, "EndpointSlice", kick, &mut listed);
        let accounts = typed(client, "ServiceAccount", kick, &mut listed);
        let dynamic = DYNAMIC_KINDS
            .iter()
            .map(|&(group, version, kind)| {
                let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
                let writer = Writer::<DynamicObject>::new(ar.clone());
                let store = writer.as_reader();
                let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
                listed.push(reflect(kind, writer, api, kick.clone()));
                (kind, store)
            })
            .collect();
        let stores = Stores {
            namespaces,
            pods,
            services,
            slices,
            accounts,
            dynamic,
            last_valid: HashMap::new(),
        };
        (stores, listed)
    }

    /// The model of what the stores hold now, and what was wrong with the
    /// objects whose current version is invalid (their last valid version,
    /// if any, is in the model instead).
    fn model(&mut self) -> (Model, Vec<String>) {
        let mut objs: Vec<Object> = Vec::new();
        objs.extend(self.namespaces.state().into_iter().map(Object::Namespace));
        objs.extend(self.pods.state().into_iter().map(Object::Pod));
        objs.extend(self.services.state().into_iter().map(Object::Service));
        objs.extend(self.slices.state().into_iter().map(Object::EndpointSlice));
        objs.extend(
            self.accounts
                .state()
                .into_iter()
                .map(Object::ServiceAccount),
        );
        let mut errs = Vec::new();
        // (id, uid, index of its error) of every object whose current
        // version is invalid.
        let mut invalid: Vec<(String, Option<String>, usize)> = Vec::new();
        for (kind, store) in &self.dynamic {
            for p in store.state() {
                let m = &p.metadata;
                let id = format!(
                    "{kind}/{}/{}",
                    m.namespace.as_deref().unwrap_or("default"),
                    m.name.as_deref().unwrap_or_default()
                );
                // Through YAML values, exactly as the manifest source types it.
                let err = match serde_json::to_value(&*p)
                    .map_err(|e| e.to_string())
                    .and_then(|v| serde_yaml::to_value(v).map_err(|e| e.to_string()))
                {
                    Ok(v) => match parse_object(v) {
                        Ok(Some(o)) => {
                            objs.push(o);
                            continue;
                        }
                        Ok(None) => continue,
                        Err(e) => format!("field {}: {}", e.field, e.message),
                    },
                    Err(e) => e,
                };
                invalid.push((id.clone(), m.uid.clone(), errs.len()));
                errs.push(format!("cluster: {id}: {err}"));
            }
        }
        let mut good = Vec::new();
        let mut seen = HashSet::new();
        for mut o in objs {
            match validate(&mut o) {
                Ok(()) => {
                    let id = o.id();
                    seen.insert(id.clone());
                    self.last_valid.insert(id, o.clone());
                    good.push(o);
                }
                Err(e) => {
                    let id = o.id();
                    invalid.push((id.clone(), o.meta().uid.clone(), errs.len()));
                    errs.push(format!("cluster: {id}: field {}: {}", e.field, e.message));
                }
            }
        }
        for (id, uid, err) in invalid {
            // The same object (not one re-created under its name) keeps
            // its last valid version.
            if let Some(o) = self.last_valid.get(&id).filter(|o| o.meta().uid == uid) {
                if let Some(e) = errs.get_mut(err) {
                    e.push_str(" (its last valid version stays in force)");
                }
                good.push(o.clone());
                seen.insert(id);
            }
        }
        // Objects gone from their store are forgotten.
        self.last_valid.retain(|id, _| seen.contains(id));
        (Model::from_objects(good), errs)
    }

    /// Builds the model, reports its errors and publishes it.
    fn publish(&mut self, tx: &watch::Sender<Arc<Model>>, errors: &ErrorList, metrics: &Metrics) {
        let (model, errs) = self.model();
        for e in &errs {
            warn!("{e}");
            metrics.source_errors.inc();
        }
        if let Ok(mut g) = errors.lock() {
            *g = errs;
        }
        tx.send_replace(Arc::new(model));
    }
}

/// Waits until every kind has been listed, saying now and then which
/// kinds are still missing (an unreachable API server, or RBAC that does
/// not allow listing one, shows here).
async fn all_listed(listed: Vec<Listed>) {
    for Listed { kind, mut rx } in listed {
        loop {
            tokio::select! {
                // An error means the reflector task ended: nothing to wait for.
                _ = &mut rx => break,
                _ = tokio::time::sleep(WAIT_REPORT) => {
                    warn!("kubernetes: still waiting for the first list of {kind}");
                }
            }
        }
    }
}

/// Starts the reflectors on the cluster of the in-cluster config or the
/// kubeconfig; see [`run_with`].
pub async fn run(
    tx: watch::Sender<Arc<Model>>,
    errors: ErrorList,
    metrics: Arc<Metrics>,
    waypoints: deploy::Settings,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    run_with(client, tx, errors, metrics, waypoints).await;
    Ok(())
}

/// Starts the waypoint controller and the reflectors, waits until every
/// kind is listed, publishes the first model on `tx`, then a new one on
/// every change.
pub async fn run_with(
    client: Client,
    tx: watch::Sender<Arc<Model>>,
    errors: ErrorList,
    metrics: Arc<Metrics>,
    waypoints: deploy::Settings,
) {
    deploy::spawn(client.clone(), waypoints);
    let (kick, mut kicked) = mpsc::channel(1);
    let (mut stores, listed) = Stores::start(&client, &kick);
    all_listed(listed).await;
    stores.publish(&tx, &errors, &metrics);
    info!("kubernetes: every kind listed, first model published");
    tokio::spawn(async move {
        while kicked.recv().await.is_some() {
            stores.publish(&tx, &errors, &metrics);
        }
    });
}
