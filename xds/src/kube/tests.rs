//! The Kubernetes source against a fake API server that lists and
//! watches, the way kube-rs' watcher talks to a real one, and records the
//! server-side applies of the waypoint controller.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use super::*;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";

/// One collection of the fake API: what a list returns, and the events
/// its watches get.
struct Collection {
    items: Vec<Value>,
    events: broadcast::Sender<String>,
    /// How long a list takes.
    delay: Duration,
}

/// Collections by path; a path with none is not served (404), as a kind
/// whose CRD is not installed. PATCHes are recorded in the second field.
#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<HashMap<String, Collection>>>, Arc<Mutex<Patches>>);

/// One PATCH the fake API received.
#[derive(Clone, Debug)]
struct Patched {
    path: String,
    query: String,
    /// The status code it answered with.
    code: u16,
    body: Value,
}

#[derive(Default)]
struct Patches {
    log: Vec<Patched>,
    /// (path suffix, code, how many more times): PATCHes to refuse.
    refuse: Vec<(String, u16, usize)>,
}

/// The cluster IP the fake API assigns to every Service.
const CLUSTER_IP: &str = "10.96.0.15";

type Body = BoxBody<Bytes, Infallible>;

impl FakeApi {
    fn serve_kind(&self, path: &str, items: Vec<Value>, delay: Duration) {
        let (events, _) = broadcast::channel(16);
        let c = Collection {
            items,
            events,
            delay,
        };
        self.0.lock().unwrap().insert(path.to_string(), c);
    }

    /// Sends a watch event to the collection's watchers, once one watches.
    async fn event(&self, path: &str, kind: &str, mut object: Value) {
        // The watcher resumes from the last event's version: it needs one.
        object["metadata"]["resourceVersion"] = json!("2");
        let tx = self.0.lock().unwrap()[path].events.clone();
        // Gateways have two watchers: the model's and the waypoint controller's.
        let watchers = if path == GATEWAYS { 2 } else { 1 };
        while tx.receiver_count() < watchers {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let line = json!({"type": kind, "object": object}).to_string() + "\n";
        tx.send(line).unwrap();
    }

    /// Refuses the next `times` PATCHes of paths ending in `suffix`.
    fn refuse(&self, suffix: &str, code: u16, times: usize) {
        let r = (suffix.to_string(), code, times);
        self.1.lock().unwrap().refuse.push(r);
    }

    fn patches(&self) -> Vec<Patched> {
        self.1.lock().unwrap().log.clone()
    }

    /// Waits for a PATCH that satisfies `ok`.
    async fn until_patched(&self, what: &str, ok: impl Fn(&Patched) -> bool) -> Patched {
        let wait = async {
            loop {
                if let Some(p) = self.patches().into_iter().find(|p| ok(p)) {
                    return p;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no PATCH of {what}: {:#?}", self.patches()))
    }

    /// A server-side apply: answered with the applied object as stored
    /// (a Service gets its cluster IP), or refused as configured.
    async fn patch(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let mut body: Value = serde_json::from_slice(&bytes).unwrap();
        let mut p = self.1.lock().unwrap();
        let refused = p
            .refuse
            .iter_mut()
            .find(|(suffix, _, n)| *n > 0 && path.ends_with(suffix.as_str()));
        let code = match refused {
            Some((_, code, n)) => {
                *n -= 1;
                *code
            }
            None => 200,
        };
        p.log.push(Patched {
            path: path.clone(),
            query,
            code,
            body: body.clone(),
        });
        if code != 200 {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("refused by the test at {path}"), "reason": "Forbidden", "code": code});
            return respond(code, Full::new(Bytes::from(status.to_string())).boxed());
        }
        body["metadata"]["uid"] = json!("uid-applied");
        body["metadata"]["resourceVersion"] = json!("3");
        if body["kind"] == "Service" {
            body["spec"]["clusterIP"] = json!(CLUSTER_IP);
        }
        respond(200, Full::new(Bytes::from(body.to_string())).boxed())
    }

    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
        if req.method() == hyper::Method::PATCH {
            return self.patch(req).await;
        }
        let path = req.uri().path().to_string();
        let watching = req.uri().query().unwrap_or("").contains("watch=true");
        let found = self.0.lock().unwrap().get(&path).map(|c| {
            // Only a watch counts as a watcher (see `event`).
            let events = watching.then(|| c.events.subscribe());
            (c.items.clone(), events, c.delay)
        });
        let Some((items, events, delay)) = found else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "the server could not find the requested resource",
                "reason": "NotFound", "code": 404});
            return respond(404, Full::new(Bytes::from(status.to_string())).boxed());
        };
        if let Some(events) = events {
            let lines = futures::stream::unfold(events, |mut rx| async move {
                let line = rx.recv().await.ok()?;
                Some((Ok(Frame::data(Bytes::from(line))), rx))
            });
            return respond(200, BodyExt::boxed(StreamBody::new(lines)));
        }
        tokio::time::sleep(delay).await;
        let list = json!({"kind": "List", "apiVersion": "v1",
            "metadata": {"resourceVersion": "1"}, "items": items});
        respond(200, Full::new(Bytes::from(list.to_string())).boxed())
    }

    /// Serves on a loopback port; returns a client of it.
    async fn start(&self) -> Client {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let api = api.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
    }
}

