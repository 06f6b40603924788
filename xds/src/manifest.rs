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
//! held before.
//!
//! Changes arrive as filesystem notifications (`notify`: inotify on
//! Linux): a burst of them makes one rescan set, the manifests named, and
//! only those are re-read; the model is patched with their objects, and an
//! object whose contents did not change keeps its `Arc`. Notifications
//! that name no manifest but may hide several (a directory moved, a
//! ConfigMap volume's `..data` symlink swapped, an event queue overflow)
//! make a full rescan, which only re-reads files whose size or mtime
//! changed. A slow poll does the same full rescan for filesystems that
//! send no events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
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
    stamp: Option<Stamp>,
    /// Object id (`Kind/ns/name`) -> object.
    objects: BTreeMap<String, Object>,
}

/// A directory of manifests, what was last read from each file, and the
/// model they make. The model is patched file by file: re-reading one file
/// touches only that file's objects, and an object whose contents did not
/// change keeps its `Arc`, so translation sees exactly what changed.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Errors of the last read of each file.
    errors: BTreeMap<PathBuf, Vec<ObjectError>>,
    model: Model,
    /// Object id -> how many files define it. Above one, the last file in
    /// path order wins (as if the files were applied in order).
    holders: HashMap<String, usize>,
}

/// What one rescan did.
#[derive(Debug, Default)]
pub struct Rescan {
    /// The model changed.
    pub model_changed: bool,
    /// Some file was re-read or dropped (its errors may have changed).
    pub files_changed: bool,
    /// The errors met this time.
    pub errors: Vec<ObjectError>,
}

