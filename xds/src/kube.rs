//! The Kubernetes source (feature `kube`): kube-rs reflectors on
//! Namespaces, Pods, Services, EndpointSlices, ServiceAccounts and Istio's
//! AuthorizationPolicies and Gateway API Gateways (waypoints) and HTTPRoutes, with in-cluster config or the kubeconfig
//! (`KUBECONFIG`, `~/.kube/config`). On every change the reflector stores
//! are turned into the same [`Model`] the manifest directory produces, each
//! object through the same [`validate`]; an invalid object is reported as
//! `cluster: Kind ns/name: field ...` and skipped.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::manifest::{parse_object, validate, ErrorList};
use crate::metrics::Metrics;
use crate::model::{Model, Object};

fn reflect<K>(api: Api<K>, kick: mpsc::Sender<()>) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                warn!("kubernetes watch: {e}");
            }
            let _ = kick.try_send(());
        }
    });
    reader
}

/// A reflector on a kind given by (group, version, kind).
fn reflect_dynamic(
    client: &Client,
    (group, version, kind): (&str, &str, &str),
    kick: mpsc::Sender<()>,
) -> Store<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let reader = writer.as_reader();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let kind = kind.to_string();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                warn!("kubernetes watch ({kind}): {e}");
            }
            let _ = kick.try_send(());
        }
    });
    reader
}

/// Starts the reflectors and publishes a model on every change.
pub async fn run(
    tx: watch::Sender<Arc<Model>>,
    errors: ErrorList,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let (kick, mut kicked) = mpsc::channel(1);
    let ns = reflect(Api::<Namespace>::all(client.clone()), kick.clone());
    let pods = reflect(Api::<Pod>::all(client.clone()), kick.clone());
    let svcs = reflect(Api::<Service>::all(client.clone()), kick.clone());
    let slices = reflect(Api::<EndpointSlice>::all(client.clone()), kick.clone());
    let sas = reflect(Api::<ServiceAccount>::all(client.clone()), kick.clone());
    // Kinds k8s-openapi does not type: watched as dynamic objects, typed
    // by the manifest parser.
    let policies = reflect_dynamic(
        &client,
        ("security.istio.io", "v1", "AuthorizationPolicy"),
        kick.clone(),
    );
    let gateways = reflect_dynamic(
        &client,
        ("gateway.networking.k8s.io", "v1", "Gateway"),
        kick.clone(),
    );
    let routes = reflect_dynamic(
        &client,
        ("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        kick.clone(),
    );
    tokio::spawn(async move {
        while kicked.recv().await.is_some() {
            let mut objs: Vec<Object> = Vec::new();
            objs.extend(ns.state().iter().map(|o| Object::Namespace(o.clone())));
            objs.extend(pods.state().iter().map(|o| Object::Pod(o.clone())));
            objs.extend(svcs.state().iter().map(|o| Object::Service(o.clone())));
            objs.extend(
                slices
                    .state()
                    .iter()
                    .map(|o| Object::EndpointSlice(o.clone())),
            );
            objs.extend(
                sas.state()
                    .iter()
                    .map(|o| Object::ServiceAccount(o.clone())),
            );
            let mut errs = Vec::new();
            for (kind, store) in [
                ("AuthorizationPolicy", &policies),
                ("Gateway", &gateways),
                ("HTTPRoute", &routes),
            ] {
                for p in store.state() {
                    // Through YAML values, exactly as the manifest source types it.
                    match serde_json::to_value(&*p)
                        .map_err(|e| e.to_string())
                        .and_then(|v| serde_yaml::to_value(v).map_err(|e| e.to_string()))
                    {
                        Ok(v) => match parse_object(v) {
                            Ok(Some(o)) => objs.push(o),
                            Ok(None) => {}
                            Err(e) => errs.push(format!(
                                "cluster: {kind} {}: field {}: {}",
                                p.metadata.name.clone().unwrap_or_default(),
                                e.field,
                                e.message
                            )),
                        },
                        Err(e) => errs.push(format!("cluster: {kind}: {e}")),
                    }
                }
            }
            let mut good = Vec::new();
            for mut o in objs {
                match validate(&mut o) {
                    Ok(()) => good.push(o),
                    Err(e) => errs.push(format!(
                        "cluster: {}: field {}: {}",
                        o.id(),
                        e.field,
                        e.message
                    )),
                }
            }
            for e in &errs {
                warn!("{e}");
                metrics.source_errors.inc();
            }
            if let Ok(mut g) = errors.lock() {
                *g = errs;
            }
            tx.send_replace(Arc::new(Model::from_objects(good)));
        }
    });
    Ok(())
}
