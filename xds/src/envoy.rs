//! Waypoint configuration: each waypoint Gateway's Services and the
//! HTTPRoutes attached to them, as the Envoy v3 resources the waypoint
//! consumes (see waypoint/README.md, "Configuration over xDS").
//!
//! Per waypoint Gateway `ns/gw`:
//! - Listener `ns/gw`: one filter chain per port of each Service using the
//!   waypoint (`istio.io/use-waypoint`), matched by destination port and
//!   ClusterIP, with an HTTP connection manager naming its routes over RDS.
//! - RouteConfiguration `ns/svc:port` (the filter chain's name): one route
//!   per HTTPRoute rule and match, in order; without an HTTPRoute, one
//!   route sending everything to the Service itself.
//! - Cluster `outbound|port||host` (EDS) for every Service a route sends
//!   to, and its ClusterLoadAssignment: the selected pods' IPs and target
//!   ports, with `filter_metadata["istio"]` carrying the workload and, for
//!   pods in the mesh (reached over HBONE), `identity` and `hbone_port`.
//!
//! Resources of all waypoints are served to every client subscribing to
//! the Envoy types; names are unique per waypoint and Service.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_proto::envoy::config::cluster::v3 as pc;
use mesh_proto::envoy::config::core::v3 as core;
use mesh_proto::envoy::config::endpoint::v3 as pe;
use mesh_proto::envoy::config::listener::v3 as pl;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use mesh_proto::envoy::r#type::matcher::v3 as pm;
use mesh_proto::type_url;
use prost::Message;

use crate::model::{
    BackendRef, HttpRoute, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, Model, PathModifier,
    ValueMatch, USE_WAYPOINT_LABEL,
};
use crate::translate::{
    hostname, in_mesh, pod_identity, resolve_target_port, resource, Options, Resource,
};

type Named = BTreeMap<Arc<str>, Arc<Resource>>;

/// `(field, message)` of the first problem in an HTTPRoute.
pub type RouteError = (String, String);

fn bad<T>(field: impl Into<String>, msg: impl Into<String>) -> Result<T, RouteError> {
    Err((field.into(), msg.into()))
}