fn respond(code: u16, body: Body) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}})
}

fn pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(name: &str, action: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"action": action, "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}})
}

/// Every kind the source watches, empty and quick, except as overridden.
/// [`fake_api`] serving one Gateway `waypoint` of class `istio-waypoint`.
fn fake_api_with_waypoint() -> FakeApi {
    let api = fake_api();
    api.serve_kind(
        GATEWAYS,
        vec![gateway("waypoint", "istio-waypoint")],
        Duration::ZERO,
    );
    api
}

fn fake_api() -> FakeApi {
    let api = FakeApi::default();
    for path in [
        NAMESPACES,
        PODS,
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/serviceaccounts",
        POLICIES,
        GATEWAYS,
        "/apis/gateway.networking.k8s.io/v1/httproutes",
    ] {
        api.serve_kind(path, vec![], Duration::ZERO);
    }
    api
}

struct Source {
    models: watch::Receiver<Arc<Model>>,
    errors: ErrorList,
}

/// What the tests deploy waypoints with: the defaults, but an image of
/// their own.
fn settings() -> deploy::Settings {
    deploy::Settings {
        waypoint: crate::WaypointDeployment {
            image: "mesh:test".into(),
            ..Default::default()
        },
        trust_domain: "td.test".into(),
        cluster_domain: "cluster.local".into(),
        root_pem: ROOT_PEM.into(),
    }
}

/// Stands in for the mesh root's certificate.
const ROOT_PEM: &str = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----";

async fn start(api: &FakeApi) -> Source {
    let client = api.start().await;
    let (tx, models) = watch::channel(Arc::new(Model::default()));
    let errors = ErrorList::default();
    let metrics = Arc::new(Metrics::default());
    let run = run_with(client, tx, errors.clone(), metrics, settings());
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("every kind listed");
    Source { models, errors }
}

impl Source {
    /// Waits for a model that satisfies `ok`.
    async fn until(&mut self, what: &str, ok: impl Fn(&Model) -> bool) {
        let wait = self.models.wait_for(|m| ok(m));
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no model with {what}"))
            .unwrap();
    }
}

#[tokio::test]
async fn first_model_waits_for_every_kind() {
    let api = fake_api();
    api.serve_kind(NAMESPACES, vec![namespace("shop")], Duration::ZERO);
    api.serve_kind(PODS, vec![pod("web-1", "10.244.1.5")], Duration::ZERO);
    // The policies come in last, well after everything else.
    let deny = policy("deny-other", "DENY");
    api.serve_kind(POLICIES, vec![deny], Duration::from_millis(500));
    let src = start(&api).await;
    let m = src.models.borrow().clone();
    assert!(m.namespaces.contains_key("shop"), "{m:?}");
    assert!(m.pods.contains_key("shop/web-1"), "{m:?}");
    assert!(
        m.policies.contains_key("shop/deny-other"),
        "the first model lacks the policy listed last: {:?}",
        m.policies.keys()
    );
}

