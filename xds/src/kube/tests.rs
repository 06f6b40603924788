//! The Kubernetes source against a fake API server that lists and
//! watches, the way kube-rs' watcher talks to a real one.

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
/// whose CRD is not installed.
#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<HashMap<String, Collection>>>);

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
        while tx.receiver_count() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let line = json!({"type": kind, "object": object}).to_string() + "\n";
        tx.send(line).unwrap();
    }

    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
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

async fn start(api: &FakeApi) -> Source {
    let client = api.start().await;
    let (tx, models) = watch::channel(Arc::new(Model::default()));
    let errors = ErrorList::default();
    let run = run_with(client, tx, errors.clone(), Arc::new(Metrics::default()));
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