/// A Gateway API duration (`1h`, `10s`, `500ms`, `1m30s`) in nanoseconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1_000_000, 2)
        } else if rest.starts_with('h') {
            (3_600_000_000_000, 1)
        } else if rest.starts_with('m') {
            (60_000_000_000, 1)
        } else if rest.starts_with('s') {
            (1_000_000_000, 1)
        } else {
            return None;
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

fn check_backend(field: &str, b: &BackendRef) -> Result<(), RouteError> {
    if !matches!(b.group.as_deref(), None | Some("") | Some("core")) {
        return bad(format!("{field}.group"), "only core Services are supported");
    }
    if !matches!(b.kind.as_deref(), None | Some("Service")) {
        return bad(
            format!("{field}.kind"),
            "only Service backends are supported",
        );
    }
    if b.name.is_empty() {
        return bad(format!("{field}.name"), "missing");
    }
    match b.port {
        Some(1..=65535) => {}
        Some(p) => return bad(format!("{field}.port"), format!("{p} is not a port")),
        None => return bad(format!("{field}.port"), "required for a Service"),
    }
    if b.weight.is_some_and(|w| !(0..=1_000_000).contains(&w)) {
        return bad(format!("{field}.weight"), "must be 0 to 1000000");
    }
    Ok(())
}

fn check_path_modifier(field: &str, p: &PathModifier) -> Result<(), RouteError> {
    match p.type_.as_str() {
        "ReplaceFullPath" if p.replace_full_path.is_some() => Ok(()),
        "ReplacePrefixMatch" if p.replace_prefix_match.is_some() => Ok(()),
        "ReplaceFullPath" | "ReplacePrefixMatch" => {
            bad(field, format!("{} needs its value", p.type_))
        }
        t => bad(format!("{field}.type"), format!("unknown type {t:?}")),
    }
}

fn check_value_match(field: &str, v: &ValueMatch) -> Result<(), RouteError> {
    if v.name.is_empty() {
        return bad(format!("{field}.name"), "missing");
    }
    match v.type_.as_deref() {
        None | Some("Exact" | "RegularExpression") => Ok(()),
        Some(t) => bad(format!("{field}.type"), format!("unknown type {t:?}")),
    }
}

/// Checks what translation relies on; the field path names the problem.
pub fn validate_route(r: &HttpRoute) -> Result<(), RouteError> {
    if r.spec.parent_refs.is_empty() {
        return bad("spec.parentRefs", "at least one parent is required");
    }
    for (i, p) in r.spec.parent_refs.iter().enumerate() {
        let f = format!("spec.parentRefs[{i}]");
        if !matches!(p.group.as_deref(), None | Some("") | Some("core"))
            || p.kind.as_deref() != Some("Service")
        {
            return bad(
                format!("{f}.kind"),
                "only Service parents (mesh routes) are supported",
            );
        }
        if p.name.is_empty() {
            return bad(format!("{f}.name"), "missing");
        }
        if p.port.is_some_and(|p| !(1..=65535).contains(&p)) {
            return bad(format!("{f}.port"), "not a port");
        }
    }
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let mf = format!("{f}.matches[{j}]");
            if let Some(p) = &m.path {
                match p.type_.as_deref() {
                    None | Some("Exact" | "PathPrefix" | "RegularExpression") => {}
                    Some(t) => {
                        return bad(format!("{mf}.path.type"), format!("unknown type {t:?}"))
                    }
                }
                if p.value.as_deref().is_some_and(|v| v.is_empty())
                    || (p.type_.as_deref() != Some("RegularExpression")
                        && p.value.as_deref().is_some_and(|v| !v.starts_with('/')))
                {
                    return bad(format!("{mf}.path.value"), "must start with /");
                }
            }
            for (k, h) in m.headers.iter().enumerate() {
                check_value_match(&format!("{mf}.headers[{k}]"), h)?;
            }
            for (k, q) in m.query_params.iter().enumerate() {
                check_value_match(&format!("{mf}.queryParams[{k}]"), q)?;
            }
        }
        let mut redirect = false;
        for (j, flt) in rule.filters.iter().enumerate() {
            let ff = format!("{f}.filters[{j}]");
            let present = match flt.type_.as_str() {
                "RequestHeaderModifier" => flt.request_header_modifier.is_some(),
                "ResponseHeaderModifier" => flt.response_header_modifier.is_some(),
                "RequestRedirect" => {
                    redirect = true;
                    if let Some(rr) = &flt.request_redirect {
                        if let Some(p) = &rr.path {
                            check_path_modifier(&format!("{ff}.requestRedirect.path"), p)?;
                        }
                        if let Some(c) = rr.status_code {
                            if ![301, 302, 303, 307, 308].contains(&c) {
                                return bad(
                                    format!("{ff}.requestRedirect.statusCode"),
                                    format!("{c} is not a redirect status"),
                                );
                            }
                        }
                        if rr.port.is_some_and(|p| !(1..=65535).contains(&p)) {
                            return bad(format!("{ff}.requestRedirect.port"), "not a port");
                        }
                    }
                    flt.request_redirect.is_some()
                }
                "URLRewrite" => {
                    if let Some(p) = flt.url_rewrite.as_ref().and_then(|u| u.path.as_ref()) {
                        check_path_modifier(&format!("{ff}.urlRewrite.path"), p)?;
                    }
                    flt.url_rewrite.is_some()
                }
                "RequestMirror" => {
                    if let Some(m) = &flt.request_mirror {
                        check_backend(&format!("{ff}.requestMirror.backendRef"), &m.backend_ref)?;
                    }
                    flt.request_mirror.is_some()
                }
                t => return bad(format!("{ff}.type"), format!("unsupported filter {t:?}")),
            };
            if !present {
                return bad(ff, format!("type {} needs its configuration", flt.type_));
            }
        }
        if redirect && !rule.backend_refs.is_empty() {
            return bad(
                format!("{f}.backendRefs"),
                "a RequestRedirect rule cannot also have backends",
            );
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            check_backend(&format!("{f}.backendRefs[{j}]"), b)?;
        }
        if let Some(t) = &rule.timeouts {
            for (name, v) in [
                ("request", &t.request),
                ("backendRequest", &t.backend_request),
            ] {
                if let Some(v) = v {
                    if parse_duration(v).is_none() {
                        return bad(
                            format!("{f}.timeouts.{name}"),
                            format!("{v:?} is not a duration (e.g. 10s, 500ms)"),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Istio's cluster name for a Service port.
pub fn cluster_name(host: &str, port: i32) -> String {
    format!("outbound|{port}||{host}")
}

fn any<M: Message>(t: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: t.to_string(),
        value: m.encode_to_vec(),
    }
}

fn duration(nanos: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

fn string_value(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_string())),
    }
}

/// The waypoint a Service uses: its own label, else its namespace's.
fn service_waypoint<'a>(model: &'a Model, s: &'a Service) -> Option<&'a str> {
    let ns = s.metadata.namespace.as_deref().unwrap_or("default");
    s.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(USE_WAYPOINT_LABEL))
        .or_else(|| {
            model
                .namespaces
                .get(ns)
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(USE_WAYPOINT_LABEL))
        })
        .map(String::as_str)
        .filter(|v| *v != "none")
}

fn exact_or_regex(v: &ValueMatch) -> pm::StringMatcher {
    use pm::string_matcher::MatchPattern;
    pm::StringMatcher {
        match_pattern: Some(match v.type_.as_deref() {
            Some("RegularExpression") => MatchPattern::SafeRegex(pm::RegexMatcher {
                regex: v.value.clone(),
            }),
            _ => MatchPattern::Exact(v.value.clone()),
        }),
        ignore_case: false,
    }
}

fn route_match(m: &HttpRouteMatch) -> pr::RouteMatch {
    use pr::route_match::PathSpecifier;
    let (t, v) = m
        .path
        .as_ref()
        .map(|p| (p.type_.as_deref(), p.value.as_deref()))
        .unwrap_or((None, None));
    let v = v.unwrap_or("/").to_string();
    let path_specifier = match t {
        Some("Exact") => PathSpecifier::Path(v),
        Some("RegularExpression") => PathSpecifier::SafeRegex(pm::RegexMatcher { regex: v }),
        _ => PathSpecifier::Prefix(v),
    };
    let mut headers: Vec<pr::HeaderMatcher> = m
        .headers
        .iter()
        .map(|h| pr::HeaderMatcher {
            name: h.name.to_ascii_lowercase(),
            header_match_specifier: Some(pr::header_matcher::HeaderMatchSpecifier::StringMatch(
                exact_or_regex(h),
            )),
            invert_match: false,
        })
        .collect();
    if let Some(method) = &m.method {
        headers.push(pr::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(pr::header_matcher::HeaderMatchSpecifier::ExactMatch(
                method.clone(),
            )),
            invert_match: false,
        });
    }
    pr::RouteMatch {
        path_specifier: Some(path_specifier),
        case_sensitive: None,
        headers,
        query_parameters: m
            .query_params
            .iter()
            .map(|q| pr::QueryParameterMatcher {
                name: q.name.clone(),
                query_parameter_match_specifier: Some(
                    pr::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        exact_or_regex(q),
                    ),
                ),
            })
            .collect(),
    }
}

