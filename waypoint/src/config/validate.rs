//! Validation: turns a [`Bootstrap`] into the runtime [`Config`] or
//! explains, with the path of the offending field, why it cannot be used.
//!
//! This is the one gate every configuration passes, from the YAML file
//! today and from xDS later (where an error becomes a NACK carrying the
//! message). Nothing is half-applied: the caller keeps the previous
//! configuration when this fails.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;

use super::matcher::{self, HeaderMatch, QueryMatch, StringMatch, ValueMatch};
use super::model::{self as m, Bootstrap, Denominator, RedirectResponseCode};
use super::runtime::*;
use crate::path::EscapedSlashes;
use crate::rbac::{self, RbacFilter, RbacPolicy};

/// Why a configuration was rejected: where, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        path: path.to_string(),
        message: message.into(),
    })
}

/// Envoy's request timeout default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

pub fn compile(b: &Bootstrap) -> Result<Config, ConfigError> {
    let mut clusters = HashMap::new();
    for (i, c) in b.clusters.iter().enumerate() {
        let path = format!("clusters[{i}]");
        let compiled = cluster(&path, c)?;
        if clusters
            .insert(c.name.clone(), Arc::new(compiled))
            .is_some()
        {
            return err(&path, format!("duplicate cluster name {:?}", c.name));
        }
    }
    let mut tables = HashMap::new();
    for (i, rc) in b.route_configurations.iter().enumerate() {
        let path = format!("route_configurations[{i}]");
        let t = route_table(&path, rc, &clusters)?;
        if tables.insert(rc.name.clone(), Arc::new(t)).is_some() {
            return err(
                &path,
                format!("duplicate route configuration {:?}", rc.name),
            );
        }
    }
    let mut chains = Vec::new();
    let mut default_chain = None;
    for (i, l) in b.listeners.iter().enumerate() {
        let lpath = format!("listeners[{i}]");
        for (j, fc) in l.filter_chains.iter().enumerate() {
            let path = format!("{lpath}.filter_chains[{j}]");
            chains.push(chain(&path, fc, &tables, &clusters)?);
        }
        if let Some(fc) = &l.default_filter_chain {
            let path = format!("{lpath}.default_filter_chain");
            default_chain = Some(chain(&path, fc, &tables, &clusters)?);
        }
    }
    Ok(Config {
        source: b.clone(),
        chains,
        default_chain,
        clusters,
    })
}

/// Parses Envoy's JSON duration form: `"1.5s"`, also `"250ms"`.
pub fn duration(path: &str, s: &str) -> Result<Duration, ConfigError> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return err(
            path,
            format!("duration {s:?} needs a unit (\"1.5s\", \"250ms\")"),
        );
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * scale < 1e9 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => err(path, format!("invalid duration {s:?}")),
    }
}

fn fraction(path: &str, p: &m::FractionalPercent) -> Result<f64, ConfigError> {
    let d = match p.denominator {
        Denominator::Hundred => 100.0,
        Denominator::TenThousand => 10_000.0,
        Denominator::Million => 1_000_000.0,
    };
    let f = f64::from(p.numerator) / d;
    if f > 1.0 {
        return err(path, format!("{} is more than 100%", p.numerator));
    }
    Ok(f)
}

