//! The node agent's passes (`follow.rs`) on a running pod of the test bed's
//! kind: a process in its own network namespace, in a pod cgroup under the
//! host's real cgroup2 mount (uniquely named, removed after), found
//! through /proc; enrolled with a fake ztunnel (netns fd, cgroup, netns
//! path) and annotated on a fake API server when its namespace is in the
//! mesh, removed and un-annotated when it leaves; first one pass at a
//! time, then the whole watch loop against a fake API server that lists
//! and watches.
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
    uid: String,
    /// The pod-level cgroup.
    pod_dir: PathBuf,
}

impl TestPod {
    /// Starts one under `<mount>/<name><pid>`, with a uid ending in
    /// `uid_tail`; returns once its process is in its own netns.
    async fn start(mount: &std::path::Path, name: &str, uid_tail: &str) -> TestPod {
        let top = mount.join(format!("{name}{}", std::process::id()));
        let uid = format!("{:08x}-{uid_tail}", std::process::id());
        let pod_dir = top.join(format!("pod{uid}"));
        let sandbox = pod_dir.join("sandbox");
        std::fs::create_dir_all(&sandbox).unwrap();
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let pod = TestPod {
            child,
            dirs: vec![top, pod_dir.clone(), sandbox.clone()],
            uid,
            pod_dir,
        };
        std::fs::write(sandbox.join("cgroup.procs"), pid.to_string()).unwrap();
        eventually("the test pod in its own netns", || {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
                != std::fs::read_link("/proc/self/ns/net").ok()
        })
        .await;
        pod
    }
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

/// The agent's options on this node, with the test's cgroup mount for
/// both the agent's view and the host's.
fn options(mount: &std::path::Path, socket: PathBuf, interval: Duration) -> follow::Options {
    follow::Options {
        node: "node-1".into(),
        proc_dir: "/proc".into(),
        cgroup_dir: mount.to_path_buf(),
        host_cgroup_dir: mount.to_path_buf(),
        socket,
        interval,
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

/// What the agent's passes are tested against: an API server holding pod
/// `mesh/app` (account `sa-app`), a fake ztunnel, and the agent on both.
struct Fakes {
    api_server: ApiServer,
    dir: tempfile::TempDir,
    client: kube::Client,
    zt: FakeZtunnel,
    agent: follow::Agent,
}

impl Fakes {
    async fn start(mount: &std::path::Path) -> Fakes {
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
        let agent = follow::Agent::new(
            client.clone(),
            options(mount, socket, Duration::from_secs(1)),
            procfs::own_netns().unwrap(),
        );
        Fakes {
            api_server,
            dir,
            client,
            zt,
            agent,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pod_joins_and_leaves_with_its_namespace_label() {
    // The pod: a process in its own netns, in a pod-level cgroup.
    let mount = cgroup::mount();
    let test_pod = TestPod::start(&mount, "ztcnifollow", "aaaa-4bbb-8ccc-dddddddddddd").await;
    let (uid, pod_dir) = (test_pod.uid.clone(), test_pod.pod_dir.clone());
    let pid = test_pod.child.id();
    let host_netns = procfs::own_netns().unwrap();
    let Fakes {
        api_server,
        dir,
        client,
        zt,
        mut agent,
    } = Fakes::start(&mount).await;
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

    // The label goes, but ztunnel is away: the pod stays annotated (the
    // record is let go only once the capture is gone), to be retried.
    let plain = namespace(json!({}));
    let mut away = follow::Agent::new(
        client.clone(),
        options(
            &mount,
            dir.path().join("absent.sock"),
            Duration::from_secs(1),
        ),
        host_netns,
    );
    away.reconcile(std::slice::from_ref(&annotated), |_| Some(plain.clone()))
        .await;
    assert_eq!(patches().len(), 1, "still annotated");

    // With ztunnel there: removed from it, then un-annotated.
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

/// A pod the agent enrolled is `del`eted from ztunnel once it is gone or
/// finished, in case its CNI `DEL` came while the agent was enrolling it;
/// pods the agent did not enroll are left to their `DEL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_agent_enrolled_leaves_ztunnel_when_it_is_gone() {
    let mount = cgroup::mount();
    let test_pod = TestPod::start(&mount, "ztcnigone", "aaaa-4bbb-8ccc-eeeeeeeeeeee").await;
    let uid = test_pod.uid.clone();
    // Whole: its temporary directory holds ztunnel's socket.
    let mut fakes = Fakes::start(&mount).await;
    let (zt, agent) = (&fakes.zt, &mut fakes.agent);
    let ambient = namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    let dels = || zt.dels.lock().unwrap().clone();

    // Already annotated (the plugin enrolled it): gone, it is left alone.
    let by_plugin = pod(&uid, "1", json!({CAPTURED: "enabled"}));
    agent
        .reconcile(&[by_plugin], |_| Some(ambient.clone()))
        .await;
    agent.reconcile(&[], |_| Some(ambient.clone())).await;
    assert!(dels().is_empty(), "{:?}", dels());

    // Enrolled by the agent, then finished: removed from ztunnel, once.
    let p = pod(&uid, "2", json!({}));
    agent.reconcile(&[p], |_| Some(ambient.clone())).await;
    assert_eq!(zt.adds.lock().unwrap().len(), 1);
    let mut finished = (*pod(&uid, "3", json!({CAPTURED: "enabled"}))).clone();
    finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let finished = Arc::new(finished);
    agent
        .reconcile(std::slice::from_ref(&finished), |_| Some(ambient.clone()))
        .await;
    assert_eq!(dels(), vec![uid.clone()]);
    agent
        .reconcile(&[finished], |_| Some(ambient.clone()))
        .await;
    agent.reconcile(&[], |_| Some(ambient.clone())).await;
    assert_eq!(dels(), vec![uid.clone()], "once");

    // Enrolled again, then deleted (gone from the watch).
    let p = pod(&uid, "4", json!({}));
    agent.reconcile(&[p], |_| Some(ambient.clone())).await;
    assert_eq!(zt.adds.lock().unwrap().len(), 2);
    agent.reconcile(&[], |_| Some(ambient.clone())).await;
    assert_eq!(dels(), vec![uid.clone(), uid.clone()]);
}

/// A fake API server that lists and watches Pods and Namespaces the way
/// kube-rs' watcher talks to a real one, and applies merge patches of a
/// pod's annotations (sending the MODIFIED event a watch would get).
mod watched {
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::{json, Value};
    use tokio::sync::broadcast;

    pub const PODS: &str = "/api/v1/pods";
    pub const NAMESPACES: &str = "/api/v1/namespaces";

    type Body = BoxBody<Bytes, Infallible>;

    #[derive(Clone, Default)]
    pub struct FakeApi {
        /// Objects by collection path, then by name.
        objects: Arc<Mutex<HashMap<String, Vec<Value>>>>,
        events: Arc<Mutex<HashMap<String, broadcast::Sender<String>>>>,
        /// Query strings of the pod lists and watches.
        pub pod_queries: Arc<Mutex<Vec<String>>>,
        version: Arc<Mutex<u64>>,
    }

    impl FakeApi {
        pub fn serve(&self, path: &str, items: Vec<Value>) {
            self.objects.lock().unwrap().insert(path.into(), items);
            self.events
                .lock()
                .unwrap()
                .insert(path.into(), broadcast::channel(16).0);
        }

        /// Replaces the object of that name and tells the watchers.
        pub fn update(&self, path: &str, mut object: Value) {
            let v = {
                let mut v = self.version.lock().unwrap();
                *v += 1;
                *v + 1
            };
            object["metadata"]["resourceVersion"] = json!(v.to_string());
            let name = object["metadata"]["name"].clone();
            let mut all = self.objects.lock().unwrap();
            let items = all.get_mut(path).unwrap();
            items.retain(|o| o["metadata"]["name"] != name);
            items.push(object.clone());
            let line = json!({"type": "MODIFIED", "object": object}).to_string() + "\n";
            let _ = self.events.lock().unwrap()[path].send(line);
        }

        pub fn get(&self, path: &str, name: &str) -> Value {
            self.objects.lock().unwrap()[path]
                .iter()
                .find(|o| o["metadata"]["name"] == name)
                .cloned()
                .unwrap()
        }

        async fn handle(
            &self,
            req: hyper::Request<hyper::body::Incoming>,
        ) -> hyper::Response<Body> {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            if req.method() == hyper::Method::PATCH {
                // /api/v1/namespaces/<ns>/pods/<name>
                let name = path.rsplit('/').next().unwrap().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let patch: Value = serde_json::from_slice(&body).unwrap();
                let mut pod = self.get(PODS, &name);
                for (k, v) in patch["metadata"]["annotations"].as_object().unwrap() {
                    if v.is_null() {
                        if let Some(a) = pod["metadata"]["annotations"].as_object_mut() {
                            a.remove(k);
                        }
                    } else {
                        pod["metadata"]["annotations"][k] = v.clone();
                    }
                }
                self.update(PODS, pod.clone());
                return respond(Full::new(Bytes::from(pod.to_string())).boxed());
            }
            if path == PODS {
                self.pod_queries.lock().unwrap().push(query.clone());
            }
            if query.contains("watch=true") {
                let rx = self.events.lock().unwrap()[&path].subscribe();
                let lines = futures::stream::unfold(rx, |mut rx| async move {
                    let line = rx.recv().await.ok()?;
                    Some((Ok(Frame::data(Bytes::from(line))), rx))
                });
                return respond(BodyExt::boxed(StreamBody::new(lines)));
            }
            let items = self.objects.lock().unwrap()[&path].clone();
            let v = self.version.lock().unwrap().to_string();
            let list = json!({"kind": "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": v}, "items": items});
            respond(Full::new(Bytes::from(list.to_string())).boxed())
        }

        pub async fn start(&self) -> kube::Client {
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
            kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
        }
    }

    fn respond(body: Body) -> hyper::Response<Body> {
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }
}

/// Polls `f` until it holds (failing the test after 20s: no timing is
/// asserted, only that it happens).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_loop_follows_a_namespace_label_both_ways() {
    use watched::{FakeApi, NAMESPACES, PODS};
    let mount = cgroup::mount();
    let _pod = TestPod::start(&mount, "ztcniwatch", "eeee-4fff-8aaa-bbbbbbbbbbbb").await;
    let (uid, pod_dir) = (_pod.uid.clone(), _pod.pod_dir.clone());

    let api = FakeApi::default();
    let ns = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "mesh", "resourceVersion": "1", "labels": labels}})
    };
    api.serve(NAMESPACES, vec![ns(json!({}))]);
    api.serve(
        PODS,
        vec![json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "mesh", "uid": uid,
                         "resourceVersion": "1", "annotations": {}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "sa-app",
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"}})],
    );
    let client = api.start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let zt = FakeZtunnel::start(&socket);
    let agent = tokio::spawn(follow::run(
        client,
        options(&mount, socket, Duration::from_millis(100)),
    ));
    let captured = || api.get(PODS, "app")["metadata"]["annotations"][CAPTURED] == json!("enabled");
    eventually("the pods watched", || {
        api.pod_queries
            .lock()
            .unwrap()
            .iter()
            .any(|q| q.contains("watch=true"))
    })
    .await;
    // Outside the mesh: left alone (several passes).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(zt.adds.lock().unwrap().is_empty());
    assert!(!captured());
    // Only this node's pods are asked for.
    assert!(api
        .pod_queries
        .lock()
        .unwrap()
        .iter()
        .all(|q| q.contains("fieldSelector=spec.nodeName%3Dnode-1")));

    api.update(
        NAMESPACES,
        ns(json!({"istio.io/dataplane-mode": "ambient"})),
    );
    eventually("the running pod enrolled and annotated", captured).await;
    let adds = zt.adds.lock().unwrap().clone();
    assert_eq!(adds.len(), 1);
    assert_eq!(PathBuf::from(&adds[0].cgroup_path), pod_dir);

    api.update(NAMESPACES, ns(json!({})));
    // Del from ztunnel first, then the annotation (Istio's order): wait
    // for both.
    eventually("the pod removed and its annotation dropped", || {
        !zt.dels.lock().unwrap().is_empty() && !captured()
    })
    .await;
    assert_eq!(*zt.dels.lock().unwrap(), vec![uid.clone()]);
    assert_eq!(zt.adds.lock().unwrap().len(), 1, "enrolled once");
    agent.abort();
}
