//! Istio `security.istio.io/v1` AuthorizationPolicies bound to a waypoint
//! (`targetRefs`: a waypoint Gateway, or a Service using one) as Envoy RBAC
//! HTTP filters (network RBAC filters on opaque TCP chains, from the L4
//! fields only), the way Istio builds them: one filter for the DENY
//! policies, then one for the ALLOW policies, each rule an RBAC policy
//! named `ns[<ns>]-policy[<name>]-rule[<i>]`. A rule's `from` entries are
//! any-of, a source's fields all-of (and each field's values any-of); the
//! same for `to` and operations; `when` conditions all-of.
//!
//! What the waypoint cannot enforce (notPorts, IP blocks, request
//! principals, namespace wildcards, path templates, most `when` keys) is
//! reported naming the policy and field. An ALLOW rule needing it is
//! skipped (it can never match: stricter); a DENY rule is applied without
//! it (it denies more: stricter), as Istio does for ztunnel. The trees are
//! shaped so the waypoint can flatten them (negations of methods, paths and
//! single identities only): nothing here may be NACKed.

use mesh_proto::envoy::config::listener::v3 as pl;
use mesh_proto::envoy::config::rbac::v3 as prbac;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::envoy::extensions::filters::http::rbac::v3 as phrbac;
use mesh_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use mesh_proto::envoy::extensions::filters::network::rbac::v3 as pnrbac;
use mesh_proto::envoy::r#type::matcher::v3 as pm;
use mesh_proto::type_url;

use super::any;
use crate::model::{AuthorizationPolicy, Condition, Operation, PolicyAction, PolicyRule, Source};
use crate::translate::Options;

/// A policy bound to waypoints, translated once for HTTP chains and once
/// for opaque TCP chains (L4 fields only).
pub(super) struct Bound {
    deny: bool,
    policies: Vec<(String, prbac::Policy)>,
    tcp_policies: Vec<(String, prbac::Policy)>,
    /// What only the TCP translation leaves out (HTTP fields), reported
    /// when the policy applies to a TCP chain.
    tcp_errors: Vec<String>,
    /// `ns/name` of the Gateways and Services it targets.
    gateways: Vec<String>,
    services: Vec<String>,
}

/// What a policy's `targetRef(s)` name: (Gateways, Services) as `ns/name`.
fn targets(
    ap: &AuthorizationPolicy,
    id: &str,
    errors: &mut Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let ns = ap.metadata.namespace.as_deref().unwrap_or("default");
    let refs: Vec<(String, &serde_json::Value)> = match (&ap.spec.target_ref, &ap.spec.target_refs)
    {
        (Some(t), _) => vec![("spec.targetRef".into(), t)],
        (None, Some(ts)) => ts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t))
            .collect(),
        (None, None) => Vec::new(),
    };
    let (mut gateways, mut services) = (Vec::new(), Vec::new());
    for (field, r) in refs {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let name = format!("{ns}/{}", s("name"));
        match (s("group"), s("kind")) {
            ("gateway.networking.k8s.io", "Gateway") => gateways.push(name),
            ("" | "core", "Service") => services.push(name),
            (g, k) => errors.push(format!(
                "AuthorizationPolicy {id}: {field}: {g:?}/{k:?} is not supported on the waypoint (Gateway or Service only); that target is ignored"
            )),
        }
    }
    (gateways, services)
}

