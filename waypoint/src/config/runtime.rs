//! The configuration in force: validated, regexes compiled, names
//! resolved. Built only by [`super::validate::compile`]; swapped in whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;
use regex::Regex;

use super::matcher::{HeaderMatch, QueryMatch};
use super::model::{AppendAction, Bootstrap, CodecType, UpstreamProtocol};
use crate::rbac::RbacFilter;
use crate::upstream::balancer::EndpointState;
use ztunnel::identity::Identity;

pub struct Config {
    /// What it was built from, for `/config_dump`.
    pub source: Bootstrap,
    pub chains: Vec<Chain>,
    pub default_chain: Option<Chain>,
    pub clusters: HashMap<String, Arc<ClusterConfig>>,
}

impl Config {
    /// The filter chain for a CONNECT stream to `dst` whose first bytes
    /// were sniffed as `protocol` (`"http/1.1"`, `"h2c"`, or `None` when not
    /// HTTP or not sniffed): the most specific match, as Envoy orders them:
    /// port, then address prefix length, then application protocol.
    pub fn chain_for_protocol(&self, dst: SocketAddr, protocol: Option<&str>) -> Option<&Chain> {
        self.chains
            .iter()
            .filter(|c| c.matches_address(dst))
            .filter(|c| {
                c.application_protocols.is_empty()
                    || protocol.is_some_and(|p| c.application_protocols.iter().any(|a| a == p))
            })
            .max_by_key(|c| {
                let longest = c.prefixes.iter().map(|n| n.prefix_len()).max();
                (
                    c.port.is_some(),
                    longest.map(|l| l as i32 + 1).unwrap_or(0),
                    !c.application_protocols.is_empty(),
                )
            })
            .or(self.default_chain.as_ref())
    }

    /// The chain for `dst` without sniffing.
    pub fn chain_for(&self, dst: SocketAddr) -> Option<&Chain> {
        self.chain_for_protocol(dst, None)
    }

    /// Whether choosing a chain for `dst` depends on the protocol, i.e. the
    /// first bytes must be sniffed (Envoy's http_inspector).
    pub fn needs_sniffing(&self, dst: SocketAddr) -> bool {
        self.chains
            .iter()
            .any(|c| c.matches_address(dst) && !c.application_protocols.is_empty())
    }
}

pub struct Chain {
    pub name: String,
    pub port: Option<u16>,
    pub prefixes: Vec<IpNet>,
    pub application_protocols: Vec<String>,
    pub kind: ChainKind,
}

impl Chain {
    fn matches_address(&self, dst: SocketAddr) -> bool {
        self.port.is_none_or(|p| p == dst.port())
            && (self.prefixes.is_empty() || self.prefixes.iter().any(|n| n.contains(&dst.ip())))
    }
}

pub enum ChainKind {
    Http(Arc<HttpChain>),
    Tcp(Arc<TcpChain>),
}

pub struct HttpChain {
    pub codec: CodecType,
    pub max_header_bytes: usize,
    pub path: crate::path::PathNormalization,
    pub rbac: Vec<RbacFilter>,
    pub routes: Arc<RouteTable>,
}

pub struct TcpChain {
    pub cluster: Arc<ClusterConfig>,
    pub rbac: Vec<RbacFilter>,
}

pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Arc<Route>>,
}

pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

pub struct Route {
    pub name: String,
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    pub action: Action,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    pub fault: Option<Fault>,
}

pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: StatusCode, body: String },
}

pub struct Forward {
    /// Weights are > 0 and sum to `total_weight`.
    pub clusters: Vec<WeightedCluster>,
    pub total_weight: u32,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<String>,
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// (cluster, probability in 0..=1).
    pub mirrors: Vec<(Arc<ClusterConfig>, f64)>,
}

pub struct Retry {
    pub num_retries: u32,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub status_codes: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
}

pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub status: StatusCode,
    pub strip_query: bool,
}

/// One of a route's clusters, with its weight and its own header changes.
pub struct WeightedCluster {
    pub cluster: Arc<ClusterConfig>,
    pub weight: u32,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
}

