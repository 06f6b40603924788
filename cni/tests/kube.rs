//! The plugin and an API server (a fake one over TLS): the ambient rule on
//! the Pod and Namespace it gets, Istio's exclusions, the capture recorded
//! on enrolled pods, and every way the API can fail turning into a CNI
//! error, not an enrollment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use support::{add, prev_result, ApiServer, FakeZtunnel, PodSpec};

const AMBIENT: &str = "istio.io/dataplane-mode";

fn pod(labels: Value, annotations: Value) -> PodSpec {
    PodSpec {
        labels,
        annotations,
        service_account: "sa-app",
    }
}

async fn cluster() -> ApiServer {
    let namespaces = BTreeMap::from([
        ("mesh", json!({AMBIENT: "ambient"})),
        ("plain", json!({})),
        ("kube-system", json!({AMBIENT: "ambient"})),
    ]);
    let pods = BTreeMap::from([
        ("mesh/app", pod(json!({}), json!({}))),
        ("mesh/opted-out", pod(json!({AMBIENT: "none"}), json!({}))),
        (
            "mesh/sidecar",
            pod(json!({}), json!({"sidecar.istio.io/status": "{}"})),
        ),
        ("mesh/ztunnel", pod(json!({"app": "ztunnel"}), json!({}))),
        // The fake API server refuses to patch it.
        ("mesh/no-patch", pod(json!({}), json!({}))),
        ("plain/app", pod(json!({}), json!({}))),
        (
            "plain/opted-in",
            pod(json!({AMBIENT: "ambient"}), json!({})),
        ),
        (
            "kube-system/dns",
            pod(json!({AMBIENT: "ambient"}), json!({})),
        ),
        // Its namespace is missing.
        ("ghost/app", pod(json!({AMBIENT: "ambient"}), json!({}))),
    ]);
    ApiServer::start("good-token", namespaces, pods).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_from_the_api_server_decide_enrollment() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let zt = FakeZtunnel::start(&socket);
    let conf = json!({"type": "ztunnel-cni", "ztunnelSocket": socket,
                      "kubeconfig": api.kubeconfig(dir.path(), "good-token")});

    for (ns, name, enrolled) in [
        ("mesh", "app", true),
        ("mesh", "opted-out", false),
        ("mesh", "sidecar", false),
        ("mesh", "ztunnel", false),
        ("plain", "app", false),
        ("plain", "opted-in", true),
    ] {
        let before = zt.enrolled().len();
        let (ok, out) = add(&conf, ns, name).await;
        assert!(ok, "{ns}/{name}: {out}");
        assert_eq!(out, prev_result(), "{ns}/{name}");
        assert_eq!(
            zt.enrolled().len() - before,
            usize::from(enrolled),
            "{ns}/{name} enrolled: {:?}",
            zt.enrolled()
        );
    }
    assert_eq!(
        zt.enrolled(),
        vec![
            ("mesh/app".to_string(), "sa-app".to_string()),
            ("plain/opted-in".to_string(), "sa-app".to_string()),
        ],
        "pods are enrolled with their service account"
    );
    let annotation =
        json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}});
    assert_eq!(
        *api.patches.lock().unwrap(),
        vec![
            ("mesh/app".to_string(), annotation.clone()),
            ("plain/opted-in".to_string(), annotation),
        ],
        "enrolled pods, and only they, are annotated as captured"
    );

    // Enrolled but not recorded (no RBAC to patch, say): the ADD fails, so
    // the runtime retries rather than run a pod others would not reach
    // over HBONE.
    let (ok, out) = add(&conf, "mesh", "no-patch").await;
    assert!(!ok, "{out}");
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap()
            .contains("recording the pod's capture"),
        "{out}"
    );
    let details = out["details"].as_str().unwrap();
    assert!(
        details.contains("annotating pod mesh/no-patch") && details.contains("forbidden"),
        "{out}"
    );
    assert_eq!(zt.enrolled().len(), 3);

    // kube-system is never enrolled, and not even looked up.
    let hits = api.hits.load(Ordering::SeqCst);
    let (ok, out) = add(&conf, "kube-system", "dns").await;
    assert!(ok, "{out}");
    assert_eq!(
        api.hits.load(Ordering::SeqCst),
        hits,
        "asked the API server"
    );
    assert_eq!(zt.enrolled().len(), 3);
}

/// The runtime retries a pod whose ADD failed: a failed lookup must fail
/// the ADD, naming the pod and what went wrong, and enroll nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_failures_are_cni_errors() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let zt = FakeZtunnel::start(&socket);
    let conf = |kubeconfig: &std::path::Path| json!({"type": "ztunnel-cni", "ztunnelSocket": socket, "kubeconfig": kubeconfig});
    let good = conf(&api.kubeconfig(dir.path(), "good-token"));

    let check = |(ok, out): (bool, Value), what: &str, details: &[&str]| {
        assert!(!ok, "{what}: {out}");
        assert_eq!(out["code"], 11, "{what}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains("from the API server"), "{what}: {out}");
        let d = out["details"].as_str().unwrap();
        for want in details {
            assert!(d.contains(want), "{what}: {want:?} not in {out}");
        }
    };
    check(
        add(&good, "mesh", "missing").await,
        "404 pod",
        &["getting pod mesh/missing", "not found"],
    );
    check(
        add(&good, "ghost", "app").await,
        "404 namespace",
        &["getting namespace ghost", "not found"],
    );
    let stale = dir.path().join("stale");
    std::fs::create_dir(&stale).unwrap();
    check(
        add(&conf(&api.kubeconfig(&stale, "old-token")), "mesh", "app").await,
        "rejected token",
        &["Unauthorized"],
    );
    check(
        add(&conf(&dir.path().join("absent")), "mesh", "app").await,
        "no kubeconfig",
        &["absent"],
    );

    // API server down: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = dir.path().join("down");
    std::fs::create_dir(&down).unwrap();
    let kc = api.kubeconfig(&down, "good-token");
    let text = std::fs::read_to_string(&kc)
        .unwrap()
        .replace(&api.port.to_string(), &port.to_string());
    std::fs::write(&kc, text).unwrap();
    check(
        add(&conf(&kc), "mesh", "app").await,
        "API down",
        &["getting"],
    );
    assert!(zt.enrolled().is_empty(), "{:?}", zt.enrolled());
}