/// Every policy with waypoint targets; problems go to `errors`.
pub(super) fn bound_policies(
    opts: &Options,
    policies: impl Iterator<Item = impl AsRef<AuthorizationPolicy>>,
    errors: &mut Vec<String>,
) -> Vec<Bound> {
    let mut out = Vec::new();
    for ap in policies {
        let ap = ap.as_ref();
        let spec = &ap.spec;
        if spec.target_ref.is_none() && spec.target_refs.as_ref().is_none_or(|t| t.is_empty()) {
            continue;
        }
        let ns = ap.metadata.namespace.as_deref().unwrap_or("default");
        let name = ap.metadata.name.as_deref().unwrap_or_default();
        let id = format!("{ns}/{name}");
        let (gateways, services) = targets(ap, &id, errors);
        let deny = match spec.action {
            None | Some(PolicyAction::Allow) => false,
            Some(PolicyAction::Deny) => true,
            // Rejected when the object was read.
            Some(PolicyAction::Audit | PolicyAction::Custom) => continue,
        };
        let (mut policies, mut tcp_policies, mut tcp_errors) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in spec.rules.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}]");
            let policy_name = format!("ns[{ns}]-policy[{name}]-rule[{i}]");
            let mut unsupported = Vec::new();
            let p = rule(opts, &field, r, Layer::Http, &mut unsupported);
            for (field, why) in &unsupported {
                errors.push(if deny {
                    format!("AuthorizationPolicy {id}: {field}: {why}; the DENY rule applies without it")
                } else {
                    format!("AuthorizationPolicy {id}: {field}: {why}; the ALLOW rule is skipped")
                });
            }
            if deny || unsupported.is_empty() {
                policies.push((policy_name.clone(), p));
            }
            let mut tcp_unsupported = Vec::new();
            let p = rule(opts, &field, r, Layer::Tcp, &mut tcp_unsupported);
            for (field, why) in tcp_unsupported.iter().filter(|u| !unsupported.contains(u)) {
                tcp_errors.push(if deny {
                    format!("AuthorizationPolicy {id}: {field}: {why}; on TCP ports the DENY rule applies without it")
                } else {
                    format!("AuthorizationPolicy {id}: {field}: {why}; on TCP ports the ALLOW rule is skipped")
                });
            }
            if deny || tcp_unsupported.is_empty() {
                tcp_policies.push((policy_name, p));
            }
        }
        out.push(Bound {
            deny,
            policies,
            tcp_policies,
            tcp_errors,
            gateways,
            services,
        });
    }
    out
}

/// The RBAC HTTP filters for a filter chain of Service `service`
/// (`ns/name`) on waypoint `gateway` (`ns/name`): see [`rules`].
pub(super) fn http_filters(bound: &[Bound], gateway: &str, service: &str) -> Vec<hcm::HttpFilter> {
    rules(bound, gateway, service, |b| &b.policies)
        .into_iter()
        .map(|rules| hcm::HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                type_url::HTTP_RBAC,
                &phrbac::Rbac { rules: Some(rules) },
            ))),
            ..Default::default()
        })
        .collect()
}

/// The network RBAC filters for an opaque TCP chain, as
/// [`http_filters`] but from the rules' L4 fields; what that leaves out
/// goes to `errors` (once).
pub(super) fn network_filters(
    bound: &[Bound],
    gateway: &str,
    service: &str,
    errors: &mut Vec<String>,
) -> Vec<pl::Filter> {
    for b in bound.iter().filter(|b| b.applies(gateway, service)) {
        for e in &b.tcp_errors {
            if !errors.contains(e) {
                errors.push(e.clone());
            }
        }
    }
    rules(bound, gateway, service, |b| &b.tcp_policies)
        .into_iter()
        .map(|rules| pl::Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(pl::filter::ConfigType::TypedConfig(any(
                type_url::NETWORK_RBAC,
                &pnrbac::Rbac {
                    rules: Some(rules),
                    stat_prefix: String::new(),
                },
            ))),
        })
        .collect()
}

impl Bound {
    fn applies(&self, gateway: &str, service: &str) -> bool {
        self.gateways.iter().any(|g| g == gateway) || self.services.iter().any(|s| s == service)
    }
}

/// The DENY, then the ALLOW rule set of the policies that apply, each
/// only when some policy of that action applies. An ALLOW policy whose
/// rules were all skipped still makes the ALLOW set (which then denies),
/// as an ALLOW policy without rules does.
fn rules(
    bound: &[Bound],
    gateway: &str,
    service: &str,
    policies: impl Fn(&Bound) -> &Vec<(String, prbac::Policy)>,
) -> Vec<prbac::Rbac> {
    let mut out = Vec::new();
    for deny in [true, false] {
        let applying: Vec<&Bound> = bound
            .iter()
            .filter(|b| b.deny == deny && b.applies(gateway, service))
            .collect();
        if applying.is_empty() {
            continue;
        }
        let action = if deny {
            prbac::rbac::Action::Deny
        } else {
            prbac::rbac::Action::Allow
        };
        out.push(prbac::Rbac {
            action: action as i32,
            policies: applying
                .iter()
                .flat_map(|b| policies(b).iter().cloned())
                .collect(),
        });
    }
    out
}

type Unsupported = Vec<(String, String)>;

/// Which chain a rule is translated for: on opaque TCP only L4 fields
/// (sources, ports) can be checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    Http,
    Tcp,
}

const HTTP_ONLY: &str = "an HTTP field, not seen on an opaque TCP port";

fn perm(rule: prbac::permission::Rule) -> prbac::Permission {
    prbac::Permission { rule: Some(rule) }
}