fn regex(path: &str, r: &m::RegexMatcher) -> Result<regex::Regex, ConfigError> {
    matcher::full_regex(&r.regex).or_else(|e| {
        err(
            &format!("{path}.regex"),
            format!("invalid regex {:?}: {}", r.regex, one_line(&e.to_string())),
        )
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn string_matcher(
    path: &str,
    s: &m::StringMatcher,
) -> Result<matcher::StringMatcher, ConfigError> {
    let mut kinds = Vec::new();
    if let Some(v) = &s.exact {
        kinds.push(StringMatch::Exact(v.clone()));
    }
    if let Some(v) = &s.prefix {
        kinds.push(StringMatch::Prefix(v.clone()));
    }
    if let Some(v) = &s.suffix {
        kinds.push(StringMatch::Suffix(v.clone()));
    }
    if let Some(v) = &s.contains {
        kinds.push(StringMatch::Contains(v.clone()));
    }
    if let Some(r) = &s.safe_regex {
        let pat = if s.ignore_case {
            m::RegexMatcher {
                regex: format!("(?i:{})", r.regex),
            }
        } else {
            r.clone()
        };
        kinds.push(StringMatch::Regex(regex(
            &format!("{path}.safe_regex"),
            &pat,
        )?));
    }
    if kinds.len() != 1 {
        return err(
            path,
            "exactly one of exact, prefix, suffix, contains, safe_regex is required",
        );
    }
    Ok(matcher::StringMatcher {
        kind: kinds.remove(0),
        ignore_case: s.ignore_case,
    })
}

fn value_match(
    path: &str,
    string_match: &Option<m::StringMatcher>,
    present: Option<bool>,
) -> Result<ValueMatch, ConfigError> {
    match (string_match, present) {
        (Some(s), None) => Ok(ValueMatch::String(string_matcher(
            &format!("{path}.string_match"),
            s,
        )?)),
        (None, Some(p)) => Ok(ValueMatch::Present(p)),
        (None, None) => Ok(ValueMatch::Present(true)),
        (Some(_), Some(_)) => err(path, "string_match and present_match are exclusive"),
    }
}

fn header_match(path: &str, h: &m::HeaderMatcher) -> Result<HeaderMatch, ConfigError> {
    let name = h.name.to_ascii_lowercase();
    let pseudo = matches!(
        name.as_str(),
        ":method" | ":authority" | ":path" | ":scheme"
    );
    if !pseudo && HeaderName::from_bytes(name.as_bytes()).is_err() {
        return err(path, format!("invalid header name {:?}", h.name));
    }
    Ok(HeaderMatch {
        name,
        value: value_match(path, &h.string_match, h.present_match)?,
        invert: h.invert_match,
    })
}

fn header_mods(
    path: &str,
    add: &[m::HeaderValueOption],
    remove: &[String],
) -> Result<HeaderMods, ConfigError> {
    let mut mods = HeaderMods::default();
    for (i, h) in add.iter().enumerate() {
        let p = format!("{path}_to_add[{i}]");
        let name = HeaderName::from_bytes(h.header.key.as_bytes())
            .or_else(|_| err(&p, format!("invalid header name {:?}", h.header.key)))?;
        let value = HeaderValue::from_str(&h.header.value)
            .or_else(|_| err(&p, format!("invalid header value {:?}", h.header.value)))?;
        mods.add.push((name, value, h.append_action));
    }
    for (i, r) in remove.iter().enumerate() {
        let p = format!("{path}_to_remove[{i}]");
        mods.remove.push(
            HeaderName::from_bytes(r.as_bytes())
                .or_else(|_| err(&p, format!("invalid header name {r:?}")))?,
        );
    }
    Ok(mods)
}

fn status(path: &str, code: u16) -> Result<StatusCode, ConfigError> {
    match StatusCode::from_u16(code) {
        Ok(s) if code >= 200 => Ok(s),
        _ => err(path, format!("invalid HTTP status {code}")),
    }
}

fn cluster(path: &str, c: &m::Cluster) -> Result<ClusterConfig, ConfigError> {
    if c.name.is_empty() {
        return err(path, "cluster name is empty");
    }
    let od = c.outlier_detection.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    for (i, l) in c.load_assignment.endpoints.iter().enumerate() {
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let p = format!("{path}.load_assignment.endpoints[{i}].lb_endpoints[{j}]");
            let sa = &e.endpoint.address.socket_address;
            let ip: IpAddr = sa.address.parse().or_else(|_| {
                err(
                    &format!("{p}.endpoint.address.socket_address.address"),
                    format!("{:?} is not an IP address", sa.address),
                )
            })?;
            let identity = e
                .metadata
                .identity
                .as_deref()
                .map(|s| s.parse())
                .transpose()
                .or_else(|e| err(&format!("{p}.metadata.identity"), format!("{e}")))?;
            endpoints.push(EndpointConfig {
                address: SocketAddr::new(ip, sa.port_value),
                identity,
                hbone_port: e.metadata.hbone_port.unwrap_or(15008),
                workload: e.metadata.workload.clone(),
                namespace: e.metadata.namespace.clone(),
            });
        }
    }
    let max_ejection_percent = od.max_ejection_percent.unwrap_or(10);
    if max_ejection_percent > 100 {
        return err(
            &format!("{path}.outlier_detection.max_ejection_percent"),
            "more than 100",
        );
    }
    Ok(ClusterConfig {
        name: c.name.clone(),
        balancer_state: OnceLock::new(),
        connect_timeout: c
            .connect_timeout
            .as_deref()
            .map(|d| duration(&format!("{path}.connect_timeout"), d))
            .transpose()?
            .unwrap_or(Duration::from_secs(5)),
        protocol: c.upstream_protocol,
        consecutive_failures: od.consecutive_5xx.unwrap_or(5).max(1),
        base_ejection_time: od
            .base_ejection_time
            .as_deref()
            .map(|d| duration(&format!("{path}.outlier_detection.base_ejection_time"), d))
            .transpose()?
            .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent,
        endpoints,
    })
}

fn lookup(
    path: &str,
    name: &str,
    clusters: &HashMap<String, Arc<ClusterConfig>>,
) -> Result<Arc<ClusterConfig>, ConfigError> {
    clusters.get(name).cloned().ok_or_else(|| ConfigError {
        path: path.to_string(),
        message: format!("unknown cluster {name:?}"),
    })
}

fn route_table(
    path: &str,
    rc: &m::RouteConfiguration,
    clusters: &HashMap<String, Arc<ClusterConfig>>,
) -> Result<RouteTable, ConfigError> {
    let mut vhosts = Vec::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vpath = format!("{path}.virtual_hosts[{i}]");
        if vh.domains.is_empty() {
            return err(&vpath, "domains is empty");
        }
        let mut routes = Vec::new();
        for (j, r) in vh.routes.iter().enumerate() {
            routes.push(Arc::new(route(
                &format!("{vpath}.routes[{j}]"),
                r,
                clusters,
            )?));
        }
        vhosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            routes,
        });
    }
    Ok(RouteTable {
        name: rc.name.clone(),
        virtual_hosts: vhosts,
    })
}

