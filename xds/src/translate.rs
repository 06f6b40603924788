//! Model -> xDS resources, once per change.
//!
//! Pods become `istio.workload.Address` Workloads (key: uid), Services
//! become Address Services (key: `namespace/hostname`), AuthorizationPolicies
//! become `istio.security.Authorization` (key: `namespace/name`), following
//! Istio's ambient translation. Each resource's version is a hash of its
//! encoded bytes, so it is stable across control-plane restarts: a client
//! resuming with `initial_resource_versions` is sent only what really
//! changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_proto::security as sec;
use mesh_proto::workload as wl;
use prost::Message;

use crate::model::{
    key_of, AuthorizationPolicy, Model, PolicyAction, GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL,
};

pub const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";
/// Put on a pod by whoever enrolled it with its ztunnel (the CNI plugin),
/// once its traffic is captured: Istio's annotation.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Istio's label for a pod that terminates HBONE itself.
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

#[derive(Clone, Debug)]
pub struct Options {
    pub trust_domain: String,
    pub cluster_domain: String,
    pub cluster_id: String,
    /// Policies without selector here apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// One encoded resource, ready to send.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    /// Hash of the encoded body; sent as 16 hex digits.
    pub hash: u64,
    pub type_url: &'static str,
    /// The resource message, encoded.
    pub value: Bytes,
    /// Wrapped in an `Any`, encoded (state-of-the-world responses).
    pub any: Bytes,
    /// As an envoy `Resource` (name, version, `Any`), encoded (delta).
    pub delta: Bytes,
}

impl Resource {
    pub fn version(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// A version string as sent by [`Resource::version`]; anything else
/// (another server's version) matches nothing.
pub fn parse_version(v: &str) -> u64 {
    u64::from_str_radix(v, 16).unwrap_or(u64::MAX)
}

/// The translated state: resources by type URL and name, and which
/// identities each node's pods have (for the CA).
#[derive(Debug, Default)]
pub struct Resources {
    /// Shared, so that an ADS stream can remember "this client holds
    /// exactly this map" with a pointer (see `ads::known`).
    pub by_type: BTreeMap<&'static str, Arc<Named>>,
    pub node_identities: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// What translation could not do as asked (objects were valid, but
    /// e.g. a policy field the waypoint cannot enforce), naming the object
    /// and field.
    pub errors: Vec<String>,
    /// Which waypoint may see which Envoy resources.
    pub waypoints: crate::envoy::Scope,
}

impl Resources {
    pub fn get(&self, type_url: &str) -> Option<&Arc<Named>> {
        self.by_type.get(type_url)
    }
}

/// FNV-1a: a version that only depends on the bytes.
fn version_of(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Encodes a resource once, in the three shapes streams send.
pub(crate) fn resource(type_url: &'static str, name: String, msg: &impl Message) -> Arc<Resource> {
    salted_resource(type_url, name, msg, b"")
}

/// [`resource`] whose version also covers `salt`: what else decides who
/// is sent it (a waypoint resource's owners), so a change there is a new
/// version the ADS streams notice.
pub(crate) fn salted_resource(
    type_url: &'static str,
    name: String,
    msg: &impl Message,
    salt: &[u8],
) -> Arc<Resource> {
    let value = msg.encode_to_vec();
    let hash = match salt {
        [] => version_of(&value),
        _ => version_of(&value) ^ version_of(salt).rotate_left(1),
    };
    let any = prost_types::Any {
        type_url: type_url.to_string(),
        value,
    };
    let delta = mesh_proto::discovery::Resource {
        name: name.clone(),
        version: format!("{hash:016x}"),
        resource: Some(any.clone()),
        ..Default::default()
    };
    Arc::new(Resource {
        name: name.into(),
        hash,
        type_url,
        any: any.encode_to_vec().into(),
        value: any.value.into(),
        delta: delta.encode_to_vec().into(),
    })
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(p: &Pod) -> BTreeMap<String, String> {
    p.metadata.labels.clone().unwrap_or_default()
}

/// A pod is in the mesh when it, or failing that its namespace, is labelled
/// `istio.io/dataplane-mode=ambient` (`none` on the pod opts it out).
pub fn in_mesh(model: &Model, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    match labels
        .and_then(|l| l.get(AMBIENT_LABEL))
        .map(String::as_str)
    {
        Some("ambient") => true,
        Some("none") => false,
        _ => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            model
                .namespaces
                .get(ns)
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(AMBIENT_LABEL))
                .is_some_and(|v| v == "ambient")
        }
    }
}

/// Whether a pod is reached over HBONE, as Istio decides it: its capture
/// is in place (`ambient.istio.io/redirection: enabled`, set once ztunnel
/// has taken the pod), or it speaks HBONE itself (a waypoint's pod, or
/// `networking.istio.io/tunnel: http`).
///
/// The `istio.io/dataplane-mode` label ([`in_mesh`]) only asks for
/// capture: a pod running before its namespace was labelled is not
/// captured until it is enrolled (restarted), and until then is reached
/// in plain TCP, rather than over HBONE to a listener that is not there.
pub fn reached_over_hbone(model: &Model, pod: &Pod) -> bool {
    let meta = &pod.metadata;
    let annotated = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == "enabled");
    let labels = meta.labels.as_ref();
    let native = labels
        .and_then(|l| l.get(TUNNEL_LABEL))
        .is_some_and(|v| v.split(',').any(|t| t.trim() == "http"));
    let waypoint = labels
        .and_then(|l| l.get(GATEWAY_NAME_LABEL))
        .is_some_and(|gw| {
            let ns = meta.namespace.as_deref().unwrap_or("default");
            model
                .gateways
                .get(&format!("{ns}/{gw}"))
                .is_some_and(|g| g.is_waypoint())
        });
    annotated || native || waypoint
}

fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let Some(st) = &p.status else {
        return vec![];
    };
    let mut ips: Vec<IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if let Some(ip) = st.pod_ip.as_ref().and_then(|i| i.parse().ok()) {
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    ips
}

fn service_account(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The pod's workload name as istiod derives it (`GetDeployMetaFromPod`),
/// for the `*_workload` metric labels: its controller's name, where a
/// ReplicaSet whose name ends in the pod's `pod-template-hash` stands for
/// its Deployment and a Job named `<name>-<8 to 10 digits>` for its
/// CronJob; the pod's own name when nothing controls it.
pub(crate) fn workload_name(p: &Pod) -> String {
    let pod_name = p.metadata.name.clone().unwrap_or_default();
    let Some(owner) = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return pod_name;
    };
    let hash = p
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
        .filter(|h| !h.is_empty());
    match (owner.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
            .filter(|n| !n.is_empty())
            .unwrap_or(&owner.name)
            .to_string(),
        ("Job", _) => match owner.name.rsplit_once('-') {
            Some((cron, stamp))
                if !cron.is_empty()
                    && (8..=10).contains(&stamp.len())
                    && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_string()
            }
            _ => owner.name.clone(),
        },
        _ if owner.name.is_empty() => pod_name,
        _ => owner.name.clone(),
    }
}

