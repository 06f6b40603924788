//! Envoy v3 resources → the waypoint's configuration model
//! ([`crate::config::model`]). The model already mirrors Envoy's shapes,
//! so this is mostly field-for-field copying; the departures (typed
//! extensions inlined, RBAC trees flattened, durations as strings) are the
//! table in the README. Anything the model cannot express is an error
//! naming the resource and field, and becomes the NACK's message.

use std::collections::{BTreeMap, BTreeSet};

use mesh_proto::envoy::config::cluster::v3 as pc;
use mesh_proto::envoy::config::core::v3 as core;
use mesh_proto::envoy::config::endpoint::v3 as pe;
use mesh_proto::envoy::config::listener::v3 as pl;
use mesh_proto::envoy::config::rbac::v3 as prbac;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::envoy::extensions::filters::http::fault::v3 as pfault;
use mesh_proto::envoy::extensions::filters::http::rbac::v3 as phrbac;
use mesh_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use mesh_proto::envoy::extensions::filters::network::rbac::v3 as pnrbac;
use mesh_proto::envoy::extensions::filters::network::tcp_proxy::v3 as ptcp;
use mesh_proto::envoy::extensions::upstreams::http::v3 as pup;
use mesh_proto::envoy::r#type::matcher::v3 as pm;
use mesh_proto::envoy::r#type::v3 as pt;
use mesh_proto::type_url;
use prost::Message;

use crate::config::model as m;
use crate::config::ConfigError;

/// The per-route fault config key (Envoy's filter name).
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// `Cluster.typed_extension_protocol_options` key for the upstream protocol.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

type Result<T> = std::result::Result<T, ConfigError>;

fn err<T>(path: &str, message: impl Into<String>) -> Result<T> {
    Err(ConfigError {
        path: path.to_string(),
        message: message.into(),
    })
}

/// Decodes an `Any` whose type we know, checking the type URL.
fn any<T: Message + Default>(path: &str, a: &prost_types::Any, want: &str) -> Result<T> {
    if a.type_url != want {
        return err(path, format!("expected {want}, got {:?}", a.type_url));
    }
    T::decode(a.value.as_slice()).or_else(|e| err(path, format!("cannot decode {want}: {e}")))
}

/// `google.protobuf.Duration` → the model's `"1.5s"` form.
fn duration(path: &str, d: &prost_types::Duration) -> Result<String> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return err(
            path,
            format!("invalid duration {}s {}ns", d.seconds, d.nanos),
        );
    }
    Ok(format!("{}.{:09}s", d.seconds, d.nanos))
}

fn opt_duration(path: &str, d: &Option<prost_types::Duration>) -> Result<Option<String>> {
    d.as_ref().map(|d| duration(path, d)).transpose()
}

fn u16_of(path: &str, v: u32) -> Result<u16> {
    u16::try_from(v).or_else(|_| err(path, format!("{v} is out of range")))
}

/// A listener and the route configurations it carries inline
/// (`HttpConnectionManager.route_config`).
pub struct TranslatedListener {
    pub listener: m::Listener,
    pub inline_routes: Vec<m::RouteConfiguration>,
}

pub fn listener(l: &pl::Listener) -> Result<TranslatedListener> {
    let base = format!("Listener {:?}", l.name);
    let mut inline_routes = Vec::new();
    let mut chains = Vec::new();
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let path = format!("{base}.filter_chains[{i}]");
        chains.push(filter_chain(&path, fc, &mut inline_routes)?);
    }
    let default_filter_chain = l
        .default_filter_chain
        .as_ref()
        .map(|fc| {
            filter_chain(
                &format!("{base}.default_filter_chain"),
                fc,
                &mut inline_routes,
            )
        })
        .transpose()?;
    Ok(TranslatedListener {
        listener: m::Listener {
            name: l.name.clone(),
            filter_chains: chains,
            default_filter_chain,
        },
        inline_routes,
    })
}

fn filter_chain(
    path: &str,
    fc: &pl::FilterChain,
    inline_routes: &mut Vec<m::RouteConfiguration>,
) -> Result<m::FilterChain> {
    let fcm = fc.filter_chain_match.clone().unwrap_or_default();
    let destination_port = fcm
        .destination_port
        .map(|p| u16_of(&format!("{path}.filter_chain_match.destination_port"), p))
        .transpose()?;
    let prefix_ranges = fcm
        .prefix_ranges
        .iter()
        .map(|c| match c.prefix_len {
            Some(n) => format!("{}/{n}", c.address_prefix),
            None => c.address_prefix.clone(),
        })
        .collect();
    let mut out = m::FilterChain {
        name: fc.name.clone(),
        filter_chain_match: m::FilterChainMatch {
            destination_port,
            prefix_ranges,
            application_protocols: fcm.application_protocols.clone(),
        },
        http_connection_manager: None,
        tcp_proxy: None,
    };
    let mut network_rbac = Vec::new();
    for (j, f) in fc.filters.iter().enumerate() {
        let fpath = format!("{path}.filters[{j}].typed_config");
        let Some(pl::filter::ConfigType::TypedConfig(tc)) = &f.config_type else {
            return err(&fpath, format!("filter {:?} has no typed_config", f.name));
        };
        match tc.type_url.as_str() {
            type_url::HTTP_CONNECTION_MANAGER => {
                let h: hcm::HttpConnectionManager =
                    any(&fpath, tc, type_url::HTTP_CONNECTION_MANAGER)?;
                let inline_name = format!("{}#{}", fc.name, j);
                out.http_connection_manager =
                    Some(connection_manager(&fpath, &h, inline_name, inline_routes)?);
            }
            type_url::TCP_PROXY => {
                let t: ptcp::TcpProxy = any(&fpath, tc, type_url::TCP_PROXY)?;
                let Some(ptcp::tcp_proxy::ClusterSpecifier::Cluster(cluster)) = t.cluster_specifier
                else {
                    return err(&format!("{fpath}.cluster"), "tcp_proxy needs a cluster");
                };
                out.tcp_proxy = Some(m::TcpProxy {
                    stat_prefix: t.stat_prefix,
                    cluster,
                    rbac: Vec::new(),
                });
            }
            type_url::NETWORK_RBAC => {
                let r: pnrbac::Rbac = any(&fpath, tc, type_url::NETWORK_RBAC)?;
                if let Some(rules) = &r.rules {
                    network_rbac.push(rbac(&format!("{fpath}.rules"), rules)?);
                }
            }
            // Other network filters (stats, metadata exchange) carry
            // nothing the waypoint acts on.
            _ => {}
        }
    }
    if !network_rbac.is_empty() {
        match &mut out.tcp_proxy {
            Some(t) => t.rbac = network_rbac,
            None => {
                return err(
                    path,
                    "network RBAC filters are only supported with tcp_proxy",
                )
            }
        }
    }
    Ok(out)
}

