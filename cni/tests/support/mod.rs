//! What the plugin and installer tests share: a fake Kubernetes API server
//! (TLS, bearer token), a fake ztunnel enrollment socket, and running the
//! plugin the way a runtime does.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use ztunnel::inpod::zds::{self, workload_request::Payload};

/// A Kubernetes API server with a fixed set of pods and namespaces that
/// answers GETs of one Pod or one Namespace, over TLS with a self-signed
/// certificate for 127.0.0.1, to requests bearing `token` only.
pub struct ApiServer {
    pub port: u16,
    pub ca_pem: String,
    /// Requests served (any path, any outcome).
    pub hits: Arc<AtomicUsize>,
    /// The token it accepts; tests change it to rotate.
    pub token: Arc<Mutex<String>>,
    /// The merge patches applied to pods: ("ns/name", patch).
    pub patches: Arc<Mutex<Vec<(String, Value)>>>,
    /// Answers to GETs of other paths (or overriding a pod's), with their
    /// status codes: tests add, change and remove them as they go.
    pub objects: Arc<Mutex<BTreeMap<String, (u16, Value)>>>,
}

/// Pod `ns/name`: labels, annotations, service account.
pub struct PodSpec {
    pub labels: Value,
    pub annotations: Value,
    pub service_account: &'static str,
}

impl ApiServer {
    /// `namespaces`: name → labels; `pods`: "ns/name" → the pod.
    pub async fn start(
        token: &str,
        namespaces: BTreeMap<&'static str, Value>,
        pods: BTreeMap<&'static str, PodSpec>,
    ) -> ApiServer {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let ca_pem = ck.cert.pem();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![ck.cert.der().clone()],
                rustls_pki_types_key(ck.signing_key.serialize_der()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let token = Arc::new(Mutex::new(token.to_string()));
        let state = Arc::new((namespaces, pods));
        let patches = Arc::new(Mutex::new(Vec::new()));
        let objects = Arc::new(Mutex::new(BTreeMap::new()));
        let (h, t, p, o) = (
            hits.clone(),
            token.clone(),
            patches.clone(),
            objects.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (acceptor, h, t, p, o, state) = (
                    acceptor.clone(),
                    h.clone(),
                    t.clone(),
                    p.clone(),
                    o.clone(),
                    state.clone(),
                );
                tokio::spawn(async move {
                    let Ok(s) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let want = format!("Bearer {}", t.lock().unwrap());
                        let authorized = req
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v.as_bytes() == want.as_bytes());
                        let (state, p, o) = (state.clone(), p.clone(), o.clone());
                        async move {
                            let method = req.method().clone();
                            let path = req.uri().path().to_string();
                            let ctype = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_string());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let object = o.lock().unwrap().get(&path).cloned();
                            let (code, body) = if !authorized {
                                (401, status(401, "Unauthorized", "Unauthorized"))
                            } else if let (true, Some(answer)) =
                                (method == hyper::Method::GET, object)
                            {
                                answer
                            } else if method == hyper::Method::GET {
                                answer(&state.0, &state.1, &path)
                            } else if method == hyper::Method::PATCH {
                                assert_eq!(ctype.as_deref(), Some("application/merge-patch+json"));
                                let patch: Value = serde_json::from_slice(&body).unwrap();
                                patch_pod(&state.0, &state.1, &path, patch, &p)
                            } else {
                                (405, status(405, "MethodNotAllowed", "not here"))
                            };
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(code)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        ApiServer {
            port,
            ca_pem,
            hits,
            token,
            patches,
            objects,
        }
    }

    /// A kubeconfig for this server with `token`, as a file in `dir`.
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> std::path::PathBuf {
        use base64::Engine;
        let path = dir.join("kubeconfig");
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {
                "server": format!("https://127.0.0.1:{}", self.port),
                "certificate-authority-data":
                    base64::engine::general_purpose::STANDARD.encode(&self.ca_pem),
            }}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        });
        std::fs::write(&path, kc.to_string()).unwrap();
        path
    }
}

fn rustls_pki_types_key(der: Vec<u8>) -> rustls::pki_types::PrivateKeyDer<'static> {
    rustls::pki_types::PrivateKeyDer::Pkcs8(der.into())
}

pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn answer(
    namespaces: &BTreeMap<&'static str, Value>,
    pods: &BTreeMap<&'static str, PodSpec>,
    path: &str,
) -> (u16, Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns] => match namespaces.get(ns) {
            Some(labels) => (
                200,
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": ns, "labels": labels}}),
            ),
            None => (
                404,
                status(404, "NotFound", &format!("namespaces \"{ns}\" not found")),
            ),
        },
        ["api", "v1", "namespaces", ns, "pods", name] => {
            match pods.get(format!("{ns}/{name}").as_str()) {
                Some(p) => (
                    200,
                    json!({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": ns,
                                        "labels": p.labels, "annotations": p.annotations},
                           "spec": {"serviceAccountName": p.service_account,
                                    "containers": [{"name": "app"}]}}),
                ),
                None => (
                    404,
                    status(404, "NotFound", &format!("pods \"{name}\" not found")),
                ),
            }
        }
        _ => (
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        ),
    }
}

/// A merge patch of a pod: recorded, answered with the pod; refused (403,
/// as RBAC without `patch` would) for pods named `no-patch*`.
fn patch_pod(
    namespaces: &BTreeMap<&'static str, Value>,
    pods: &BTreeMap<&'static str, PodSpec>,
    path: &str,
    patch: Value,
    patches: &Mutex<Vec<(String, Value)>>,
) -> (u16, Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name] = parts.as_slice() else {
        return (404, status(404, "NotFound", "no such resource"));
    };
    if name.starts_with("no-patch") {
        return (
            403,
            status(
                403,
                "Forbidden",
                &format!("pods \"{name}\" is forbidden: cannot patch"),
            ),
        );
    }
    let (code, pod) = answer(
        namespaces,
        pods,
        &format!("/api/v1/namespaces/{ns}/pods/{name}"),
    );
    if code == 200 {
        patches
            .lock()
            .unwrap()
            .push((format!("{ns}/{name}"), patch));
    }
    (code, pod)
}

/// A ztunnel enrollment socket that accepts every request and keeps the
/// adds it was sent.
pub struct FakeZtunnel {
    pub adds: Arc<Mutex<Vec<zds::AddWorkload>>>,
    /// The uids of the dels it was sent.
    pub dels: Arc<Mutex<Vec<String>>>,
}

struct Recorder {
    adds: Arc<Mutex<Vec<zds::AddWorkload>>>,
    dels: Arc<Mutex<Vec<String>>>,
}

impl zds::Handler for Recorder {
    fn handle(
        &self,
        req: Payload,
        netns: Option<OwnedFd>,
        _resync: &mut Option<Vec<String>>,
    ) -> Result<(), String> {
        match req {
            Payload::Add(a) => {
                if netns.is_none() {
                    return Err("add without a netns fd".into());
                }
                self.adds.lock().unwrap().push(a);
            }
            Payload::Del(d) => self.dels.lock().unwrap().push(d.uid),
            _ => {}
        }
        Ok(())
    }
}

impl FakeZtunnel {
    pub fn start(socket: &Path) -> FakeZtunnel {
        let adds = Arc::new(Mutex::new(Vec::new()));
        let dels = Arc::new(Mutex::new(Vec::new()));
        let l = zds::bind(socket).unwrap();
        tokio::spawn(zds::serve(
            l,
            Arc::new(Recorder {
                adds: adds.clone(),
                dels: dels.clone(),
            }),
        ));
        FakeZtunnel { adds, dels }
    }

    /// The (namespace/name, service account) of each pod enrolled so far.
    pub fn enrolled(&self) -> Vec<(String, String)> {
        self.adds
            .lock()
            .unwrap()
            .iter()
            .map(|a| {
                let w = a.workload_info.clone().unwrap_or_default();
                (format!("{}/{}", w.namespace, w.name), w.service_account)
            })
            .collect()
    }
}

/// Runs the plugin as a runtime does; (exit status ok, stdout as JSON).
/// Blocking: call it from `spawn_blocking` while the fakes run.
pub fn run_plugin(env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni"));
    cmd.env_clear().stdin(Stdio::piped()).stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", out.stdout));
    (out.status.success(), v)
}

/// `ADD` of pod `ns/name` with network config `conf` (a `prevResult` and a
/// `runtimeConfig.cgroupPath` are added), run off the async runtime.
pub async fn add(conf: &Value, ns: &str, name: &str) -> (bool, Value) {
    let mut conf = conf.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["prevResult"] = prev_result();
    conf["runtimeConfig"] = json!({"cgroupPath": "/"});
    let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}");
    tokio::task::spawn_blocking(move || {
        run_plugin(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/proc/self/ns/net"),
                ("CNI_ARGS", &args),
            ],
            &conf.to_string(),
        )
    })
    .await
    .unwrap()
}

pub fn prev_result() -> Value {
    json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/32"}]})
}