/// The SPIFFE identity of a pod, as the CA will check it.
pub fn pod_identity(opts: &Options, p: &Pod) -> String {
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        opts.trust_domain,
        p.metadata.namespace.as_deref().unwrap_or("default"),
        service_account(p)
    )
}

pub(crate) fn resolve_target_port(p: &Pod, svc_port: i32, target: Option<&IntOrString>) -> u32 {
    match target {
        None => svc_port as u32,
        Some(IntOrString::Int(i)) => *i as u32,
        Some(IntOrString::String(name)) => p
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .map(|cp| cp.container_port as u32)
            .unwrap_or(0),
    }
}

pub(crate) fn hostname(opts: &Options, s: &Service) -> String {
    format!(
        "{}.{}.svc.{}",
        s.metadata.name.as_deref().unwrap_or_default(),
        s.metadata.namespace.as_deref().unwrap_or("default"),
        opts.cluster_domain
    )
}

/// The waypoint an object in `ns` with `labels` opted into: its own
/// `istio.io/use-waypoint` label, else its namespace's (`none` opts out).
/// The value names a Gateway of class `istio-waypoint` in the same
/// namespace; a name with no such Gateway gives no waypoint rather than
/// traffic sent nowhere. The waypoint's own pods and service
/// (`gateway-name` label or selector) never get one: they would loop.
fn waypoint_for(
    opts: &Options,
    model: &Model,
    ns: &str,
    labels: Option<&BTreeMap<String, String>>,
    is_waypoint_itself: bool,
) -> Option<wl::GatewayAddress> {
    if is_waypoint_itself {
        return None;
    }
    let name = labels.and_then(|l| l.get(USE_WAYPOINT_LABEL)).or_else(|| {
        model
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(USE_WAYPOINT_LABEL))
    })?;
    if name == "none" {
        return None;
    }
    model
        .gateways
        .get(&format!("{ns}/{name}"))
        .filter(|g| g.is_waypoint())?;
    Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(
            wl::NamespacedHostname {
                namespace: ns.to_string(),
                hostname: format!("{name}.{ns}.svc.{}", opts.cluster_domain),
            },
        )),
        hbone_mtls_port: 15008,
    })
}

fn translate_service(opts: &Options, model: &Model, s: &Service) -> wl::Service {
    let spec = s.spec.clone().unwrap_or_default();
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if let Some(ip) = &spec.cluster_ip {
        if !ips.contains(ip) {
            ips.insert(0, ip.clone());
        }
    }
    let ns = s.metadata.namespace.as_deref().unwrap_or_default();
    let own = spec
        .selector
        .as_ref()
        .is_some_and(|sel| sel.contains_key(GATEWAY_NAME_LABEL))
        || model
            .gateways
            .get(&key_of(&s.metadata))
            .is_some_and(|g| g.is_waypoint());
    let waypoint = waypoint_for(opts, model, ns, s.metadata.labels.as_ref(), own);
    wl::Service {
        waypoint,
        name: s.metadata.name.clone().unwrap_or_default(),
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        hostname: hostname(opts, s),
        addresses: ips
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| wl::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
            })
            .collect(),
        ports: spec
            .ports
            .iter()
            .flatten()
            .map(|p| wl::Port {
                service_port: p.port as u32,
                target_port: match &p.target_port {
                    None => p.port as u32,
                    Some(IntOrString::Int(i)) => *i as u32,
                    // Named: resolved per workload (Workload.services).
                    Some(IntOrString::String(_)) => 0,
                },
            })
            .collect(),
        ..Default::default()
    }
}

fn string_match(s: &str) -> sec::StringMatch {
    use sec::string_match::MatchType;
    let m = if s == "*" {
        MatchType::Presence(())
    } else if let Some(p) = s.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else if let Some(p) = s.strip_prefix('*') {
        MatchType::Suffix(p.to_string())
    } else {
        MatchType::Exact(s.to_string())
    };
    sec::StringMatch {
        match_type: Some(m),
    }
}

fn addresses(blocks: &[&Vec<String>]) -> Vec<sec::Address> {
    blocks
        .iter()
        .flat_map(|b| b.iter())
        .filter_map(|b| parse_cidr(b).ok())
        .map(|n| sec::Address {
            address: ip_bytes(n.addr()),
            length: u32::from(n.prefix_len()),
        })
        .collect()
}

fn ports(p: &[String]) -> Vec<u32> {
    p.iter().filter_map(|p| p.parse::<u32>().ok()).collect()
}

/// AuthorizationPolicy -> Authorization, as Istio's ambient controller does
/// for ztunnel: `from` entries become one clause (any source), `to`
/// entries another (any operation), each `when` condition one more.
/// Attributes ztunnel cannot see (HTTP methods, paths, hosts, request
/// principals): an ALLOW rule needing them can never match and is dropped;
/// a DENY rule is applied without them (stricter). Policies bound to a
/// waypoint (`targetRef(s)`) are not ztunnel's and give `None`.
pub fn translate_policy(opts: &Options, ap: &AuthorizationPolicy) -> Option<sec::Authorization> {
    let spec = &ap.spec;
    if spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
        return None;
    }
    let ns = ap.metadata.namespace.clone().unwrap_or_default();
    let has_selector = spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    let scope = if has_selector {
        sec::Scope::WorkloadSelector
    } else if ns == opts.root_namespace {
        sec::Scope::Global
    } else {
        sec::Scope::Namespace
    };
    let deny = spec.action == Some(PolicyAction::Deny);
    let mut rules = Vec::new();
    'rules: for r in spec.rules.iter().flatten() {
        let mut clauses = Vec::new();
        if !r.from.is_empty() {
            let mut matches = Vec::new();
            for f in &r.from {
                let s = &f.source;
                if !deny
                    && (!s.request_principals.is_empty() || !s.not_request_principals.is_empty())
                {
                    continue;
                }
                let sa = |sas: &Vec<String>| -> Vec<sec::StringMatch> {
                    sas.iter()
                        .filter_map(|x| x.split_once('/'))
                        .map(|(n, a)| string_match(&format!("{}/ns/{n}/sa/{a}", opts.trust_domain)))
                        .collect()
                };
                let mut principals: Vec<_> = s.principals.iter().map(|p| string_match(p)).collect();
                principals.extend(sa(&s.service_accounts));
                let mut not_principals: Vec<_> =
                    s.not_principals.iter().map(|p| string_match(p)).collect();
                not_principals.extend(sa(&s.not_service_accounts));
                matches.push(sec::Match {
                    namespaces: s.namespaces.iter().map(|p| string_match(p)).collect(),
                    not_namespaces: s.not_namespaces.iter().map(|p| string_match(p)).collect(),
                    principals,
                    not_principals,
                    source_ips: addresses(&[&s.ip_blocks, &s.remote_ip_blocks]),
                    not_source_ips: addresses(&[&s.not_ip_blocks, &s.not_remote_ip_blocks]),
                    ..Default::default()
                });
            }
            if matches.is_empty() {
                continue 'rules;
            }
            clauses.push(sec::Clause { matches });
        }
        if !r.to.is_empty() {
            let mut matches = Vec::new();
            for t in &r.to {
                let o = &t.operation;
                let l7 = [
                    &o.hosts,
                    &o.not_hosts,
                    &o.methods,
                    &o.not_methods,
                    &o.paths,
                    &o.not_paths,
                ]
                .iter()
                .any(|v| !v.is_empty());
                if l7 && !deny {
                    continue;
                }
                matches.push(sec::Match {
                    destination_ports: ports(&o.ports),
                    not_destination_ports: ports(&o.not_ports),
                    ..Default::default()
                });
            }
            if matches.is_empty() {
                continue 'rules;
            }
            clauses.push(sec::Clause { matches });
        }
        for c in &r.when {
            let vals = |v: &Vec<String>| v.iter().map(|x| string_match(x)).collect::<Vec<_>>();
            let m = match c.key.as_str() {
                "source.ip" | "source.remote_ip" => sec::Match {
                    source_ips: addresses(&[&c.values]),
                    not_source_ips: addresses(&[&c.not_values]),
                    ..Default::default()
                },
                "source.namespace" => sec::Match {
                    namespaces: vals(&c.values),
                    not_namespaces: vals(&c.not_values),
                    ..Default::default()
                },
                "source.principal" => sec::Match {
                    principals: vals(&c.values),
                    not_principals: vals(&c.not_values),
                    ..Default::default()
                },
                "destination.ip" => sec::Match {
                    destination_ips: addresses(&[&c.values]),
                    not_destination_ips: addresses(&[&c.not_values]),
                    ..Default::default()
                },
                "destination.port" => sec::Match {
                    destination_ports: ports(&c.values),
                    not_destination_ports: ports(&c.not_values),
                    ..Default::default()
                },
                _ if deny => continue,
                _ => continue 'rules,
            };
            clauses.push(sec::Clause { matches: vec![m] });
        }
        rules.push(sec::Rule { clauses });
    }
    Some(sec::Authorization {
        name: ap.metadata.name.clone().unwrap_or_default(),
        namespace: ns,
        scope: scope as i32,
        action: if deny {
            sec::Action::Deny as i32
        } else {
            sec::Action::Allow as i32
        },
        rules,
    })
}