fn connection_manager(
    path: &str,
    h: &hcm::HttpConnectionManager,
    inline_name: String,
    inline_routes: &mut Vec<m::RouteConfiguration>,
) -> Result<m::HttpConnectionManager> {
    use hcm::http_connection_manager::{CodecType, RouteSpecifier};
    let codec_type = match h.codec_type() {
        CodecType::Auto => m::CodecType::Auto,
        CodecType::Http1 => m::CodecType::Http1,
        CodecType::Http2 => m::CodecType::Http2,
        CodecType::Http3 => return err(&format!("{path}.codec_type"), "HTTP3 is not supported"),
    };
    let route_config_name = match &h.route_specifier {
        Some(RouteSpecifier::Rds(r)) => r.route_config_name.clone(),
        Some(RouteSpecifier::RouteConfig(rc)) => {
            let mut t = route_configuration_at(&format!("{path}.route_config"), rc)?;
            t.name = inline_name;
            let name = t.name.clone();
            inline_routes.push(t);
            name
        }
        None => return err(path, "needs rds or route_config"),
    };
    let mut rbacs = Vec::new();
    for (k, f) in h.http_filters.iter().enumerate() {
        let fpath = format!("{path}.http_filters[{k}]");
        let tc = f
            .config_type
            .as_ref()
            .map(|hcm::http_filter::ConfigType::TypedConfig(tc)| tc);
        let ty = tc.map(filter_type);
        match (tc, ty.as_deref()) {
            (Some(tc), Some(type_url::HTTP_RBAC)) => {
                let p = format!("{fpath}.typed_config");
                let r: phrbac::Rbac = any(&p, tc, type_url::HTTP_RBAC)?;
                // Without `rules` only `shadow_rules`: they log, never deny.
                if let Some(rules) = &r.rules {
                    rbacs.push(rbac(&format!("{p}.rules"), rules)?);
                }
            }
            (_, Some(t)) if SKIPPED_HTTP_FILTERS.contains(&t) => {}
            _ if f.is_optional || f.disabled => {}
            (_, t) => {
                // Serving without it could let through what it refuses
                // (ext_authz for a CUSTOM policy, jwt_authn, ...).
                return err(
                    &fpath,
                    format!(
                        "HTTP filter {:?} ({}) is not supported; mark it is_optional to serve without it",
                        f.name,
                        t.unwrap_or("no typed_config")
                    ),
                );
            }
        }
    }
    use hcm::http_connection_manager::PathWithEscapedSlashesAction as A;
    Ok(m::HttpConnectionManager {
        stat_prefix: h.stat_prefix.clone(),
        codec_type,
        route_config_name,
        max_request_headers_kb: h.max_request_headers_kb,
        rbac: rbacs,
        normalize_path: h.normalize_path.unwrap_or(false),
        merge_slashes: h.merge_slashes,
        path_with_escaped_slashes_action: match h.path_with_escaped_slashes_action() {
            A::ImplementationSpecificDefault | A::KeepUnchanged => {
                m::EscapedSlashesAction::KeepUnchanged
            }
            A::RejectRequest => m::EscapedSlashesAction::RejectRequest,
            A::UnescapeAndRedirect => m::EscapedSlashesAction::UnescapeAndRedirect,
            A::UnescapeAndForward => m::EscapedSlashesAction::UnescapeAndForward,
        },
    })
}

/// HTTP filters istiod puts in a waypoint's chain that change nothing this
/// proxy decides: routing (done anyway), CORS and fault (per route here),
/// and telemetry.
const SKIPPED_HTTP_FILTERS: &[&str] = &[
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
    type_url::HTTP_FAULT,
    "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "type.googleapis.com/io.istio.http.peer_metadata.Config",
    "type.googleapis.com/stats.PluginConfig",
    "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
];

/// `udpa.type.v1.TypedStruct` and `xds.type.v3.TypedStruct`: a filter's
/// config as JSON-like struct; only the type it stands for is read.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// The type of a filter's config, looking through a `TypedStruct`.
fn filter_type(tc: &prost_types::Any) -> String {
    const TYPED_STRUCTS: [&str; 2] = [
        "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type.googleapis.com/xds.type.v3.TypedStruct",
    ];
    if TYPED_STRUCTS.contains(&tc.type_url.as_str()) {
        if let Ok(t) = TypedStruct::decode(tc.value.as_slice()) {
            return t.type_url;
        }
    }
    tc.type_url.clone()
}

pub fn route_configuration(rc: &pr::RouteConfiguration) -> Result<m::RouteConfiguration> {
    route_configuration_at(&format!("RouteConfiguration {:?}", rc.name), rc)
}

fn route_configuration_at(
    path: &str,
    rc: &pr::RouteConfiguration,
) -> Result<m::RouteConfiguration> {
    let mut vhosts = Vec::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vpath = format!("{path}.virtual_hosts[{i}]");
        let mut routes = Vec::new();
        for (j, r) in vh.routes.iter().enumerate() {
            routes.push(route(&format!("{vpath}.routes[{j}]"), r)?);
        }
        vhosts.push(m::VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.clone(),
            routes,
        });
    }
    Ok(m::RouteConfiguration {
        name: rc.name.clone(),
        virtual_hosts: vhosts,
    })
}