fn id(identifier: prbac::principal::Identifier) -> prbac::Principal {
    prbac::Principal {
        identifier: Some(identifier),
    }
}

fn perm_or(rules: Vec<prbac::Permission>) -> prbac::Permission {
    perm(prbac::permission::Rule::OrRules(prbac::permission::Set {
        rules,
    }))
}

fn perm_and(mut rules: Vec<prbac::Permission>) -> prbac::Permission {
    match rules.len() {
        0 => perm(prbac::permission::Rule::Any(true)),
        1 => rules.remove(0),
        _ => perm(prbac::permission::Rule::AndRules(prbac::permission::Set {
            rules,
        })),
    }
}

fn id_or(ids: Vec<prbac::Principal>) -> prbac::Principal {
    id(prbac::principal::Identifier::OrIds(prbac::principal::Set {
        ids,
    }))
}

fn id_and(mut ids: Vec<prbac::Principal>) -> prbac::Principal {
    match ids.len() {
        0 => id(prbac::principal::Identifier::Any(true)),
        1 => ids.remove(0),
        _ => id(prbac::principal::Identifier::AndIds(
            prbac::principal::Set { ids },
        )),
    }
}

fn matcher(p: pm::string_matcher::MatchPattern) -> pm::StringMatcher {
    pm::StringMatcher {
        match_pattern: Some(p),
        ignore_case: false,
    }
}

/// Istio's value forms: `exact`, `prefix*`, `*suffix`, `*` (anything);
/// `None` for other wildcards.
fn value_pattern(v: &str) -> Option<pm::string_matcher::MatchPattern> {
    use pm::string_matcher::MatchPattern as P;
    let stars = v.matches('*').count();
    if v == "*" {
        return Some(P::SafeRegex(pm::RegexMatcher { regex: ".+".into() }));
    }
    match stars {
        0 => Some(P::Exact(v.into())),
        1 if v.ends_with('*') => Some(P::Prefix(v.trim_end_matches('*').into())),
        1 if v.starts_with('*') => Some(P::Suffix(v.trim_start_matches('*').into())),
        _ => None,
    }
}

fn authenticated(p: pm::string_matcher::MatchPattern) -> prbac::Principal {
    id(prbac::principal::Identifier::Authenticated(
        prbac::principal::Authenticated {
            principal_name: Some(matcher(p)),
        },
    ))
}

/// A principal as Istio writes it (`cluster.local/ns/a/sa/b`, with
/// wildcards) matched against the peer's SPIFFE ID.
fn principal(v: &str) -> Option<prbac::Principal> {
    use pm::string_matcher::MatchPattern as P;
    let p = match value_pattern(v)? {
        P::Exact(x) => P::Exact(format!("spiffe://{x}")),
        P::Prefix(x) => P::Prefix(format!("spiffe://{x}")),
        other => other,
    };
    Some(authenticated(p))
}

fn namespace(v: &str) -> Option<prbac::Principal> {
    use pm::string_matcher::MatchPattern as P;
    if v == "*" {
        return Some(authenticated(P::SafeRegex(pm::RegexMatcher {
            regex: ".+".into(),
        })));
    }
    let plain = !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    plain.then(|| {
        authenticated(P::SafeRegex(pm::RegexMatcher {
            regex: format!(".*/ns/{v}/.*"),
        }))
    })
}

/// Values of one field, any-of; `None` (and a report) when one value has
/// a form the waypoint cannot match.
fn any_of<T>(
    field: &str,
    values: &[String],
    f: impl Fn(&str) -> Option<T>,
    unsupported: &mut Unsupported,
) -> Option<Vec<T>> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match f(v) {
            Some(x) => out.push(x),
            None => {
                unsupported.push((
                    format!("{field}[{i}]"),
                    format!("the form {v:?} is not supported"),
                ));
                return None;
            }
        }
    }
    Some(out)
}

fn unsupported_if(field: String, set: bool, unsupported: &mut Unsupported) {
    if set {
        unsupported.push((field, "not supported on the waypoint".into()));
    }
}

