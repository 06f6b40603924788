//! The waypoint names a client by its workload, from the control plane's
//! workload discovery, as Istio's waypoints do: its Deployment, canonical
//! service and revision, cluster. A workload at the client's address with
//! another identity than its certificate's is not taken for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod in_process_waypoint;
#[path = "../../waypoint/tests/common/mod.rs"]
mod wcommon;

use std::net::IpAddr;

/// The client: a Deployment's pod `shell` at 127.0.0.1 (the address the
/// test clients' tunnels name as their source), service account `sleep`;
/// the echo pod is at 127.0.0.2, where the backend listens.
const CLIENT: &str = r#"---
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: shell-5d8f7c9b4-x2x9z
  namespace: default
  labels: {app: shell, version: v2, pod-template-hash: 5d8f7c9b4}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: shell-5d8f7c9b4, uid: rs-1, controller: true}]
spec:
  nodeName: node-a
  serviceAccountName: sleep
  containers: [{name: app, image: app}]
status:
  podIP: 127.0.0.1
"#;

/// The `istio_requests_total` line whose labels include `with`.
fn requests_line(metrics: &str, with: &str) -> Option<String> {
    metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains(with))
        .map(str::to_string)
}

#[tokio::test]
async fn a_client_is_named_by_its_workload() {
    let backend = wcommon::backend_at("echo", "127.0.0.2:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = common::waypoint_mesh("127.0.0.2", backend.addr.port(), CLIENT);
    common::write(dir.path(), "mesh.yaml", &mesh);
    let server = common::start(dir.path()).await;
    let w = in_process_waypoint::start_waypoint(&server).await;
    let client_ip: IpAddr = "127.0.0.1".parse().unwrap();
    common::wait_for("the waypoint to learn the client's workload", || {
        w.wp.proxy
            .peers
            .snapshot()
            .workload_by_ip(client_ip)
            .is_some()
    })
    .await;

    let shell = wcommon::client(w.ca.clone(), "sleep", &w.wp);
    assert_eq!(shell.get("/", &[]).await.status, 200);
    let m = wcommon::admin_get(&w.wp, "/metrics").await;
    let line = requests_line(
        &m,
        "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
    )
    .unwrap_or_else(|| panic!("no request counted for shell:\n{m}"));
    for want in [
        "source_workload=\"shell\"",
        "source_workload_namespace=\"default\"",
        "source_canonical_service=\"shell\"",
        "source_canonical_revision=\"v2\"",
        "source_app=\"shell\"",
        "source_version=\"v2\"",
        "source_cluster=\"Kubernetes\"",
        "destination_workload=\"echo-1\"",
        "destination_canonical_service=\"echo\"",
        "destination_cluster=\"Kubernetes\"",
    ] {
        assert!(line.contains(want), "{want} in {line}");
    }

    // Same address, another identity: the workload there is not this
    // client, which is named by its certificate alone.
    let other = wcommon::client(w.ca.clone(), "intruder", &w.wp);
    assert_eq!(other.get("/", &[]).await.status, 200);
    let m = wcommon::admin_get(&w.wp, "/metrics").await;
    let line = requests_line(&m, "sa/intruder").expect("the intruder's request was counted");
    for want in [
        "source_workload=\"intruder\"",
        "source_canonical_service=\"unknown\"",
        "source_canonical_revision=\"latest\"",
        "source_cluster=\"unknown\"",
    ] {
        assert!(line.contains(want), "{want} in {line}");
    }
}