fn route(path: &str, r: &pr::Route) -> Result<m::Route> {
    let rm = r.r#match.clone().unwrap_or_default();
    let mpath = format!("{path}.match");
    let mut route_match = m::RouteMatch::default();
    match &rm.path_specifier {
        Some(pr::route_match::PathSpecifier::Prefix(p)) => route_match.prefix = Some(p.clone()),
        Some(pr::route_match::PathSpecifier::Path(p)) => route_match.path = Some(p.clone()),
        Some(pr::route_match::PathSpecifier::SafeRegex(re)) => {
            route_match.safe_regex = Some(regex(re))
        }
        None => return err(&mpath, "needs one of prefix, path, safe_regex"),
    }
    if rm.case_sensitive == Some(false) {
        return err(
            &format!("{mpath}.case_sensitive"),
            "case-insensitive paths are not supported",
        );
    }
    for (k, h) in rm.headers.iter().enumerate() {
        route_match
            .headers
            .push(header_matcher(&format!("{mpath}.headers[{k}]"), h)?);
    }
    for (k, q) in rm.query_parameters.iter().enumerate() {
        use pr::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let qpath = format!("{mpath}.query_parameters[{k}]");
        let (string_match, present_match) = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => (Some(string_matcher(&qpath, s)?), None),
            Some(Q::PresentMatch(b)) => (None, Some(*b)),
            None => (None, Some(true)),
        };
        route_match.query_parameters.push(m::QueryParameterMatcher {
            name: q.name.clone(),
            string_match,
            present_match,
        });
    }
    let mut out = m::Route {
        name: r.name.clone(),
        route_match,
        request_headers_to_add: headers_to_add(&r.request_headers_to_add),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: headers_to_add(&r.response_headers_to_add),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        ..Default::default()
    };
    match &r.action {
        Some(pr::route::Action::Route(a)) => {
            out.route = Some(route_action(&format!("{path}.route"), a)?)
        }
        Some(pr::route::Action::Redirect(a)) => {
            out.redirect = Some(redirect(&format!("{path}.redirect"), a)?)
        }
        Some(pr::route::Action::DirectResponse(d)) => {
            let dpath = format!("{path}.direct_response");
            use core::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => None,
                Some(Specifier::InlineString(s)) => Some(s.clone()),
                Some(Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(_) => {
                    return err(&format!("{dpath}.body"), "only inline bodies are supported")
                }
            };
            out.direct_response = Some(m::DirectResponse {
                status: u16_of(&format!("{dpath}.status"), d.status)?,
                body,
            });
        }
        None => return err(path, "needs one of route, redirect, direct_response"),
    }
    if let Some(f) = r.typed_per_filter_config.get(FAULT_FILTER) {
        let fpath = format!("{path}.typed_per_filter_config[{FAULT_FILTER:?}]");
        let f: pfault::HttpFault = any(&fpath, f, type_url::HTTP_FAULT)?;
        out.fault = Some(fault(&fpath, &f)?);
    }
    Ok(out)
}

fn regex(r: &pm::RegexMatcher) -> m::RegexMatcher {
    m::RegexMatcher {
        regex: r.regex.clone(),
    }
}

fn string_matcher(path: &str, s: &pm::StringMatcher) -> Result<m::StringMatcher> {
    use pm::string_matcher::MatchPattern as P;
    let mut out = m::StringMatcher {
        ignore_case: s.ignore_case,
        ..Default::default()
    };
    match &s.match_pattern {
        Some(P::Exact(v)) => out.exact = Some(v.clone()),
        Some(P::Prefix(v)) => out.prefix = Some(v.clone()),
        Some(P::Suffix(v)) => out.suffix = Some(v.clone()),
        Some(P::Contains(v)) => out.contains = Some(v.clone()),
        Some(P::SafeRegex(r)) => out.safe_regex = Some(regex(r)),
        None => return err(path, "string matcher needs a pattern"),
    }
    Ok(out)
}

fn header_matcher(path: &str, h: &pr::HeaderMatcher) -> Result<m::HeaderMatcher> {
    use pr::header_matcher::HeaderMatchSpecifier as H;
    let sm = |f: fn(&mut m::StringMatcher, String), v: &str| {
        let mut s = m::StringMatcher::default();
        f(&mut s, v.to_string());
        Some(s)
    };
    let (string_match, present_match) = match &h.header_match_specifier {
        Some(H::StringMatch(s)) => (Some(string_matcher(path, s)?), None),
        Some(H::ExactMatch(v)) => (sm(|s, v| s.exact = Some(v), v), None),
        Some(H::PrefixMatch(v)) => (sm(|s, v| s.prefix = Some(v), v), None),
        Some(H::SuffixMatch(v)) => (sm(|s, v| s.suffix = Some(v), v), None),
        Some(H::ContainsMatch(v)) => (sm(|s, v| s.contains = Some(v), v), None),
        Some(H::SafeRegexMatch(r)) => (
            Some(m::StringMatcher {
                safe_regex: Some(regex(r)),
                ..Default::default()
            }),
            None,
        ),
        Some(H::PresentMatch(b)) => (None, Some(*b)),
        // Envoy: no specifier means "present".
        None => (None, Some(true)),
    };
    Ok(m::HeaderMatcher {
        name: h.name.clone(),
        string_match,
        present_match,
        invert_match: h.invert_match,
    })
}

fn headers_to_add(v: &[core::HeaderValueOption]) -> Vec<m::HeaderValueOption> {
    use core::header_value_option::HeaderAppendAction as A;
    v.iter()
        .filter_map(|o| {
            let h = o.header.as_ref()?;
            let value = if h.value.is_empty() && !h.raw_value.is_empty() {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            } else {
                h.value.clone()
            };
            let append_action = match (o.append, o.append_action()) {
                // The deprecated `append: false` means overwrite.
                (Some(false), A::AppendIfExistsOrAdd) => m::AppendAction::OverwriteIfExistsOrAdd,
                (_, A::AppendIfExistsOrAdd) => m::AppendAction::AppendIfExistsOrAdd,
                (_, A::AddIfAbsent) => m::AppendAction::AddIfAbsent,
                (_, A::OverwriteIfExistsOrAdd | A::OverwriteIfExists) => {
                    m::AppendAction::OverwriteIfExistsOrAdd
                }
            };
            Some(m::HeaderValueOption {
                header: m::HeaderValue {
                    key: h.key.clone(),
                    value,
                },
                append_action,
            })
        })
        .collect()
}