fn source(
    opts: &Options,
    field: &str,
    s: &Source,
    unsupported: &mut Unsupported,
) -> prbac::Principal {
    use prbac::principal::Identifier;
    for (name, v) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        unsupported_if(format!("{field}.{name}"), !v.is_empty(), unsupported);
    }
    let sa = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|x| match x.split_once('/') {
                Some((n, a)) => format!("{}/ns/{n}/sa/{a}", opts.trust_domain),
                None => format!("{}/ns/*/sa/{x}", opts.trust_domain),
            })
            .collect()
    };
    // The waypoint ANDs at most one list of principals with one of
    // namespaces: principals and service accounts together cannot be said.
    let (principals, pfield) = match (s.principals.is_empty(), s.service_accounts.is_empty()) {
        (_, true) => (s.principals.clone(), "principals"),
        (true, false) => (sa(&s.service_accounts), "serviceAccounts"),
        (false, false) => {
            unsupported_if(format!("{field}.serviceAccounts"), true, unsupported);
            (s.principals.clone(), "principals")
        }
    };
    let mut not_principals = s.not_principals.clone();
    not_principals.extend(sa(&s.not_service_accounts));
    let mut all = Vec::new();
    if let Some(v) = any_of(
        &format!("{field}.{pfield}"),
        &principals,
        principal,
        unsupported,
    ) {
        if !v.is_empty() {
            all.push(id_or(v));
        }
    }
    if let Some(v) = any_of(
        &format!("{field}.namespaces"),
        &s.namespaces,
        namespace,
        unsupported,
    ) {
        if !v.is_empty() {
            all.push(id_or(v));
        }
    }
    for (name, values, f) in [
        ("notPrincipals", &not_principals, principal as fn(&str) -> _),
        ("notNamespaces", &s.not_namespaces, namespace),
    ] {
        if let Some(v) = any_of(&format!("{field}.{name}"), values, f, unsupported) {
            if !v.is_empty() {
                all.push(id(Identifier::NotId(Box::new(id_or(v)))));
            }
        }
    }
    id_and(all)
}

fn method(m: &str) -> Option<prbac::Permission> {
    Some(perm(prbac::permission::Rule::Header(pr::HeaderMatcher {
        name: ":method".into(),
        header_match_specifier: Some(pr::header_matcher::HeaderMatchSpecifier::ExactMatch(
            m.to_ascii_uppercase(),
        )),
        invert_match: false,
    })))
}

/// Istio's value forms (`exact`, `prefix*`, `*suffix`, `*`) as a regex;
/// `None` for other wildcards.
fn wildcard_regex(v: &str) -> Option<String> {
    Some(match v {
        "*" => ".*".to_string(),
        _ if v.matches('*').count() > 1 => return None,
        _ => match (v.strip_prefix('*'), v.strip_suffix('*')) {
            (Some(s), _) => format!(".*{}", regex::escape(s)),
            (_, Some(p)) => format!("{}.*", regex::escape(p)),
            _ if v.contains('*') => return None,
            _ => regex::escape(v),
        },
    })
}

/// A host as Istio matches it: the `:authority`, case-insensitive, with
/// or without a port; `*.suffix`, `prefix*` and `*` as wildcards.
fn host(h: &str) -> Option<prbac::Permission> {
    let name = wildcard_regex(h)?;
    Some(perm(prbac::permission::Rule::Header(pr::HeaderMatcher {
        name: ":authority".into(),
        header_match_specifier: Some(pr::header_matcher::HeaderMatchSpecifier::SafeRegexMatch(
            pm::RegexMatcher {
                regex: format!("(?i)(?:{name})(?::[0-9]+)?"),
            },
        )),
        invert_match: false,
    })))
}

fn path(p: &str) -> Option<prbac::Permission> {
    use pm::string_matcher::MatchPattern as P;
    let pattern = match value_pattern(p)? {
        // Any path: the empty prefix.
        P::SafeRegex(_) => P::Prefix(String::new()),
        x => x,
    };
    if p.contains('{') {
        return None;
    }
    Some(perm(prbac::permission::Rule::UrlPath(pm::PathMatcher {
        rule: Some(pm::path_matcher::Rule::Path(matcher(pattern))),
    })))
}

fn port(p: &str) -> Option<prbac::Permission> {
    let p: u16 = p.parse().ok().filter(|p| *p > 0)?;
    Some(perm(prbac::permission::Rule::DestinationPort(u32::from(p))))
}