type ServicePorts = (String, Vec<wl::Port>);
type Labels = BTreeMap<String, String>;
/// A type's resources by name.
pub type Named = BTreeMap<Arc<str>, Arc<Resource>>;
/// `(type_url, name)` of a resource.
pub type ResourceId = (&'static str, Arc<str>);

/// The whole model, translated.
pub fn translate(opts: &Options, model: &Model) -> Resources {
    Translator::new(opts.clone()).translate(Arc::new(model.clone()))
}

/// A pod's Workload and, when in the mesh, its (node, identity).
type PodOut = (Arc<Resource>, Option<(Arc<str>, Arc<str>)>);

/// What the pods of one namespace depend on besides themselves (all of a
/// pod's inputs are in its namespace), rebuilt when one of them changes.
#[derive(Default)]
struct NsIndex {
    /// Services with a selector.
    selecting: Vec<Arc<Service>>,
    /// Selector-less services' ports, by the endpoint IPs of their
    /// EndpointSlices.
    slice_services: HashMap<IpAddr, Vec<ServicePorts>>,
    /// Workload-selector policies that apply at L4: (key, selector).
    policies: Vec<(String, Labels)>,
}

/// The keys of `map` in namespace `ns` (keys are `namespace/name`).
fn in_ns<'a, T>(
    map: &'a BTreeMap<String, Arc<T>>,
    ns: &str,
) -> impl Iterator<Item = (&'a String, &'a Arc<T>)> {
    // '0' follows '/': every "ns/..." key sorts between the two.
    map.range(format!("{ns}/")..format!("{ns}0"))
}

fn ns_of(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

/// A key with its old and new object (`None`: absent on that side).
type Change<'a, T> = (&'a String, Option<&'a Arc<T>>, Option<&'a Arc<T>>);

/// Keys whose object differs between two versions of a map (added,
/// removed, or another `Arc`), in one merge pass over both.
fn changed_keys<'a, T>(
    old: &'a BTreeMap<String, Arc<T>>,
    new: &'a BTreeMap<String, Arc<T>>,
) -> Vec<Change<'a, T>> {
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, o)), None) => {
                out.push((*k, Some(*o), None));
                a.next();
            }
            (None, Some((k, n))) => {
                out.push((*k, None, Some(*n)));
                b.next();
            }
            (Some((ka, o)), Some((kb, n))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka, Some(*o), None));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb, None, Some(*n)));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(o, n) {
                        out.push((*ka, Some(*o), Some(*n)));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

fn selector(s: &Service) -> Option<&Labels> {
    s.spec
        .as_ref()
        .and_then(|sp| sp.selector.as_ref())
        .filter(|sel| !sel.is_empty())
}

fn policy_selector(ap: &AuthorizationPolicy) -> Option<&Labels> {
    ap.spec
        .selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|l| !l.is_empty())
}

/// Translates a model incrementally. Sources keep unchanged objects as the
/// same `Arc` across updates, so the translator finds what changed by
/// comparing pointers with the model it translated last, and retranslates
/// only the resources that depend on it: a pod change costs one pod; a
/// service or policy change, the pods of its namespace its selector (old or
/// new) matches; a namespace or waypoint Gateway change, its namespace.
/// Its outputs (resources by name, node identities) are kept and patched,
/// and it reports which resources changed, so nothing downstream compares
/// the whole state either. The first translation is the same pass with
/// every namespace dirty.
pub struct Translator {
    opts: Options,
    prev: Arc<Model>,
    /// Whether `prev` was translated (the first translation is one pass).
    translated: bool,
    ns: HashMap<String, NsIndex>,
    /// Pod key -> its last translation (`None`: not served).
    pods: HashMap<String, Option<PodOut>>,
    services: HashMap<String, Arc<Resource>>,
    policies: HashMap<String, Option<Arc<Resource>>>,
    addrs: Named,
    authz: Named,
    /// Waypoints' Envoy resources, by type (small: rebuilt every time).
    envoy: BTreeMap<&'static str, Named>,
    /// node -> identity -> how many served pods have it.
    node_ids: HashMap<Arc<str>, HashMap<Arc<str>, usize>>,
    /// Pods translated afresh by the last [`Translator::translate`].
    pub last_retranslated: usize,
    /// Resources changed (added, modified, removed) by the last
    /// [`Translator::translate`].
    pub last_changed: HashSet<ResourceId>,
}

/// Puts `r` in `map`, noting it as changed unless the same version was there.
fn put(map: &mut Named, changed: &mut HashSet<ResourceId>, r: Arc<Resource>) {
    let (t, name) = (r.type_url, r.name.clone());
    if map.insert(name.clone(), r.clone()).map(|o| o.hash) != Some(r.hash) {
        changed.insert((t, name));
    }
}

fn take(map: &mut Named, changed: &mut HashSet<ResourceId>, t: &'static str, name: &Arc<str>) {
    if map.remove(name).is_some() {
        changed.insert((t, name.clone()));
    }
}