fn route(
    path: &str,
    r: &m::Route,
    clusters: &HashMap<String, Arc<ClusterConfig>>,
) -> Result<Route, ConfigError> {
    let mp = format!("{path}.match");
    let rm = &r.route_match;
    let path_match = match (&rm.prefix, &rm.path, &rm.safe_regex) {
        (Some(p), None, None) => PathMatch::Prefix(p.clone()),
        (None, Some(p), None) => PathMatch::Exact(p.clone()),
        (None, None, Some(re)) => PathMatch::Regex(regex(&format!("{mp}.safe_regex"), re)?),
        _ => return err(&mp, "exactly one of prefix, path, safe_regex is required"),
    };
    let headers = rm
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_match(&format!("{mp}.headers[{i}]"), h))
        .collect::<Result<_, _>>()?;
    let query = rm
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let p = format!("{mp}.query_parameters[{i}]");
            Ok(QueryMatch {
                name: q.name.clone(),
                value: value_match(&p, &q.string_match, q.present_match)?,
            })
        })
        .collect::<Result<_, _>>()?;
    let action = match (&r.route, &r.redirect, &r.direct_response) {
        (Some(a), None, None) => Action::Forward(forward(&format!("{path}.route"), a, clusters)?),
        (None, Some(rd), None) => Action::Redirect(Redirect {
            scheme: rd.scheme_redirect.clone(),
            host: rd.host_redirect.clone(),
            port: rd.port_redirect,
            path: rd.path_redirect.clone(),
            prefix_rewrite: rd.prefix_rewrite.clone(),
            status: match rd.response_code {
                RedirectResponseCode::MovedPermanently => StatusCode::MOVED_PERMANENTLY,
                RedirectResponseCode::Found => StatusCode::FOUND,
                RedirectResponseCode::SeeOther => StatusCode::SEE_OTHER,
                RedirectResponseCode::TemporaryRedirect => StatusCode::TEMPORARY_REDIRECT,
                RedirectResponseCode::PermanentRedirect => StatusCode::PERMANENT_REDIRECT,
            },
            strip_query: rd.strip_query,
        }),
        (None, None, Some(d)) => Action::Direct {
            status: status(&format!("{path}.direct_response.status"), d.status)?,
            body: d.body.clone().unwrap_or_default(),
        },
        _ => {
            return err(
                path,
                "exactly one of route, redirect, direct_response is required",
            )
        }
    };
    let fault = r
        .fault
        .as_ref()
        .map(|f| -> Result<Fault, ConfigError> {
            let fp = format!("{path}.fault");
            Ok(Fault {
                delay: f
                    .delay
                    .as_ref()
                    .map(|d| {
                        Ok::<_, ConfigError>((
                            duration(&format!("{fp}.delay.fixed_delay"), &d.fixed_delay)?,
                            fraction(&format!("{fp}.delay.percentage"), &d.percentage)?,
                        ))
                    })
                    .transpose()?,
                abort: f
                    .abort
                    .as_ref()
                    .map(|a| {
                        Ok::<_, ConfigError>((
                            status(&format!("{fp}.abort.http_status"), a.http_status)?,
                            fraction(&format!("{fp}.abort.percentage"), &a.percentage)?,
                        ))
                    })
                    .transpose()?,
            })
        })
        .transpose()?;
    Ok(Route {
        name: r.name.clone(),
        path: path_match,
        headers,
        query,
        action,
        request_headers: header_mods(
            &format!("{path}.request_headers"),
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
        )?,
        response_headers: header_mods(
            &format!("{path}.response_headers"),
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
        fault,
    })
}