fn operation(
    field: &str,
    o: &Operation,
    layer: Layer,
    unsupported: &mut Unsupported,
) -> prbac::Permission {
    use prbac::permission::Rule;
    unsupported_if(
        format!("{field}.notPorts"),
        !o.not_ports.is_empty(),
        unsupported,
    );
    if layer == Layer::Tcp {
        for (name, v) in [
            ("hosts", &o.hosts),
            ("methods", &o.methods),
            ("paths", &o.paths),
            ("notHosts", &o.not_hosts),
            ("notMethods", &o.not_methods),
            ("notPaths", &o.not_paths),
        ] {
            if !v.is_empty() {
                unsupported.push((format!("{field}.{name}"), HTTP_ONLY.into()));
            }
        }
        return match any_of(&format!("{field}.ports"), &o.ports, port, unsupported) {
            Some(v) if !v.is_empty() => perm_or(v),
            _ => perm_and(Vec::new()),
        };
    }
    let mut all = Vec::new();
    for (name, values, f) in [
        ("hosts", &o.hosts, host as fn(&str) -> _),
        ("methods", &o.methods, method),
        ("paths", &o.paths, path),
        ("ports", &o.ports, port),
    ] {
        if let Some(v) = any_of(&format!("{field}.{name}"), values, f, unsupported) {
            if !v.is_empty() {
                all.push(perm_or(v));
            }
        }
    }
    for (name, values, f) in [
        ("notHosts", &o.not_hosts, host as fn(&str) -> _),
        ("notMethods", &o.not_methods, method),
        ("notPaths", &o.not_paths, path),
    ] {
        if let Some(v) = any_of(&format!("{field}.{name}"), values, f, unsupported) {
            if !v.is_empty() {
                all.push(perm(Rule::NotRule(Box::new(perm_or(v)))));
            }
        }
    }
    perm_and(all)
}

/// A `when` condition on `request.headers[<name>]`: values any-of, or
/// notValues none-of (one inverted matcher: the waypoint ANDs at most one
/// header per permission).
fn header_condition(
    field: &str,
    name: &str,
    c: &Condition,
    unsupported: &mut Unsupported,
) -> Option<prbac::Permission> {
    use pr::header_matcher::HeaderMatchSpecifier as H;
    let header = |spec: H, invert_match: bool| {
        perm(prbac::permission::Rule::Header(pr::HeaderMatcher {
            name: name.to_ascii_lowercase(),
            header_match_specifier: Some(spec),
            invert_match,
        }))
    };
    match (c.values.is_empty(), c.not_values.is_empty()) {
        (true, true) => {
            unsupported.push((field.into(), "needs values or notValues".into()));
            None
        }
        (false, false) => {
            unsupported.push((
                format!("{field}.notValues"),
                "values and notValues on one header are not supported on the waypoint".into(),
            ));
            None
        }
        (false, true) => {
            let v = any_of(
                &format!("{field}.values"),
                &c.values,
                |v| Some(header(H::StringMatch(matcher(value_pattern(v)?)), false)),
                unsupported,
            )?;
            Some(perm_or(v))
        }
        (true, false) => {
            let alts = any_of(
                &format!("{field}.notValues"),
                &c.not_values,
                wildcard_regex,
                unsupported,
            )?;
            let regex = format!("(?:{})", alts.join("|"));
            Some(header(H::SafeRegexMatch(pm::RegexMatcher { regex }), true))
        }
    }
}

/// One rule as an RBAC policy; what cannot be enforced goes to
/// `unsupported` and is left out.
fn rule(
    opts: &Options,
    field: &str,
    r: &PolicyRule,
    layer: Layer,
    unsupported: &mut Unsupported,
) -> prbac::Policy {
    let mut permissions = Vec::new();
    if !r.to.is_empty() {
        permissions.push(perm_or(
            r.to.iter()
                .enumerate()
                .map(|(i, t)| {
                    operation(
                        &format!("{field}.to[{i}].operation"),
                        &t.operation,
                        layer,
                        unsupported,
                    )
                })
                .collect(),
        ));
    }
    let mut principals = Vec::new();
    if !r.from.is_empty() {
        principals.push(id_or(
            r.from
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    source(
                        opts,
                        &format!("{field}.from[{i}].source"),
                        &f.source,
                        unsupported,
                    )
                })
                .collect(),
        ));
    }
    for (i, c) in r.when.iter().enumerate() {
        let cf = format!("{field}.when[{i}]");
        let header = c
            .key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
            .filter(|k| !k.is_empty());
        match header {
            Some(_) if layer == Layer::Tcp => {
                unsupported.push((format!("{cf}.key"), HTTP_ONLY.into()))
            }
            Some(name) => {
                if let Some(p) = header_condition(&cf, name, c, unsupported) {
                    permissions.push(p);
                }
            }
            None => unsupported.push((
                format!("{cf}.key"),
                format!(
                    "{:?} is not supported on the waypoint (request.headers[...] only)",
                    c.key
                ),
            )),
        }
    }
    prbac::Policy {
        permissions: vec![perm_and(permissions)],
        principals: vec![id_and(principals)],
    }
}