impl Translator {
    pub fn new(opts: Options) -> Self {
        Translator {
            opts,
            prev: Arc::new(Model::default()),
            translated: false,
            ns: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            policies: HashMap::new(),
            addrs: Named::new(),
            authz: Named::new(),
            envoy: BTreeMap::new(),
            node_ids: HashMap::new(),
            last_retranslated: 0,
            last_changed: HashSet::new(),
        }
    }

    pub fn translate(&mut self, model: Arc<Model>) -> Resources {
        let old = std::mem::replace(&mut self.prev, model.clone());
        let model = &*model;
        let mut changed = HashSet::new();
        // Namespaces whose pods and services all retranslate, whose pod
        // inputs are re-indexed, and single pods / services / policies.
        let mut all_ns: BTreeSet<String> = BTreeSet::new();
        let mut index_ns: BTreeSet<String> = BTreeSet::new();
        let mut pods: BTreeSet<String> = BTreeSet::new();
        let mut services: BTreeSet<String> = BTreeSet::new();
        let mut policies: BTreeSet<String> = BTreeSet::new();

        if !std::mem::replace(&mut self.translated, true) {
            // First translation: one pass over everything.
            let keys = model
                .pods
                .keys()
                .chain(model.services.keys())
                .chain(model.endpoint_slices.keys())
                .chain(model.policies.keys())
                .chain(model.gateways.keys());
            for k in keys {
                if !all_ns.contains(ns_of(k)) {
                    all_ns.insert(ns_of(k).to_string());
                }
            }
            all_ns.extend(model.namespaces.keys().cloned());
        }
        for (k, _, _) in changed_keys(&old.namespaces, &model.namespaces) {
            all_ns.insert(k.clone());
        }
        for (k, _, _) in changed_keys(&old.gateways, &model.gateways) {
            all_ns.insert(ns_of(k).to_string());
        }
        // Pods of `ns` whose labels `sel` matches, unless `ns` is redone whole.
        let matching = |ns: &str, sel: Option<&Labels>, pods: &mut BTreeSet<String>| {
            let Some(sel) = sel else { return };
            for (k, p) in in_ns(&model.pods, ns) {
                let labels = p.metadata.labels.as_ref();
                if sel
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                {
                    pods.insert(k.clone());
                }
            }
        };
        for (k, o, n) in changed_keys(&old.services, &model.services) {
            let ns = ns_of(k);
            services.insert(k.clone());
            index_ns.insert(ns.to_string());
            if all_ns.contains(ns) {
                continue;
            }
            let (os, ns_) = (o.and_then(|s| selector(s)), n.and_then(|s| selector(s)));
            if (o.is_some() && os.is_none()) || (n.is_some() && ns_.is_none()) {
                // A selector-less service: its EndpointSlices' pods.
                all_ns.insert(ns.to_string());
                continue;
            }
            matching(ns, os, &mut pods);
            matching(ns, ns_, &mut pods);
        }
        for (k, o, n) in changed_keys(&old.endpoint_slices, &model.endpoint_slices) {
            let ns = ns_of(k);
            index_ns.insert(ns.to_string());
            if all_ns.contains(ns) {
                continue;
            }
            let ips: HashSet<IpAddr> = o
                .into_iter()
                .chain(n)
                .flat_map(|es| es.endpoints.iter())
                .flat_map(|ep| ep.addresses.iter())
                .filter_map(|a| a.parse().ok())
                .collect();
            for (pk, p) in in_ns(&model.pods, ns) {
                if pod_ips(p).iter().any(|ip| ips.contains(ip)) {
                    pods.insert(pk.clone());
                }
            }
        }
        for (k, o, n) in changed_keys(&old.policies, &model.policies) {
            let ns = ns_of(k);
            policies.insert(k.clone());
            let (os, ns_) = (
                o.and_then(|p| policy_selector(p)),
                n.and_then(|p| policy_selector(p)),
            );
            if os.is_none() && ns_.is_none() {
                continue;
            }
            index_ns.insert(ns.to_string());
            if !all_ns.contains(ns) {
                matching(ns, os, &mut pods);
                matching(ns, ns_, &mut pods);
            }
        }
        for (k, _, _) in changed_keys(&old.pods, &model.pods) {
            if !all_ns.contains(ns_of(k)) {
                pods.insert(k.clone());
            }
        }
        for ns in &all_ns {
            services.extend(in_ns(&model.services, ns).map(|(k, _)| k.clone()));
            pods.extend(in_ns(&model.pods, ns).map(|(k, _)| k.clone()));
        }
        index_ns.extend(all_ns.iter().cloned());

        // Policies first: the index lists only those that apply at L4.
        for key in &policies {
            let new = model.policies.get(key).and_then(|ap| {
                translate_policy(&self.opts, ap)
                    .map(|a| resource(mesh_proto::type_url::AUTHORIZATION, key.clone(), &a))
            });
            match &new {
                Some(r) => put(&mut self.authz, &mut changed, r.clone()),
                None => take(
                    &mut self.authz,
                    &mut changed,
                    mesh_proto::type_url::AUTHORIZATION,
                    &Arc::from(key.as_str()),
                ),
            }
            match model.policies.get(key) {
                Some(_) => self.policies.insert(key.clone(), new),
                None => self.policies.remove(key),
            };
        }
        for key in &services {
            let old = self.services.remove(key).map(|r| r.name.clone());
            let new = model.services.get(key).map(|s| {
                let msg = translate_service(&self.opts, model, s);
                let name = format!("{}/{}", msg.namespace, msg.hostname);
                resource(
                    mesh_proto::type_url::ADDRESS,
                    name,
                    &wl::Address {
                        r#type: Some(wl::address::Type::Service(msg)),
                    },
                )
            });
            if let Some(r) = &new {
                put(&mut self.addrs, &mut changed, r.clone());
                self.services.insert(key.clone(), r.clone());
            }
            if let Some(name) = old.filter(|n| new.as_ref().map(|r| &r.name) != Some(n)) {
                take(
                    &mut self.addrs,
                    &mut changed,
                    mesh_proto::type_url::ADDRESS,
                    &name,
                );
            }
        }
        for ns in &index_ns {
            let idx = self.index(model, ns);
            self.ns.insert(ns.clone(), idx);
        }

        self.last_retranslated = 0;
        let empty = NsIndex::default();
        for key in &pods {
            let old = self.pods.remove(key).flatten().map(|(r, id)| {
                if let Some((node, identity)) = id {
                    self.forget_identity(&node, &identity);
                }
                r.name.clone()
            });
            let new = model.pods.get(key).and_then(|p| {
                self.last_retranslated += 1;
                let idx = self.ns.get(ns_of(key)).unwrap_or(&empty);
                self.translate_pod(model, p, idx)
            });
            if let Some((r, id)) = &new {
                if let Some((node, identity)) = id {
                    *self
                        .node_ids
                        .entry(node.clone())
                        .or_default()
                        .entry(identity.clone())
                        .or_default() += 1;
                }
                put(&mut self.addrs, &mut changed, r.clone());
            }
            // Gone, or no longer served (finished, lost its IP).
            if let Some(name) = old.filter(|n| new.as_ref().map(|(r, _)| &r.name) != Some(n)) {
                take(
                    &mut self.addrs,
                    &mut changed,
                    mesh_proto::type_url::ADDRESS,
                    &name,
                );
            }
            if model.pods.contains_key(key) {
                self.pods.insert(key.clone(), new);
            }
        }

        // Waypoints' Envoy configuration.
        let envoy_out = crate::envoy::translate(&self.opts, model);
        let envoy: BTreeMap<&'static str, Named> = envoy_out.resources.into_iter().collect();
        let empty_named = Named::new();
        for t in envoy.keys().chain(self.envoy.keys()) {
            let (o, n) = (
                self.envoy.get(t).unwrap_or(&empty_named),
                envoy.get(t).unwrap_or(&empty_named),
            );
            for (name, r) in n {
                if o.get(name).map(|x| x.hash) != Some(r.hash) {
                    changed.insert((*t, name.clone()));
                }
            }
            for name in o.keys().filter(|k| !n.contains_key(*k)) {
                changed.insert((*t, name.clone()));
            }
        }
        self.envoy = envoy;

        let mut out = Resources::default();
        out.by_type
            .insert(mesh_proto::type_url::ADDRESS, Arc::new(self.addrs.clone()));
        out.by_type.insert(
            mesh_proto::type_url::AUTHORIZATION,
            Arc::new(self.authz.clone()),
        );
        for (t, named) in &self.envoy {
            out.by_type.insert(t, Arc::new(named.clone()));
        }
        out.node_identities = self
            .node_ids
            .iter()
            .map(|(n, ids)| (n.clone(), ids.keys().cloned().collect()))
            .collect();
        out.errors = envoy_out.errors;
        out.waypoints = envoy_out.scope;
        self.last_changed = changed;
        out
    }