/// A file the source reads: `.yaml`/`.yml`, no hidden component (editors'
/// temporary files, Kubernetes' `..data` directories) below `dir`.
fn is_manifest(dir: &Path, p: &Path) -> bool {
    let Ok(rel) = p.strip_prefix(dir) else {
        return false;
    };
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    (name.ends_with(".yaml") || name.ends_with(".yml"))
        && rel.components().all(|c| match c {
            std::path::Component::Normal(n) => !n.to_string_lossy().starts_with('.'),
            _ => false,
        })
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

/// What a full rescan compares to tell that a file changed without
/// reading it. File timestamps move in clock ticks, so a same-size
/// rewrite within one tick keeps the mtime: the inode still tells a file
/// renamed over it (how editors and tools write), and a change notified
/// by the watch is re-read whatever its stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

fn stamp(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).ok().filter(|m| m.is_file())?;
    Some(Stamp {
        modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        len: md.len(),
        inode: md.ino(),
    })
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            errors: BTreeMap::new(),
            model: Model::default(),
            holders: HashMap::new(),
        }
    }

    /// Lists the whole directory and re-reads files whose size or mtime
    /// changed; files gone are dropped. The start, and the slow fallback
    /// poll for filesystems that send no change events.
    pub fn rescan(&mut self) -> anyhow::Result<Rescan> {
        let mut paths = Vec::new();
        list_files(&self.dir, &mut paths).map_err(|e| {
            anyhow::anyhow!("reading manifest directory {}: {e}", self.dir.display())
        })?;
        let present: HashSet<&PathBuf> = paths.iter().collect();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        let stale: Vec<PathBuf> = paths
            .into_iter()
            .filter(|p| self.files.get(p).and_then(|f| f.stamp) != stamp(p))
            .collect();
        Ok(self.rescan_paths(gone.into_iter().chain(stale)))
    }

    /// Re-reads just these paths (the rescan set a change notification
    /// names): a manifest is parsed again, one that is gone is dropped;
    /// other paths are ignored. Objects that come out the same keep their
    /// `Arc` and change nothing.
    pub fn rescan_paths(&mut self, paths: impl IntoIterator<Item = PathBuf>) -> Rescan {
        let mut out = Rescan::default();
        for p in paths {
            let now = stamp(&p).filter(|_| is_manifest(&self.dir, &p));
            let Some(now) = now else {
                if let Some(st) = self.files.remove(&p) {
                    self.errors.remove(&p);
                    out.files_changed = true;
                    for (id, o) in st.objects {
                        out.model_changed |= self.settle(&id, Some(&o), None);
                    }
                }
                continue;
            };
            out.files_changed = true;
            let errs = self.read(&p, now, &mut out.model_changed);
            out.errors.extend(errs.iter().cloned());
            self.errors.insert(p, errs);
        }
        out
    }

    /// Parses one file and patches the model; returns its errors.
    fn read(&mut self, p: &Path, now: Stamp, changed: &mut bool) -> Vec<ObjectError> {
        let origin = p.display().to_string();
        let st = self.files.entry(p.to_path_buf()).or_default();
        st.stamp = Some(now);
        let text = match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                return vec![ObjectError {
                    origin,
                    object: None,
                    field: None,
                    message: format!("cannot read: {e}"),
                }]
            }
        };
        // Not YAML at all: keep everything this file held.
        let (objects, errors) = match parse_file(&text, &origin) {
            Ok(parsed) => parsed,
            Err(e) => return vec![e],
        };
        let mut next = BTreeMap::new();
        for o in objects {
            // Unchanged contents keep the object that is already shared.
            let o = match st.objects.get(&o.id()) {
                Some(old) if old.same_as(&o) => old.clone(),
                _ => o,
            };
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
        let old = std::mem::replace(&mut st.objects, next.clone());
        for (id, o) in &old {
            if !next.contains_key(id) {
                *changed |= self.settle(id, Some(o), None);
            }
        }
        for (id, o) in &next {
            match old.get(id) {
                Some(prev) if Object::same_as(prev, o) => {}
                Some(_) => *changed |= self.settle(id, None, Some(o)),
                None => {
                    *self.holders.entry(id.clone()).or_default() += 1;
                    *changed |= self.settle(id, None, Some(o));
                }
            }
        }
        errs
    }

    /// Puts the right version of object `id` in the model after a file
    /// dropped it (`dropped`) or set it (`set`). Returns whether the model
    /// changed.
    fn settle(&mut self, id: &str, dropped: Option<&Object>, set: Option<&Object>) -> bool {
        let count = self.holders.get(id).copied().unwrap_or(0);
        let count = if dropped.is_some() {
            count.saturating_sub(1)
        } else {
            count
        };
        if count == 0 {
            self.holders.remove(id);
            if let Some(o) = dropped {
                self.model.remove(o);
            }
            return true;
        }
        self.holders.insert(id.to_string(), count);
        let winner = match set {
            Some(o) if count == 1 => o.clone(),
            _ => match self.files.values().rev().find_map(|f| f.objects.get(id)) {
                Some(o) => o.clone(),
                None => return false,
            },
        };
        self.model.insert(winner);
        true
    }

    /// All current errors (of the last read of each file).
    pub fn errors(&self) -> Vec<ObjectError> {
        self.errors.values().flatten().cloned().collect()
    }

    /// The model: every file's objects (a later file wins a duplicate).
    pub fn model(&self) -> &Model {
        &self.model
    }
}

/// Current source errors, for logs, `/debug` and tests.
pub type ErrorList = Arc<Mutex<Vec<String>>>;

/// What the watcher tells the loop.
enum Change {
    /// These paths changed (created, written, renamed, removed).
    Paths(Vec<PathBuf>),
    /// Something only a full rescan sorts out: a directory moved or
    /// removed, a `..data` symlink swapped, events lost.
    Everything,
}