fn forward(
    path: &str,
    a: &m::RouteAction,
    clusters: &HashMap<String, Arc<ClusterConfig>>,
) -> Result<Forward, ConfigError> {
    let targets = match (&a.cluster, &a.weighted_clusters) {
        (Some(c), None) => vec![WeightedCluster {
            cluster: lookup(&format!("{path}.cluster"), c, clusters)?,
            weight: 1,
            request_headers: HeaderMods::default(),
            response_headers: HeaderMods::default(),
        }],
        (None, Some(w)) => {
            let mut v = Vec::new();
            for (i, cw) in w.clusters.iter().enumerate() {
                let p = format!("{path}.weighted_clusters.clusters[{i}]");
                if cw.weight > 0 {
                    v.push(WeightedCluster {
                        cluster: lookup(&p, &cw.name, clusters)?,
                        weight: cw.weight,
                        request_headers: header_mods(
                            &format!("{p}.request_headers"),
                            &cw.request_headers_to_add,
                            &cw.request_headers_to_remove,
                        )?,
                        response_headers: header_mods(
                            &format!("{p}.response_headers"),
                            &cw.response_headers_to_add,
                            &cw.response_headers_to_remove,
                        )?,
                    });
                }
            }
            v
        }
        _ => {
            return err(
                path,
                "exactly one of cluster, weighted_clusters is required",
            )
        }
    };
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    let Ok(total_weight) = u32::try_from(total) else {
        return err(
            &format!("{path}.weighted_clusters"),
            "weights add up to more than 4294967295",
        );
    };
    if total_weight == 0 {
        return err(
            &format!("{path}.weighted_clusters"),
            "weights must add up to more than 0",
        );
    }
    let retry = a
        .retry_policy
        .as_ref()
        .map(|rp| retry(&format!("{path}.retry_policy"), rp))
        .transpose()?;
    let mut mirrors = Vec::new();
    for (i, mp) in a.request_mirror_policies.iter().enumerate() {
        let p = format!("{path}.request_mirror_policies[{i}]");
        let f = match &mp.runtime_fraction {
            Some(rf) => fraction(&format!("{p}.runtime_fraction"), &rf.default_value)?,
            None => 1.0,
        };
        mirrors.push((lookup(&format!("{p}.cluster"), &mp.cluster, clusters)?, f));
    }
    let timeout = match &a.timeout {
        Some(t) => Some(duration(&format!("{path}.timeout"), t)?).filter(|d| !d.is_zero()),
        None => Some(DEFAULT_TIMEOUT),
    };
    if let Some(h) = &a.host_rewrite_literal {
        if http::uri::Authority::try_from(h.as_str()).is_err() {
            return err(
                &format!("{path}.host_rewrite_literal"),
                format!("invalid host {h:?}"),
            );
        }
    }
    Ok(Forward {
        clusters: targets,
        total_weight,
        prefix_rewrite: a.prefix_rewrite.clone(),
        regex_rewrite: a
            .regex_rewrite
            .as_ref()
            .map(|r| {
                let re = regex::Regex::new(&r.pattern.regex).or_else(|e| {
                    err(
                        &format!("{path}.regex_rewrite.pattern.regex"),
                        format!(
                            "invalid regex {:?}: {}",
                            r.pattern.regex,
                            one_line(&e.to_string())
                        ),
                    )
                })?;
                Ok::<_, ConfigError>((re, r.substitution.clone()))
            })
            .transpose()?,
        host_rewrite: a.host_rewrite_literal.clone(),
        timeout,
        retry,
        mirrors,
    })
}