#[tokio::test]
async fn a_kind_not_served_counts_as_empty() {
    let api = fake_api();
    api.0.lock().unwrap().remove(GATEWAYS);
    api.serve_kind(PODS, vec![pod("web-1", "10.244.1.5")], Duration::ZERO);
    let src = start(&api).await;
    let m = src.models.borrow().clone();
    assert!(m.pods.contains_key("shop/web-1"), "{m:?}");
    assert!(m.gateways.is_empty());
}

#[tokio::test]
async fn a_kind_served_later_is_picked_up() {
    let api = fake_api();
    api.0.lock().unwrap().remove(GATEWAYS);
    let mut src = start(&api).await;
    // The CRD gets installed, with a waypoint in it.
    let waypoint = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}});
    api.serve_kind(GATEWAYS, vec![waypoint], Duration::ZERO);
    src.until("the waypoint", |m| m.gateways.contains_key("shop/waypoint"))
        .await;
}

#[tokio::test]
async fn watch_events_change_the_model() {
    let api = fake_api();
    api.serve_kind(NAMESPACES, vec![namespace("shop")], Duration::ZERO);
    api.serve_kind(POLICIES, vec![policy("deny-other", "DENY")], Duration::ZERO);
    let mut src = start(&api).await;

    api.event(PODS, "ADDED", pod("web-2", "10.244.1.6")).await;
    src.until("the added pod", |m| m.pods.contains_key("shop/web-2"))
        .await;

    api.event(POLICIES, "DELETED", policy("deny-other", "DENY"))
        .await;
    src.until("the policy deleted", |m| m.policies.is_empty())
        .await;
    assert!(src.models.borrow().pods.contains_key("shop/web-2"));
}

#[tokio::test]
async fn an_invalid_object_is_reported_and_the_rest_kept() {
    let api = fake_api();
    api.serve_kind(
        POLICIES,
        vec![policy("good", "ALLOW"), policy("bad", "PERMIT")],
        Duration::ZERO,
    );
    let src = start(&api).await;
    let m = src.models.borrow().clone();
    assert!(m.policies.contains_key("shop/good"), "{:?}", m.policies);
    assert!(!m.policies.contains_key("shop/bad"));
    let errs = src.errors.lock().unwrap().clone();
    assert!(
        errs.iter()
            .any(|e| e.contains("AuthorizationPolicy") && e.contains("bad")),
        "{errs:?}"
    );
}

/// [`policy`] with a `uid`, as the API server gives every object.
fn policy_uid(name: &str, action: &str, uid: &str) -> Value {
    let mut p = policy(name, action);
    p["metadata"]["uid"] = json!(uid);
    p
}

