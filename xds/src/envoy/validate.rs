//! Checks an HTTPRoute before translation: everything the translation
//! relies on, each problem named by its field path, so an unsupported or
//! malformed route is reported and skipped instead of half-applied.

use crate::model::{BackendRef, HttpRoute, PathModifier, ValueMatch};

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
    for (j, flt) in b.filters.iter().enumerate() {
        let ff = format!("{field}.filters[{j}]");
        let present = match flt.type_.as_str() {
            "RequestHeaderModifier" => flt.request_header_modifier.is_some(),
            "ResponseHeaderModifier" => flt.response_header_modifier.is_some(),
            t => {
                return bad(
                    format!("{ff}.type"),
                    format!("{t:?} is not supported on a backend (only header modifiers)"),
                )
            }
        };
        if !present {
            return bad(ff, format!("type {} needs its configuration", flt.type_));
        }
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
                        let bf = format!("{ff}.requestMirror.backendRef");
                        check_backend(&bf, &m.backend_ref)?;
                        if !m.backend_ref.filters.is_empty() {
                            return bad(format!("{bf}.filters"), "a mirror has no filters");
                        }
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
            // Gateway API: a backend request cannot outlast the request.
            let (req, be) = (
                t.request.as_deref().and_then(parse_duration),
                t.backend_request.as_deref().and_then(parse_duration),
            );
            if let (Some(req), Some(be)) = (req, be) {
                if req > 0 && (be == 0 || be > req) {
                    return bad(
                        format!("{f}.timeouts.backendRequest"),
                        "must not be longer than timeouts.request",
                    );
                }
            }
        }
        if let Some(r) = &rule.retry {
            let rf = format!("{f}.retry");
            if r.attempts.is_some_and(|a| a < 0) {
                return bad(format!("{rf}.attempts"), "must not be negative");
            }
            for (j, c) in r.codes.iter().enumerate() {
                if !(400..=599).contains(c) {
                    return bad(
                        format!("{rf}.codes[{j}]"),
                        format!("{c} is not an HTTP error status (400-599)"),
                    );
                }
            }
            if let Some(b) = &r.backoff {
                if parse_duration(b).is_none_or(|d| d == 0) {
                    return bad(
                        format!("{rf}.backoff"),
                        format!("{b:?} is not a positive duration (e.g. 100ms)"),
                    );
                }
            }
        }
    }
    Ok(())
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
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
                "spec.rules[0].timeouts.backendRequest",
            ),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{retry: {codes: [200]}}]",
                "spec.rules[0].retry.codes[0]",
            ),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{retry: {attempts: -1}}]",
                "spec.rules[0].retry.attempts",
            ),
            (
                "  parentRefs: [{kind: Service, name: s}]\n  rules: [{retry: {backoff: 0s}}]",
                "spec.rules[0].retry.backoff",
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
}