fn retry(path: &str, rp: &m::RetryPolicy) -> Result<Retry, ConfigError> {
    let mut r = Retry {
        num_retries: rp.num_retries.unwrap_or(1),
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        status_codes: Vec::new(),
        per_try_timeout: rp
            .per_try_timeout
            .as_deref()
            .map(|d| duration(&format!("{path}.per_try_timeout"), d))
            .transpose()?,
        base_interval: Duration::from_millis(25),
        max_interval: Duration::from_millis(250),
    };
    for cond in rp
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match cond {
            "5xx" => r.on_5xx = true,
            "gateway-error" => r.on_gateway_error = true,
            "connect-failure" => r.on_connect_failure = true,
            "reset" => r.on_reset = true,
            "retriable-status-codes" => r.status_codes = rp.retriable_status_codes.clone(),
            // Others (`refused-stream`, gRPC's `unavailable`, `cancelled`,
            // ... which istiod puts on every route) retry nothing here.
            // Envoy, too, skips conditions it does not know: refusing the
            // route would refuse the whole table.
            _ => {}
        }
    }
    if let Some(b) = &rp.retry_back_off {
        let bp = format!("{path}.retry_back_off");
        r.base_interval = duration(&format!("{bp}.base_interval"), &b.base_interval)?;
        r.max_interval = match &b.max_interval {
            Some(mi) => duration(&format!("{bp}.max_interval"), mi)?,
            None => r.base_interval * 10,
        };
        if r.base_interval.is_zero() || r.max_interval < r.base_interval {
            return err(&bp, "base_interval must be > 0 and <= max_interval");
        }
    }
    Ok(r)
}

