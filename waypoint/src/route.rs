//! Route selection, as Envoy does it: the virtual host whose domain
//! matches the request's host most specifically (exact, then the longest
//! `*.suffix`, then `prefix.*`, then `*`), then the first of its routes
//! whose path, headers and query parameters all match.
//!
//! Gateway API's HTTPRoute precedence (exact path, longest prefix, method,
//! most headers, most query parameters) is expressed by the order of the
//! routes; [`httproute_order`] sorts a list that way for the translator.

use std::sync::Arc;

use http::request::Parts;

use crate::config::model;
use crate::config::runtime::{PathMatch, Route, RouteTable, VirtualHost};

/// The host a request is for, lower-cased and without a port.
pub fn request_host(parts: &Parts) -> String {
    let raw = parts
        .uri
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(strip_port)
        })
        .unwrap_or_default();
    raw.to_ascii_lowercase()
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        // "[v6]" or "[v6]:port"; a lone "[" is left as it is.
        return h.find(']').map(|i| &h[..=i]).unwrap_or(h);
    }
    // By bytes: `rsplit_once`'s searcher cost more than the rest of the
    // host's handling.
    match h.bytes().rposition(|b| b == b':') {
        Some(i) if h.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => &h[..i],
        _ => h,
    }
}

/// How well `domain` matches `host`; higher is more specific, `None` is no
/// match.
fn domain_score(domain: &str, host: &str) -> Option<usize> {
    if domain == "*" {
        Some(0)
    } else if let Some(suffix) = domain.strip_prefix('*') {
        (host.ends_with(suffix) && host.len() > suffix.len()).then(|| 2 * suffix.len() + 1)
    } else if let Some(prefix) = domain.strip_suffix('*') {
        (host.starts_with(prefix) && host.len() > prefix.len()).then(|| 2 * prefix.len())
    } else {
        (domain == host || strip_port(domain) == host).then_some(usize::MAX)
    }
}

pub fn virtual_host<'a>(table: &'a RouteTable, host: &str) -> Option<&'a VirtualHost> {
    table
        .virtual_hosts
        .iter()
        .filter_map(|vh| {
            vh.domains
                .iter()
                .filter_map(|d| domain_score(d, host))
                .max()
                .map(|s| (s, vh))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, vh)| vh)
}

/// The route for a request to `host` (as [`request_host`] gives it).
pub fn select(table: &RouteTable, host: &str, parts: &Parts) -> Option<Arc<Route>> {
    let vh = virtual_host(table, host)?;
    let path = parts.uri.path();
    let query = parts.uri.query();
    vh.routes
        .iter()
        .find(|r| {
            let path_ok = match &r.path {
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                PathMatch::Exact(p) => path == p,
                PathMatch::Regex(re) => re.is_match(path),
            };
            path_ok
                && r.headers
                    .iter()
                    .all(|h| h.matches(&parts.method, &parts.uri, &parts.headers))
                && r.query.iter().all(|q| q.matches(query))
        })
        .cloned()
}

/// Sorts routes by Gateway API HTTPRoute precedence: exact path before
/// prefix, longer prefixes first, then routes with a method match, then
/// more header matches, then more query matches. Stable, so ties keep
/// their order (HTTPRoute's creation-time and name tiebreaks are the
/// translator's to apply before calling this).
pub fn httproute_order(routes: &mut [model::Route]) {
    fn key(r: &model::Route) -> (u8, usize, bool, usize, usize) {
        let m = &r.route_match;
        let (kind, len) = match (&m.path, &m.prefix, &m.safe_regex) {
            (Some(p), _, _) => (2, p.len()),
            (_, Some(p), _) => (1, p.len()),
            (_, _, Some(re)) => (1, re.regex.len()),
            _ => (0, 0),
        };
        let method = m.headers.iter().any(|h| h.name == ":method");
        let headers = m.headers.iter().filter(|h| h.name != ":method").count();
        (kind, len, method, headers, m.query_parameters.len())
    }
    routes.sort_by_key(|r| std::cmp::Reverse(key(r)));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn domains() {
        assert_eq!(domain_score("*", "a.b"), Some(0));
        assert!(domain_score("*.b", "a.b").is_some());
        assert_eq!(domain_score("*.b", "b"), None);
        assert!(domain_score("a.b", "a.b") > domain_score("*.b", "a.b"));
        assert_eq!(strip_port("echo:8080"), "echo");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1"), "[::1");
        assert_eq!(strip_port(":"), "");
    }

    #[test]
    fn httproute_precedence() {
        let yaml = r#"
- {name: short-prefix, match: {prefix: /a}, route: {cluster: c}}
- {name: prefix-with-header, match: {prefix: /a, headers: [{name: x, present_match: true}]}, route: {cluster: c}}
- {name: exact, match: {path: /a}, route: {cluster: c}}
- {name: long-prefix, match: {prefix: /a/b}, route: {cluster: c}}
- {name: prefix-with-method, match: {prefix: /a, headers: [{name: ':method', string_match: {exact: GET}}]}, route: {cluster: c}}
"#;
        let mut routes: Vec<model::Route> = serde_yaml::from_str(yaml).unwrap();
        httproute_order(&mut routes);
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "exact",
                "long-prefix",
                "prefix-with-method",
                "prefix-with-header",
                "short-prefix"
            ]
        );
    }
}
