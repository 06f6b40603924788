//! `ztunnel-cni-install` on temp dirs standing in for the host's CNI dirs:
//! chaining into a conflist or a converted `.conf`, idempotence, coming
//! back after the primary rewrites its file, token rotation, bad configs,
//! and SIGTERM leaving the node as it found it. One test runs the installed
//! plugin with the installed config and kubeconfig against a fake API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use support::{prev_result, status, ApiServer, FakeZtunnel, PodSpec};
use ztunnel_cni::upgrade::{self, Stop};

struct Node {
    dir: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    sa: PathBuf,
    log: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let [bin, conf, sa] = ["bin", "net.d", "sa"].map(|d| dir.path().join(d));
        for d in [&bin, &conf, &sa] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(sa.join("token"), "token-1\n").unwrap();
        std::fs::write(sa.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let log = dir.path().join("install.log");
        Node {
            dir,
            bin,
            conf,
            sa,
            log,
        }
    }

    /// Starts the installer; `api_port` is KUBERNETES_SERVICE_PORT.
    fn install(&self, api_port: u16) -> Installer {
        self.install_as(api_port, &[])
    }

    /// The installer with extra environment (its pod, from the downward API).
    fn install_as(&self, api_port: u16, env: &[(&str, &str)]) -> Installer {
        let child = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni-install"))
            .args(["--cni-bin-dir", self.bin.to_str().unwrap()])
            .args(["--cni-conf-dir", self.conf.to_str().unwrap()])
            .args(["--service-account-dir", self.sa.to_str().unwrap()])
            .args(["--plugin-binary", env!("CARGO_BIN_EXE_ztunnel-cni")])
            .args(["--ztunnel-socket", self.socket().to_str().unwrap()])
            .args(["--interval", "50ms"])
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", api_port.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap();
        Installer { child: Some(child) }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("ztunnel.sock")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.conf.join("ztunnel-cni-kubeconfig")
    }

