//! Deploys waypoints from their Gateways, as istiod does: for every
//! Gateway of class `istio-waypoint`, a ServiceAccount, a Deployment and a
//! Service named after it in its namespace, the same objects the
//! `charts/waypoint` chart renders; then the Gateway's status. The mesh
//! root the waypoint trusts comes with them, as the chart writes it when
//! given the root: a ConfigMap `<name>-istio-ca-root-cert` (istiod copies
//! `istio-ca-root-cert` into every namespace instead; we do not).
//!
//! # Design
//! - A kube-runtime [`Controller`] on Gateways: it reconciles every
//!   Gateway once at start, again on every change, and every `RESYNC`
//!   (re-applying puts back an object someone edited or deleted, without
//!   watching Deployments, Services and ServiceAccounts as well).
//! - Server-side apply under [`FIELD_MANAGER`], forced: the fields we set
//!   are ours, others' fields stay. We set no `replicas`, so an HPA or
//!   `kubectl scale` owns it, as with Istio's generated Deployments.
//! - Each object's ownerReference names the Gateway (`controller: true`):
//!   Kubernetes' garbage collector deletes them with it, so nothing here
//!   deletes.
//! - A Gateway with a `Hostname` address is deployed by hand (Istio's
//!   convention; `charts/waypoint` declares its Gateway so): we leave it
//!   alone, status included, so the chart and the controller never fight
//!   over one Deployment.
//! - A refused or failed apply (RBAC, an admission webhook, the API server
//!   down) is logged with the Gateway's name and retried with a backoff
//!   per Gateway. The controller runs in its own task: it never stops the
//!   model or the xDS server.
//! - The status (Accepted and Programmed with the generation they are for,
//!   and the Service's address) is written only when it changes: each
//!   write is a change of the Gateway, which triggers a reconcile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::model::{Gateway, GATEWAY_NAME_LABEL, WAYPOINT_CLASS};
use crate::WaypointDeployment;

/// The Gateways this controller deploys from.
const GATEWAY: (&str, &str, &str) = ("gateway.networking.k8s.io", "v1", "Gateway");
/// Our server-side apply field manager.
pub const FIELD_MANAGER: &str = "ambient-mesh-waypoint-controller";
/// The label Istio puts on the objects it generates for a Gateway.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// How often a deployed Gateway's objects are applied again.
const RESYNC: Duration = Duration::from_secs(600);
/// First retry after a failure; doubled per further failure, up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What the waypoints are deployed with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub waypoint: WaypointDeployment,
    /// Of the waypoint's SPIFFE identity.
    pub trust_domain: String,
    /// Of its xDS node id and its Service's hostname.
    pub cluster_domain: String,
    /// The mesh root's certificate (PEM), which the waypoint trusts.
    pub root_pem: String,
}

/// Why a Gateway's waypoint could not be deployed (this time).
#[derive(Debug, thiserror::Error)]
#[error("Gateway {gateway}: {step}: {source}")]
pub struct Error {
    gateway: String,
    step: &'static str,
    #[source]
    source: kube::Error,
}

