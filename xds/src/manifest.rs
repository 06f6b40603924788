//! The manifest-directory source: the Kubernetes YAML a cluster would hold
//! (multi-document files of Namespaces, Pods, Services, EndpointSlices,
//! ServiceAccounts and `security.istio.io/v1` AuthorizationPolicies), read
//! at start and polled for changes.
//!
//! Every document is parsed into its typed `k8s-openapi` object and checked
//! by [`validate`], the same check the Kubernetes source runs. A bad
//! document is reported with its file, object and field and skipped; the
//! rest of the file still applies; an object that was good before keeps its
//! last good version; a file that is not YAML at all keeps everything it
//! held before. Polling (one `stat` per file per interval) also sees
//! editors' rename-over writes and ConfigMap symlink swaps.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::{AuthorizationPolicy, Gateway, HttpRoute, Model, Object, PolicyAction};

/// What was wrong with one object (or one file), and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// File path, or `cluster` for the Kubernetes source.
    pub origin: String,
    /// `Kind namespace/name`, when the document got that far.
    pub object: Option<String>,
    /// The offending field (`spec.ports[0].port`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A field-level validation failure, before it is placed in a file.
#[derive(Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn parse_typed<T: DeserializeOwned>(v: serde_yaml::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            field: if path == "." { "(object)".into() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

/// Turns one YAML document into a typed object. `Ok(None)`: a kind this
/// control plane does not use (skipped silently, as a cluster holds many).
pub fn parse_object(v: serde_yaml::Value) -> Result<Option<Object>, FieldError> {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    let api = v
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    if kind.is_empty() {
        return Err(field_err("kind", "missing"));
    }
    if api.is_empty() {
        return Err(field_err("apiVersion", "missing"));
    }
    let o = match (api, kind) {
        ("v1", "Namespace") => Object::Namespace(Arc::new(parse_typed::<Namespace>(v)?)),
        ("v1", "Pod") => Object::Pod(Arc::new(parse_typed::<Pod>(v)?)),
        ("v1", "Service") => Object::Service(Arc::new(parse_typed::<Service>(v)?)),
        ("v1", "ServiceAccount") => {
            Object::ServiceAccount(Arc::new(parse_typed::<ServiceAccount>(v)?))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(Arc::new(parse_typed::<EndpointSlice>(v)?))
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
            Object::AuthorizationPolicy(Arc::new(parse_typed::<AuthorizationPolicy>(v)?))
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
            Object::Gateway(Arc::new(parse_typed::<Gateway>(v)?))
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            Object::HttpRoute(Arc::new(parse_typed::<HttpRoute>(v)?))
        }
        (_, "Namespace" | "Pod" | "Service" | "ServiceAccount" | "EndpointSlice")
        | (_, "AuthorizationPolicy" | "Gateway" | "HTTPRoute") => {
            return Err(field_err(
                "apiVersion",
                format!("{api:?} is not a supported version of {kind}"),
            ))
        }
        _ => return Ok(None),
    };
    Ok(Some(o))
}

