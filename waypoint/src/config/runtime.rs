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
    pub workload: Option<String>,
    pub namespace: Option<String>,
}