struct Ctx {
    client: Client,
    settings: Settings,
    /// Consecutive failures per Gateway (`ns/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// Starts the controller on the cluster's Gateways.
pub fn spawn(client: Client, settings: Settings) {
    let ar = gateway_resource();
    let gateways = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let ctx = Arc::new(Ctx {
        client,
        settings,
        failures: Mutex::default(),
    });
    let run = Controller::new_with(gateways, watcher::Config::default(), ar)
        .run(reconcile, retry, ctx)
        .for_each(|r| async move {
            match r {
                Ok(_) => {}
                // Logged with its backoff by `retry`.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                // The Kubernetes source reports watch trouble (and Gateway
                // API not installed) already.
                Err(e) => debug!("waypoint controller: {e}"),
            }
        });
    tokio::spawn(run);
}

fn gateway_resource() -> ApiResource {
    let (group, version, kind) = GATEWAY;
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

fn key(o: &DynamicObject) -> String {
    format!(
        "{}/{}",
        o.metadata.namespace.as_deref().unwrap_or_default(),
        o.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The error policy: log, and try again after the Gateway's backoff.
fn retry(gw: Arc<DynamicObject>, e: &Error, ctx: Arc<Ctx>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let n = failures.entry(key(&gw)).or_insert(0);
    let delay = RETRY_FIRST.saturating_mul(1 << (*n).min(16)).min(RETRY_MAX);
    *n = n.saturating_add(1);
    warn!("deploying the waypoint failed: {e}; retrying in {delay:?}");
    Action::requeue(delay)
}

async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // Other classes are not ours, whatever their spec holds.
    if obj.data["spec"]["gatewayClassName"] != WAYPOINT_CLASS {
        return Ok(Action::await_change());
    }
    let gw_key = key(&obj);
    let m = &obj.metadata;
    let gw = serde_json::to_value(&*obj).and_then(serde_json::from_value::<Gateway>);
    let (Ok(gw), Some(ns), Some(name), Some(uid)) = (gw, &m.namespace, &m.name, &m.uid) else {
        // Retrying cannot help: it takes a change of the Gateway, which
        // reconciles it again. (The model reports what is wrong with it.)
        warn!(
            "Gateway {gw_key}: not a Gateway with a name, namespace and uid; no waypoint deployed"
        );
        return Ok(Action::await_change());
    };
    if gw.is_deployed_by_hand() {
        return Ok(Action::await_change());
    }
    let s = &ctx.settings;
    let applied = apply(&ctx.client, &gw_key, ns, &render(s, ns, name, uid)).await;
    let hostname = format!("{name}.{ns}.svc.{}", s.cluster_domain);
    let programmed = match &applied {
        Ok(svc) => Ok((hostname, address(svc, name, ns, &s.cluster_domain))),
        Err(e) => Err(e.to_string()),
    };
    let status = write_status(&ctx.client, &obj, programmed).await;
    applied?;
    status?;
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&gw_key);
    Ok(Action::requeue(RESYNC))
}

/// The objects of one waypoint.
#[derive(Debug)]
pub struct Objects {
    pub root_cert: Value,
    pub account: Value,
    pub deployment: Value,
    pub service: Value,
}

/// Applies the root's ConfigMap, the ServiceAccount, the Deployment and
/// the Service, in that order (the pods need the first two); returns the
/// Service as stored.
async fn apply(client: &Client, gw: &str, ns: &str, o: &Objects) -> Result<Service, Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let failed = |step: &'static str| {
        move |source: kube::Error| Error {
            gateway: gw.to_string(),
            step,
            source,
        }
    };
    let name = |v: &Value| {
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    config_maps
        .patch(&name(&o.root_cert), &pp, &Patch::Apply(&o.root_cert))
        .await
        .map_err(failed("applying its root certificate's ConfigMap"))?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    accounts
        .patch(&name(&o.account), &pp, &Patch::Apply(&o.account))
        .await
        .map_err(failed("applying its ServiceAccount"))?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .patch(&name(&o.deployment), &pp, &Patch::Apply(&o.deployment))
        .await
        .map_err(failed("applying its Deployment"))?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    services
        .patch(&name(&o.service), &pp, &Patch::Apply(&o.service))
        .await
        .map_err(failed("applying its Service"))
}

/// The Gateway's address: its Service's cluster IP, or (headless, or not
/// assigned yet) the Service's hostname.
fn address(svc: &Service, name: &str, ns: &str, cluster_domain: &str) -> Value {
    match svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) {
        Some(ip) if !ip.is_empty() && ip != "None" => json!({"type": "IPAddress", "value": ip}),
        _ => json!({"type": "Hostname", "value": format!("{name}.{ns}.svc.{cluster_domain}")}),
    }
}

/// Writes Accepted and Programmed (true with the address once applied,
/// false with the error otherwise), unless the Gateway has them already.
/// A condition keeps its `lastTransitionTime` while its status holds.
async fn write_status(
    client: &Client,
    gw: &DynamicObject,
    programmed: Result<(String, Value), String>,
) -> Result<(), Error> {
    let generation = gw.metadata.generation;
    let (programmed, addresses) = match programmed {
        Ok((host, addr)) => (
            (
                "True",
                "Programmed",
                format!("Resource programmed, assigned to service(s) {host}:15008"),
            ),
            vec![addr],
        ),
        Err(e) => (("False", "Pending", format!("{e}; retrying")), vec![]),
    };
    let want = [
        (
            "Accepted",
            ("True", "Accepted", "Resource accepted".to_string()),
        ),
        ("Programmed", programmed),
    ];
    let current = gw.data.get("status");
    let current_cond = |t: &str| {
        current
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
    };
    let mut unchanged = current.and_then(|s| s.get("addresses")).cloned()
        == (!addresses.is_empty()).then(|| json!(addresses));
    let now =
        serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null);
    let mut conditions = Vec::new();
    for (t, (status, reason, message)) in want {
        let cur = current_cond(t);
        let same_status = cur.is_some_and(|c| c["status"] == status);
        // A failure's message alone does not make a write: each write
        // triggers a reconcile at once, which would bypass the backoff if
        // the error's text varied from one attempt to the next.
        unchanged &= same_status
            && cur.is_some_and(|c| {
                c["reason"] == reason
                    && (c["message"] == message.as_str() || status == "False")
                    && c["observedGeneration"].as_i64() == generation
            });
        let since = match cur {
            Some(c) if same_status => c["lastTransitionTime"].clone(),
            _ => now.clone(),
        };
        conditions.push(json!({"type": t, "status": status, "reason": reason,
            "message": message, "observedGeneration": generation, "lastTransitionTime": since}));
    }
    if unchanged {
        return Ok(());
    }
    let ar = gateway_resource();
    let ns = gw.metadata.namespace.as_deref().unwrap_or_default();
    let name = gw.metadata.name.as_deref().unwrap_or_default();
    let mut status = json!({"conditions": conditions});
    if !addresses.is_empty() {
        status["addresses"] = json!(addresses);
    }
    let body = json!({"apiVersion": ar.api_version, "kind": ar.kind,
        "metadata": {"name": name, "namespace": ns}, "status": status});
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    gateways
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error {
            gateway: format!("{ns}/{name}"),
            step: "writing its status",
            source,
        })?;
    Ok(())
}