/// Defaults a cluster would fill in (namespace `default`), then checks what
/// translation relies on. Shared by both sources.
pub fn validate(o: &mut Object) -> Result<(), FieldError> {
    let namespaced = !matches!(o, Object::Namespace(_));
    // Objects are fresh from a parser or a reflector: make_mut only copies
    // when the object is shared.
    let meta = match o {
        Object::Namespace(x) => &mut Arc::make_mut(x).metadata,
        Object::Pod(x) => &mut Arc::make_mut(x).metadata,
        Object::Service(x) => &mut Arc::make_mut(x).metadata,
        Object::EndpointSlice(x) => &mut Arc::make_mut(x).metadata,
        Object::ServiceAccount(x) => &mut Arc::make_mut(x).metadata,
        Object::AuthorizationPolicy(x) => &mut Arc::make_mut(x).metadata,
        Object::Gateway(x) => &mut Arc::make_mut(x).metadata,
        Object::HttpRoute(x) => &mut Arc::make_mut(x).metadata,
    };
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err(field_err("metadata.name", "missing"));
    }
    if namespaced && meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".into());
    }
    match o {
        Object::Pod(p) => {
            if let Some(st) = &p.status {
                if let Some(ip) = &st.pod_ip {
                    parse_ip(ip).map_err(|m| field_err("status.podIP", m))?;
                }
                for (i, ip) in st.pod_ips.iter().flatten().enumerate() {
                    parse_ip(&ip.ip).map_err(|m| field_err(format!("status.podIPs[{i}].ip"), m))?;
                }
            }
        }
        Object::Service(s) => {
            if let Some(spec) = &s.spec {
                for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
                    if ip != "None" {
                        parse_ip(ip).map_err(|m| field_err(format!("spec.clusterIPs[{i}]"), m))?;
                    }
                }
                if let Some(ip) = &spec.cluster_ip {
                    if ip != "None" && !ip.is_empty() {
                        parse_ip(ip).map_err(|m| field_err("spec.clusterIP", m))?;
                    }
                }
                for (i, p) in spec.ports.iter().flatten().enumerate() {
                    if !(1..=65535).contains(&p.port) {
                        return Err(field_err(
                            format!("spec.ports[{i}].port"),
                            format!("{} is not a port (1-65535)", p.port),
                        ));
                    }
                }
            }
        }
        Object::AuthorizationPolicy(ap) => {
            if let Some(PolicyAction::Audit | PolicyAction::Custom) = ap.spec.action {
                return Err(field_err(
                    "spec.action",
                    "only ALLOW and DENY are supported",
                ));
            }
            for (r, rule) in ap.spec.rules.iter().flatten().enumerate() {
                for (t, to) in rule.to.iter().enumerate() {
                    for (f, ports) in [
                        ("ports", &to.operation.ports),
                        ("notPorts", &to.operation.not_ports),
                    ] {
                        for (i, p) in ports.iter().enumerate() {
                            if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
                                return Err(field_err(
                                    format!("spec.rules[{r}].to[{t}].operation.{f}[{i}]"),
                                    format!("{p:?} is not a port"),
                                ));
                            }
                        }
                    }
                }
                for (s, from) in rule.from.iter().enumerate() {
                    let src = &from.source;
                    for (f, blocks) in [
                        ("ipBlocks", &src.ip_blocks),
                        ("notIpBlocks", &src.not_ip_blocks),
                        ("remoteIpBlocks", &src.remote_ip_blocks),
                        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
                    ] {
                        for (i, b) in blocks.iter().enumerate() {
                            crate::translate::parse_cidr(b).map_err(|m| {
                                field_err(format!("spec.rules[{r}].from[{s}].source.{f}[{i}]"), m)
                            })?;
                        }
                    }
                }
            }
        }
        Object::HttpRoute(r) => {
            crate::envoy::validate_route(r).map_err(|(f, m)| field_err(f, m))?;
        }
        // A waypoint must offer what ztunnels will dial: HBONE on 15008.
        Object::Gateway(g)
            if g.is_waypoint()
                && !g
                    .spec
                    .listeners
                    .iter()
                    .any(|l| l.port == 15008 && l.protocol == "HBONE") =>
        {
            return Err(field_err(
                "spec.listeners",
                "a waypoint needs a listener on port 15008 with protocol HBONE",
            ));
        }
        _ => {}
    }
    Ok(())
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("{s:?} is not an IP address"))
}

/// Good objects, and errors with the id of the object they concern.
pub type Parsed = (Vec<Object>, Vec<(Option<String>, ObjectError)>);

/// The objects of one file's text, plus what was wrong. `Err`: not YAML
/// at all (the caller keeps the file's previous objects).
pub fn parse_file(text: &str, origin: &str) -> Result<Parsed, ObjectError> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(doc).map_err(|e| ObjectError {
            origin: origin.to_string(),
            object: None,
            field: None,
            message: format!("not valid YAML: {e}"),
        })?;
        if v.is_null() {
            continue;
        }
        // Name the object as best we can before typing it.
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
        let meta = v.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?");
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str());
        let label = match ns {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None if kind == "Namespace" => format!("{kind} {name}"),
            None => format!("{kind} default/{name} (document {})", i + 1),
        };
        let id = (name != "?").then(|| match ns {
            Some(ns) => format!("{kind}/{ns}/{name}"),
            None if kind == "Namespace" => format!("{kind}/{name}"),
            None => format!("{kind}/default/{name}"),
        });
        let parsed = parse_object(v).and_then(|o| match o {
            Some(mut o) => validate(&mut o).map(|()| Some(o)),
            None => Ok(None),
        });
        match parsed {
            Ok(Some(o)) => objects.push(o),
            Ok(None) => {}
            Err(e) => errors.push((
                id,
                ObjectError {
                    origin: origin.to_string(),
                    object: Some(label),
                    field: Some(e.field),
                    message: e.message,
                },
            )),
        }
    }
    Ok((objects, errors))
}