fn fraction(p: &Option<pt::FractionalPercent>) -> m::FractionalPercent {
    use pt::fractional_percent::DenominatorType as D;
    match p {
        None => m::FractionalPercent {
            numerator: 100,
            denominator: m::Denominator::Hundred,
        },
        Some(p) => m::FractionalPercent {
            numerator: p.numerator,
            denominator: match p.denominator() {
                D::Hundred => m::Denominator::Hundred,
                D::TenThousand => m::Denominator::TenThousand,
                D::Million => m::Denominator::Million,
            },
        },
    }
}

fn route_action(path: &str, a: &pr::RouteAction) -> Result<m::RouteAction> {
    use pr::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let mut out = m::RouteAction::default();
    match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => out.cluster = Some(c.clone()),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            out.weighted_clusters = Some(m::WeightedClusters {
                clusters: w
                    .clusters
                    .iter()
                    .map(|c| m::ClusterWeight {
                        name: c.name.clone(),
                        weight: c.weight.unwrap_or(0),
                        request_headers_to_add: headers_to_add(&c.request_headers_to_add),
                        request_headers_to_remove: c.request_headers_to_remove.clone(),
                        response_headers_to_add: headers_to_add(&c.response_headers_to_add),
                        response_headers_to_remove: c.response_headers_to_remove.clone(),
                    })
                    .collect(),
            })
        }
        None => return err(path, "needs cluster or weighted_clusters"),
    }
    if !a.prefix_rewrite.is_empty() {
        out.prefix_rewrite = Some(a.prefix_rewrite.clone());
    }
    if let Some(rr) = &a.regex_rewrite {
        let Some(pattern) = &rr.pattern else {
            return err(&format!("{path}.regex_rewrite.pattern"), "missing");
        };
        out.regex_rewrite = Some(m::RegexMatchAndSubstitute {
            pattern: regex(pattern),
            substitution: rr.substitution.clone(),
        });
    }
    if let Some(HostRewriteSpecifier::HostRewriteLiteral(h)) = &a.host_rewrite_specifier {
        out.host_rewrite_literal = Some(h.clone());
    }
    out.timeout = opt_duration(&format!("{path}.timeout"), &a.timeout)?;
    if let Some(rp) = &a.retry_policy {
        let rpath = format!("{path}.retry_policy");
        out.retry_policy = Some(m::RetryPolicy {
            retry_on: rp.retry_on.clone(),
            num_retries: rp.num_retries,
            per_try_timeout: opt_duration(
                &format!("{rpath}.per_try_timeout"),
                &rp.per_try_timeout,
            )?,
            retriable_status_codes: rp
                .retriable_status_codes
                .iter()
                .enumerate()
                .map(|(i, c)| u16_of(&format!("{rpath}.retriable_status_codes[{i}]"), *c))
                .collect::<Result<_>>()?,
            retry_back_off: rp
                .retry_back_off
                .as_ref()
                .map(|b| -> Result<m::RetryBackOff> {
                    let bpath = format!("{rpath}.retry_back_off");
                    let Some(base) = &b.base_interval else {
                        return err(&format!("{bpath}.base_interval"), "missing");
                    };
                    Ok(m::RetryBackOff {
                        base_interval: duration(&format!("{bpath}.base_interval"), base)?,
                        max_interval: opt_duration(
                            &format!("{bpath}.max_interval"),
                            &b.max_interval,
                        )?,
                    })
                })
                .transpose()?,
        });
    }
    out.request_mirror_policies =
        a.request_mirror_policies
            .iter()
            .map(|p| m::RequestMirrorPolicy {
                cluster: p.cluster.clone(),
                runtime_fraction: p.runtime_fraction.as_ref().map(|f| {
                    m::RuntimeFractionalPercent {
                        default_value: fraction(&f.default_value),
                    }
                }),
            })
            .collect();
    Ok(out)
}

fn redirect(path: &str, a: &pr::RedirectAction) -> Result<m::RedirectAction> {
    use pr::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode as C, SchemeRewriteSpecifier,
    };
    let mut out = m::RedirectAction {
        host_redirect: (!a.host_redirect.is_empty()).then(|| a.host_redirect.clone()),
        port_redirect: match a.port_redirect {
            0 => None,
            p => Some(u16_of(&format!("{path}.port_redirect"), p)?),
        },
        response_code: match a.response_code() {
            C::MovedPermanently => m::RedirectResponseCode::MovedPermanently,
            C::Found => m::RedirectResponseCode::Found,
            C::SeeOther => m::RedirectResponseCode::SeeOther,
            C::TemporaryRedirect => m::RedirectResponseCode::TemporaryRedirect,
            C::PermanentRedirect => m::RedirectResponseCode::PermanentRedirect,
        },
        strip_query: a.strip_query,
        ..Default::default()
    };
    match &a.scheme_rewrite_specifier {
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => {
            out.scheme_redirect = Some("https".into())
        }
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => out.scheme_redirect = Some(s.clone()),
        _ => {}
    }
    match &a.path_rewrite_specifier {
        Some(PathRewriteSpecifier::PathRedirect(p)) => out.path_redirect = Some(p.clone()),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) => out.prefix_rewrite = Some(p.clone()),
        Some(PathRewriteSpecifier::RegexRewrite(_)) => {
            return err(
                &format!("{path}.regex_rewrite"),
                "regex rewrites in redirects are not supported",
            )
        }
        None => {}
    }
    Ok(out)
}

fn fault(path: &str, f: &pfault::HttpFault) -> Result<m::HttpFault> {
    use mesh_proto::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let Some(FaultDelaySecifier::FixedDelay(fd)) = &d.fault_delay_secifier else {
                return err(
                    &format!("{path}.delay.fixed_delay"),
                    "only fixed delays are supported",
                );
            };
            Some(m::FaultDelay {
                fixed_delay: duration(&format!("{path}.delay.fixed_delay"), fd)?,
                percentage: fraction(&d.percentage),
            })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let Some(pfault::fault_abort::ErrorType::HttpStatus(s)) = a.error_type else {
                return err(
                    &format!("{path}.abort.http_status"),
                    "only HTTP aborts are supported",
                );
            };
            Some(m::FaultAbort {
                http_status: u16_of(&format!("{path}.abort.http_status"), s)?,
                percentage: fraction(&a.percentage),
            })
        }
    };
    Ok(m::HttpFault { delay, abort })
}

