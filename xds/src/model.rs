//! The one in-memory model every source feeds: typed Kubernetes objects,
//! keyed by `namespace/name`.
//!
//! Both sources (the manifest directory and a live cluster) produce these
//! same `k8s-openapi` types, so everything downstream (translation, the
//! xDS server, the CA's node checks) is shared. Istio's
//! `security.istio.io/v1` AuthorizationPolicy is not in `k8s-openapi`; it is
//! typed here ([`AuthorizationPolicy`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// Istio's `security.istio.io/v1` AuthorizationPolicy (the L4-relevant
/// parts; unknown fields are kept out by serde and reported by translation
/// only where they change meaning).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub target_refs: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub action: Option<PolicyAction>,
    #[serde(default)]
    pub provider: Option<serde_json::Value>,
    /// `None`: no rules at all (an ALLOW then denies everything).
    #[serde(default)]
    pub rules: Option<Vec<PolicyRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// Gateway API's `gateway.networking.k8s.io/v1` Gateway, the parts a
/// waypoint declaration uses (`gatewayClassName: istio-waypoint`, a `mesh`
/// listener on 15008 speaking HBONE). Other fields are accepted and
/// ignored: Gateways of other classes are ingress, not ours.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

/// One of a Gateway's `spec.addresses`. Istio reads a `Hostname` address
/// as "this Gateway is deployed by hand, at that Service": it then deploys
/// nothing for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    /// `IPAddress` (Gateway API's default), `Hostname`, or a
    /// domain-prefixed implementation type.
    #[serde(rename = "type", default = "ip_address")]
    pub kind: String,
    #[serde(default)]
    pub value: String,
}

fn ip_address() -> String {
    "IPAddress".into()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    #[serde(default)]
    pub name: String,
    pub port: i32,
    pub protocol: String,
}

/// The Gateway class that declares a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label opting a namespace, service or pod into a waypoint (its value:
/// the Gateway's name, in the same namespace; `none` opts out).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label Istio puts on a waypoint's own pods (value: the Gateway's name).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

impl Gateway {
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    /// Whether it names its own Service (a `Hostname` address), Istio's
    /// convention for a Gateway whose Deployment and Service are installed
    /// by hand (e.g. by the `charts/waypoint` chart) rather than by the
    /// control plane.
    pub fn is_deployed_by_hand(&self) -> bool {
        self.spec.addresses.iter().any(|a| a.kind == "Hostname")
    }
}

/// Gateway API's `gateway.networking.k8s.io/v1` HTTPRoute, mesh style:
/// `parentRefs` name Services, and the route applies to traffic for that
/// Service through its waypoint. Fields the translation does not act on
/// are rejected (`deny_unknown_fields`) rather than silently ignored, so an
/// unsupported feature is reported with its field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i32>,
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<HttpRouteTimeouts>,
    pub retry: Option<HttpRouteRetry>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<RequestRedirect>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeaderModifier {
    pub set: Vec<HeaderValue>,
    pub add: Vec<HeaderValue>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<i32>,
    pub status_code: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
}

/// A backend (a Service and port) with an optional weight, and in a
/// rule's `backendRefs` its own filters (header modifiers), applied only
/// to requests sent to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i32>,
    pub weight: Option<i32>,
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// `spec.rules[].retry`: how often a failed backend request is tried
/// again (`attempts`), on which response codes, after how long.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteRetry {
    pub codes: Vec<i32>,
    pub attempts: Option<i32>,
    pub backoff: Option<String>,
}

/// Everything the control plane knows, as the sources last reported it.
/// Objects are shared (`Arc`), so publishing a new model after one change
/// copies pointers, not objects.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<String, Arc<Pod>>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub endpoint_slices: BTreeMap<String, Arc<EndpointSlice>>,
    pub service_accounts: BTreeMap<String, Arc<ServiceAccount>>,
    pub policies: BTreeMap<String, Arc<AuthorizationPolicy>>,
    pub gateways: BTreeMap<String, Arc<Gateway>>,
    pub http_routes: BTreeMap<String, Arc<HttpRoute>>,
}

/// One object of any kind the model holds.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    ServiceAccount(Arc<ServiceAccount>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    Gateway(Arc<Gateway>),
    HttpRoute(Arc<HttpRoute>),
}

/// `namespace/name` (or just `name` for cluster-scoped objects).
pub fn key_of(meta: &ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
        }
    }

    /// The same object: one `Arc`, or equal contents. Sources keep an
    /// unchanged object's `Arc` across re-reads, so translation can tell
    /// what changed by pointer.
    pub fn same_as(&self, other: &Object) -> bool {
        fn eq<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
            Arc::ptr_eq(a, b) || **a == **b
        }
        match (self, other) {
            (Object::Namespace(a), Object::Namespace(b)) => eq(a, b),
            (Object::Pod(a), Object::Pod(b)) => eq(a, b),
            (Object::Service(a), Object::Service(b)) => eq(a, b),
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => eq(a, b),
            (Object::ServiceAccount(a), Object::ServiceAccount(b)) => eq(a, b),
            (Object::AuthorizationPolicy(a), Object::AuthorizationPolicy(b)) => eq(a, b),
            (Object::Gateway(a), Object::Gateway(b)) => eq(a, b),
            (Object::HttpRoute(a), Object::HttpRoute(b)) => eq(a, b),
            _ => false,
        }
    }

    /// `Kind/namespace/name`: unique across kinds.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind(), key_of(self.meta()))
    }
}

impl Model {
    pub fn insert(&mut self, o: Object) {
        let key = key_of(o.meta());
        match o {
            Object::Namespace(o) => {
                self.namespaces.insert(key, o);
            }
            Object::Pod(o) => {
                self.pods.insert(key, o);
            }
            Object::Service(o) => {
                self.services.insert(key, o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(key, o);
            }
            Object::ServiceAccount(o) => {
                self.service_accounts.insert(key, o);
            }
            Object::AuthorizationPolicy(o) => {
                self.policies.insert(key, o);
            }
            Object::Gateway(o) => {
                self.gateways.insert(key, o);
            }
            Object::HttpRoute(o) => {
                self.http_routes.insert(key, o);
            }
        }
    }

    /// Removes the object of `o`'s kind and key, if there is one.
    pub fn remove(&mut self, o: &Object) {
        let key = key_of(o.meta());
        match o {
            Object::Namespace(_) => drop(self.namespaces.remove(&key)),
            Object::Pod(_) => drop(self.pods.remove(&key)),
            Object::Service(_) => drop(self.services.remove(&key)),
            Object::EndpointSlice(_) => drop(self.endpoint_slices.remove(&key)),
            Object::ServiceAccount(_) => drop(self.service_accounts.remove(&key)),
            Object::AuthorizationPolicy(_) => drop(self.policies.remove(&key)),
            Object::Gateway(_) => drop(self.gateways.remove(&key)),
            Object::HttpRoute(_) => drop(self.http_routes.remove(&key)),
        }
    }

    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Model {
        let mut m = Model::default();
        for o in objects {
            m.insert(o);
        }
        m
    }
}