    fn forget_identity(&mut self, node: &Arc<str>, identity: &Arc<str>) {
        let Some(ids) = self.node_ids.get_mut(node) else {
            return;
        };
        if let Some(n) = ids.get_mut(identity) {
            *n -= 1;
            if *n == 0 {
                ids.remove(identity);
            }
        }
        if ids.is_empty() {
            self.node_ids.remove(node);
        }
    }

    /// What the pods of `ns` depend on, from the model.
    fn index(&self, model: &Model, ns: &str) -> NsIndex {
        let opts = &self.opts;
        let mut idx = NsIndex::default();
        for (_, s) in in_ns(&model.services, ns) {
            if selector(s).is_some() {
                idx.selecting.push(s.clone());
            }
        }
        // Selector-less services: endpoints from EndpointSlices, by pod IP.
        for (_, es) in in_ns(&model.endpoint_slices, ns) {
            let Some(svc_name) = es
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            else {
                continue;
            };
            let Some(svc) = model.services.get(&format!("{ns}/{svc_name}")) else {
                continue;
            };
            if selector(svc).is_some() {
                continue;
            }
            let spec = svc.spec.clone().unwrap_or_default();
            let ports: Vec<wl::Port> = spec
                .ports
                .iter()
                .flatten()
                .map(|sp| {
                    let target = es
                        .ports
                        .iter()
                        .flatten()
                        .find(|ep| ep.name == sp.name)
                        .and_then(|ep| ep.port)
                        .unwrap_or(sp.port);
                    wl::Port {
                        service_port: sp.port as u32,
                        target_port: target as u32,
                    }
                })
                .collect();
            let key = format!("{ns}/{}", hostname(opts, svc));
            for ep in &es.endpoints {
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse::<IpAddr>() {
                        idx.slice_services
                            .entry(ip)
                            .or_default()
                            .push((key.clone(), ports.clone()));
                    }
                }
            }
        }
        for (key, ap) in in_ns(&model.policies, ns) {
            let applies = self.policies.get(key).is_some_and(Option::is_some);
            if let Some(sel) = policy_selector(ap).filter(|_| applies) {
                idx.policies.push((key.clone(), sel.clone()));
            }
        }
        idx
    }

    /// One pod as a Workload; `None` when it is not served (no IP, host
    /// network, finished).
    fn translate_pod(&self, model: &Model, p: &Pod, idx: &NsIndex) -> Option<PodOut> {
        let opts = &self.opts;
        let ips = pod_ips(p);
        let spec = p.spec.as_ref();
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if ips.is_empty() || spec.and_then(|s| s.host_network) == Some(true) {
            return None;
        }
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let labels = pod_labels(p);
        let mesh = in_mesh(model, p);
        let hbone = reached_over_hbone(model, p);
        let mut services = BTreeMap::new();
        for s in &idx.selecting {
            let Some(sspec) = s.spec.as_ref() else {
                continue;
            };
            let Some(sel) = sspec.selector.as_ref() else {
                continue;
            };
            if !labels_match(sel, &labels) {
                continue;
            }
            let ports = sspec
                .ports
                .iter()
                .flatten()
                .map(|sp| wl::Port {
                    service_port: sp.port as u32,
                    target_port: resolve_target_port(p, sp.port, sp.target_port.as_ref()),
                })
                .collect();
            services.insert(
                format!("{ns}/{}", hostname(opts, s)),
                wl::PortList { ports },
            );
        }
        for ip in &ips {
            for (key, ports) in idx.slice_services.get(ip).into_iter().flatten() {
                services.insert(
                    key.clone(),
                    wl::PortList {
                        ports: ports.clone(),
                    },
                );
            }
        }
        let mut authorization_policies: Vec<String> = idx
            .policies
            .iter()
            .filter(|(_, sel)| labels_match(sel, &labels))
            .map(|(k, _)| k.clone())
            .collect();
        authorization_policies.sort();
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_none_or(|c| c.status == "True");
        let uid = format!("{}//Pod/{ns}/{name}", opts.cluster_id);
        let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        let waypoint = waypoint_for(
            opts,
            model,
            &ns,
            Some(&labels),
            labels.contains_key(GATEWAY_NAME_LABEL),
        );
        let workload_name = workload_name(p);
        let w = wl::Workload {
            waypoint,
            uid: uid.clone(),
            name: name.clone(),
            namespace: ns.clone(),
            addresses: ips.iter().map(|ip| ip_bytes(*ip)).collect(),
            tunnel_protocol: if hbone {
                wl::TunnelProtocol::Hbone as i32
            } else {
                wl::TunnelProtocol::None as i32
            },
            trust_domain: opts.trust_domain.clone(),
            service_account: service_account(p),
            node: node.clone(),
            canonical_name: labels
                .get("service.istio.io/canonical-name")
                .or_else(|| labels.get("app.kubernetes.io/name"))
                .or_else(|| labels.get("app"))
                .cloned()
                // Istio's default: the workload (a pod's Deployment).
                .unwrap_or_else(|| workload_name.clone()),
            canonical_revision: labels
                .get("service.istio.io/canonical-revision")
                .or_else(|| labels.get("app.kubernetes.io/version"))
                .or_else(|| labels.get("version"))
                .cloned()
                .unwrap_or_else(|| "latest".into()),
            workload_type: wl::WorkloadType::Pod as i32,
            workload_name,
            services,
            authorization_policies,
            status: if ready {
                wl::WorkloadStatus::Healthy as i32
            } else {
                wl::WorkloadStatus::Unhealthy as i32
            },
            cluster_id: opts.cluster_id.clone(),
            ..Default::default()
        };
        // The CA signs, for a node, the identities of its pods in the mesh
        // and of its gateway (waypoint) pods: a waypoint is not captured,
        // but needs the mesh's certificate for its own identity.
        let is_gateway = labels.contains_key(GATEWAY_NAME_LABEL);
        // Labelled in (about to be enrolled, and asking for its
        // certificate) or already captured.
        let id = ((mesh || hbone || is_gateway) && !node.is_empty()).then(|| {
            (
                Arc::from(node.as_str()),
                Arc::from(pod_identity(opts, p).as_str()),
            )
        });
        let r = resource(
            mesh_proto::type_url::ADDRESS,
            uid,
            &wl::Address {
                r#type: Some(wl::address::Type::Workload(w)),
            },
        );
        Some((r, id))
    }
}