fn header_options(m: &crate::model::HeaderModifier) -> Vec<core::HeaderValueOption> {
    use core::header_value_option::HeaderAppendAction as A;
    let opt = |h: &crate::model::HeaderValue, a: A| core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: h.name.to_ascii_lowercase(),
            value: h.value.clone(),
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: a as i32,
    };
    m.set
        .iter()
        .map(|h| opt(h, A::OverwriteIfExistsOrAdd))
        .chain(m.add.iter().map(|h| opt(h, A::AppendIfExistsOrAdd)))
        .collect()
}

/// Builds the waypoint's resources; `clusters` collects the Services
/// (namespace, name, port) routes send to.
struct Builder<'a> {
    opts: &'a Options,
    model: &'a Model,
    clusters: BTreeMap<String, (&'a Service, i32)>,
}

impl<'a> Builder<'a> {
    /// The cluster for a backend in `ns`, if that Service exists.
    fn backend(&mut self, ns: &str, b: &BackendRef, default_port: i32) -> Option<String> {
        let bns = b.namespace.as_deref().unwrap_or(ns);
        let s = self.model.services.get(&format!("{bns}/{}", b.name))?;
        let port = b.port.unwrap_or(default_port);
        let name = cluster_name(&hostname(self.opts, s), port);
        self.clusters.insert(name.clone(), (s, port));
        Some(name)
    }

