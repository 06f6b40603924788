//! The ADS and CA servers driven by a raw tonic client on loopback:
//! ACK, NACK, unsubscribe, resume, removal, node checks, SotW, the CA's
//! node rule, and malformed manifests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::*;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest};
use mesh_proto::rpc::Status as RpcStatus;
use mesh_proto::type_url::{ADDRESS, AUTHORIZATION};
use mesh_proto::workload as wl;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;

const ECHO_UID: &str = "Kubernetes//Pod/demo/echo";
const CLIENT_UID: &str = "Kubernetes//Pod/demo/client";
const SVC: &str = "demo/echo.demo.svc.cluster.local";

fn manifests(echo_labels: &str, with_client: bool, extra: &str) -> String {
    let mut s = NS.to_string();
    s += &pod("echo", "node-b", "10.244.2.10", "echo", echo_labels);
    if with_client {
        s += &pod("client", "node-a", "10.244.1.10", "client", "app: client");
    }
    s += SERVICE;
    s += extra;
    s
}

const DENY: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/other"]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

fn sub(t: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: t.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

fn workload(r: &DeltaDiscoveryResponse, name: &str) -> wl::Workload {
    let res = r.resources.iter().find(|x| x.name == name).unwrap();
    match wl::Address::decode(res.resource.as_ref().unwrap().value.as_slice())
        .unwrap()
        .r#type
    {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("not a workload: {other:?}"),
    }
}

#[tokio::test]
async fn delta_ack_nack_removal_unsubscribe_resume() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "mesh.yaml",
        &manifests("app: echo, version: v1", true, DENY),
    );
    let server = start(dir.path()).await;
    let ch = channel(&server).await;

    // Wildcard subscription to both types.
    let mut first = sub(ADDRESS, &[]);
    first.node = node("node-a");
    let mut s = Delta::open(ch.clone(), "tok-a", first).await.unwrap();
    s.send(sub(AUTHORIZATION, &[])).await;
    let a = s.recv().await.unwrap();
    assert_eq!(a.type_url, ADDRESS);
    assert_eq!(names(&a), vec![CLIENT_UID, ECHO_UID, SVC]);
    let echo = workload(&a, ECHO_UID);
    assert_eq!(echo.node, "node-b");
    assert_eq!(echo.service_account, "echo");
    assert_eq!(echo.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
    assert_eq!(echo.addresses, vec![vec![10, 244, 2, 10]]);
    assert_eq!(echo.authorization_policies, vec!["demo/deny-other"]);
    // The named target port resolved through the container's ports.
    assert_eq!(echo.services[SVC].ports[0].target_port, 8080);
    s.ack(&a).await;
    let z = s.recv().await.unwrap();
    assert_eq!(z.type_url, AUTHORIZATION);
    assert_eq!(names(&z), vec!["demo/deny-other"]);
    s.ack(&z).await;
    let versions: HashMap<String, String> = a
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();

    // A change pushes only what changed; NACK it.
    write(
        dir.path(),
        "mesh.yaml",
        &manifests("app: echo, version: v2", true, DENY),
    );
    let c = s.recv().await.unwrap();
    assert_eq!(names(&c), vec![ECHO_UID]);
    assert_eq!(workload(&c, ECHO_UID).canonical_revision, "v2");
    assert!(c.removed_resources.is_empty());
    s.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        response_nonce: c.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "test rejects this".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    let m = server.metrics.clone();
    wait_for("the NACK to be counted", || m.nack_count(ADDRESS) == 1).await;

    // Removal: the client pod goes away.
    write(
        dir.path(),
        "mesh.yaml",
        &manifests("app: echo, version: v2", false, DENY),
    );
    let r = s.recv().await.unwrap();
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec![CLIENT_UID]);
    s.ack(&r).await;

    // Explicit subscription and unsubscribe on a second stream.
    let mut first = sub(ADDRESS, &[SVC]);
    first.node = node("node-b");
    let mut n = Delta::open(ch.clone(), "tok-b", first).await.unwrap();
    let only = n.recv().await.unwrap();
    assert_eq!(names(&only), vec![SVC]);
    n.ack(&only).await;
    n.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        resource_names_unsubscribe: vec![SVC.into()],
        ..Default::default()
    })
    .await;
    // The service changes, then the stream subscribes to the echo pod: the
    // next response carries the pod only, never the unsubscribed service.
    let svc2 = SERVICE.replace("port: 80,", "port: 81,");
    write(
        dir.path(),
        "mesh.yaml",
        &(NS.to_string()
            + &pod(
                "echo",
                "node-b",
                "10.244.2.10",
                "echo",
                "app: echo, version: v2",
            )
            + &svc2
            + DENY),
    );
    let c2 = s.recv().await.unwrap(); // wildcard stream sees the service change
    assert!(names(&c2).contains(&SVC.to_string()));
    n.send(sub(ADDRESS, &[ECHO_UID])).await;
    let p = n.recv().await.unwrap();
    assert_eq!(names(&p), vec![ECHO_UID]);
    assert!(p.removed_resources.is_empty());

    // Resume: a new stream tells what it holds: the echo pod at the old
    // version, the service at its current version, and a pod that no longer
    // exists. Only the echo pod is resent; the ghost is removed.
    let svc_version = c2
        .resources
        .iter()
        .find(|r| r.name == SVC)
        .unwrap()
        .version
        .clone();
    let mut first = sub(ADDRESS, &[]);
    first.node = node("node-a");
    first.initial_resource_versions = HashMap::from([
        (ECHO_UID.to_string(), versions[ECHO_UID].clone()),
        (SVC.to_string(), svc_version),
        ("Kubernetes//Pod/demo/ghost".to_string(), "0".to_string()),
    ]);
    let mut resumed = Delta::open(ch.clone(), "tok-a", first).await.unwrap();
    let rr = resumed.recv().await.unwrap();
    assert_eq!(names(&rr), vec![ECHO_UID]);
    assert_eq!(rr.removed_resources, vec!["Kubernetes//Pod/demo/ghost"]);
    server.stop().await;
}