/// A duration as the waypoint's `--drain-timeout` parses it.
fn duration_arg(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The objects `charts/waypoint` renders for a Gateway `ns/name` at its
/// default values (no replicas: see the module docs; no PodDisruptionBudget,
/// as Istio), owned by the Gateway.
pub fn render(s: &Settings, ns: &str, name: &str, uid: &str) -> Objects {
    let w = &s.waypoint;
    let (group, version, kind) = GATEWAY;
    let labels = json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": "waypoint",
        "app.kubernetes.io/part-of": "ambient-mesh",
        MANAGED_LABEL: MANAGED_VALUE,
        // How the control plane recognises the waypoint's pods and Service.
        GATEWAY_NAME_LABEL: name,
    });
    let selector = json!({ GATEWAY_NAME_LABEL: name });
    let meta = json!({
        "name": name,
        "namespace": ns,
        "labels": labels,
        "ownerReferences": [{"apiVersion": format!("{group}/{version}"), "kind": kind,
            "name": name, "uid": uid, "controller": true}],
    });
    let mut pod_labels = labels.clone();
    // A waypoint is not captured itself: it speaks HBONE on its own.
    pod_labels["istio.io/dataplane-mode"] = json!("none");
    let grace = w.drain_timeout.as_secs() + u64::from(w.drain_timeout.subsec_nanos() > 0) + 5;
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let root_cert_name = format!("{name}-istio-ca-root-cert");
    let mut root_cert = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
        "data": {"root-cert.pem": format!("{}\n", s.root_pem.trim())},
    });
    root_cert["metadata"]["name"] = json!(root_cert_name);
    let account = json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
        // The waypoint's identity; it reads nothing from the API server.
        "automountServiceAccountToken": false,
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "15020",
                        "prometheus.io/path": "/stats/prometheus"},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 1337, "runAsGroup": 1337,
                        "fsGroup": 1337, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "istio-proxy",
                        "image": w.image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/usr/local/bin/waypoint"],
                        "args": [
                            format!("--xds-address={}", w.xds_address),
                            format!("--ca-address={}", w.xds_address),
                            format!("--xds-server-name={}", w.xds_server_name),
                            "--xds-root-cert=/var/run/secrets/istio/root-cert.pem",
                            "--xds-token-file=/var/run/secrets/tokens/istio-token",
                            // Istio's node id naming this pod, by which the
                            // control plane finds its Gateway.
                            format!("--xds-node-id=router~$(POD_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.{}", s.cluster_domain),
                            format!("--identity=spiffe://{}/ns/{ns}/sa/{name}", s.trust_domain),
                            "--own-ip=$(POD_IP)",
                            "--hbone-addr=[::]:15008",
                            // Not captured: no mark to set, no NET_ADMIN.
                            "--socket-mark=0",
                            "--cert-ttl=24h",
                            format!("--drain-timeout={}", duration_arg(w.drain_timeout)),
                            "--worker-threads=2",
                        ],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": field("spec.nodeName")},
                            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
                            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
                            {"name": "POD_IP", "valueFrom": field("status.podIP")},
                        ],
                        "ports": [
                            {"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
                            {"name": "http-envoy-prom", "containerPort": 15020, "protocol": "TCP"},
                            {"name": "status-port", "containerPort": 15021, "protocol": "TCP"},
                        ],
                        // Ready once it has its certificate and a complete
                        // configuration; not ready while draining.
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021},
                            "periodSeconds": 5, "failureThreshold": 3},
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": {"memory": "512Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "path": "istio-token", "audience": w.token_audience,
                            "expirationSeconds": 43200}}]}},
                        {"name": "istiod-ca-cert", "configMap": {"name": root_cert_name}},
                    ],
                },
            },
        },
    });
    // Named like the Gateway: the control plane sends traffic for the
    // services that use the waypoint to <name>.<namespace>.svc:15008.
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "mesh", "port": 15008, "targetPort": "mesh", "protocol": "TCP"},
                {"name": "status-port", "port": 15021, "targetPort": "status-port", "protocol": "TCP"},
            ],
        },
    });
    Objects {
        root_cert,
        account,
        deployment,
        service,
    }
}