// --- RBAC: Envoy's trees, flattened into the model's any-of lists ---------

fn rbac(path: &str, r: &prbac::Rbac) -> Result<m::Rbac> {
    let action = match r.action() {
        prbac::rbac::Action::Allow => m::RbacAction::Allow,
        prbac::rbac::Action::Deny => m::RbacAction::Deny,
        prbac::rbac::Action::Log => return err(&format!("{path}.action"), "LOG is not supported"),
    };
    let mut policies = BTreeMap::new();
    for (name, p) in &r.policies {
        let ppath = format!("{path}.policies[{name:?}]");
        let mut permissions = Vec::new();
        for (i, x) in p.permissions.iter().enumerate() {
            permissions.extend(permission(&format!("{ppath}.permissions[{i}]"), x)?);
        }
        let mut principals = Vec::new();
        for (i, x) in p.principals.iter().enumerate() {
            principals.extend(principal(&format!("{ppath}.principals[{i}]"), x)?);
        }
        policies.insert(
            name.clone(),
            m::Policy {
                permissions,
                principals,
            },
        );
    }
    Ok(m::Rbac { action, policies })
}

/// A permission in disjunctive normal form: any of the returned entries.
fn permission(path: &str, p: &prbac::Permission) -> Result<Vec<m::Permission>> {
    use prbac::permission::Rule;
    let one = |f: &dyn Fn(&mut m::Permission)| {
        let mut x = m::Permission::default();
        f(&mut x);
        Ok(vec![x])
    };
    match &p.rule {
        None => err(path, "permission needs a rule"),
        Some(Rule::Any(_)) => one(&|_| {}),
        Some(Rule::OrRules(s)) => {
            let mut out = Vec::new();
            for (i, r) in s.rules.iter().enumerate() {
                out.extend(permission(&format!("{path}.or_rules.rules[{i}]"), r)?);
            }
            Ok(out)
        }
        Some(Rule::AndRules(s)) => {
            let mut acc = vec![m::Permission::default()];
            for (i, r) in s.rules.iter().enumerate() {
                let rpath = format!("{path}.and_rules.rules[{i}]");
                let alts = permission(&rpath, r)?;
                let mut next = Vec::new();
                for a in &acc {
                    for b in &alts {
                        next.push(merge_permission(&rpath, a, b)?);
                    }
                }
                acc = next;
            }
            Ok(acc)
        }
        Some(Rule::Header(h)) => {
            let hm = header_matcher(&format!("{path}.header"), h)?;
            // Istio writes methods as `:method` exact matches.
            match (&hm.string_match, hm.invert_match) {
                (Some(m::StringMatcher { exact: Some(v), .. }), false) if hm.name == ":method" => {
                    one(&|x| x.methods = vec![v.clone()])
                }
                _ => one(&|x| x.headers = vec![hm.clone()]),
            }
        }
        Some(Rule::DestinationPort(port)) => {
            let port = u16_of(&format!("{path}.destination_port"), *port)?;
            one(&|x| x.destination_ports = vec![port])
        }
        Some(Rule::UrlPath(pmatch)) => {
            let Some(pm::path_matcher::Rule::Path(s)) = &pmatch.rule else {
                return err(&format!("{path}.url_path"), "needs path");
            };
            let s = string_matcher(&format!("{path}.url_path.path"), s)?;
            one(&|x| x.paths = vec![s.clone()])
        }
        Some(Rule::NotRule(inner)) => {
            // not(a or b) = not a and not b: only methods and paths can be negated.
            let npath = format!("{path}.not_rule");
            let mut out = m::Permission::default();
            for alt in permission(&npath, inner)? {
                let only_methods = alt.paths.is_empty() && alt.headers.is_empty();
                if alt.methods.len() == 1 && only_methods && alt.destination_ports.is_empty() {
                    out.not_methods.extend(alt.methods);
                } else if alt.paths.len() == 1 && alt.methods.is_empty() && alt.headers.is_empty() {
                    out.not_paths.extend(alt.paths);
                } else {
                    return err(&npath, "only methods and paths can be negated");
                }
            }
            Ok(vec![out])
        }
    }
}

/// `a and b`, when the model can say it (one entry per field at most).
fn merge_permission(path: &str, a: &m::Permission, b: &m::Permission) -> Result<m::Permission> {
    fn join<T: Clone>(path: &str, x: &[T], y: &[T]) -> Result<Vec<T>> {
        if !x.is_empty() && !y.is_empty() {
            return err(path, "this combination of AND rules cannot be expressed");
        }
        Ok([x, y].concat())
    }
    // Headers are all-of: an AND of header rules is their union.
    let mut headers = a.headers.clone();
    headers.extend(b.headers.iter().cloned());
    Ok(m::Permission {
        methods: join(path, &a.methods, &b.methods)?,
        not_methods: [a.not_methods.clone(), b.not_methods.clone()].concat(),
        paths: join(path, &a.paths, &b.paths)?,
        not_paths: [a.not_paths.clone(), b.not_paths.clone()].concat(),
        headers,
        destination_ports: join(path, &a.destination_ports, &b.destination_ports)?,
    })
}

/// Istio's principal forms: `exact`, `prefix*`, `*suffix`; a namespace is
/// the regex `.*/ns/<ns>/.*`.
enum Who {
    Principal(String),
    Namespace(String),
}

fn who(path: &str, s: &pm::StringMatcher) -> Result<Who> {
    use pm::string_matcher::MatchPattern as P;
    match &s.match_pattern {
        Some(P::Exact(v)) => Ok(Who::Principal(v.clone())),
        Some(P::Prefix(v)) => Ok(Who::Principal(format!("{v}*"))),
        Some(P::Suffix(v)) => Ok(Who::Principal(format!("*{v}"))),
        Some(P::SafeRegex(r)) => {
            let ns = r
                .regex
                .strip_prefix(".*/ns/")
                .and_then(|x| x.strip_suffix("/.*"))
                .filter(|ns| !ns.is_empty() && !ns.contains(['/', '*', '.', '(', '[']));
            match ns {
                Some(ns) => Ok(Who::Namespace(ns.to_string())),
                None if r.regex == ".*" || r.regex == ".+" => Ok(Who::Principal("*".into())),
                None => err(
                    path,
                    format!("principal regex {:?} is not supported", r.regex),
                ),
            }
        }
        _ => err(
            path,
            "principal matcher must be exact, prefix, suffix or a namespace regex",
        ),
    }
}

