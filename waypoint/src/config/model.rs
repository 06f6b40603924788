//! The configuration as it is written: plain data mirroring Envoy's v3
//! resources (`Listener`, `RouteConfiguration`, `Cluster`), field names in
//! Envoy's snake_case, so an xDS client can fill it in one-to-one.
//!
//! Nothing here is checked beyond its shape; [`super::validate`] turns it
//! into the runtime form or says what is wrong and where.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One complete configuration: what LDS, RDS and CDS/EDS would deliver.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub route_configurations: Vec<RouteConfiguration>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
}

/// `envoy.config.listener.v3.Listener`: the waypoint has one (HBONE on
/// 15008); each filter chain handles the CONNECT streams whose original
/// destination it matches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    #[serde(default)]
    pub filter_chains: Vec<FilterChain>,
    #[serde(default)]
    pub default_filter_chain: Option<FilterChain>,
}

/// `FilterChain` with its network filter inlined: exactly one of
/// `http_connection_manager` and `tcp_proxy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterChain {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub filter_chain_match: FilterChainMatch,
    #[serde(default)]
    pub http_connection_manager: Option<HttpConnectionManager>,
    #[serde(default)]
    pub tcp_proxy: Option<TcpProxy>,
}

/// Matches the original destination (the CONNECT authority).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterChainMatch {
    #[serde(default)]
    pub destination_port: Option<u16>,
    /// CIDRs, e.g. `10.96.0.10/32`; empty matches any address.
    #[serde(default)]
    pub prefix_ranges: Vec<String>,
    /// What the first bytes were sniffed as (Envoy's http_inspector):
    /// `http/1.1`, `h2c`. Empty matches anything, including non-HTTP.
    #[serde(default)]
    pub application_protocols: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CodecType {
    /// Sniff: HTTP/2 by its connection preface, HTTP/1.1 otherwise.
    #[default]
    Auto,
    Http1,
    Http2,
}

