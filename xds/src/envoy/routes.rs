//! HTTPRoute rules as Envoy routes: matches, filters (header modifiers,
//! redirects, rewrites, mirrors), weighted backends and timeouts, ordered
//! by Gateway API match precedence.

use k8s_openapi::api::core::v1::Service;
use mesh_proto::envoy::config::core::v3 as core;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::envoy::r#type::matcher::v3 as pm;

use super::validate::parse_duration;
use super::{cluster_name, duration, Builder};
use crate::model::{HttpRoute, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, ValueMatch};
use crate::translate::hostname;

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

pub(super) fn route_match(m: &HttpRouteMatch) -> pr::RouteMatch {
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

/// The header changes a list of filters makes: (request adds, request
/// removals, response adds, response removals), for a rule or a backend.
#[derive(Default)]
struct HeaderChanges {
    req_add: Vec<core::HeaderValueOption>,
    req_remove: Vec<String>,
    resp_add: Vec<core::HeaderValueOption>,
    resp_remove: Vec<String>,
}

impl HeaderChanges {
    fn of(filters: &[HttpRouteFilter]) -> Self {
        let mut c = HeaderChanges::default();
        let lower = |m: &crate::model::HeaderModifier| {
            m.remove
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect::<Vec<_>>()
        };
        for f in filters {
            if let Some(m) = &f.request_header_modifier {
                c.req_add.extend(header_options(m));
                c.req_remove.extend(lower(m));
            }
            if let Some(m) = &f.response_header_modifier {
                c.resp_add.extend(header_options(m));
                c.resp_remove.extend(lower(m));
            }
        }
        c
    }
}

/// A backend as a weighted cluster, with its filters' header changes.
fn cluster_weight(
    name: String,
    weight: u32,
    filters: &[HttpRouteFilter],
) -> pr::weighted_cluster::ClusterWeight {
    let h = HeaderChanges::of(filters);
    pr::weighted_cluster::ClusterWeight {
        name,
        weight: Some(weight),
        request_headers_to_add: h.req_add,
        request_headers_to_remove: h.req_remove,
        response_headers_to_add: h.resp_add,
        response_headers_to_remove: h.resp_remove,
    }
}

impl<'a> Builder<'a> {
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
        for f in &rule.filters {
            self.filter(ns, f, port, &mut action, &mut redirect);
        }
        let headers = HeaderChanges::of(&rule.filters);
        let (timeout, retry) = timeout_and_retry(rule);
        action.timeout = timeout;
        action.retry_policy = retry;
        // Backends that exist, with their weights (default 1; 0 drops one)
        // and their own header modifiers.
        let mut weighted = Vec::new();
        for b in &rule.backend_refs {
            let w = b.weight.unwrap_or(1).max(0) as u32;
            if let Some(c) = self.backend(ns, b, port) {
                if w > 0 {
                    weighted.push(cluster_weight(c, w, &b.filters));
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
            let plain = |c: &pr::weighted_cluster::ClusterWeight| {
                c.request_headers_to_add.is_empty()
                    && c.request_headers_to_remove.is_empty()
                    && c.response_headers_to_add.is_empty()
                    && c.response_headers_to_remove.is_empty()
            };
            action.cluster_specifier = Some(if weighted.len() == 1 && plain(&weighted[0]) {
                ClusterSpecifier::Cluster(weighted.remove(0).name)
            } else {
                ClusterSpecifier::WeightedClusters(pr::WeightedCluster { clusters: weighted })
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
                request_headers_to_add: headers.req_add.clone(),
                request_headers_to_remove: headers.req_remove.clone(),
                response_headers_to_add: headers.resp_add.clone(),
                response_headers_to_remove: headers.resp_remove.clone(),
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
    pub(super) fn routes(&mut self, svc: &'a Service, port: i32) -> Vec<pr::Route> {
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
            self.use_cluster(c.clone(), svc, port);
            out.push(pr::Route {
                name: "default".into(),
                r#match: Some(route_match(&HttpRouteMatch::default())),
                action: Some(pr::route::Action::Route(pr::RouteAction {
                    cluster_specifier: Some(pr::route_action::ClusterSpecifier::Cluster(c)),
                    // No timeout, as istiod sends (see `timeout_and_retry`).
                    timeout: Some(duration(0)),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
        out
    }
}

/// `timeouts` and `retry` as the route's timeout and retry policy.
/// `request` bounds the whole exchange (retries included); `backendRequest`
/// bounds each try: the retry policy's per-try timeout, or, without
/// retries, the one try there is (so it also bounds the route). A zero
/// duration means no timeout, as in Gateway API; without one the route
/// gets an explicit zero, as istiod sends, since Envoy's default (15 s)
/// would cut long uploads, downloads and streaming calls.
fn timeout_and_retry(
    rule: &HttpRouteRule,
) -> (Option<prost_types::Duration>, Option<pr::RetryPolicy>) {
    let t = rule.timeouts.as_ref();
    let positive = |v: Option<&String>| v.and_then(|v| parse_duration(v)).filter(|d| *d > 0);
    let request = positive(t.and_then(|t| t.request.as_ref()));
    let backend = positive(t.and_then(|t| t.backend_request.as_ref()));
    let Some(r) = &rule.retry else {
        let bound = match (request, backend) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        return (Some(duration(bound.unwrap_or(0))), None);
    };
    // Istio's defaults: 503 is retried; two attempts.
    let codes = if r.codes.is_empty() {
        vec![503]
    } else {
        r.codes.iter().map(|c| *c as u32).collect()
    };
    let backoff = r
        .backoff
        .as_deref()
        .and_then(parse_duration)
        .filter(|d| *d > 0)
        .map(|b| pr::retry_policy::RetryBackOff {
            base_interval: Some(duration(b)),
            // Envoy's default cap: ten times the base.
            max_interval: Some(duration(b.saturating_mul(10))),
        });
    let policy = pr::RetryPolicy {
        retry_on: "connect-failure,reset,retriable-status-codes".into(),
        num_retries: Some(r.attempts.unwrap_or(2).max(0) as u32),
        per_try_timeout: backend.map(duration),
        retriable_status_codes: codes,
        retry_back_off: backoff,
    };
    (Some(duration(request.unwrap_or(0))), Some(policy))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(yaml: &str) -> HttpRouteRule {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn retries_and_timeouts() {
        let d = |s: i64, n: i32| {
            Some(prost_types::Duration {
                seconds: s,
                nanos: n,
            })
        };
        // With a retry: request bounds the whole, backendRequest each try.
        let (t, r) = timeout_and_retry(&rule(
            "{retry: {attempts: 3, codes: [502, 503], backoff: 50ms}, timeouts: {request: 2s, backendRequest: 500ms}}",
        ));
        assert_eq!(t, d(2, 0));
        let r = r.unwrap();
        assert_eq!(r.retry_on, "connect-failure,reset,retriable-status-codes");
        assert_eq!(r.num_retries, Some(3));
        assert_eq!(r.retriable_status_codes, vec![502, 503]);
        assert_eq!(r.per_try_timeout, d(0, 500_000_000));
        let b = r.retry_back_off.unwrap();
        assert_eq!(
            (b.base_interval, b.max_interval),
            (d(0, 50_000_000), d(0, 500_000_000))
        );
        // Istio's defaults: two attempts on 503.
        let (_, r) = timeout_and_retry(&rule("{retry: {}}"));
        let r = r.unwrap();
        assert_eq!(
            (r.num_retries, r.retriable_status_codes),
            (Some(2), vec![503])
        );
        // Without: the one backend request bounds the route.
        let (t, r) = timeout_and_retry(&rule("{timeouts: {request: 2s, backendRequest: 300ms}}"));
        assert_eq!((t, r), (d(0, 300_000_000), None));
        let (t, _) = timeout_and_retry(&rule("{timeouts: {backendRequest: 1s}}"));
        assert_eq!(t, d(1, 0));
        // 0s: no timeout at all.
        let (t, _) = timeout_and_retry(&rule("{timeouts: {request: 0s}}"));
        assert_eq!(t, d(0, 0));
        // None given: an explicit zero, as istiod sends (Envoy's default
        // would be 15 s).
        assert_eq!(timeout_and_retry(&rule("{}")), (d(0, 0), None));
        let (t, _) = timeout_and_retry(&rule("{retry: {}}"));
        assert_eq!(t, d(0, 0));
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
}