#[derive(Default)]
pub struct HeaderMods {
    pub add: Vec<(HeaderName, HeaderValue, AppendAction)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderMods {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, action) in &self.add {
            match action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(name.clone(), value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
    }
}

pub struct Fault {
    /// (delay, probability).
    pub delay: Option<(Duration, f64)>,
    /// (status, probability).
    pub abort: Option<(StatusCode, f64)>,
}

pub struct ClusterConfig {
    pub name: String,
    /// The balancer's state of `endpoints` (kept across reloads by the
    /// balancer), looked up on this configuration's first pick.
    pub balancer_state: OnceLock<Vec<Arc<EndpointState>>>,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    /// In the mesh: reached over HBONE, accepting only this identity.
    pub identity: Option<Identity>,
    pub hbone_port: u16,
    /// As the metadata says it: see [`WorkloadMetadata::parse`].
    pub workload: Option<String>,
    pub namespace: Option<String>,
}

/// An endpoint's workload as its `istio` metadata names it; `None` where
/// it does not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadMetadata<'a> {
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub canonical_service: Option<&'a str>,
    pub canonical_revision: Option<&'a str>,
    pub cluster: Option<&'a str>,
}

impl<'a> WorkloadMetadata<'a> {
    /// `workload` in Istio's encoding, `name;namespace;canonical
    /// service;canonical revision;cluster` (istiod's, and our control
    /// plane's), or a bare name with the namespace in `namespace` (our
    /// control plane's before it). As Istio's proxy reads it, fewer than
    /// five fields say nothing and an empty field is not known.
    pub fn parse(workload: Option<&'a str>, namespace: Option<&'a str>) -> Self {
        let some = |s: &'a str| Some(s).filter(|s| !s.is_empty());
        let Some(w) = workload.and_then(some) else {
            return WorkloadMetadata {
                namespace: namespace.and_then(some),
                ..Default::default()
            };
        };
        if !w.contains(';') {
            // Names cannot hold a `;`: this is the bare form.
            return WorkloadMetadata {
                name: Some(w),
                namespace: namespace.and_then(some),
                ..Default::default()
            };
        }
        let f: Vec<&str> = w.splitn(6, ';').collect();
        if f.len() < 5 {
            return WorkloadMetadata::default();
        }
        WorkloadMetadata {
            name: some(f[0]),
            namespace: some(f[1]),
            canonical_service: some(f[2]),
            canonical_revision: some(f[3]),
            cluster: some(f[4]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WorkloadMetadata as W;

    #[test]
    fn workload_metadata_in_istios_encoding() {
        let want = W {
            name: Some("echo-v1"),
            namespace: Some("demo"),
            canonical_service: Some("echo"),
            canonical_revision: Some("v1"),
            cluster: Some("Kubernetes"),
        };
        assert_eq!(
            W::parse(Some("echo-v1;demo;echo;v1;Kubernetes"), None),
            want
        );
        // Istio's encoding wins over a `namespace` beside it; more fields
        // than five are ignored, as Istio's proxy does.
        assert_eq!(
            W::parse(Some("echo-v1;demo;echo;v1;Kubernetes;x"), Some("other")),
            want
        );
        // Empty fields are not known.
        assert_eq!(
            W::parse(Some("echo-v1;;;;"), None),
            W {
                name: Some("echo-v1"),
                ..Default::default()
            }
        );
    }

    #[test]
    fn workload_metadata_in_the_bare_form() {
        assert_eq!(
            W::parse(Some("echo-v1"), Some("demo")),
            W {
                name: Some("echo-v1"),
                namespace: Some("demo"),
                ..Default::default()
            }
        );
        assert_eq!(
            W::parse(None, Some("demo")),
            W {
                namespace: Some("demo"),
                ..Default::default()
            }
        );
        assert_eq!(W::parse(Some(""), Some("")), W::default());
        assert_eq!(W::parse(None, None), W::default());
    }

    #[test]
    fn workload_metadata_garbage_says_nothing() {
        for g in [";", "a;b", "a;;;b", "a;b;c;d", "ü;ñ"] {
            assert_eq!(W::parse(Some(g), Some("demo")), W::default(), "{g:?}");
        }
        assert_eq!(W::parse(Some(";;;;"), None), W::default());
        // Odd bytes are values like any other (and never a panic).
        let odd = W::parse(Some("\u{0};é;;;"), None);
        assert_eq!((odd.name, odd.namespace), (Some("\u{0}"), Some("é")));
    }
}