#[derive(Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    /// Object id (`Kind/ns/name`) -> object.
    objects: BTreeMap<String, Object>,
}

/// A directory of manifests and what was last read from each file.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Errors of the last read of each file.
    errors: BTreeMap<PathBuf, Vec<ObjectError>>,
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            list_files(&p, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(p);
        }
    }
    Ok(())
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    /// Re-reads files whose size or mtime changed. Returns whether anything
    /// changed, and the errors met this time.
    pub fn rescan(&mut self) -> anyhow::Result<(bool, Vec<ObjectError>)> {
        let mut paths = Vec::new();
        list_files(&self.dir, &mut paths).map_err(|e| {
            anyhow::anyhow!("reading manifest directory {}: {e}", self.dir.display())
        })?;
        let mut changed = false;
        let mut new_errors = Vec::new();
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        self.errors.retain(|p, _| paths.contains(p));
        changed |= before != self.files.len();
        for p in paths {
            let Ok(md) = std::fs::metadata(&p) else {
                continue;
            };
            let stamp = Some((md.modified().unwrap_or(SystemTime::UNIX_EPOCH), md.len()));
            let st = self.files.entry(p.clone()).or_default();
            if st.stamp == stamp {
                continue;
            }
            st.stamp = stamp;
            changed = true;
            let origin = p.display().to_string();
            let text = match std::fs::read_to_string(&p) {
                Ok(t) => t,
                Err(e) => {
                    let err = ObjectError {
                        origin,
                        object: None,
                        field: None,
                        message: format!("cannot read: {e}"),
                    };
                    new_errors.push(err.clone());
                    self.errors.insert(p, vec![err]);
                    continue;
                }
            };
            match parse_file(&text, &origin) {
                Err(e) => {
                    // Not YAML: keep everything this file held.
                    new_errors.push(e.clone());
                    self.errors.insert(p, vec![e]);
                }
                Ok((objects, errors)) => {
                    let mut next = BTreeMap::new();
                    for o in objects {
                        next.insert(o.id(), o);
                    }
                    let mut errs = Vec::new();
                    for (id, e) in errors {
                        // An object that was good keeps its last good version.
                        if let Some(old) = id.as_ref().and_then(|id| st.objects.get(id)) {
                            next.entry(old.id()).or_insert_with(|| old.clone());
                        }
                        errs.push(e);
                    }
                    st.objects = next;
                    new_errors.extend(errs.iter().cloned());
                    self.errors.insert(p, errs);
                }
            }
        }
        Ok((changed, new_errors))
    }

    /// All current errors (of the last read of each file).
    pub fn errors(&self) -> Vec<ObjectError> {
        self.errors.values().flatten().cloned().collect()
    }

    /// The model: every file's objects (a later file wins a duplicate).
    pub fn model(&self) -> Model {
        Model::from_objects(
            self.files
                .values()
                .flat_map(|f| f.objects.values().cloned()),
        )
    }
}

/// Current source errors, for logs, `/debug` and tests.
pub type ErrorList = Arc<Mutex<Vec<String>>>;

/// Reads `dir` now (an unreadable directory is a start-up error), publishes
/// the model on `tx`, and keeps polling every `interval`.
pub async fn run(
    dir: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Model>>,
    errors: ErrorList,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut md = ManifestDir::new(&dir);
    let publish = move |md: &mut ManifestDir, first: bool| -> anyhow::Result<()> {
        let t0 = std::time::Instant::now();
        let (changed, errs) = md.rescan()?;
        for e in &errs {
            warn!("manifest error: {e}");
            metrics.source_errors.inc();
        }
        if changed || first {
            let model = md.model();
            info!(
                pods = model.pods.len(),
                services = model.services.len(),
                policies = model.policies.len(),
                errors = errs.len(),
                took = ?t0.elapsed(),
                "manifests loaded"
            );
            if let Ok(mut g) = errors.lock() {
                *g = md.errors().iter().map(|e| e.to_string()).collect();
            }
            tx.send_replace(Arc::new(model));
        }
        Ok(())
    };
    publish(&mut md, true)?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = publish(&mut md, false) {
                // The directory itself went away: keep the last model.
                warn!("{e:#}");
            }
        }
    });
    Ok(())
}