    fn rule_routes(
        &mut self,
        route: &HttpRoute,
        i: usize,
        rule: &HttpRouteRule,
        port: i32,
    ) -> Vec<pr::Route> {
        let ns = route.metadata.namespace.as_deref().unwrap_or("default");
        let rname = route.metadata.name.as_deref().unwrap_or_default();
        let mut action = pr::RouteAction::default();
        let mut redirect = None;
        let mut req_add = Vec::new();
        let mut req_remove = Vec::new();
        let mut resp_add = Vec::new();
        let mut resp_remove = Vec::new();
        for f in &rule.filters {
            self.filter(ns, f, port, &mut action, &mut redirect);
            if let Some(m) = &f.request_header_modifier {
                req_add.extend(header_options(m));
                req_remove.extend(m.remove.iter().map(|h| h.to_ascii_lowercase()));
            }
            if let Some(m) = &f.response_header_modifier {
                resp_add.extend(header_options(m));
                resp_remove.extend(m.remove.iter().map(|h| h.to_ascii_lowercase()));
            }
        }
        if let Some(t) = rule
            .timeouts
            .as_ref()
            .and_then(|t| t.request.as_deref())
            .and_then(parse_duration)
        {
            action.timeout = Some(duration(t));
        }
        // Backends that exist, with their weights (default 1; 0 drops one).
        let mut weighted = Vec::new();
        for b in &rule.backend_refs {
            let w = b.weight.unwrap_or(1).max(0) as u32;
            if let Some(c) = self.backend(ns, b, port) {
                if w > 0 {
                    weighted.push((c, w));
                }
            }
        }
        let act = if let Some(r) = redirect {
            pr::route::Action::Redirect(r)
        } else if weighted.is_empty() {
            // No usable backend: Gateway API answers 500.
            pr::route::Action::DirectResponse(pr::DirectResponseAction {
                status: 500,
                body: None,
            })
        } else {
            use pr::route_action::ClusterSpecifier;
            action.cluster_specifier = Some(if weighted.len() == 1 {
                ClusterSpecifier::Cluster(weighted.remove(0).0)
            } else {
                ClusterSpecifier::WeightedClusters(pr::WeightedCluster {
                    clusters: weighted
                        .into_iter()
                        .map(|(name, w)| pr::weighted_cluster::ClusterWeight {
                            name,
                            weight: Some(w),
                        })
                        .collect(),
                })
            });
            pr::route::Action::Route(action)
        };
        let default_match = [HttpRouteMatch::default()];
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            &rule.matches[..]
        };
        matches
            .iter()
            .enumerate()
            .map(|(j, m)| pr::Route {
                name: format!("{ns}/{rname}.{i}.{j}"),
                r#match: Some(route_match(m)),
                action: Some(act.clone()),
                request_headers_to_add: req_add.clone(),
                request_headers_to_remove: req_remove.clone(),
                response_headers_to_add: resp_add.clone(),
                response_headers_to_remove: resp_remove.clone(),
                typed_per_filter_config: Default::default(),
            })
            .collect()
    }

    fn filter(
        &mut self,
        ns: &str,
        f: &HttpRouteFilter,
        port: i32,
        action: &mut pr::RouteAction,
        redirect: &mut Option<pr::RedirectAction>,
    ) {
        if let Some(rr) = &f.request_redirect {
            use pr::redirect_action::{PathRewriteSpecifier, RedirectResponseCode as C};
            let code = match rr.status_code {
                Some(301) => C::MovedPermanently,
                Some(303) => C::SeeOther,
                Some(307) => C::TemporaryRedirect,
                Some(308) => C::PermanentRedirect,
                _ => C::Found,
            };
            *redirect = Some(pr::RedirectAction {
                scheme_rewrite_specifier: rr
                    .scheme
                    .clone()
                    .map(pr::redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
                host_redirect: rr.hostname.clone().unwrap_or_default(),
                port_redirect: rr.port.unwrap_or(0) as u32,
                path_rewrite_specifier: rr.path.as_ref().and_then(|p| match p.type_.as_str() {
                    "ReplaceFullPath" => p
                        .replace_full_path
                        .clone()
                        .map(PathRewriteSpecifier::PathRedirect),
                    _ => p
                        .replace_prefix_match
                        .clone()
                        .map(PathRewriteSpecifier::PrefixRewrite),
                }),
                response_code: code as i32,
                strip_query: false,
            });
        }
        if let Some(u) = &f.url_rewrite {
            if let Some(h) = &u.hostname {
                action.host_rewrite_specifier = Some(
                    pr::route_action::HostRewriteSpecifier::HostRewriteLiteral(h.clone()),
                );
            }
            if let Some(p) = &u.path {
                match p.type_.as_str() {
                    "ReplaceFullPath" => {
                        action.regex_rewrite = Some(pm::RegexMatchAndSubstitute {
                            pattern: Some(pm::RegexMatcher {
                                regex: "^/.*$".into(),
                            }),
                            substitution: p.replace_full_path.clone().unwrap_or_default(),
                        })
                    }
                    _ => action.prefix_rewrite = p.replace_prefix_match.clone().unwrap_or_default(),
                }
            }
        }
        if let Some(m) = &f.request_mirror {
            if let Some(c) = self.backend(ns, &m.backend_ref, port) {
                action
                    .request_mirror_policies
                    .push(pr::route_action::RequestMirrorPolicy {
                        cluster: c,
                        runtime_fraction: None,
                    });
            }
        }
    }

    /// The routes for one Service port: its HTTPRoutes' rules, or one
    /// route to the Service itself.
    fn routes(&mut self, svc: &'a Service, port: i32) -> Vec<pr::Route> {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let mut out = Vec::new();
        for r in self.model.http_routes.values() {
            let rns = r.metadata.namespace.as_deref().unwrap_or("default");
            let attached = r.spec.parent_refs.iter().any(|p| {
                p.kind.as_deref() == Some("Service")
                    && p.name == name
                    && p.namespace.as_deref().unwrap_or(rns) == ns
                    && p.port.is_none_or(|pp| pp == port)
            });
            if !attached {
                continue;
            }
            let created = r
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second());
            for (i, rule) in r.spec.rules.iter().enumerate() {
                out.extend(
                    self.rule_routes(r, i, rule, port)
                        .into_iter()
                        .map(|rt| (precedence(&rt), created.is_none(), created, rt)),
                );
            }
        }
        // Gateway API precedence; ties keep the oldest route, then
        // namespace/name order (the model's), then rule order: a stable sort.
        out.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
        let mut out: Vec<pr::Route> = out.into_iter().map(|x| x.3).collect();
        if out.is_empty() {
            let c = cluster_name(&hostname(self.opts, svc), port);
            self.clusters.insert(c.clone(), (svc, port));
            out.push(pr::Route {
                name: "default".into(),
                r#match: Some(route_match(&HttpRouteMatch::default())),
                action: Some(pr::route::Action::Route(pr::RouteAction {
                    cluster_specifier: Some(pr::route_action::ClusterSpecifier::Cluster(c)),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
        out
    }

    fn endpoints(&self, name: &str, svc: &Service, port: i32) -> pe::ClusterLoadAssignment {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let spec = svc.spec.clone().unwrap_or_default();
        let selector = spec.selector.clone().unwrap_or_default();
        let target = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.port == port)
            .and_then(|p| p.target_port.clone());
        let mut lb_endpoints = Vec::new();
        if !selector.is_empty() {
            for p in self.model.pods.values() {
                if p.metadata.namespace.as_deref() != Some(ns) || !selects(&selector, p) {
                    continue;
                }
                let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                    continue;
                };
                let tp = resolve_target_port(p, port, target.as_ref());
                if tp == 0 {
                    continue;
                }
                let mut fields = BTreeMap::new();
                fields.insert(
                    "workload".into(),
                    string_value(p.metadata.name.as_deref().unwrap_or_default()),
                );
                fields.insert("namespace".into(), string_value(ns));
                // An identity means "in the mesh, reach over HBONE" to the
                // waypoint; pods outside the mesh are plain TCP.
                if in_mesh(self.model, p) {
                    fields.insert("identity".into(), string_value(&pod_identity(self.opts, p)));
                    fields.insert(
                        "hbone_port".into(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(15008.0)),
                        },
                    );
                }
                lb_endpoints.push(pe::LbEndpoint {
                    host_identifier: Some(pe::lb_endpoint::HostIdentifier::Endpoint(
                        pe::Endpoint {
                            address: Some(core::Address {
                                socket_address: Some(core::SocketAddress {
                                    address: ip,
                                    port_value: tp,
                                }),
                            }),
                        },
                    )),
                    metadata: Some(core::Metadata {
                        filter_metadata: [("istio".to_string(), prost_types::Struct { fields })]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    }),
                });
            }
        }
        pe::ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![pe::LocalityLbEndpoints { lb_endpoints }],
        }
    }
}

/// Sort key of a route by Gateway API match precedence: exact paths, then
/// longer prefixes, then regular expressions; then a method match; then
/// more header matches; then more query parameter matches.
fn precedence(
    r: &pr::Route,
) -> (
    u8,
    std::cmp::Reverse<usize>,
    bool,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
) {
    use pr::route_match::PathSpecifier;
    use std::cmp::Reverse;
    let m = r.r#match.clone().unwrap_or_default();
    let (kind, len) = match &m.path_specifier {
        Some(PathSpecifier::Path(_)) => (0, 0),
        Some(PathSpecifier::Prefix(p)) => (1, p.len()),
        _ => (2, 0),
    };
    let method = m.headers.iter().any(|h| h.name == ":method");
    let headers = m.headers.iter().filter(|h| h.name != ":method").count();
    (
        kind,
        Reverse(len),
        !method,
        Reverse(headers),
        Reverse(m.query_parameters.len()),
    )
}

fn selects(selector: &BTreeMap<String, String>, p: &Pod) -> bool {
    let labels = p.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Listeners, route configurations, clusters and endpoints of every
/// waypoint in the model, by type URL.
pub fn translate(opts: &Options, model: &Model) -> Vec<(&'static str, Named)> {
    let mut b = Builder {
        opts,
        model,
        clusters: BTreeMap::new(),
    };
    let mut listeners = Named::new();
    let mut routes = Named::new();
    for g in model.gateways.values().filter(|g| g.is_waypoint()) {
        let gns = g.metadata.namespace.as_deref().unwrap_or("default");
        let gname = g.metadata.name.as_deref().unwrap_or_default();
        let mut chains = Vec::new();
        for s in model.services.values() {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            if ns != gns || service_waypoint(model, s) != Some(gname) {
                continue;
            }
            let Some(spec) = &s.spec else { continue };
            let Some(ip) = spec
                .cluster_ip
                .as_deref()
                .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            else {
                continue;
            };
            let host = hostname(opts, s);
            for p in spec.ports.iter().flatten() {
                let chain = format!(
                    "{ns}/{}:{}",
                    s.metadata.name.as_deref().unwrap_or_default(),
                    p.port
                );
                let rc = pr::RouteConfiguration {
                    name: chain.clone(),
                    virtual_hosts: vec![pr::VirtualHost {
                        name: format!("{host}:{}", p.port),
                        domains: vec!["*".into()],
                        routes: b.routes(s, p.port),
                    }],
                };
                routes.insert(
                    chain.as_str().into(),
                    resource(type_url::ROUTE_CONFIGURATION, chain.clone(), &rc),
                );
                let h = hcm::HttpConnectionManager {
                    stat_prefix: chain.clone(),
                    route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                        hcm::Rds {
                            route_config_name: chain.clone(),
                        },
                    )),
                    ..Default::default()
                };
                let prefix_len = if ip.contains(':') { 128 } else { 32 };
                chains.push(pl::FilterChain {
                    name: chain,
                    filter_chain_match: Some(pl::FilterChainMatch {
                        destination_port: Some(p.port as u32),
                        prefix_ranges: vec![core::CidrRange {
                            address_prefix: ip.to_string(),
                            prefix_len: Some(prefix_len),
                        }],
                        ..Default::default()
                    }),
                    filters: vec![pl::Filter {
                        name: "envoy.filters.network.http_connection_manager".into(),
                        config_type: Some(pl::filter::ConfigType::TypedConfig(any(
                            type_url::HTTP_CONNECTION_MANAGER,
                            &h,
                        ))),
                    }],
                });
            }
        }
        let name = format!("{gns}/{gname}");
        let l = pl::Listener {
            name: name.clone(),
            filter_chains: chains,
            ..Default::default()
        };
        listeners.insert(name.as_str().into(), resource(type_url::LISTENER, name, &l));
    }
    let mut clusters = Named::new();
    let mut cla = Named::new();
    for (name, (svc, port)) in &b.clusters {
        let c = pc::Cluster {
            name: name.clone(),
            cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
                pc::cluster::DiscoveryType::Eds as i32,
            )),
            connect_timeout: Some(duration(10_000_000_000)),
            ..Default::default()
        };
        clusters.insert(
            name.as_str().into(),
            resource(type_url::CLUSTER, name.clone(), &c),
        );
        let e = b.endpoints(name, svc, *port);
        cla.insert(
            name.as_str().into(),
            resource(type_url::CLUSTER_LOAD_ASSIGNMENT, name.clone(), &e),
        );
    }
    vec![
        (type_url::LISTENER, listeners),
        (type_url::ROUTE_CONFIGURATION, routes),
        (type_url::CLUSTER, clusters),
        (type_url::CLUSTER_LOAD_ASSIGNMENT, cla),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1500ms"), Some(1_500_000_000));
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("1h"), Some(3_600_000_000_000));
        for bad in [
            "",
            "s",
            "10",
            "1.5s",
            "10x",
            "-1s",
            "99999999999999999999h",
            "1é",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    fn route(spec: &str) -> HttpRoute {
        serde_yaml::from_str(&format!(
            "metadata: {{name: r, namespace: demo}}\nspec:\n{spec}"
        ))
        .unwrap()
    }

    #[test]
    fn invalid_routes_name_the_field() {
        let cases = [
            ("  parentRefs: []", "spec.parentRefs"),
            ("  parentRefs: [{name: wp}]", "spec.parentRefs[0].kind"),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{backendRefs: [{name: b}]}]",
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{filters: [{type: ExtensionRef}]}]",
                "spec.rules[0].filters[0].type",
            ),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{timeouts: {request: soon}}]",
                "spec.rules[0].timeouts.request",
            ),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{matches: [{path: {value: x}}]}]",
                "spec.rules[0].matches[0].path.value",
            ),
        ];
        for (spec, field) in cases {
            let e = validate_route(&route(spec)).unwrap_err();
            assert_eq!(e.0, field, "{spec}: {e:?}");
        }
    }

    #[test]
    fn routes_follow_match_precedence() {
        let rt = |path: pr::route_match::PathSpecifier, headers: usize| pr::Route {
            r#match: Some(pr::RouteMatch {
                path_specifier: Some(path),
                headers: (0..headers)
                    .map(|i| pr::HeaderMatcher {
                        name: format!("h{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        use pr::route_match::PathSpecifier::{Path, Prefix, SafeRegex};
        let mut v = [
            rt(Prefix("/".into()), 0),
            rt(SafeRegex(pm::RegexMatcher { regex: ".*".into() }), 0),
            rt(Prefix("/".into()), 2),
            rt(Prefix("/api".into()), 0),
            rt(Path("/x".into()), 0),
        ];
        v.sort_by_key(precedence);
        let order: Vec<_> = v
            .iter()
            .map(|r| {
                let m = r.r#match.as_ref().unwrap();
                (m.path_specifier.clone().unwrap(), m.headers.len())
            })
            .collect();
        assert_eq!(
            order,
            vec![
                (Path("/x".into()), 0),
                (Prefix("/api".into()), 0),
                (Prefix("/".into()), 2),
                (Prefix("/".into()), 0),
                (SafeRegex(pm::RegexMatcher { regex: ".*".into() }), 0),
            ]
        );
    }

    #[test]
    fn filters_become_route_fields() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}], selector: {app: echo}}
---
apiVersion: v1
kind: Service
metadata: {name: shadow, namespace: demo}
spec: {clusterIP: 10.96.0.13, ports: [{port: 80}], selector: {app: shadow}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: Exact, value: /old}, method: GET, queryParams: [{name: q, value: "1"}]}]
    filters:
    - {type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}
  - filters:
    - {type: URLRewrite, urlRewrite: {hostname: h, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: X-A, value: b}], remove: [x-gone]}}
    backendRefs: [{name: echo, port: 80}, {name: missing, port: 80}]