fn principal(path: &str, p: &prbac::Principal) -> Result<Vec<m::Principal>> {
    use prbac::principal::Identifier;
    match &p.identifier {
        None => err(path, "principal needs an identifier"),
        Some(Identifier::Any(_)) => Ok(vec![m::Principal::default()]),
        Some(Identifier::Authenticated(a)) => {
            let apath = format!("{path}.authenticated.principal_name");
            let Some(s) = &a.principal_name else {
                // Envoy: no name means "any authenticated peer".
                return Ok(vec![m::Principal {
                    principals: vec!["*".into()],
                    ..Default::default()
                }]);
            };
            Ok(vec![match who(&apath, s)? {
                Who::Principal(x) => m::Principal {
                    principals: vec![x],
                    ..Default::default()
                },
                Who::Namespace(x) => m::Principal {
                    namespaces: vec![x],
                    ..Default::default()
                },
            }])
        }
        Some(Identifier::OrIds(s)) => {
            let mut out = Vec::new();
            for (i, r) in s.ids.iter().enumerate() {
                out.extend(principal(&format!("{path}.or_ids.ids[{i}]"), r)?);
            }
            Ok(out)
        }
        Some(Identifier::AndIds(s)) => {
            let mut acc = vec![m::Principal::default()];
            for (i, r) in s.ids.iter().enumerate() {
                let rpath = format!("{path}.and_ids.ids[{i}]");
                let alts = principal(&rpath, r)?;
                let mut next = Vec::new();
                for a in &acc {
                    for b in &alts {
                        next.push(merge_principal(&rpath, a, b)?);
                    }
                }
                acc = next;
            }
            Ok(acc)
        }
        Some(Identifier::NotId(inner)) => {
            let npath = format!("{path}.not_id");
            let mut out = m::Principal::default();
            for alt in principal(&npath, inner)? {
                if !alt.not_principals.is_empty() || !alt.not_namespaces.is_empty() {
                    return err(&npath, "double negation is not supported");
                }
                if alt.principals.len() + alt.namespaces.len() != 1 {
                    return err(
                        &npath,
                        "only single principals or namespaces can be negated",
                    );
                }
                out.not_principals.extend(alt.principals);
                out.not_namespaces.extend(alt.namespaces);
            }
            Ok(vec![out])
        }
    }
}

fn merge_principal(path: &str, a: &m::Principal, b: &m::Principal) -> Result<m::Principal> {
    if (!a.principals.is_empty() && !b.principals.is_empty())
        || (!a.namespaces.is_empty() && !b.namespaces.is_empty())
    {
        return err(
            path,
            "this combination of AND principals cannot be expressed",
        );
    }
    Ok(m::Principal {
        principals: [a.principals.clone(), b.principals.clone()].concat(),
        not_principals: [a.not_principals.clone(), b.not_principals.clone()].concat(),
        namespaces: [a.namespaces.clone(), b.namespaces.clone()].concat(),
        not_namespaces: [a.not_namespaces.clone(), b.not_namespaces.clone()].concat(),
    })
}

// --- CDS / EDS --------------------------------------------------------------

/// The EDS resource name a cluster reads its endpoints from, if it is an
/// EDS cluster.
pub fn eds_name(c: &pc::Cluster) -> Option<String> {
    let is_eds = matches!(
        c.cluster_discovery_type,
        Some(pc::cluster::ClusterDiscoveryType::Type(t)) if t == pc::cluster::DiscoveryType::Eds as i32
    );
    is_eds.then(|| {
        c.eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| c.name.clone())
    })
}

/// A cluster, with its endpoints from `eds` when it is an EDS cluster
/// (`None` when that assignment has not arrived yet).
pub fn cluster(c: &pc::Cluster, eds: Option<&pe::ClusterLoadAssignment>) -> Result<m::Cluster> {
    let path = format!("Cluster {:?}", c.name);
    if let Some(pc::cluster::ClusterDiscoveryType::Type(t)) = c.cluster_discovery_type {
        if t != pc::cluster::DiscoveryType::Static as i32
            && t != pc::cluster::DiscoveryType::Eds as i32
        {
            return err(
                &format!("{path}.type"),
                "only STATIC and EDS clusters are supported",
            );
        }
    }
    let upstream_protocol = match c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)
    {
        None => m::UpstreamProtocol::UseDownstream,
        Some(a) => {
            use pup::http_protocol_options::explicit_http_config::ProtocolConfig;
            use pup::http_protocol_options::UpstreamProtocolOptions as U;
            let opath =
                format!("{path}.typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS:?}]");
            let o: pup::HttpProtocolOptions = any(&opath, a, type_url::HTTP_PROTOCOL_OPTIONS)?;
            match o.upstream_protocol_options {
                Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(_)) => m::UpstreamProtocol::Http2,
                    _ => m::UpstreamProtocol::Http1,
                },
                _ => m::UpstreamProtocol::UseDownstream,
            }
        }
    };
    let outlier_detection = c
        .outlier_detection
        .as_ref()
        .map(|o| -> Result<m::OutlierDetection> {
            Ok(m::OutlierDetection {
                consecutive_5xx: o.consecutive_5xx,
                base_ejection_time: opt_duration(
                    &format!("{path}.outlier_detection.base_ejection_time"),
                    &o.base_ejection_time,
                )?,
                max_ejection_percent: o.max_ejection_percent,
            })
        })
        .transpose()?;
    let (la, la_path) = match eds {
        Some(a) => (
            Some(a),
            format!("ClusterLoadAssignment {:?}", a.cluster_name),
        ),
        None => (
            c.load_assignment.as_ref(),
            format!("{path}.load_assignment"),
        ),
    };
    Ok(m::Cluster {
        name: c.name.clone(),
        connect_timeout: opt_duration(&format!("{path}.connect_timeout"), &c.connect_timeout)?,
        upstream_protocol,
        outlier_detection,
        load_assignment: la
            .map(|a| load_assignment(&la_path, a))
            .transpose()?
            .unwrap_or_default(),
    })
}