/// Sorts one notification into manifests to re-read, or a full rescan.
/// `notify` names paths under the absolute form of the directory (`abs`);
/// they are put back under `dir` as given, the form the files are kept in.
fn classify(dir: &Path, abs: &Path, ev: notify::Result<notify::Event>) -> Option<Change> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let ev = match ev {
        Ok(ev) => ev,
        Err(e) => {
            warn!("manifest watch: {e}; rescanning");
            return Some(Change::Everything);
        }
    };
    if ev.need_rescan() {
        return Some(Change::Everything);
    }
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return None,
        // A write in place: the file is read once its writer closes it
        // (`cp`, `cat >` and many editors truncate, then write). Read at
        // the first write, a half-written or empty file would drop its
        // objects, DENY policies included, until the next event.
        EventKind::Modify(ModifyKind::Data(_)) => return None,
        _ => {}
    }
    let mut paths = Vec::new();
    for p in ev.paths {
        let p = match p.strip_prefix(abs) {
            Ok(rel) => dir.join(rel),
            Err(_) => p,
        };
        if is_manifest(dir, &p) {
            paths.push(p);
            continue;
        }
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        match std::fs::metadata(&p) {
            // Editors' temporary files, other kinds of files: not ours.
            Ok(m) if m.is_file() => {}
            // A hidden directory that appears: Kubernetes' atomic swap of
            // a ConfigMap volume's `..data` symlink.
            Ok(_) if hidden => return Some(Change::Everything),
            Err(_) if hidden => {}
            // A directory created, moved or removed: whatever it held.
            _ => return Some(Change::Everything),
        }
    }
    (!paths.is_empty()).then_some(Change::Paths(paths))
}

