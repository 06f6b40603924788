//! The node agent's passes (`follow.rs`) on a running pod of the test bed's
//! kind: a process in its own network namespace, in a pod cgroup under the
//! host's real cgroup2 mount (uniquely named, removed after), found
//! through /proc; enrolled with a fake ztunnel (netns fd, cgroup, netns
//! path) and annotated on a fake API server when its namespace is in the
//! mesh, un-annotated and removed when it leaves. The watches that feed
//! the passes are kube-rs's and not exercised here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};
use support::{ApiServer, FakeZtunnel, PodSpec};
use ztunnel_cni::{api, cgroup, follow, procfs};

const CAPTURED: &str = "ambient.istio.io/redirection";

/// A running pod's sandbox: `unshare --net sleep` in `<mount>/<top>/pod<uid>/sandbox`.
struct TestPod {
    child: Child,
    dirs: Vec<PathBuf>,
}
impl Drop for TestPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn pod(uid: &str, version: &str, annotations: Value) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": "app", "namespace": "mesh", "uid": uid,
                         "resourceVersion": version, "annotations": annotations},
            "spec": {"serviceAccountName": "sa-app", "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap(),
    )
}

fn namespace(labels: Value) -> Arc<Namespace> {
    Arc::new(
        serde_json::from_value(json!({"metadata": {"name": "mesh", "labels": labels}})).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pod_joins_and_leaves_with_its_namespace_label() {
    // The pod: a process in its own netns, in a pod-level cgroup.
    let mount = cgroup::mount();
    let top = format!("ztcnifollow{}", std::process::id());
    let uid = format!("{:08x}-aaaa-4bbb-8ccc-dddddddddddd", std::process::id());
    let pod_dir = mount.join(&top).join(format!("pod{uid}"));
    let sandbox = pod_dir.join("sandbox");
    std::fs::create_dir_all(&sandbox).unwrap();
    let child = Command::new("unshare")
        .args(["--net", "sleep", "60"])
        .spawn()
        .unwrap();
    let test_pod = TestPod {
        child,
        dirs: vec![mount.join(&top), pod_dir.clone(), sandbox.clone()],
    };
    let pid = test_pod.child.id();
    std::fs::write(sandbox.join("cgroup.procs"), pid.to_string()).unwrap();
    let host_netns = procfs::own_netns().unwrap();
    for _ in 0..100 {
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        if ns != std::fs::read_link("/proc/self/ns/net").unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pods = BTreeMap::from([(
        "mesh/app",
        PodSpec {
            labels: json!({}),
            annotations: json!({}),
            service_account: "sa-app",
        },
    )]);
    let api_server = ApiServer::start("t", BTreeMap::new(), pods).await;
    let dir = tempfile::tempdir().unwrap();
    let client = api::client(&api_server.kubeconfig(dir.path(), "t"))
        .await
        .unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let zt = FakeZtunnel::start(&socket);
    let mut agent = follow::Agent::new(
        client,
        follow::Options {
            node: "node-1".into(),
            proc_dir: "/proc".into(),
            cgroup_dir: mount.clone(),
            host_cgroup_dir: mount.clone(),
            socket,
            interval: Duration::from_secs(1),
        },
        host_netns,
    );
    let patches = || api_server.patches.lock().unwrap().clone();

    // The namespace gets the label: the running pod is enrolled, then
    // annotated.
    let ambient = namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    let p = pod(&uid, "1", json!({}));
    agent
        .reconcile(std::slice::from_ref(&p), |_| Some(ambient.clone()))
        .await;
    let adds = zt.adds.lock().unwrap().clone();
    assert_eq!(adds.len(), 1, "enrolled once");
    assert_eq!(adds[0].uid, uid);
    assert_eq!(PathBuf::from(&adds[0].cgroup_path), pod_dir);
    assert_eq!(adds[0].netns_path, format!("/proc/{pid}/ns/net"));
    let info = adds[0].workload_info.clone().unwrap();
    assert_eq!(
        (info.namespace.as_str(), info.name.as_str()),
        ("mesh", "app")
    );
    assert_eq!(info.service_account, "sa-app");
    assert_eq!(
        patches(),
        vec![(
            "mesh/app".to_string(),
            json!({"metadata": {"annotations": {CAPTURED: "enabled"}}})
        )]
    );

    // Until the pod changes (the annotation lands), nothing is redone.
    agent.reconcile(&[p], |_| Some(ambient.clone())).await;
    assert_eq!(zt.adds.lock().unwrap().len(), 1);
    assert_eq!(patches().len(), 1);
    // Annotated: in place, nothing to do.
    let annotated = pod(&uid, "2", json!({CAPTURED: "enabled"}));
    agent
        .reconcile(std::slice::from_ref(&annotated), |_| Some(ambient.clone()))
        .await;
    assert_eq!(zt.adds.lock().unwrap().len(), 1);
    assert!(zt.dels.lock().unwrap().is_empty());

    // The label goes: un-annotated, then removed from ztunnel.
    let plain = namespace(json!({}));
    agent.reconcile(&[annotated], |_| Some(plain.clone())).await;
    assert_eq!(
        patches().last().unwrap(),
        &(
            "mesh/app".to_string(),
            json!({"metadata": {"annotations": {CAPTURED: null}}})
        )
    );
    assert_eq!(*zt.dels.lock().unwrap(), vec![uid.clone()]);

    // Its namespace not listed yet: nothing, whatever the pod says.
    let before = patches().len();
    let p = pod(&uid, "3", json!({CAPTURED: "enabled"}));
    agent.reconcile(&[p], |_| None).await;
    assert_eq!(patches().len(), before);

    // A pod with no process on the node: not enrolled, not annotated.
    drop(test_pod);
    let p = pod(&uid, "4", json!({}));
    agent.reconcile(&[p], |_| Some(ambient.clone())).await;
    assert_eq!(zt.adds.lock().unwrap().len(), 1);
    assert_eq!(patches().len(), before);
}