fn load_assignment(path: &str, a: &pe::ClusterLoadAssignment) -> Result<m::ClusterLoadAssignment> {
    let mut endpoints = Vec::new();
    for (i, l) in a.endpoints.iter().enumerate() {
        let mut lb_endpoints = Vec::new();
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let epath = format!("{path}.endpoints[{i}].lb_endpoints[{j}]");
            let Some(pe::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return err(&format!("{epath}.endpoint"), "missing");
            };
            let Some(sa) = ep.address.as_ref().and_then(|a| a.socket_address.as_ref()) else {
                return err(
                    &format!("{epath}.endpoint.address.socket_address"),
                    "missing",
                );
            };
            lb_endpoints.push(m::LbEndpoint {
                endpoint: m::Endpoint {
                    address: m::Address {
                        socket_address: m::SocketAddress {
                            address: sa.address.clone(),
                            port_value: u16_of(
                                &format!("{epath}.endpoint.address.socket_address.port_value"),
                                sa.port_value,
                            )?,
                        },
                    },
                },
                metadata: endpoint_metadata(&format!("{epath}.metadata"), e.metadata.as_ref())?,
            });
        }
        endpoints.push(m::LocalityLbEndpoints { lb_endpoints });
    }
    Ok(m::ClusterLoadAssignment { endpoints })
}

/// `filter_metadata["istio"]`: `identity`, `hbone_port`, `workload`,
/// `namespace` (the model's endpoint metadata, same keys; `workload` kept
/// as sent, Istio's `name;ns;...` or a bare name, read for the metrics).
fn endpoint_metadata(path: &str, md: Option<&core::Metadata>) -> Result<m::EndpointMetadata> {
    use prost_types::value::Kind;
    let mut out = m::EndpointMetadata::default();
    let Some(fields) = md
        .and_then(|m| m.filter_metadata.get("istio"))
        .map(|s| &s.fields)
    else {
        return Ok(out);
    };
    let string = |k: &str| match fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    };
    out.identity = string("identity");
    out.workload = string("workload");
    out.namespace = string("namespace");
    out.hbone_port = match fields.get("hbone_port").and_then(|v| v.kind.as_ref()) {
        None => None,
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && (1.0..=65535.0).contains(n) => {
            Some(*n as u16)
        }
        Some(Kind::StringValue(s)) => match s.parse() {
            Ok(p) => Some(p),
            Err(_) => {
                return err(
                    &format!("{path}.istio.hbone_port"),
                    format!("invalid port {s:?}"),
                )
            }
        },
        Some(_) => return err(&format!("{path}.istio.hbone_port"), "must be a port number"),
    };
    Ok(out)
}

/// What a set of listeners and clusters refers to: RDS and EDS names.
pub fn route_names(listeners: &[m::Listener], inline: &BTreeSet<String>) -> BTreeSet<String> {
    listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter().chain(l.default_filter_chain.iter()))
        .filter_map(|fc| fc.http_connection_manager.as_ref())
        .map(|h| h.route_config_name.clone())
        .filter(|n| !inline.contains(n))
        .collect()
}