/// Reads `dir` now (an unreadable directory is a start-up error), publishes
/// the model on `tx`, then watches the directory (inotify, through
/// `notify`) and re-reads only the files that changed. A full rescan by
/// `stat` also runs every `fallback_poll`, for filesystems that send no
/// events (NFS, some FUSE mounts) and in case the watch cannot be set up.
pub async fn run(
    dir: PathBuf,
    fallback_poll: Duration,
    tx: watch::Sender<Arc<Model>>,
    errors: ErrorList,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut md = ManifestDir::new(&dir);
    let publish = move |md: &ManifestDir, r: &Rescan, first: bool, t0: std::time::Instant| {
        for e in &r.errors {
            warn!("manifest error: {e}");
            metrics.source_errors.inc();
        }
        if r.files_changed || first {
            if let Ok(mut g) = errors.lock() {
                *g = md.errors().iter().map(|e| e.to_string()).collect();
            }
        }
        if r.model_changed || first {
            let model = md.model();
            info!(
                pods = model.pods.len(),
                services = model.services.len(),
                policies = model.policies.len(),
                errors = r.errors.len(),
                took = ?t0.elapsed(),
                "manifests loaded"
            );
            tx.send_replace(Arc::new(model.clone()));
        }
    };
    let t0 = std::time::Instant::now();
    let r = md.rescan()?;
    publish(&md, &r, true, t0);

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let wdir = dir.clone();
    let abs = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
    let watcher = notify::recommended_watcher(move |ev| {
        if let Some(c) = classify(&wdir, &abs, ev) {
            let _ = ev_tx.send(c);
        }
    })
    .and_then(|mut w| {
        use notify::Watcher;
        w.watch(&dir, notify::RecursiveMode::Recursive).map(|()| w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "cannot watch {} ({e}); polling it every {fallback_poll:?}",
                dir.display()
            );
            None
        }
    };
    tokio::spawn(async move {
        // Dropping the watcher stops it: it lives as long as this loop.
        let _watcher = watcher;
        let mut poll = tokio::time::interval(fallback_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let mut everything = false;
            let mut notified = false;
            let mut set: HashSet<PathBuf> = HashSet::new();
            tokio::select! {
                c = ev_rx.recv() => {
                    let mut next = c;
                    // Take everything already queued: one re-read per burst.
                    while let Some(c) = next {
                        match c {
                            Change::Paths(p) => set.extend(p),
                            Change::Everything => everything = true,
                        }
                        next = ev_rx.try_recv().ok();
                    }
                    notified = true;
                }
                _ = poll.tick() => everything = true,
            }
            if everything && notified {
                // `notify` watches a new directory only after reporting
                // it: a file written there meanwhile sends no event. One
                // more rescan shortly after catches it.
                poll.reset_after(Duration::from_millis(100));
            }
            let t0 = std::time::Instant::now();
            let r = if everything {
                match md.rescan() {
                    Ok(r) => r,
                    Err(e) => {
                        // The directory itself went away: keep the last model.
                        warn!("{e:#}");
                        continue;
                    }
                }
            } else {
                md.rescan_paths(set)
            };
            publish(&md, &r, false, t0);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The watcher, with a fallback poll too slow to matter: every change
    //! here must arrive as a notification.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn pod(name: &str, app: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns, labels: {{app: {app}}}}}\nspec: {{nodeName: n, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        )
    }

    /// Replaces `file` the way editors and `kubectl` tools do: a
    /// temporary file renamed over it.
    fn write_atomic(dir: &Path, file: &str, text: &str) {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }

    fn app(m: &Model, pod: &str) -> Option<String> {
        m.pods
            .get(&format!("ns/{pod}"))
            .and_then(|p| p.metadata.labels.as_ref()?.get("app").cloned())
    }

    async fn until(rx: &mut watch::Receiver<Arc<Model>>, what: &str, f: impl Fn(&Model) -> bool) {
        let wait = async {
            loop {
                if f(&rx.borrow_and_update()) {
                    return;
                }
                rx.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("not picked up: {what}"));
    }

    async fn start(dir: &Path) -> (watch::Receiver<Arc<Model>>, ErrorList) {
        let (tx, rx) = watch::channel(Arc::new(Model::default()));
        let errors = ErrorList::default();
        run(
            dir.to_path_buf(),
            Duration::from_secs(3600),
            tx,
            errors.clone(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        (rx, errors)
    }

    #[tokio::test]
    async fn edits_additions_deletions_and_renames_are_picked_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("a.yaml"), pod("p1", "v1", "10.0.0.1")).unwrap();
        let (mut rx, _) = start(dir).await;
        until(&mut rx, "initial read", |m| {
            app(m, "p1").as_deref() == Some("v1")
        })
        .await;

        // In place, and renamed over.
        std::fs::write(dir.join("a.yaml"), pod("p1", "v2", "10.0.0.1")).unwrap();
        until(&mut rx, "edit in place", |m| {
            app(m, "p1").as_deref() == Some("v2")
        })
        .await;
        write_atomic(dir, "a.yaml", &pod("p1", "v3", "10.0.0.1"));
        until(&mut rx, "rename-over edit", |m| {
            app(m, "p1").as_deref() == Some("v3")
        })
        .await;

        std::fs::write(dir.join("b.yml"), pod("p2", "x", "10.0.0.2")).unwrap();
        until(&mut rx, "new file", |m| app(m, "p2").is_some()).await;

        // Renamed to a name that is not a manifest, then back to one.
        std::fs::rename(dir.join("b.yml"), dir.join("b.yml.bak")).unwrap();
        until(&mut rx, "renamed away", |m| app(m, "p2").is_none()).await;
        std::fs::rename(dir.join("b.yml.bak"), dir.join("c.yaml")).unwrap();
        until(&mut rx, "renamed back", |m| app(m, "p2").is_some()).await;

        // A new directory, and a file in it.
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/d.yaml"), pod("p3", "x", "10.0.0.3")).unwrap();
        until(&mut rx, "file in a new directory", |m| {
            app(m, "p3").is_some()
        })
        .await;

        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        until(&mut rx, "deleted file", |m| app(m, "p1").is_none()).await;
        std::fs::remove_dir_all(dir.join("sub")).unwrap();
        until(&mut rx, "deleted directory", |m| app(m, "p3").is_none()).await;
        assert!(app(&rx.borrow(), "p2").is_some());
    }

    /// Truncated and rewritten in place, the file's objects never drop out
    /// while its writer still holds it.
    #[tokio::test]
    async fn a_file_rewritten_in_place_is_read_once_closed() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("a.yaml"), pod("p1", "v1", "10.0.0.1")).unwrap();
        let (mut rx, _) = start(dir).await;
        until(&mut rx, "initial read", |m| app(m, "p1").is_some()).await;
        let mut f = std::fs::File::create(dir.join("a.yaml")).unwrap();
        f.write_all(b"# being written\n").unwrap();
        f.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(app(&rx.borrow(), "p1").as_deref(), Some("v1"));
        f.write_all(pod("p1", "v2", "10.0.0.1").as_bytes()).unwrap();
        drop(f);
        until(&mut rx, "the closed file", |m| {
            app(m, "p1").as_deref() == Some("v2")
        })
        .await;
    }

    async fn errors_until(errors: &ErrorList, what: &str, f: impl Fn(&[String]) -> bool) {
        for _ in 0..1000 {
            if f(&errors.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("errors never showed {what}: {:?}", errors.lock().unwrap());
    }

    #[tokio::test]
    async fn a_malformed_file_is_reported_and_its_last_good_objects_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let good = format!(
            "{}---\n{}",
            pod("p1", "v1", "10.0.0.1"),
            pod("p2", "v1", "10.0.0.2")
        );
        std::fs::write(dir.join("a.yaml"), &good).unwrap();
        let (mut rx, errors) = start(dir).await;
        until(&mut rx, "initial read", |m| m.pods.len() == 2).await;

        // Not YAML at all: everything the file held stays.
        write_atomic(dir, "a.yaml", "kind: Pod\nmetadata: [unclosed\n");
        errors_until(&errors, "the YAML error", |e| {
            e.len() == 1 && e[0].contains("a.yaml") && e[0].contains("not valid YAML")
        })
        .await;
        assert_eq!(rx.borrow().pods.len(), 2);

        // One bad object: it keeps its last good version, the rest apply.
        let one_bad = format!(
            "{}---\n{}",
            pod("p1", "v2", "300.0.0.1"),
            pod("p2", "v2", "10.0.0.2")
        );
        write_atomic(dir, "a.yaml", &one_bad);
        until(&mut rx, "the good object", |m| {
            app(m, "p2").as_deref() == Some("v2")
        })
        .await;
        assert_eq!(app(&rx.borrow(), "p1").as_deref(), Some("v1"));
        errors_until(&errors, "the bad field", |e| {
            e.len() == 1 && e[0].contains("Pod ns/p1") && e[0].contains("status.podIP")
        })
        .await;

        // Fixed: applied, and the error is gone.
        write_atomic(dir, "a.yaml", &pod("p1", "v3", "10.0.0.1"));
        until(&mut rx, "the fix", |m| {
            app(m, "p1").as_deref() == Some("v3") && app(m, "p2").is_none()
        })
        .await;
        errors_until(&errors, "no error", |e| e.is_empty()).await;
    }

    #[test]
    fn unchanged_objects_keep_their_arc_and_later_files_win() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let two = |v: &str| {
            format!(
                "{}---\n{}",
                pod("p1", v, "10.0.0.1"),
                pod("p2", "x", "10.0.0.2")
            )
        };
        std::fs::write(dir.join("a.yaml"), two("v1")).unwrap();
        let mut md = ManifestDir::new(dir);
        let r = md.rescan().unwrap();
        assert!(r.model_changed && r.errors.is_empty());
        let p2 = md.model().pods["ns/p2"].clone();
        let p1 = md.model().pods["ns/p1"].clone();

        // The same text again: nothing changes.
        std::fs::write(dir.join("a.yaml"), two("v1") + "\n").unwrap();
        let r = md.rescan_paths([dir.join("a.yaml")]);
        assert!(r.files_changed && !r.model_changed);
        assert!(Arc::ptr_eq(&md.model().pods["ns/p1"], &p1));

        std::fs::write(dir.join("a.yaml"), two("v2")).unwrap();
        let r = md.rescan_paths([dir.join("a.yaml")]);
        assert!(r.model_changed);
        assert!(Arc::ptr_eq(&md.model().pods["ns/p2"], &p2));
        assert!(!Arc::ptr_eq(&md.model().pods["ns/p1"], &p1));

        // The same pod in a later file wins; when that file goes, the
        // earlier file's version is back; when both go, the pod is gone.
        std::fs::write(dir.join("b.yaml"), pod("p1", "from-b", "10.0.0.1")).unwrap();
        md.rescan().unwrap();
        assert_eq!(app(md.model(), "p1").as_deref(), Some("from-b"));
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        md.rescan_paths([dir.join("b.yaml")]);
        assert_eq!(app(md.model(), "p1").as_deref(), Some("v2"));
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let r = md.rescan().unwrap();
        assert!(r.model_changed);
        assert!(md.model().pods.is_empty());
    }
}