#[tokio::test]
async fn node_must_match_token() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &manifests("app: echo", true, ""));
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let mut first = sub(ADDRESS, &[]);
    first.node = node("node-b");
    let err = match Delta::open(ch.clone(), "tok-a", first).await {
        Ok(mut s) => s.recv().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node-a"), "{}", err.message());

    let mut first = sub(ADDRESS, &[]);
    first.node = node("node-a");
    let err = match Delta::open(ch.clone(), "wrong", first).await {
        Ok(mut s) => s.recv().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn sotw_push_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &manifests("app: echo", true, DENY));
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: node("node-a"),
        type_url: AUTHORIZATION.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut st = AggregatedDiscoveryServiceClient::new(ch)
        .stream_aggregated_resources(authed(ReceiverStream::new(rx), "tok-a"))
        .await
        .unwrap()
        .into_inner();
    let r = st.message().await.unwrap().unwrap();
    assert_eq!(r.resources.len(), 1);
    tx.send(DiscoveryRequest {
        type_url: AUTHORIZATION.into(),
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Removing the policy pushes the (now empty) full set.
    write(dir.path(), "mesh.yaml", &manifests("app: echo", true, ""));
    let r2 = st.message().await.unwrap().unwrap();
    assert!(r2.resources.is_empty());
    assert_ne!(r2.nonce, r.nonce);
    server.stop().await;
}

fn csr_pem(identity: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn ca_signs_only_identities_on_the_callers_node() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &manifests("app: echo", true, ""));
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let mut ca = IstioCertificateServiceClient::new(ch);
    let echo_id = "spiffe://cluster.local/ns/demo/sa/echo";
    let req = |id: &str| IstioCertificateRequest {
        csr: csr_pem(id),
        validity_duration: 60,
        metadata: None,
    };
    // node-a asks for the identity of a pod on node-b: refused.
    let err = ca
        .create_certificate(authed(req(echo_id), "tok-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("node-a") && err.message().contains(echo_id));
    // node-b may.
    let ok = ca
        .create_certificate(authed(req(echo_id), "tok-b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.cert_chain.len(), 2);
    let der = pem::parse(&ok.cert_chain[0]).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
    let v = cert.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    assert!(
        life <= 60 + 61,
        "validity {life}s exceeds the requested TTL"
    );
    // Without a token: unauthenticated.
    let err = ca
        .create_certificate(tonic::Request::new(req(echo_id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn malformed_manifests_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &manifests("app: echo", true, ""));
    let bad_pod = pod("broken", "node-a", "not-an-ip", "x", "app: x");
    write(
        dir.path(),
        "extra.yaml",
        &(bad_pod.clone() + &pod("fine", "node-a", "10.244.1.20", "fine", "app: fine")),
    );
    let server = start(dir.path()).await;
    let errors = server.errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("extra.yaml")
            && errors[0].contains("Pod demo/broken")
            && errors[0].contains("status.podIP"),
        "{}",
        errors[0]
    );
    let snap = server.snapshots.borrow().clone();
    let addrs = snap.resources.get(ADDRESS).unwrap();
    assert!(addrs.contains_key("Kubernetes//Pod/demo/fine"));
    assert!(!addrs.contains_key("Kubernetes//Pod/demo/broken"));

    // A good object turned bad keeps its last good version; a type error
    // names the field.
    let bad_echo =
        manifests("app: echo", true, "").replace("containerPort: 8080", "containerPort: eighty");
    write(dir.path(), "mesh.yaml", &bad_echo);
    let e2 = server.errors.clone();
    wait_for("the bad edit to be reported", || {
        e2.lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("mesh.yaml") && e.contains("containerPort"))
    })
    .await;
    let snap = server.snapshots.borrow().clone();
    assert!(snap.resources.get(ADDRESS).unwrap().contains_key(ECHO_UID));

    // Not YAML at all: everything the file held stays.
    write(dir.path(), "mesh.yaml", "{{{ not yaml");
    wait_for("the broken file to be reported", || {
        e2.lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("not valid YAML"))
    })
    .await;
    let snap = server.snapshots.borrow().clone();
    assert!(snap.resources.get(ADDRESS).unwrap().contains_key(ECHO_UID));
    assert!(snap.resources.get(ADDRESS).unwrap().contains_key(SVC));
    server.stop().await;
}

#[tokio::test]
async fn large_responses_come_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = NS.to_string();
    for i in 0..600 {
        text += &pod(
            &format!("p{i}"),
            "node-a",
            &format!("10.1.{}.{}", i / 256, i % 256),
            "sa",
            "app: x",
        );
    }
    write(dir.path(), "many.yaml", &text);
    let server = start(dir.path()).await;
    let mut first = sub(ADDRESS, &[]);
    first.node = node("node-a");
    let mut s = Delta::open(channel(&server).await, "tok-a", first)
        .await
        .unwrap();
    let c1 = s.recv().await.unwrap();
    assert_eq!(c1.resources.len(), xds::ads::CHUNK);
    assert!(c1.system_version_info.ends_with("/partial"));
    s.ack(&c1).await;
    let c2 = s.recv().await.unwrap();
    assert_eq!(c2.resources.len(), 600 - xds::ads::CHUNK);
    assert!(!c2.system_version_info.ends_with("/partial"));
    assert_ne!(c1.nonce, c2.nonce);
    server.stop().await;
}