/// Every cluster name that listeners and routes refer to.
pub fn cluster_refs(
    listeners: &[m::Listener],
    routes: &[m::RouteConfiguration],
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for fc in listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter().chain(l.default_filter_chain.iter()))
    {
        if let Some(t) = &fc.tcp_proxy {
            out.insert(t.cluster.clone());
        }
    }
    for a in routes
        .iter()
        .flat_map(|r| &r.virtual_hosts)
        .flat_map(|v| &v.routes)
        .filter_map(|r| r.route.as_ref())
    {
        out.extend(a.cluster.iter().cloned());
        if let Some(w) = &a.weighted_clusters {
            out.extend(w.clusters.iter().map(|c| c.name.clone()));
        }
        out.extend(a.request_mirror_policies.iter().map(|p| p.cluster.clone()));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prbac::permission::Rule;
    use prbac::principal::Identifier;

    fn method(m: &str) -> prbac::Permission {
        prbac::Permission {
            rule: Some(Rule::Header(pr::HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(pr::header_matcher::HeaderMatchSpecifier::ExactMatch(
                    m.into(),
                )),
                invert_match: false,
            })),
        }
    }

    fn path_prefix(p: &str) -> prbac::Permission {
        prbac::Permission {
            rule: Some(Rule::UrlPath(pm::PathMatcher {
                rule: Some(pm::path_matcher::Rule::Path(pm::StringMatcher {
                    match_pattern: Some(pm::string_matcher::MatchPattern::Prefix(p.into())),
                    ignore_case: false,
                })),
            })),
        }
    }

    fn or(rules: Vec<prbac::Permission>) -> prbac::Permission {
        prbac::Permission {
            rule: Some(Rule::OrRules(prbac::permission::Set { rules })),
        }
    }

    fn and(rules: Vec<prbac::Permission>) -> prbac::Permission {
        prbac::Permission {
            rule: Some(Rule::AndRules(prbac::permission::Set { rules })),
        }
    }

    fn authn(p: pm::string_matcher::MatchPattern) -> prbac::Principal {
        prbac::Principal {
            identifier: Some(Identifier::Authenticated(prbac::principal::Authenticated {
                principal_name: Some(pm::StringMatcher {
                    match_pattern: Some(p),
                    ignore_case: false,
                }),
            })),
        }
    }

    /// The shapes Istio's AuthorizationPolicy translation produces.
    #[test]
    fn istio_style_rbac_flattens() {
        use pm::string_matcher::MatchPattern as P;
        let policy = prbac::Policy {
            permissions: vec![and(vec![
                or(vec![method("GET"), method("HEAD")]),
                or(vec![path_prefix("/api/")]),
            ])],
            principals: vec![prbac::Principal {
                identifier: Some(Identifier::OrIds(prbac::principal::Set {
                    ids: vec![
                        authn(P::SafeRegex(pm::RegexMatcher {
                            regex: ".*/ns/default/.*".into(),
                        })),
                        authn(P::Exact("spiffe://cluster.local/ns/x/sa/app".into())),
                    ],
                })),
            }],
        };
        let r = prbac::Rbac {
            action: prbac::rbac::Action::Deny as i32,
            policies: [("p".to_string(), policy)].into(),
        };
        let m = rbac("rules", &r).unwrap();
        assert_eq!(m.action, m::RbacAction::Deny);
        let p = &m.policies["p"];
        assert_eq!(p.permissions.len(), 2);
        assert_eq!(p.permissions[0].methods, vec!["GET"]);
        assert_eq!(p.permissions[1].methods, vec!["HEAD"]);
        assert!(p
            .permissions
            .iter()
            .all(|x| x.paths[0].prefix.as_deref() == Some("/api/")));
        assert_eq!(p.principals[0].namespaces, vec!["default"]);
        assert_eq!(
            p.principals[1].principals,
            vec!["spiffe://cluster.local/ns/x/sa/app"]
        );

        // AND of two paths cannot be said in the model: an error with a path.
        let bad = prbac::Rbac {
            action: 0,
            policies: [(
                "q".to_string(),
                prbac::Policy {
                    permissions: vec![and(vec![path_prefix("/a"), path_prefix("/b")])],
                    principals: vec![],
                },
            )]
            .into(),
        };
        let e = rbac("rules", &bad).unwrap_err();
        assert_eq!(
            e.path,
            "rules.policies[\"q\"].permissions[0].and_rules.rules[1]"
        );
    }

    /// A filter this proxy does not implement is refused unless optional
    /// or disabled: serving without ext_authz or jwt_authn would let
    /// through what they refuse. istiod's telemetry and routing filters,
    /// also inside a TypedStruct, are skipped.
    #[test]
    fn unknown_http_filters_are_refused() {
        let any = |t: &str, value: Vec<u8>| {
            Some(hcm::http_filter::ConfigType::TypedConfig(
                prost_types::Any {
                    type_url: t.into(),
                    value,
                },
            ))
        };
        let filter = |name: &str, t: &str| hcm::HttpFilter {
            name: name.into(),
            config_type: any(t, Vec::new()),
            ..Default::default()
        };
        let ext_authz = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
        let peer_metadata = TypedStruct {
            type_url: "type.googleapis.com/io.istio.http.peer_metadata.Config".into(),
        };
        let hcm_with = |filters| hcm::HttpConnectionManager {
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: "r".into(),
                },
            )),
            http_filters: filters,
            ..Default::default()
        };
        let istiod = hcm_with(vec![
            hcm::HttpFilter {
                name: "istio.metadata_exchange".into(),
                config_type: any(
                    "type.googleapis.com/udpa.type.v1.TypedStruct",
                    peer_metadata.encode_to_vec(),
                ),
                ..Default::default()
            },
            filter("istio.stats", "type.googleapis.com/stats.PluginConfig"),
            filter(
                "envoy.filters.http.router",
                "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            ),
        ]);
        connection_manager("h", &istiod, String::new(), &mut Vec::new()).unwrap();
        let e = connection_manager(
            "h",
            &hcm_with(vec![filter("envoy.filters.http.ext_authz", ext_authz)]),
            String::new(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.path, "h.http_filters[0]");
        assert!(e.message.contains("ext_authz"), "{}", e.message);
        for optional in [
            hcm::HttpFilter {
                is_optional: true,
                ..filter("x", ext_authz)
            },
            hcm::HttpFilter {
                disabled: true,
                ..filter("x", ext_authz)
            },
        ] {
            connection_manager(
                "h",
                &hcm_with(vec![optional]),
                String::new(),
                &mut Vec::new(),
            )
            .unwrap();
        }
        // A filter from ECDS (no typed_config here) is refused too.
        let ecds = hcm::HttpFilter {
            name: "from-ecds".into(),
            ..Default::default()
        };
        assert!(
            connection_manager("h", &hcm_with(vec![ecds]), String::new(), &mut Vec::new()).is_err()
        );
    }

    #[test]
    fn inline_route_config_and_durations() {
        let h = hcm::HttpConnectionManager {
            codec_type: hcm::http_connection_manager::CodecType::Http2 as i32,
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
                pr::RouteConfiguration {
                    name: String::new(),
                    virtual_hosts: vec![pr::VirtualHost {
                        name: "vh".into(),
                        domains: vec!["*".into()],
                        routes: vec![pr::Route {
                            r#match: Some(pr::RouteMatch {
                                path_specifier: Some(pr::route_match::PathSpecifier::Path(
                                    "/x".into(),
                                )),
                                ..Default::default()
                            }),
                            action: Some(pr::route::Action::Route(pr::RouteAction {
                                cluster_specifier: Some(
                                    pr::route_action::ClusterSpecifier::Cluster("c".into()),
                                ),
                                timeout: Some(prost_types::Duration {
                                    seconds: 1,
                                    nanos: 500_000_000,
                                }),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                    }],
                },
            )),
            ..Default::default()
        };
        let l = pl::Listener {
            name: "l".into(),
            filter_chains: vec![pl::FilterChain {
                name: "fc".into(),
                filters: vec![pl::Filter {
                    name: "hcm".into(),
                    config_type: Some(pl::filter::ConfigType::TypedConfig(prost_types::Any {
                        type_url: type_url::HTTP_CONNECTION_MANAGER.into(),
                        value: h.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = listener(&l).unwrap();
        let hm = t.listener.filter_chains[0]
            .http_connection_manager
            .as_ref()
            .unwrap();
        assert_eq!(hm.codec_type, m::CodecType::Http2);
        assert_eq!(t.inline_routes[0].name, hm.route_config_name);
        let a = t.inline_routes[0].virtual_hosts[0].routes[0]
            .route
            .as_ref()
            .unwrap();
        let d = crate::config::validate::duration("t", a.timeout.as_deref().unwrap()).unwrap();
        assert_eq!(d, std::time::Duration::from_millis(1500));
        // An inline route config is not an RDS subscription.
        let inline = t.inline_routes.iter().map(|r| r.name.clone()).collect();
        assert!(route_names(&[t.listener], &inline).is_empty());
    }
}