#[cfg(test)]
mod tests {
    //! The translation as the Kubernetes source drives it: typed objects
    //! built in code (as kube-rs reflectors hand them over), no YAML.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use k8s_openapi::api::core::v1::{
        Container, Namespace, PodIP, PodSpec, PodStatus, ServicePort, ServiceSpec,
    };
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::manifest::validate;
    use crate::model::{
        AuthorizationPolicySpec, From, Object, Operation, PolicyRule, Source, To, WorkloadSelector,
    };

    fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: ns.map(String::from),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Object {
        Object::Pod(Arc::new(Pod {
            metadata: meta(Some(ns), name, labels),
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                service_account_name: Some("sa".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                ..Default::default()
            }),
        }))
    }

    /// `o`, a pod, as its enrolment leaves it: annotated as captured.
    fn captured(o: Object) -> Object {
        let Object::Pod(mut p) = o else {
            panic!("not a pod")
        };
        Arc::make_mut(&mut p)
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(REDIRECTION_ANNOTATION.into(), "enabled".into());
        Object::Pod(p)
    }

    fn decode(r: &Resources, name: &str) -> wl::address::Type {
        let res = &r.get(mesh_proto::type_url::ADDRESS).unwrap()[name];
        wl::Address::decode(res.value.clone())
            .unwrap()
            .r#type
            .unwrap()
    }

    fn model() -> Model {
        let mut objs = vec![
            Object::Namespace(Arc::new(Namespace {
                metadata: meta(None, "mesh", &[(AMBIENT_LABEL, "ambient")]),
                ..Default::default()
            })),
            Object::Namespace(Arc::new(Namespace {
                metadata: meta(None, "plain", &[]),
                ..Default::default()
            })),
            captured(pod("mesh", "a", "10.0.0.1", &[("app", "a")])),
            pod("mesh", "out", "10.0.0.2", &[(AMBIENT_LABEL, "none")]),
            pod("plain", "p", "10.0.0.3", &[]),
            // Labelled in, not captured (yet).
            pod("plain", "in", "10.0.0.4", &[(AMBIENT_LABEL, "ambient")]),
            // A waypoint's pod: not captured, but the CA signs its identity.
            pod("gw", "wp-0", "10.0.0.5", &[(GATEWAY_NAME_LABEL, "wp")]),
            // Selector-less service: endpoints from an EndpointSlice.
            Object::Service(Arc::new(Service {
                metadata: meta(Some("mesh"), "ext", &[]),
                spec: Some(ServiceSpec {
                    cluster_ip: Some("10.96.0.1".into()),
                    ports: Some(vec![ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            Object::EndpointSlice(Arc::new(EndpointSlice {
                metadata: meta(
                    Some("mesh"),
                    "ext-1",
                    &[("kubernetes.io/service-name", "ext")],
                ),
                address_type: "IPv4".into(),
                endpoints: vec![Endpoint {
                    addresses: vec!["10.0.0.1".into()],
                    ..Default::default()
                }],
                ports: Some(vec![EndpointPort {
                    name: Some("http".into()),
                    port: Some(9090),
                    ..Default::default()
                }]),
            })),
            Object::AuthorizationPolicy(Arc::new(AuthorizationPolicy {
                metadata: meta(Some("mesh"), "allow", &[]),
                spec: AuthorizationPolicySpec {
                    selector: Some(WorkloadSelector {
                        match_labels: [("app".to_string(), "a".to_string())].into(),
                    }),
                    rules: Some(vec![
                        PolicyRule {
                            from: vec![From {
                                source: Source {
                                    principals: vec!["cluster.local/ns/mesh/sa/*".into()],
                                    ..Default::default()
                                },
                            }],
                            ..Default::default()
                        },
                        // L7-only: cannot match at L4, dropped from an ALLOW.
                        PolicyRule {
                            to: vec![To {
                                operation: Operation {
                                    methods: vec!["GET".into()],
                                    ..Default::default()
                                },
                            }],
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                },
            })),
        ];
        for o in &mut objs {
            validate(o).unwrap();
        }
        Model::from_objects(objs)
    }

    #[test]
    fn typed_objects_translate_like_manifests() {
        let r = translate(&Options::default(), &model());
        let wl::address::Type::Workload(a) = decode(&r, "Kubernetes//Pod/mesh/a") else {
            panic!("not a workload")
        };
        assert_eq!(a.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
        assert_eq!(a.authorization_policies, vec!["mesh/allow"]);
        let ports = &a.services["mesh/ext.mesh.svc.cluster.local"].ports;
        assert_eq!((ports[0].service_port, ports[0].target_port), (80, 9090));
        let proto = |n: &str| match decode(&r, n) {
            wl::address::Type::Workload(w) => w.tunnel_protocol,
            _ => panic!(),
        };
        assert_eq!(
            proto("Kubernetes//Pod/mesh/out"),
            wl::TunnelProtocol::None as i32
        );
        assert_eq!(
            proto("Kubernetes//Pod/plain/p"),
            wl::TunnelProtocol::None as i32
        );
        // Until its capture is in place, plain TCP, not HBONE to a
        // listener that is not there.
        assert_eq!(
            proto("Kubernetes//Pod/plain/in"),
            wl::TunnelProtocol::None as i32
        );
        // Only in-mesh pods (labelled in, or captured) and gateway pods get
        // identities from the CA.
        let ids = &r.node_identities["node-1"];
        assert!(ids.contains("spiffe://cluster.local/ns/mesh/sa/sa"));
        assert!(ids.contains("spiffe://cluster.local/ns/plain/sa/sa"));
        assert!(ids.contains("spiffe://cluster.local/ns/gw/sa/sa"));
        assert_eq!(ids.len(), 3);
        assert_eq!(
            proto("Kubernetes//Pod/gw/wp-0"),
            wl::TunnelProtocol::None as i32
        );
        let pol = &r.get(mesh_proto::type_url::AUTHORIZATION).unwrap()["mesh/allow"];
        let a = sec::Authorization::decode(pol.value.clone()).unwrap();
        assert_eq!(a.scope, sec::Scope::WorkloadSelector as i32);
        assert_eq!(a.rules.len(), 1, "the L7-only ALLOW rule is dropped");
        assert_eq!(
            a.rules[0].clauses[0].matches[0].principals[0].match_type,
            Some(sec::string_match::MatchType::Prefix(
                "cluster.local/ns/mesh/sa/".into()
            ))
        );
        // Same input, same versions: what resume relies on.
        let again = translate(&Options::default(), &model());
        assert_eq!(
            r.get(mesh_proto::type_url::ADDRESS).unwrap()["Kubernetes//Pod/mesh/a"].hash,
            again.get(mesh_proto::type_url::ADDRESS).unwrap()["Kubernetes//Pod/mesh/a"].hash
        );
    }

    #[test]
    fn workload_name_is_the_controller_as_istiod_names_it() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let owned = |kind: &str, owner: &str, hash: Option<&str>, controller: bool| {
            let labels: Vec<(&str, &str)> =
                hash.map(|h| ("pod-template-hash", h)).into_iter().collect();
            let Object::Pod(mut p) = pod("ns", "the-pod", "10.0.0.1", &labels) else {
                unreachable!()
            };
            Arc::make_mut(&mut p).metadata.owner_references = Some(vec![OwnerReference {
                kind: kind.into(),
                name: owner.into(),
                controller: Some(controller),
                ..Default::default()
            }]);
            p
        };
        let cases = [
            // A Deployment's pod: its ReplicaSet's name without the hash.
            (
                owned("ReplicaSet", "echo-5d8f9c7b4", Some("5d8f9c7b4"), true),
                "echo",
            ),
            // A bare ReplicaSet (no hash label), a StatefulSet: the owner.
            (owned("ReplicaSet", "rs", None, true), "rs"),
            (owned("StatefulSet", "db", None, true), "db"),
            // A CronJob's Job, and a plain Job.
            (owned("Job", "backup-28930140", None, true), "backup"),
            (owned("Job", "migrate", None, true), "migrate"),
            // Owned, but not by a controller: the pod itself.
            (
                owned("ReplicaSet", "echo-5d8f9c7b4", Some("5d8f9c7b4"), false),
                "the-pod",
            ),
        ];
        for (p, want) in cases {
            assert_eq!(workload_name(&p), want);
        }
        let Object::Pod(bare) = pod("ns", "the-pod", "10.0.0.1", &[]) else {
            unreachable!()
        };
        assert_eq!(workload_name(&bare), "the-pod");
        // And it is what the Workload carries, with the cluster.
        let r = translate(&Options::default(), &model());
        let wl::address::Type::Workload(a) = decode(&r, "Kubernetes//Pod/mesh/a") else {
            panic!("not a workload")
        };
        assert_eq!(
            (a.workload_name.as_str(), a.cluster_id.as_str()),
            ("a", "Kubernetes")
        );
    }

    fn hashes(r: &Resources) -> Vec<(String, u64)> {
        r.by_type
            .values()
            .flat_map(|m| m.values().map(|x| (x.name.to_string(), x.hash)))
            .collect()
    }

    #[test]
    fn incremental_translation_matches_a_fresh_one() {
        let opts = Options::default();
        let mut tr = Translator::new(opts.clone());
        let mut m = model();
        assert_eq!(
            hashes(&tr.translate(Arc::new(m.clone()))),
            hashes(&translate(&opts, &m))
        );
        tr.translate(Arc::new(m.clone()));
        assert_eq!(tr.last_retranslated, 0, "nothing changed");
        assert!(tr.last_changed.is_empty());
        // One pod changes; the namespace of others changes its label and
        // one of them gets captured; a policy goes away.
        let Object::Pod(p) = captured(pod("mesh", "a", "10.0.0.9", &[("app", "a")])) else {
            panic!()
        };
        m.pods.insert("mesh/a".into(), p);
        let Object::Pod(p) = captured(pod("plain", "p", "10.0.0.3", &[])) else {
            panic!()
        };
        m.pods.insert("plain/p".into(), p);
        m.namespaces.insert(
            "plain".into(),
            Arc::new(Namespace {
                metadata: meta(None, "plain", &[(AMBIENT_LABEL, "ambient")]),
                ..Default::default()
            }),
        );
        m.policies.remove("mesh/allow");
        let inc = tr.translate(Arc::new(m.clone()));
        assert_eq!(hashes(&inc), hashes(&translate(&opts, &m)));
        // Pod a (changed, and the policy that went selected it), and all
        // of namespace plain (its label; p also changed): not mesh/out.
        assert_eq!(tr.last_retranslated, 3);
        let mut changed: Vec<_> = tr.last_changed.iter().map(|(_, n)| n.to_string()).collect();
        changed.sort();
        assert_eq!(
            changed,
            [
                "Kubernetes//Pod/mesh/a",
                "Kubernetes//Pod/plain/p",
                "mesh/allow"
            ],
            "plain/in was labelled in already: retranslated, but the same"
        );
        let wl::address::Type::Workload(p) = decode(&inc, "Kubernetes//Pod/plain/p") else {
            panic!()
        };
        assert_eq!(p.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
        let wl::address::Type::Workload(a) = decode(&inc, "Kubernetes//Pod/mesh/a") else {
            panic!()
        };
        assert!(a.authorization_policies.is_empty());
        assert_eq!(a.addresses, vec![vec![10, 0, 0, 9]]);
    }

    /// (type, name) -> hash of every resource.
    fn versions(r: &Resources) -> BTreeMap<(String, String), u64> {
        r.by_type
            .iter()
            .flat_map(|(t, m)| {
                m.values()
                    .map(|x| ((t.to_string(), x.name.to_string()), x.hash))
            })
            .collect()
    }

    #[test]
    fn every_kind_of_change_translates_like_a_fresh_translation() {
        let opts = Options::default();
        let (objs, errs) = crate::manifest::parse_file(WAYPOINT_MANIFEST, "t.yaml").unwrap();
        assert!(errs.is_empty());
        let mut m = model();
        for o in objs {
            m.insert(o);
        }
        let mut tr = Translator::new(opts.clone());
        let mut before = translate(&opts, &m);
        assert_eq!(
            versions(&tr.translate(Arc::new(m.clone()))),
            versions(&before)
        );
        let parse = |text: &str| {
            let (mut o, e) = crate::manifest::parse_file(text, "t.yaml").unwrap();
            assert!(
                e.is_empty(),
                "{:?}",
                e.iter().map(|e| &e.1).collect::<Vec<_>>()
            );
            o.remove(0)
        };
        type Step<'a> = Box<dyn Fn(&mut Model) + 'a>;
        let steps: Vec<Step> = vec![
            // A selecting service changes its selector: pods move.
            Box::new(|m| {
                m.insert(parse("apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: app}\nspec: {clusterIP: 10.96.0.10, selector: {app: plain}, ports: [{port: 81}]}"));
            }),
            // A pod goes; another loses its IP.
            Box::new(|m| {
                m.pods.remove("app/plain-1");
                m.insert(parse("apiVersion: v1\nkind: Pod\nmetadata: {name: echo-1, namespace: app, labels: {app: echo}}\nspec: {nodeName: n, containers: [{name: c}]}"));
            }),
            // The selector-less service's EndpointSlice moves to another pod.
            Box::new(|m| {
                m.insert(parse("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, namespace: mesh, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.2]}]\nports: [{name: http, port: 7070}]"));
            }),
            // A waypoint Gateway goes: its namespace loses the waypoint.
            Box::new(|m| {
                m.gateways.remove("app/wp");
            }),
            // A policy with a selector appears; a service goes.
            Box::new(|m| {
                m.insert(parse("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: app}\nspec: {selector: {matchLabels: {app: echo}}, action: DENY, rules: [{}]}"));
                m.services.remove("mesh/ext");
            }),
            // A new namespace with a pod.
            Box::new(|m| {
                m.insert(parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: new, labels: {istio.io/dataplane-mode: ambient}}"));
                m.insert(parse("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: new}\nspec: {nodeName: n2, serviceAccountName: x, containers: [{name: c}]}\nstatus: {podIP: 10.0.9.9}"));
            }),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(&mut m);
            let fresh = translate(&opts, &m);
            let inc = tr.translate(Arc::new(m.clone()));
            assert_eq!(versions(&inc), versions(&fresh), "step {i}");
            assert_eq!(inc.node_identities, fresh.node_identities, "step {i}");
            let (a, b) = (versions(&before), versions(&fresh));
            let mut want: Vec<_> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, _)| k.1.clone())
                .chain(
                    b.keys()
                        .filter(|k| !a.contains_key(*k))
                        .map(|k| k.1.clone()),
                )
                .collect();
            want.sort();
            let mut got: Vec<_> = tr.last_changed.iter().map(|(_, n)| n.to_string()).collect();
            got.sort();
            assert_eq!(got, want, "step {i}");
            assert!(!got.is_empty(), "step {i} changed nothing: a useless step");
            before = fresh;
        }
    }

    #[test]
    fn invalid_typed_objects_name_the_field() {
        let mut p = pod("mesh", "bad", "300.1.1.1", &[]);
        let e = validate(&mut p).unwrap_err();
        assert_eq!(e.field, "status.podIPs[0].ip");
    }

    const WAYPOINT_MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: app}
spec:
  clusterIP: 10.96.0.20
  selector: {gateway.networking.k8s.io/gateway-name: wp}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: app}
spec:
  clusterIP: 10.96.0.11
  selector: {app: plain}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: n, containers: [{name: c}]}
status: {podIP: 10.0.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: app, labels: {app: echo, istio.io/use-waypoint: wp}}
spec: {nodeName: n, containers: [{name: c}]}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-1, namespace: app, labels: {app: plain}}
spec: {nodeName: n, containers: [{name: c}]}
status: {podIP: 10.0.0.11}
"#;

    /// name -> waypoint of every workload and service in the translation.
    fn waypoints(text: &str) -> BTreeMap<String, Option<wl::GatewayAddress>> {
        let (objs, errs) = crate::manifest::parse_file(text, "test.yaml").unwrap();
        assert!(
            errs.is_empty(),
            "{:?}",
            errs.iter().map(|e| &e.1).collect::<Vec<_>>()
        );
        let r = translate(&Options::default(), &Model::from_objects(objs));
        r.get(mesh_proto::type_url::ADDRESS)
            .unwrap()
            .keys()
            .map(|k| match decode(&r, k) {
                wl::address::Type::Workload(w) => (w.name, w.waypoint),
                wl::address::Type::Service(s) => (format!("svc/{}", s.name), s.waypoint),
            })
            .collect()
    }

    #[test]
    fn hbone_only_to_pods_that_take_it() {
        // The waypoint manifest's pods: wp-1 (the waypoint's), echo-1
        // (labelled in by its namespace, not enrolled); and three more.
        let text = WAYPOINT_MANIFEST.to_string()
            + &[
                ("enrolled", "{}", "{ambient.istio.io/redirection: enabled}"),
                ("other-gw", "{gateway.networking.k8s.io/gateway-name: nope}", "{}"),
                ("native", "{networking.istio.io/tunnel: http}", "{}"),
            ]
            .iter()
            .enumerate()
            .map(|(i, (name, labels, annotations))| {
                format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, labels: {labels}, annotations: {annotations}}}\nspec: {{nodeName: n, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: 10.0.0.{}}}\n",
                    i + 31
                )
            })
            .collect::<String>();
        let (objs, errs) = crate::manifest::parse_file(&text, "test.yaml").unwrap();
        assert!(
            errs.is_empty(),
            "{:?}",
            errs.iter().map(|e| &e.1).collect::<Vec<_>>()
        );
        let r = translate(&Options::default(), &Model::from_objects(objs));
        let hbone = |name: &str| match decode(&r, &format!("Kubernetes//Pod/app/{name}")) {
            wl::address::Type::Workload(w) => w.tunnel_protocol == wl::TunnelProtocol::Hbone as i32,
            _ => panic!("not a workload"),
        };
        assert!(hbone("enrolled"));
        assert!(
            !hbone("echo-1"),
            "its namespace's label alone does not capture it"
        );
        assert!(hbone("wp-1"), "a waypoint's pod terminates HBONE itself");
        assert!(!hbone("other-gw"), "not a waypoint's pod");
        assert!(hbone("native"));
    }

    #[test]
    fn use_waypoint_labels_set_the_waypoint() {
        let want = Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Hostname(
                wl::NamespacedHostname {
                    namespace: "app".into(),
                    hostname: format!("wp.app.svc.{}", Options::default().cluster_domain),
                },
            )),
            hbone_mtls_port: 15008,
        });
        let w = waypoints(WAYPOINT_MANIFEST);
        assert_eq!(w["svc/echo"], want);
        assert_eq!(w["echo-1"], want);
        assert_eq!(w["svc/plain"], None);
        assert_eq!(w["plain-1"], None);
        // The waypoint's own pod and service never get one.
        assert_eq!(w["wp-1"], None);
        assert_eq!(w["svc/wp"], None);

        // Labelling the namespace opts everything in but the waypoint;
        // `none` opts out.
        let ns = WAYPOINT_MANIFEST.replace(
            "labels: {istio.io/dataplane-mode: ambient}",
            "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}",
        );
        let ns = ns.replace(
            "labels: {app: plain}}",
            "labels: {app: plain, istio.io/use-waypoint: none}}",
        );
        let w = waypoints(&ns);
        assert_eq!(w["svc/plain"], want);
        assert_eq!(w["plain-1"], None);
        assert_eq!(w["wp-1"], None);
        assert_eq!(w["svc/wp"], None);

        // A name with no waypoint Gateway gives no waypoint.
        let w = waypoints(&WAYPOINT_MANIFEST.replace(
            "gatewayClassName: istio-waypoint",
            "gatewayClassName: istio",
        ));
        assert_eq!(w["svc/echo"], None);
    }

    #[test]
    fn waypoint_gateway_without_hbone_listener_names_the_field() {
        let bad = WAYPOINT_MANIFEST.replace("protocol: HBONE", "protocol: HTTP");
        let (_, errs) = crate::manifest::parse_file(&bad, "test.yaml").unwrap();
        let e = &errs[0].1;
        assert_eq!(e.field.as_deref(), Some("spec.listeners"));
        assert!(
            e.object.as_deref().unwrap().contains("Gateway app/wp"),
            "{e:?}"
        );
    }
}