/// `envoy.extensions.filters.network.http_connection_manager.v3`, with the
/// RBAC http filters it would carry inlined.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConnectionManager {
    #[serde(default)]
    pub stat_prefix: String,
    #[serde(default)]
    pub codec_type: CodecType,
    /// `rds.route_config_name`.
    pub route_config_name: String,
    /// Larger request headers get 431. Envoy's default is 60.
    #[serde(default)]
    pub max_request_headers_kb: Option<u32>,
    /// RBAC filters in order (Istio emits a DENY one, then an ALLOW one).
    #[serde(default)]
    pub rbac: Vec<Rbac>,
    /// RFC 3986 normalization of request paths before policy and routing
    /// (`waypoint::path`). Off unless set, as in Envoy; Istio sets it.
    #[serde(default)]
    pub normalize_path: bool,
    #[serde(default)]
    pub merge_slashes: bool,
    /// What `%2F` and `%5C` in a path do.
    #[serde(default)]
    pub path_with_escaped_slashes_action: EscapedSlashesAction,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EscapedSlashesAction {
    #[default]
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy` with its
/// network RBAC filters: opaque bytes, L4 policy only.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    #[serde(default)]
    pub stat_prefix: String,
    pub cluster: String,
    #[serde(default)]
    pub rbac: Vec<Rbac>,
}

/// `envoy.config.route.v3.RouteConfiguration`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfiguration {
    pub name: String,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    /// `*`, `*.suffix`, `prefix.*` or exact hosts (port ignored).
    pub domains: Vec<String>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// A route: a match and exactly one of `route`, `redirect`,
/// `direct_response`. Routes are tried in order; the first match wins.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match")]
    pub route_match: RouteMatch,
    #[serde(default)]
    pub route: Option<RouteAction>,
    #[serde(default)]
    pub redirect: Option<RedirectAction>,
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    /// The fault filter's per-route config
    /// (`typed_per_filter_config["envoy.filters.http.fault"]`).
    #[serde(default)]
    pub fault: Option<HttpFault>,
}

/// Exactly one of `prefix`, `path`, `safe_regex`; the method is matched as
/// the `:method` header, as Envoy does.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub safe_regex: Option<RegexMatcher>,
    #[serde(default)]
    pub headers: Vec<HeaderMatcher>,
    #[serde(default)]
    pub query_parameters: Vec<QueryParameterMatcher>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexMatcher {
    pub regex: String,
}

/// `envoy.type.matcher.v3.StringMatcher`: exactly one of the kinds.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StringMatcher {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub safe_regex: Option<RegexMatcher>,
    #[serde(default)]
    pub ignore_case: bool,
}

/// `envoy.config.route.v3.HeaderMatcher`: `string_match`, or
/// `present_match`; `invert_match` negates.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatcher {
    pub name: String,
    #[serde(default)]
    pub string_match: Option<StringMatcher>,
    #[serde(default)]
    pub present_match: Option<bool>,
    #[serde(default)]
    pub invert_match: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueryParameterMatcher {
    pub name: String,
    #[serde(default)]
    pub string_match: Option<StringMatcher>,
    #[serde(default)]
    pub present_match: Option<bool>,
}

/// `envoy.config.route.v3.RouteAction`: one of `cluster`,
/// `weighted_clusters`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub weighted_clusters: Option<WeightedClusters>,
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    #[serde(default)]
    pub regex_rewrite: Option<RegexMatchAndSubstitute>,
    #[serde(default)]
    pub host_rewrite_literal: Option<String>,
    /// Whole-request timeout ("1.5s", "250ms"); expiry gives 504. Envoy's
    /// default is 15s; `0s` disables.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
    #[serde(default)]
    pub request_mirror_policies: Vec<RequestMirrorPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusters {
    pub clusters: Vec<ClusterWeight>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterWeight {
    pub name: String,
    pub weight: u32,
    /// Header changes for requests sent to this cluster (and its
    /// responses), made before the route's own (Envoy's order: the most
    /// specific first, so the route's win).
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
}

/// Path rewrite by regex (`full path` rewrites use `^/.*$`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexMatchAndSubstitute {
    pub pattern: RegexMatcher,
    pub substitution: String,
}

/// `envoy.config.route.v3.RetryPolicy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Comma-separated: `5xx`, `gateway-error`, `connect-failure`, `reset`,
    /// `retriable-status-codes`.
    pub retry_on: String,
    /// Defaults to 1, as in Envoy.
    #[serde(default)]
    pub num_retries: Option<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default)]
    pub retry_back_off: Option<RetryBackOff>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBackOff {
    pub base_interval: String,
    #[serde(default)]
    pub max_interval: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestMirrorPolicy {
    pub cluster: String,
    #[serde(default)]
    pub runtime_fraction: Option<RuntimeFractionalPercent>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFractionalPercent {
    pub default_value: FractionalPercent,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Denominator {
    #[default]
    Hundred,
    TenThousand,
    Million,
}

/// `envoy.type.v3.FractionalPercent`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FractionalPercent {
    pub numerator: u32,
    #[serde(default)]
    pub denominator: Denominator,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RedirectResponseCode {
    #[default]
    MovedPermanently,
    Found,
    SeeOther,
    TemporaryRedirect,
    PermanentRedirect,
}

/// `envoy.config.route.v3.RedirectAction`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectAction {
    #[serde(default)]
    pub scheme_redirect: Option<String>,
    #[serde(default)]
    pub host_redirect: Option<String>,
    #[serde(default)]
    pub port_redirect: Option<u16>,
    #[serde(default)]
    pub path_redirect: Option<String>,
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    #[serde(default)]
    pub response_code: RedirectResponseCode,
    #[serde(default)]
    pub strip_query: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    #[default]
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub key: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueOption {
    pub header: HeaderValue,
    #[serde(default)]
    pub append_action: AppendAction,
}

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpFault {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay: String,
    pub percentage: FractionalPercent,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: u16,
    pub percentage: FractionalPercent,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RbacAction {
    #[default]
    Allow,
    Deny,
}

/// `envoy.config.rbac.v3.RBAC`: a request matches when any policy matches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rbac {
    pub action: RbacAction,
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
}

/// A policy matches when any permission and any principal match (an empty
/// list matches everything).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub principals: Vec<Principal>,
}

/// What is asked for. Every non-empty field must match (any entry of it,
/// but every entry of `headers`); the `not_*` fields must not.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<StringMatcher>,
    #[serde(default)]
    pub not_paths: Vec<StringMatcher>,
    #[serde(default)]
    pub headers: Vec<HeaderMatcher>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
}

/// Who asks: principals in Istio's forms (exact, `prefix*`, `*suffix`,
/// `*`; `spiffe://` optional) and namespaces.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UpstreamProtocol {
    /// The protocol the request came in with.
    #[default]
    UseDownstream,
    Http1,
    Http2,
}

/// `envoy.config.cluster.v3.Cluster` with its `ClusterLoadAssignment`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Envoy's `http_protocol_options` choice, flattened.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub load_assignment: ClusterLoadAssignment,
}

/// `envoy.config.cluster.v3.OutlierDetection`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses or connect failures before ejection (5).
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    /// First ejection lasts this long ("30s"), then 2x, 3x, ...
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// At most this share of endpoints is ejected at once (10).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterLoadAssignment {
    #[serde(default)]
    pub endpoints: Vec<LocalityLbEndpoints>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalityLbEndpoints {
    #[serde(default)]
    pub lb_endpoints: Vec<LbEndpoint>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LbEndpoint {
    pub endpoint: Endpoint,
    /// Istio's `istio` filter metadata, flattened: who the endpoint is.
    #[serde(default)]
    pub metadata: EndpointMetadata,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: Address,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub socket_address: SocketAddress,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketAddress {
    pub address: String,
    pub port_value: u16,
}

/// With `identity` set the endpoint is in the mesh and reached over HBONE
/// at `<address>:<hbone_port>` (15008), accepting only that SPIFFE identity;
/// without it, plain TCP.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointMetadata {
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub hbone_port: Option<u16>,
    /// Istio's `name;namespace;canonical service;canonical revision;cluster`,
    /// or a bare name with `namespace` beside it.
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}