fn rbac_filters(path: &str, filters: &[m::Rbac]) -> Result<Vec<RbacFilter>, ConfigError> {
    let mut out = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let fp = format!("{path}[{i}]");
        let mut policies = Vec::new();
        for (name, p) in &f.policies {
            let pp = format!("{fp}.policies.{name}");
            let mut permissions = Vec::new();
            for (k, perm) in p.permissions.iter().enumerate() {
                let kp = format!("{pp}.permissions[{k}]");
                let sm = |field: &str, l: &[m::StringMatcher]| {
                    l.iter()
                        .enumerate()
                        .map(|(x, s)| string_matcher(&format!("{kp}.{field}[{x}]"), s))
                        .collect::<Result<Vec<_>, _>>()
                };
                permissions.push(rbac::Permission {
                    methods: perm.methods.clone(),
                    not_methods: perm.not_methods.clone(),
                    paths: sm("paths", &perm.paths)?,
                    not_paths: sm("not_paths", &perm.not_paths)?,
                    headers: perm
                        .headers
                        .iter()
                        .enumerate()
                        .map(|(x, h)| header_match(&format!("{kp}.headers[{x}]"), h))
                        .collect::<Result<_, _>>()?,
                    destination_ports: perm.destination_ports.clone(),
                });
            }
            let principals = p
                .principals
                .iter()
                .map(|pr| rbac::Principal {
                    principals: pr.principals.clone(),
                    not_principals: pr.not_principals.clone(),
                    namespaces: pr.namespaces.clone(),
                    not_namespaces: pr.not_namespaces.clone(),
                })
                .collect();
            policies.push((
                name.clone(),
                RbacPolicy {
                    permissions,
                    principals,
                },
            ));
        }
        out.push(RbacFilter {
            action: f.action,
            policies,
        });
    }
    Ok(out)
}

fn chain(
    path: &str,
    fc: &m::FilterChain,
    tables: &HashMap<String, Arc<RouteTable>>,
    clusters: &HashMap<String, Arc<ClusterConfig>>,
) -> Result<Chain, ConfigError> {
    let prefixes = fc
        .filter_chain_match
        .prefix_ranges
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .or_else(|_| {
                    err(
                        &format!("{path}.filter_chain_match.prefix_ranges[{i}]"),
                        format!("{p:?} is not a CIDR"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let kind = match (&fc.http_connection_manager, &fc.tcp_proxy) {
        (Some(h), None) => {
            let hp = format!("{path}.http_connection_manager");
            let routes = tables
                .get(&h.route_config_name)
                .cloned()
                .ok_or_else(|| ConfigError {
                    path: format!("{hp}.route_config_name"),
                    message: format!("unknown route configuration {:?}", h.route_config_name),
                })?;
            ChainKind::Http(Arc::new(HttpChain {
                codec: h.codec_type,
                max_header_bytes: h.max_request_headers_kb.unwrap_or(60).clamp(1, 8192) as usize
                    * 1024,
                path: crate::path::PathNormalization {
                    normalize: h.normalize_path,
                    merge_slashes: h.merge_slashes,
                    escaped_slashes: match h.path_with_escaped_slashes_action {
                        m::EscapedSlashesAction::KeepUnchanged => EscapedSlashes::Keep,
                        m::EscapedSlashesAction::RejectRequest => EscapedSlashes::Reject,
                        m::EscapedSlashesAction::UnescapeAndRedirect => {
                            EscapedSlashes::UnescapeAndRedirect
                        }
                        m::EscapedSlashesAction::UnescapeAndForward => {
                            EscapedSlashes::UnescapeAndForward
                        }
                    },
                },
                rbac: rbac_filters(&format!("{hp}.rbac"), &h.rbac)?,
                routes,
            }))
        }
        (None, Some(t)) => {
            let tp = format!("{path}.tcp_proxy");
            ChainKind::Tcp(Arc::new(TcpChain {
                cluster: lookup(&format!("{tp}.cluster"), &t.cluster, clusters)?,
                rbac: rbac_filters(&format!("{tp}.rbac"), &t.rbac)?,
            }))
        }
        _ => {
            return err(
                path,
                "exactly one of http_connection_manager, tcp_proxy is required",
            )
        }
    };
    for (i, p) in fc
        .filter_chain_match
        .application_protocols
        .iter()
        .enumerate()
    {
        if !matches!(p.as_str(), "http/1.1" | "h2c") {
            return err(
                &format!("{path}.filter_chain_match.application_protocols[{i}]"),
                format!("{p:?} is not sniffed; use \"http/1.1\" or \"h2c\""),
            );
        }
    }
    Ok(Chain {
        name: fc.name.clone(),
        port: fc.filter_chain_match.destination_port,
        prefixes,
        application_protocols: fc.filter_chain_match.application_protocols.clone(),
        kind,
    })
}