    fn plugin(&self) -> PathBuf {
        self.bin.join("ztunnel-cni")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The conf dir: file name → bytes.
    fn conf_files(&self) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    /// Waits until `file` in the conf dir parses and `f` holds for it.
    fn wait_for(&self, file: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let path = self.conf.join(file);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .filter(|v| f(v))
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{file}: never {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Installer {
    child: Option<Child>,
}

impl Installer {
    /// SIGTERM; whether it exited 0.
    fn terminate(self) -> bool {
        self.signal(Signal::SIGTERM)
    }

    fn signal(mut self, sig: Signal) -> bool {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        child.wait().unwrap().success()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ours(list: &Value) -> Vec<&Value> {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "ztunnel-cni")
        .collect()
}

fn chained(list: &Value) -> bool {
    ours(list).len() == 1
}

/// Written the way a primary CNI might: its own spacing and key order,
/// which the installer must give back unchanged.
const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "ipam": {"type": "calico-ipam"}, "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
"#;

#[test]
fn chains_into_the_first_conflist_and_restores_it_on_sigterm() {
    let node = Node::new();
    std::fs::write(node.conf.join("10-calico.conflist"), CALICO).unwrap();
    std::fs::write(node.conf.join("99-later.conflist"), CALICO).unwrap();
    std::fs::write(node.conf.join("00-notes.txt"), "not a config").unwrap();
    let before = node.conf_files();
    let mut inst = node.install(443);

    let list = node.wait_for("10-calico.conflist", "chained", chained);
    let primary: Value = serde_json::from_str(CALICO).unwrap();
    assert_eq!(list["name"], primary["name"]);
    assert_eq!(list["cniVersion"], primary["cniVersion"]);
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins[..2], primary["plugins"].as_array().unwrap()[..]);
    assert_eq!(
        plugins[2],
        json!({"type": "ztunnel-cni", "ztunnelSocket": node.socket(),
               "kubeconfig": node.kubeconfig(), "capabilities": {"cgroupPath": true}})
    );
    assert_eq!(
        std::fs::read(node.conf.join("99-later.conflist")).unwrap(),
        CALICO.as_bytes(),
        "only the first config is the primary"
    );
    assert_eq!(
        std::fs::read(node.plugin()).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_ztunnel-cni")).unwrap()
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&node.plugin()), 0o755);
    assert_eq!(mode(&node.kubeconfig()), 0o600);

    // Idempotent: ticks later, still one entry, same bytes.
    let chained_bytes = std::fs::read(node.conf.join("10-calico.conflist")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read(node.conf.join("10-calico.conflist")).unwrap(),
        chained_bytes
    );

    // The primary rewrites its config (say, an upgrade adding a plugin):
    // the entry comes back, once, after the primary's plugins.
    let upgraded = CALICO.replace(
        r#"{"type": "portmap""#,
        r#"{"type": "bandwidth", "capabilities": {"bandwidth": true}},
    {"type": "portmap""#,
    );
    std::fs::write(node.conf.join("10-calico.conflist"), &upgraded).unwrap();
    let list = node.wait_for("10-calico.conflist", "re-chained", chained);
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["calico", "bandwidth", "portmap", "ztunnel-cni"]);
    assert!(inst.running());

    assert!(inst.terminate(), "exit status; log:\n{}", node.log());
    let mut want = before;
    want.insert("10-calico.conflist".into(), upgraded.into_bytes());
    assert_eq!(
        node.conf_files(),
        want,
        "conf dir after SIGTERM (the primary's latest config, byte for byte; no kubeconfig)"
    );
    assert!(!node.plugin().exists(), "plugin binary left behind");
    assert_eq!(std::fs::read_dir(&node.bin).unwrap().count(), 0);
}

#[test]
fn converts_a_conf_and_puts_it_back() {
    let node = Node::new();
    let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
    std::fs::write(node.conf.join("10-flannel.conf"), flannel).unwrap();
    let inst = node.install(443);

    let list = node.wait_for("10-flannel.conflist", "chained", chained);
    assert_eq!(list["name"], "cbr0");
    assert_eq!(list["cniVersion"], "0.3.1");
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[0], serde_json::from_str::<Value>(flannel).unwrap());
    assert!(
        !node.conf.join("10-flannel.conf").exists(),
        "the runtime would pick the .conf and skip us"
    );

    // The primary writes its .conf again: converted again.
    std::fs::write(node.conf.join("10-flannel.conf"), flannel).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.conf.join("10-flannel.conf").exists() {
        assert!(Instant::now() < deadline, "log:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    node.wait_for("10-flannel.conflist", "chained", chained);

    // Ctrl-C (a run by hand) cleans up as SIGTERM does.
    assert!(inst.signal(Signal::SIGINT), "log:\n{}", node.log());
    assert_eq!(
        node.conf_files(),
        BTreeMap::from([("10-flannel.conf".to_string(), flannel.as_bytes().to_vec())])
    );
}

#[test]
fn replaces_a_leftover_entry_instead_of_adding_one() {
    let node = Node::new();
    // What an installer killed with SIGKILL leaves behind.
    let leftover = json!({"name": "k8s-pod-network", "cniVersion": "1.0.0", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local"}},
        {"type": "ztunnel-cni", "ztunnelSocket": "/old.sock", "kubeconfig": "/old"},
    ]});
    std::fs::write(node.conf.join("05-ptp.conflist"), leftover.to_string()).unwrap();
    let inst = node.install(443);

    let list = node.wait_for("05-ptp.conflist", "re-chained", |v| {
        ours(v)
            .first()
            .is_some_and(|e| e["ztunnelSocket"] != "/old.sock")
    });
    assert_eq!(list["plugins"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(ours(&list).len(), 1, "{list}");

    assert!(inst.terminate(), "log:\n{}", node.log());
    let after: Value =
        serde_json::from_slice(&std::fs::read(node.conf.join("05-ptp.conflist")).unwrap()).unwrap();
    assert_eq!(
        after,
        json!({"name": "k8s-pod-network", "cniVersion": "1.0.0", "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local"}}]})
    );
}

#[test]
fn malformed_configs_are_reported_and_retried() {
    let node = Node::new();
    let bad = node.conf.join("10-bad.conflist");
    let mut inst = node.install(443);
    let wait_log = |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !want.iter().all(|w| node.log().contains(w)) {
            assert!(
                Instant::now() < deadline,
                "{want:?} not logged:\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_log(&["waiting for the primary CNI"]);
    std::fs::write(&bad, "{not json").unwrap();
    wait_log(&["10-bad.conflist: not JSON"]);
    std::fs::write(&bad, r#"{"name": "x", "plugins": {"type": "ptp"}}"#).unwrap();
    wait_log(&["10-bad.conflist: no \"plugins\" array"]);
    let conf = node.conf.join("05-bad.conf");
    std::fs::write(&conf, r#"{"name": "x", "plugins": []}"#).unwrap();
    wait_log(&["05-bad.conf: a single-plugin config without a \"type\""]);
    std::fs::remove_file(&conf).unwrap();
    assert!(inst.running(), "log:\n{}", node.log());
    // The binary and kubeconfig are in place even while the config is bad.
    assert!(node.plugin().exists() && node.kubeconfig().exists());

    // Fixed: chained.
    std::fs::write(&bad, CALICO).unwrap();
    node.wait_for("10-bad.conflist", "chained", chained);
    assert!(inst.terminate(), "log:\n{}", node.log());
    assert_eq!(std::fs::read(&bad).unwrap(), CALICO.as_bytes());
}

/// The whole path on a node: what the installer writes (binary, config
/// entry, kubeconfig from the service account) is what the runtime runs,
/// against the API server; a rotated token reaches the plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_plugin_reads_the_api_server_and_follows_token_rotation() {
    let api = ApiServer::start(
        "token-1",
        BTreeMap::from([("mesh", json!({"istio.io/dataplane-mode": "ambient"}))]),
        BTreeMap::from([(
            "mesh/app",
            PodSpec {
                labels: json!({}),
                annotations: json!({}),
                service_account: "app-sa",
            },
        )]),
    )
    .await;
    let node = Node::new();
    std::fs::write(node.sa.join("ca.crt"), &api.ca_pem).unwrap();
    std::fs::write(node.conf.join("10-calico.conflist"), CALICO).unwrap();
    let zt = FakeZtunnel::start(&node.socket());
    let inst = node.install(api.port);
    let node = std::sync::Arc::new(node);

    // As the runtime does: the list's cniVersion and name, our entry, the
    // previous plugin's result, our binary from the bin dir.
    let run_add = |node: std::sync::Arc<Node>| async move {
        tokio::task::spawn_blocking(move || {
            let list = node.wait_for("10-calico.conflist", "chained", chained);
            let mut conf = ours(&list)[0].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            conf["name"] = list["name"].clone();
            conf["prevResult"] = prev_result();
            conf["runtimeConfig"] = json!({"cgroupPath": "/"});
            let out = Command::new(node.plugin())
                .env_clear()
                .env("CNI_COMMAND", "ADD")
                .env("CNI_NETNS", "/proc/self/ns/net")
                .env(
                    "CNI_ARGS",
                    "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=app;K8S_POD_UID=u1",
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin
                        .take()
                        .unwrap()
                        .write_all(conf.to_string().as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
        .await
        .unwrap()
    };

    let (ok, out) = run_add(node.clone()).await;
    assert!(ok, "{out}\nlog:\n{}", node.log());
    assert_eq!(
        zt.enrolled(),
        [("mesh/app".to_string(), "app-sa".to_string())]
    );
    assert_eq!(api.patches.lock().unwrap().len(), 1, "annotated");

    // Rotation: the API server now takes only the new token; the file
    // the kubelet projects changes; the kubeconfig follows.
    *api.token.lock().unwrap() = "token-2".into();
    let (ok, out) = run_add(node.clone()).await;
    assert!(!ok, "the old token still works? {out}");
    std::fs::write(node.sa.join("token"), "token-2\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(node.kubeconfig())
        .unwrap()
        .contains("token-2")
    {
        assert!(Instant::now() < deadline, "log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out) = run_add(node.clone()).await;
    assert!(ok, "{out}");
    assert_eq!(zt.enrolled().len(), 2);

    let node = std::sync::Arc::try_unwrap(node).ok().unwrap();
    assert!(inst.terminate(), "log:\n{}", node.log());
    assert!(!node.kubeconfig().exists() && !node.plugin().exists());
    assert_eq!(
        std::fs::read(node.conf.join("10-calico.conflist")).unwrap(),
        CALICO.as_bytes()
    );
}

const DS_PATH: &str = "/apis/apps/v1/namespaces/mesh-system/daemonsets/ztunnel-cni";

/// Installer pod `name` of DaemonSet `ztunnel-cni` in `mesh-system` (and
/// the DaemonSet, selecting `nodeSelector`) on the fake API server.
fn installer_pod(api: &ApiServer, name: &str, node_selector: Value) {
    let mut o = api.objects.lock().unwrap();
    o.insert(
        format!("/api/v1/namespaces/mesh-system/pods/{name}"),
        (
            200,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "mesh-system",
                                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                                     "name": "ztunnel-cni", "uid": "ds-1",
                                                     "controller": true}]},
                   "spec": {"containers": [{"name": "install"}]}}),
        ),
    );
    o.insert(
        DS_PATH.into(),
        (
            200,
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                   "metadata": {"name": "ztunnel-cni", "namespace": "mesh-system", "uid": "ds-1"},
                   "spec": {"selector": {"matchLabels": {"app": "ztunnel-cni"}},
                            "template": {"metadata": {"labels": {"app": "ztunnel-cni"}},
                                         "spec": {"nodeSelector": node_selector,
                                                  "containers": [{"name": "install"}]}}}}),
        ),
    );
}

/// A rolling update stops the old installer before the new one starts: the
/// plugin stays for pods created in between (they wait for the new
/// installer's kubeconfig rather than start outside the mesh); the new
/// installer takes it over; once the DaemonSet is being deleted, a stop
/// removes it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_its_daemonset_leaves_the_plugin_for_the_next_installer() {
    let api = ApiServer::start("token-1", BTreeMap::new(), BTreeMap::new()).await;
    installer_pod(&api, "cni-old", json!({}));
    installer_pod(&api, "cni-new", json!({}));
    let node = Node::new();
    std::fs::write(node.sa.join("ca.crt"), &api.ca_pem).unwrap();
    // As the kubelet projects it: no newline (the agent's own client uses
    // the file as it is).
    std::fs::write(node.sa.join("token"), "token-1").unwrap();
    std::fs::write(node.conf.join("10-calico.conflist"), CALICO).unwrap();
    let as_pod = |name| [("POD_NAME", name), ("POD_NAMESPACE", "mesh-system")];

    let old = node.install_as(api.port, &as_pod("cni-old"));
    node.wait_for("10-calico.conflist", "chained", chained);
    assert!(
        old.terminate(),
        "log:
{}",
        node.log()
    );
    let list: Value =
        serde_json::from_slice(&std::fs::read(node.conf.join("10-calico.conflist")).unwrap())
            .unwrap();
    assert!(
        chained(&list),
        "entry removed during an update: {list}\nlog:\n{}",
        node.log()
    );
    assert!(node.kubeconfig().exists() && node.plugin().exists());
    assert!(
        node.log()
            .contains("DaemonSet mesh-system/ztunnel-cni is still there"),
        "{}",
        node.log()
    );

    let new = node.install_as(api.port, &as_pod("cni-new"));
    // Takes the entry over (one, not two), as after any restart.
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.wait_for("10-calico.conflist", "chained once", chained);
    api.objects.lock().unwrap().get_mut(DS_PATH).unwrap().1["metadata"]["deletionTimestamp"] =
        json!("2026-12-02T17:00:00Z");
    assert!(
        new.terminate(),
        "log:
{}",
        node.log()
    );
    assert!(!node.kubeconfig().exists() && !node.plugin().exists());
    let list: Value =
        serde_json::from_slice(&std::fs::read(node.conf.join("10-calico.conflist")).unwrap())
            .unwrap();
    let calico: Value = serde_json::from_str(CALICO).unwrap();
    assert_eq!(list, calico, "only our entry taken out");
    assert!(
        node.log()
            .contains("DaemonSet mesh-system/ztunnel-cni is being deleted"),
        "{}",
        node.log()
    );
}

/// The decision itself, against each answer the API server can give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_daemonset_still_running_here_keeps_the_plugin() {
    let api = ApiServer::start("t", BTreeMap::new(), BTreeMap::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let client = ztunnel_cni::api::client(&api.kubeconfig(dir.path(), "t"))
        .await
        .unwrap();
    installer_pod(&api, "cni-1", json!({"pool": "mesh"}));
    let node = |labels: Value| {
        api.objects.lock().unwrap().insert(
            "/api/v1/nodes/node-1".into(),
            (
                200,
                json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": "node-1", "labels": labels}}),
            ),
        );
    };
    let me = |pod: &str, node: Option<&str>| upgrade::Me {
        namespace: "mesh-system".into(),
        pod: pod.into(),
        node: node.map(str::to_string),
    };
    let decide = |pod: &'static str, n: Option<&'static str>| {
        let client = client.clone();
        async move { upgrade::decide(&client, &me(pod, n)).await }
    };
    let removed = |s: Stop, why: &str| match s {
        Stop::Remove(r) => assert!(r.contains(why), "{r:?} does not say {why:?}"),
        Stop::Keep(r) => panic!("kept ({r}), expected a removal for {why:?}"),
    };

    node(json!({"pool": "mesh"}));
    assert!(matches!(
        decide("cni-1", Some("node-1")).await,
        Stop::Keep(_)
    ));
    assert!(matches!(decide("cni-1", None).await, Stop::Keep(_)));
    // The DaemonSet no longer selects this node.
    node(json!({"pool": "batch"}));
    removed(
        decide("cni-1", Some("node-1")).await,
        "no longer runs on node node-1",
    );
    node(json!({"pool": "mesh"}));
    // Being deleted, gone, or unreadable.
    let ds = api.objects.lock().unwrap().get(DS_PATH).cloned().unwrap();
    let mut deleting = ds.clone();
    deleting.1["metadata"]["deletionTimestamp"] = json!("2026-12-02T17:00:00Z");
    api.objects.lock().unwrap().insert(DS_PATH.into(), deleting);
    removed(decide("cni-1", Some("node-1")).await, "is being deleted");
    api.objects.lock().unwrap().remove(DS_PATH);
    removed(decide("cni-1", Some("node-1")).await, "is gone");
    api.objects.lock().unwrap().insert(
        DS_PATH.into(),
        (403, status(403, "Forbidden", "daemonsets is forbidden")),
    );
    removed(
        decide("cni-1", Some("node-1")).await,
        "getting DaemonSet mesh-system/ztunnel-cni",
    );
    api.objects.lock().unwrap().insert(DS_PATH.into(), ds);
    assert!(matches!(
        decide("cni-1", Some("node-1")).await,
        Stop::Keep(_)
    ));
    // Not run by a DaemonSet, or not found.
    api.objects.lock().unwrap().insert(
        "/api/v1/namespaces/mesh-system/pods/bare".into(),
        (
            200,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "bare", "namespace": "mesh-system"},
                   "spec": {"containers": [{"name": "install"}]}}),
        ),
    );
    removed(
        decide("bare", Some("node-1")).await,
        "not run by a DaemonSet",
    );
    removed(
        decide("gone", Some("node-1")).await,
        "getting this pod mesh-system/gone",
    );
}

#[test]
fn refuses_to_start_without_the_api_server_address() {
    let node = Node::new();
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni-install"))
        .args(["--cni-bin-dir", node.bin.to_str().unwrap()])
        .args(["--cni-conf-dir", node.conf.to_str().unwrap()])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KUBERNETES_SERVICE_HOST"),
        "{out:?}"
    );
}