"#;
        let (objs, errs) = crate::manifest::parse_file(text, "t.yaml").unwrap();
        assert!(errs.is_empty(), "{errs:?}");
        let model = Model::from_objects(objs);
        let out = translate(&Options::default(), &model);
        let rds = &out[1].1["demo/echo:80"];
        let rc = pr::RouteConfiguration::decode(rds.value.clone()).unwrap();
        let routes = &rc.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 2);
        let m0 = routes[0].r#match.as_ref().unwrap();
        assert_eq!(
            m0.path_specifier,
            Some(pr::route_match::PathSpecifier::Path("/old".into()))
        );
        assert_eq!(m0.headers[0].name, ":method");
        assert_eq!(m0.query_parameters[0].name, "q");
        let Some(pr::route::Action::Redirect(r)) = &routes[0].action else {
            panic!("{:?}", routes[0].action)
        };
        assert_eq!(
            r.path_rewrite_specifier,
            Some(pr::redirect_action::PathRewriteSpecifier::PathRedirect(
                "/new".into()
            ))
        );
        assert_eq!(
            r.response_code,
            pr::redirect_action::RedirectResponseCode::MovedPermanently as i32
        );
        let Some(pr::route::Action::Route(a)) = &routes[1].action else {
            panic!()
        };
        // The missing backend is dropped; the existing one remains.
        assert_eq!(
            a.cluster_specifier,
            Some(pr::route_action::ClusterSpecifier::Cluster(
                "outbound|80||echo.demo.svc.cluster.local".into()
            ))
        );
        assert_eq!(a.prefix_rewrite, "/v2");
        assert_eq!(
            a.request_mirror_policies[0].cluster,
            "outbound|80||shadow.demo.svc.cluster.local"
        );
        assert_eq!(
            routes[1].response_headers_to_add[0]
                .header
                .as_ref()
                .unwrap()
                .key,
            "x-a"
        );
        assert_eq!(routes[1].response_headers_to_remove, vec!["x-gone"]);
        // Clusters for both the backend and the mirror.
        assert_eq!(out[2].1.len(), 2);
    }
}