fn action(m: &Model, key: &str) -> Option<String> {
    let p = m.policies.get(key)?;
    Some(
        serde_json::to_value(&p.spec).unwrap()["action"]
            .as_str()?
            .to_string(),
    )
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_last_valid_version() {
    let api = fake_api();
    let deny = policy_uid("deny-other", "DENY", "uid-1");
    api.serve_kind(POLICIES, vec![deny], Duration::ZERO);
    let mut src = start(&api).await;
    assert_eq!(
        action(&src.models.borrow(), "shop/deny-other").as_deref(),
        Some("DENY")
    );

    // Edited into an invalid form; then another policy added, so the model
    // that has it was built after the edit (one watch, in order).
    let broken = policy_uid("deny-other", "PERMIT", "uid-1");
    api.event(POLICIES, "MODIFIED", broken.clone()).await;
    api.event(POLICIES, "ADDED", policy_uid("later", "ALLOW", "uid-2"))
        .await;
    src.until("the later policy", |m| {
        m.policies.contains_key("shop/later")
    })
    .await;
    let m = src.models.borrow().clone();
    assert_eq!(
        action(&m, "shop/deny-other").as_deref(),
        Some("DENY"),
        "the DENY was lifted by an invalid edit: {:?}",
        m.policies.keys()
    );
    let errs = src.errors.lock().unwrap().clone();
    assert!(
        errs.iter()
            .any(|e| e.contains("AuthorizationPolicy/shop/deny-other") && e.contains("last valid")),
        "{errs:?}"
    );

    // Deleted: gone, and its last valid version forgotten, so re-created
    // broken (a new uid) it is not served.
    api.event(POLICIES, "DELETED", broken).await;
    src.until("the policy deleted", |m| {
        !m.policies.contains_key("shop/deny-other")
    })
    .await;
    let recreated = policy_uid("deny-other", "PERMIT", "uid-3");
    api.event(POLICIES, "ADDED", recreated).await;
    api.event(POLICIES, "ADDED", policy_uid("last", "ALLOW", "uid-4"))
        .await;
    src.until("the last policy", |m| m.policies.contains_key("shop/last"))
        .await;
    assert!(!src.models.borrow().policies.contains_key("shop/deny-other"));
    let errs = src.errors.lock().unwrap().clone();
    assert!(
        errs.iter()
            .any(|e| e.contains("AuthorizationPolicy/shop/deny-other") && !e.contains("last valid")),
        "{errs:?}"
    );
}

// ------------------------------------------------------------ waypoint deployment

const SHOP: &str = "/namespaces/shop/";

fn gateway(name: &str, class: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "generation": 1},
        "spec": {"gatewayClassName": class,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

/// The path of a PATCH of `shop/name` in `collection` (e.g. `deployments`).
fn object_path(collection: &str, name: &str) -> String {
    format!("{SHOP}{collection}/{name}")
}

/// Waits for an accepted apply of `shop/name` in `collection`.
async fn applied(api: &FakeApi, collection: &str, name: &str) -> Patched {
    let path = object_path(collection, name);
    api.until_patched(&path, |p| p.code == 200 && p.path.ends_with(&path))
        .await
}

fn args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn condition<'a>(status_patch: &'a Patched, t: &str) -> &'a Value {
    status_patch.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no condition {t}: {:#?}", status_patch.body))
}

#[tokio::test]
async fn a_listed_waypoint_gets_its_root_account_deployment_and_service() {
    let api = fake_api_with_waypoint();
    let _src = start(&api).await;
    for (collection, kind, name) in [
        ("configmaps", "ConfigMap", "waypoint-istio-ca-root-cert"),
        ("serviceaccounts", "ServiceAccount", "waypoint"),
        ("deployments", "Deployment", "waypoint"),
        ("services", "Service", "waypoint"),
    ] {
        let p = applied(&api, collection, name).await;
        assert!(
            p.query
                .contains(&format!("fieldManager={}", deploy::FIELD_MANAGER))
                && p.query.contains("force=true"),
            "not a forced server-side apply of ours: {}",
            p.query
        );
        let meta = &p.body["metadata"];
        assert_eq!(p.body["kind"], kind);
        assert_eq!(meta["name"], name);
        assert_eq!(meta["namespace"], "shop");
        assert_eq!(
            meta["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "name": "waypoint", "uid": "uid-waypoint", "controller": true}]),
            "{kind}"
        );
        assert_eq!(meta["labels"][deploy::MANAGED_LABEL], deploy::MANAGED_VALUE);
    }
    let root = applied(&api, "configmaps", "waypoint-istio-ca-root-cert").await;
    assert_eq!(root.body["data"]["root-cert.pem"], format!("{ROOT_PEM}\n"));
    let d = applied(&api, "deployments", "waypoint").await.body;
    let a = args(&d);
    for want in [
        "--xds-address=https://istiod.istio-system.svc:15012",
        "--xds-server-name=istiod.istio-system.svc",
        "--identity=spiffe://td.test/ns/shop/sa/waypoint",
        "--xds-token-file=/var/run/secrets/tokens/istio-token",
        "--drain-timeout=30s",
    ] {
        assert!(a.iter().any(|x| x == want), "no {want} in {a:?}");
    }
    let pod = &d["spec"]["template"];
    assert_eq!(pod["spec"]["containers"][0]["image"], "mesh:test");
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    assert_eq!(
        pod["spec"]["volumes"][1]["configMap"]["name"],
        "waypoint-istio-ca-root-cert"
    );
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "waypoint");
    assert_eq!(labels["istio.io/dataplane-mode"], "none");
    let svc = applied(&api, "services", "waypoint").await.body;
    assert_eq!(
        svc["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})
    );
}

#[tokio::test]
async fn the_status_is_written() {
    let api = fake_api_with_waypoint();
    let _src = start(&api).await;
    let path = format!("{}/status", object_path("gateways", "waypoint"));
    let p = api
        .until_patched("the status", |p| p.path.ends_with(&path))
        .await;
    assert!(p.query.contains("force=true"), "{}", p.query);
    assert_eq!(p.body["kind"], "Gateway");
    for t in ["Accepted", "Programmed"] {
        let c = condition(&p, t);
        assert_eq!(c["status"], "True", "{c}");
        assert_eq!(c["reason"], t, "{c}");
        assert_eq!(c["observedGeneration"], 1, "{c}");
        assert!(c["lastTransitionTime"].is_string(), "{c}");
    }
    assert_eq!(
        p.body["status"]["addresses"],
        json!([{"type": "IPAddress", "value": CLUSTER_IP}])
    );
}

#[tokio::test]
async fn a_waypoint_added_by_watch_is_deployed() {
    let api = fake_api();
    let _src = start(&api).await;
    api.event(GATEWAYS, "ADDED", gateway("late", "istio-waypoint"))
        .await;
    for collection in ["serviceaccounts", "deployments", "services"] {
        applied(&api, collection, "late").await;
    }
}

#[tokio::test]
async fn a_changed_waypoint_is_applied_again() {
    let api = fake_api_with_waypoint();
    let _src = start(&api).await;
    let status = format!("{}/status", object_path("gateways", "waypoint"));
    api.until_patched("the first status", |p| p.path.ends_with(&status))
        .await;
    let deployments = || {
        let path = object_path("deployments", "waypoint");
        api.patches()
            .iter()
            .filter(|p| p.path.ends_with(&path))
            .count()
    };
    let before = deployments();
    let mut changed = gateway("waypoint", "istio-waypoint");
    changed["metadata"]["generation"] = json!(2);
    api.event(GATEWAYS, "MODIFIED", changed).await;
    let p = api
        .until_patched("the status of generation 2", |p| {
            p.path.ends_with(&status) && condition(p, "Programmed")["observedGeneration"] == 2
        })
        .await;
    assert_eq!(condition(&p, "Accepted")["observedGeneration"], 2);
    assert!(
        deployments() > before,
        "the Deployment was not applied again"
    );
}

#[tokio::test]
async fn hand_deployed_waypoints_and_other_classes_get_nothing() {
    let api = fake_api();
    let mut by_hand = gateway("by-hand", "istio-waypoint");
    by_hand["spec"]["addresses"] =
        json!([{"type": "Hostname", "value": "by-hand.shop.svc.cluster.local"}]);
    api.serve_kind(
        GATEWAYS,
        vec![
            by_hand,
            gateway("ingress", "istio"),
            gateway("control", "istio-waypoint"),
        ],
        Duration::ZERO,
    );
    let _src = start(&api).await;
    // All three are reconciled together; the one deployed is the last to
    // finish (four API calls where the others make none).
    let status = format!("{}/status", object_path("gateways", "control"));
    api.until_patched("control's status", |p| p.path.ends_with(&status))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let others: Vec<_> = api
        .patches()
        .into_iter()
        .filter(|p| p.path.contains("/by-hand") || p.path.contains("/ingress"))
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}

#[tokio::test]
async fn a_refused_apply_is_retried_and_the_model_still_served() {
    let api = fake_api();
    api.serve_kind(NAMESPACES, vec![namespace("shop")], Duration::ZERO);
    api.serve_kind(PODS, vec![pod("web-1", "10.244.1.5")], Duration::ZERO);
    api.serve_kind(
        GATEWAYS,
        vec![gateway("waypoint", "istio-waypoint")],
        Duration::ZERO,
    );
    // RBAC without deployments, until someone fixes it.
    api.refuse("/deployments/waypoint", 403, 2);
    let mut src = start(&api).await;
    let m = src.models.borrow().clone();
    assert!(m.pods.contains_key("shop/web-1"), "{m:?}");
    assert!(m.gateways.contains_key("shop/waypoint"), "{m:?}");

    let status = format!("{}/status", object_path("gateways", "waypoint"));
    let pending = api
        .until_patched("a status saying why", |p| {
            p.path.ends_with(&status) && condition(p, "Programmed")["status"] == "False"
        })
        .await;
    let c = condition(&pending, "Programmed");
    assert_eq!(c["reason"], "Pending");
    assert!(c["message"].as_str().unwrap().contains("Deployment"), "{c}");
    applied(&api, "services", "waypoint").await;
    let deployments: Vec<u16> = api
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/deployments/waypoint"))
        .map(|p| p.code)
        .collect();
    assert_eq!(deployments[..3], [403, 403, 200], "{deployments:?}");
    api.until_patched("the status once deployed", |p| {
        p.path.ends_with(&status) && condition(p, "Programmed")["status"] == "True"
    })
    .await;
    // The model goes on meanwhile.
    api.event(PODS, "ADDED", pod("web-2", "10.244.1.6")).await;
    src.until("the added pod", |m| m.pods.contains_key("shop/web-2"))
        .await;
}

/// The waypoint chart at its defaults, given a root certificate, for
/// `shop/waypoint`, as `charts/test.py` renders it (and checks that this
/// file is current).
const CHART: &str = include_str!("testdata/waypoint-chart.yaml");

#[test]
fn the_objects_are_the_waypoint_charts() {
    let chart: HashMap<String, Value> = serde_yaml::Deserializer::from_str(CHART)
        .map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).unwrap();
            (v["kind"].as_str().unwrap().to_string(), v)
        })
        .collect();
    // The chart's defaults, and its root.
    let chart_root = &chart["ConfigMap"]["data"]["root-cert.pem"];
    let s = deploy::Settings {
        waypoint: crate::WaypointDeployment {
            image: "ambient-mesh:0.1.0".into(),
            ..Default::default()
        },
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        root_pem: chart_root.as_str().unwrap().into(),
    };
    let ours = deploy::render(&s, "shop", "waypoint", "uid-waypoint");
    let (d, cd) = (&ours.deployment["spec"], &chart["Deployment"]["spec"]);
    for part in ["selector", "strategy"] {
        assert_eq!(d[part], cd[part], "{part}");
    }
    assert_eq!(d["template"]["spec"], cd["template"]["spec"]);
    let (meta, cmeta) = (&d["template"]["metadata"], &cd["template"]["metadata"]);
    assert_eq!(meta["annotations"], cmeta["annotations"]);
    // Every pod label but Helm's own.
    for (k, v) in cmeta["labels"].as_object().unwrap() {
        let helms = k == "helm.sh/chart"
            || k.starts_with("app.kubernetes.io/")
                && !k.ends_with("/name")
                && !k.ends_with("/component")
                && !k.ends_with("/part-of");
        if !helms {
            assert_eq!(&meta["labels"][k], v, "pod label {k}");
        }
    }
    assert_eq!(ours.service["spec"], chart["Service"]["spec"]);
    assert_eq!(ours.root_cert["data"], chart["ConfigMap"]["data"]);
    assert_eq!(
        ours.root_cert["metadata"]["name"],
        chart["ConfigMap"]["metadata"]["name"]
    );
    assert_eq!(
        ours.account["automountServiceAccountToken"],
        chart["ServiceAccount"]["automountServiceAccountToken"]
    );
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let api = fake_api_with_waypoint();
    let _src = start(&api).await;
    let status = format!("{}/status", object_path("gateways", "waypoint"));
    let count = |suffix: &str| {
        let n = api
            .patches()
            .iter()
            .filter(|p| p.path.ends_with(suffix))
            .count();
        n
    };
    let first = api
        .until_patched("the first status", |p| p.path.ends_with(&status))
        .await;
    // The API server's echo of that write: a change of the Gateway, which
    // is reconciled (its objects applied again) but needs no status write.
    let mut echo = gateway("waypoint", "istio-waypoint");
    echo["status"] = first.body["status"].clone();
    api.event(GATEWAYS, "MODIFIED", echo.clone()).await;
    let services = object_path("services", "waypoint");
    let wait = async {
        while count(&services) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("the echo reconciled");
    // Then a real change: its status is the second write. (One Gateway is
    // reconciled at a time, so the echo's reconcile has ended by then.)
    echo["metadata"]["generation"] = json!(2);
    api.event(GATEWAYS, "MODIFIED", echo).await;
    api.until_patched("the status of generation 2", |p| {
        p.path.ends_with(&status) && condition(p, "Programmed")["observedGeneration"] == 2
    })
    .await;
    assert_eq!(count(&status), 2, "{:#?}", api.patches());
}
