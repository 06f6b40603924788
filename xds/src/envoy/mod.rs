//! Waypoint configuration: each waypoint Gateway's Services and the
//! HTTPRoutes attached to them, as the Envoy v3 resources the waypoint
//! consumes (see waypoint/README.md, "Configuration over xDS").
//!
//! Per waypoint Gateway `ns/gw`:
//! - Listener `ns/gw`: filter chains for each TCP port of each Service
//!   using the waypoint (`istio.io/use-waypoint`), matched by destination
//!   port and ClusterIP ([`protocol`] decides which): an HTTP port gets an
//!   HTTP connection manager naming its routes over RDS (chain `ns/svc:port`);
//!   an opaque TCP port a `tcp_proxy` to the Service's cluster behind
//!   network RBAC filters (chain `ns/svc:port/tcp`); a port declaring no
//!   protocol gets both, the HTTP one matching only what the waypoint
//!   sniffs as HTTP (`application_protocols`), the TCP one the rest.
//! - RouteConfiguration `ns/svc:port` (the filter chain's name): one route
//!   per HTTPRoute rule and match, in order; without an HTTPRoute, one
//!   route sending everything to the Service itself.
//! - Cluster `outbound|port||host` (EDS) for every Service a route sends
//!   to, and its ClusterLoadAssignment: the selected pods' IPs and target
//!   ports, with `filter_metadata["istio"]` carrying the workload in
//!   istiod's encoding (`name;ns;canonical service;canonical
//!   revision;cluster`, for Istio's metric labels) and, for pods in the
//!   mesh (reached over HBONE), `identity` and `hbone_port`.
//!
//! - AuthorizationPolicies targeting the Gateway or a Service become RBAC
//!   HTTP filters of the HTTP chains and network RBAC filters (L4 fields
//!   only) of the TCP chains they apply to ([`authz`]).
//!
//! Files: `routes` (HTTPRoute rules as routes), `authz` (policies as RBAC
//! filters), `endpoints` (load assignments), `validate` (HTTPRoute checks),
//! `protocol` (what a Service port carries).
//!
//! Each waypoint is served only its own Gateway's resources ([`scope`]);
//! names are unique per waypoint and Service, clusters shared by two
//! waypoints are served to both.

mod authz;
mod endpoints;
mod protocol;
mod routes;
mod scope;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use mesh_proto::envoy::config::cluster::v3 as pc;
use mesh_proto::envoy::config::core::v3 as core;
use mesh_proto::envoy::config::listener::v3 as pl;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use mesh_proto::envoy::extensions::filters::network::tcp_proxy::v3 as ptcp;
use mesh_proto::envoy::extensions::upstreams::http::v3 as pup;
use mesh_proto::type_url;
use prost::Message;

use protocol::{PortProtocol, SNIFFED_HTTP};
pub use scope::Scope;
pub use validate::{parse_duration, validate_route, RouteError};

use crate::model::{BackendRef, Model, USE_WAYPOINT_LABEL};
use crate::translate::{hostname, salted_resource, Options, Resource};

type Named = BTreeMap<Arc<str>, Arc<Resource>>;

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

/// Builds the waypoint's resources; `clusters` collects the Services
/// (namespace, name, port) routes send to.
struct Builder<'a> {
    opts: &'a Options,
    model: &'a Model,
    clusters: BTreeMap<String, (&'a Service, i32)>,
    /// The waypoint being built (`ns/name`), and the waypoints using each
    /// cluster.
    gateway: String,
    owners: BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Builder<'a> {
    /// The cluster for a backend in `ns`, if that Service exists.
    fn backend(&mut self, ns: &str, b: &BackendRef, default_port: i32) -> Option<String> {
        let bns = b.namespace.as_deref().unwrap_or(ns);
        let s = self.model.services.get(&format!("{bns}/{}", b.name))?;
        let port = b.port.unwrap_or(default_port);
        let name = cluster_name(&hostname(self.opts, s), port);
        self.use_cluster(name.clone(), s, port);
        Some(name)
    }

    /// Records that the waypoint being built sends to `name`.
    fn use_cluster(&mut self, name: String, s: &'a Service, port: i32) {
        self.owners
            .entry(name.clone())
            .or_default()
            .insert(self.gateway.clone());
        self.clusters.insert(name, (s, port));
    }
}

/// The waypoints' resources, and what could not be translated.
#[derive(Debug, Default)]
pub struct Output {
    pub resources: Vec<(&'static str, Named)>,
    /// Each names the object and field (e.g. an L7 policy field the
    /// waypoint cannot enforce) and what was done instead.
    pub errors: Vec<String>,
    pub scope: Scope,
}

/// Listeners, route configurations, clusters and endpoints of every
/// waypoint in the model, by type URL.
pub fn translate(opts: &Options, model: &Model) -> Output {
    let mut b = Builder {
        opts,
        model,
        clusters: BTreeMap::new(),
        gateway: String::new(),
        owners: BTreeMap::new(),
    };
    let mut scope = Scope::with_pods(model);
    let mut errors = Vec::new();
    let policies = authz::bound_policies(opts, model.policies.values(), &mut errors);
    let mut listeners = Named::new();
    let mut routes = Named::new();
    for g in model.gateways.values().filter(|g| g.is_waypoint()) {
        let gns = g.metadata.namespace.as_deref().unwrap_or("default");
        let gname = g.metadata.name.as_deref().unwrap_or_default();
        let gw = format!("{gns}/{gname}");
        b.gateway = gw.clone();
        let only = BTreeSet::from([gw.clone()]);
        let salt = gw.as_bytes();
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
            let svc = format!("{ns}/{}", s.metadata.name.as_deref().unwrap_or_default());
            let prefix_len = if ip.contains(':') { 128 } else { 32 };
            for p in spec.ports.iter().flatten() {
                let protocol = protocol::port_protocol(p);
                let chain_match = |application_protocols: Vec<String>| pl::FilterChainMatch {
                    destination_port: Some(p.port as u32),
                    prefix_ranges: vec![core::CidrRange {
                        address_prefix: ip.to_string(),
                        prefix_len: Some(prefix_len),
                    }],
                    application_protocols,
                    ..Default::default()
                };
                let chain = format!("{svc}:{}", p.port);
                if matches!(protocol, PortProtocol::Http | PortProtocol::Detect) {
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
                        salted_resource(type_url::ROUTE_CONFIGURATION, chain.clone(), &rc, salt),
                    );
                    scope.own(type_url::ROUTE_CONFIGURATION, &chain, only.clone());
                    let h = hcm::HttpConnectionManager {
                        stat_prefix: chain.clone(),
                        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                            hcm::Rds {
                                route_config_name: chain.clone(),
                            },
                        )),
                        http_filters: authz::http_filters(&policies, &gw, &svc),
                        // Istio's default (`pathNormalization: BASE`): policy
                        // and routes judge the path the backend acts on.
                        normalize_path: Some(true),
                        ..Default::default()
                    };
                    // Undeclared: HTTP only when sniffed as HTTP.
                    let sniffed = match protocol {
                        PortProtocol::Detect => SNIFFED_HTTP.map(String::from).to_vec(),
                        _ => Vec::new(),
                    };
                    chains.push(pl::FilterChain {
                        name: chain.clone(),
                        filter_chain_match: Some(chain_match(sniffed)),
                        filters: vec![pl::Filter {
                            name: "envoy.filters.network.http_connection_manager".into(),
                            config_type: Some(pl::filter::ConfigType::TypedConfig(any(
                                type_url::HTTP_CONNECTION_MANAGER,
                                &h,
                            ))),
                        }],
                    });
                }
                if matches!(protocol, PortProtocol::Tcp | PortProtocol::Detect) {
                    // Opaque bytes to the Service itself; HTTPRoutes do not
                    // apply, L4 policy does (before the proxy, as Istio
                    // orders network filters).
                    let cluster = cluster_name(&host, p.port);
                    b.use_cluster(cluster.clone(), s, p.port);
                    let name = format!("{chain}/tcp");
                    let t = ptcp::TcpProxy {
                        stat_prefix: name.clone(),
                        cluster_specifier: Some(ptcp::tcp_proxy::ClusterSpecifier::Cluster(
                            cluster,
                        )),
                    };
                    // What the TCP chain cannot check is reported for
                    // declared TCP ports; on a sniffed port's fallback it
                    // concerns only non-HTTP bytes (documented), and would
                    // report every L7 policy.
                    let mut unreported = Vec::new();
                    let report = match protocol {
                        PortProtocol::Tcp => &mut errors,
                        _ => &mut unreported,
                    };
                    let mut filters = authz::network_filters(&policies, &gw, &svc, report);
                    filters.push(pl::Filter {
                        name: "envoy.filters.network.tcp_proxy".into(),
                        config_type: Some(pl::filter::ConfigType::TypedConfig(any(
                            type_url::TCP_PROXY,
                            &t,
                        ))),
                    });
                    chains.push(pl::FilterChain {
                        name,
                        filter_chain_match: Some(chain_match(Vec::new())),
                        filters,
                    });
                }
            }
        }
        let l = pl::Listener {
            name: gw.clone(),
            filter_chains: chains,
            ..Default::default()
        };
        scope.own(type_url::LISTENER, &gw, only);
        listeners.insert(
            gw.as_str().into(),
            salted_resource(type_url::LISTENER, gw.clone(), &l, salt),
        );
    }
    let mut clusters = Named::new();
    let mut cla = Named::new();
    for (name, (svc, port)) in &b.clusters {
        let owners = b.owners.get(name).cloned().unwrap_or_default();
        let salt = owners.iter().cloned().collect::<Vec<_>>().join(",");
        scope.own(type_url::CLUSTER, name, owners.clone());
        scope.own(type_url::CLUSTER_LOAD_ASSIGNMENT, name, owners);
        let c = pc::Cluster {
            name: name.clone(),
            cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
                pc::cluster::DiscoveryType::Eds as i32,
            )),
            connect_timeout: Some(duration(10_000_000_000)),
            typed_extension_protocol_options: http2_upstream_options(svc, *port),
            ..Default::default()
        };
        clusters.insert(
            name.as_str().into(),
            salted_resource(type_url::CLUSTER, name.clone(), &c, salt.as_bytes()),
        );
        let e = b.endpoints(name, svc, *port);
        cla.insert(
            name.as_str().into(),
            salted_resource(
                type_url::CLUSTER_LOAD_ASSIGNMENT,
                name.clone(),
                &e,
                salt.as_bytes(),
            ),
        );
    }
    Output {
        resources: vec![
            (type_url::LISTENER, listeners),
            (type_url::ROUTE_CONFIGURATION, routes),
            (type_url::CLUSTER, clusters),
            (type_url::CLUSTER_LOAD_ASSIGNMENT, cla),
        ],
        errors,
        scope,
    }
}

/// `HttpProtocolOptions` asking for HTTP/2 upstream, for a port whose
/// server speaks it ([`protocol::upstream_http2`]); none otherwise (the
/// waypoint then speaks the client's protocol).
fn http2_upstream_options(
    svc: &Service,
    port: i32,
) -> std::collections::HashMap<String, prost_types::Any> {
    use pup::http_protocol_options::explicit_http_config::ProtocolConfig;
    use pup::http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions};
    let h2 = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.port == port))
        .is_some_and(protocol::upstream_http2);
    if !h2 {
        return Default::default();
    }
    let o = pup::HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Default::default())),
            },
        )),
    };
    [(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        any(type_url::HTTP_PROTOCOL_OPTIONS, &o),
    )]
    .into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rbac_filters_encode_the_same_every_time() {
        let mut text = String::from(
            r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}], selector: {app: echo}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#,
        );
        for i in 0..8 {
            text += &format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: demo}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: wp}}]\n  rules: [{{to: [{{operation: {{paths: [/p{i}]}}}}]}}, {{from: [{{source: {{namespaces: [n{i}]}}}}]}}]\n"
            );
        }
        let (objs, errs) = crate::manifest::parse_file(&text, "t.yaml").unwrap();
        assert!(errs.is_empty(), "{errs:?}");
        let model = Model::from_objects(objs);
        let version = || translate(&Options::default(), &model).resources[0].1["demo/wp"].hash;
        let first = version();
        for _ in 0..10 {
            assert_eq!(version(), first);
        }
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
        let out = translate(&Options::default(), &model).resources;
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

    /// The filter chains of listener `demo/wp`, by name: (application
    /// protocols, network filter type URLs).
    fn chains(model: &Model) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
        let out = translate(&Options::default(), model).resources;
        let l = pl::Listener::decode(out[0].1["demo/wp"].value.clone()).unwrap();
        l.filter_chains
            .into_iter()
            .map(|c| {
                let m = c.filter_chain_match.unwrap();
                assert_eq!(m.prefix_ranges[0].address_prefix, "10.96.0.10");
                let types = c
                    .filters
                    .iter()
                    .map(|f| match &f.config_type {
                        Some(pl::filter::ConfigType::TypedConfig(t)) => t.type_url.clone(),
                        None => panic!("{f:?}"),
                    })
                    .collect();
                (c.name, (m.application_protocols, types))
            })
            .collect()
    }

    #[test]
    fn tcp_ports_get_tcp_proxy_chains_behind_l4_policy() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports:
  - {name: web, port: 80, appProtocol: http}
  - {name: raw, port: 9000, appProtocol: tcp}
  - {name: redis, port: 6379}
  - {name: other, port: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{from: [{source: {namespaces: [demo]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: demo}
spec:
  action: DENY
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  rules: [{to: [{operation: {paths: [/admin], ports: ["9000"]}}]}]
"#;
        let (objs, errs) = crate::manifest::parse_file(text, "t.yaml").unwrap();
        assert!(errs.is_empty(), "{errs:?}");
        let model = Model::from_objects(objs);
        let got = chains(&model);
        let http = || vec![type_url::HTTP_CONNECTION_MANAGER.to_string()];
        let tcp = || {
            vec![
                type_url::NETWORK_RBAC.to_string(),
                type_url::NETWORK_RBAC.to_string(),
                type_url::TCP_PROXY.to_string(),
            ]
        };
        let sniffed = vec!["http/1.1".to_string(), "h2c".to_string()];
        let want = BTreeMap::from([
            ("demo/echo:80".to_string(), (vec![], http())),
            ("demo/echo:9000/tcp".to_string(), (vec![], tcp())),
            ("demo/echo:6379/tcp".to_string(), (vec![], tcp())),
            ("demo/echo:8080".to_string(), (sniffed, http())),
            ("demo/echo:8080/tcp".to_string(), (vec![], tcp())),
        ]);
        assert_eq!(got, want);

        let out = translate(&Options::default(), &model);
        // The TCP chain proxies to the Service's own cluster, which exists.
        let l = pl::Listener::decode(out.resources[0].1["demo/wp"].value.clone()).unwrap();
        let c = l
            .filter_chains
            .iter()
            .find(|c| c.name == "demo/echo:9000/tcp")
            .unwrap();
        assert_eq!(
            c.filter_chain_match.as_ref().unwrap().destination_port,
            Some(9000)
        );
        let Some(pl::filter::ConfigType::TypedConfig(t)) = &c.filters[2].config_type else {
            panic!()
        };
        let t = ptcp::TcpProxy::decode(t.value.as_slice()).unwrap();
        let cluster = "outbound|9000||echo.demo.svc.cluster.local";
        assert_eq!(
            t.cluster_specifier,
            Some(ptcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.into()))
        );
        assert!(out.resources[2].1.contains_key(cluster));
        // The DENY rule on TCP: without its path (reported once), only the
        // port remains.
        let Some(pl::filter::ConfigType::TypedConfig(d)) = &c.filters[0].config_type else {
            panic!()
        };
        let d = mesh_proto::envoy::extensions::filters::network::rbac::v3::Rbac::decode(
            d.value.as_slice(),
        )
        .unwrap()
        .rules
        .unwrap();
        use mesh_proto::envoy::config::rbac::v3 as prbac;
        assert_eq!(d.action, prbac::rbac::Action::Deny as i32);
        let p = &d.policies["ns[demo]-policy[l7]-rule[0]"];
        let want_perm = prbac::Permission {
            rule: Some(prbac::permission::Rule::OrRules(prbac::permission::Set {
                rules: vec![prbac::Permission {
                    rule: Some(prbac::permission::Rule::OrRules(prbac::permission::Set {
                        rules: vec![prbac::Permission {
                            rule: Some(prbac::permission::Rule::DestinationPort(9000)),
                        }],
                    })),
                }],
            })),
        };
        assert_eq!(p.permissions, vec![want_perm]);
        let path_errors: Vec<_> = out
            .errors
            .iter()
            .filter(|e| e.contains("l7") && e.contains("paths"))
            .collect();
        assert_eq!(path_errors.len(), 1, "{:?}", out.errors);
        assert!(path_errors[0].contains("on TCP ports the DENY rule applies without it"));
        // HTTP chains keep the path, as HTTP RBAC.
        let h = l
            .filter_chains
            .iter()
            .find(|c| c.name == "demo/echo:80")
            .unwrap();
        let Some(pl::filter::ConfigType::TypedConfig(h)) = &h.filters[0].config_type else {
            panic!()
        };
        let h = hcm::HttpConnectionManager::decode(h.value.as_slice()).unwrap();
        assert_eq!(h.http_filters.len(), 2);
        assert_eq!(h.normalize_path, Some(true));
    }

    /// The endpoints' `workload` metadata is istiod's encoding, with
    /// Istio's canonical-service rules and the Deployment as workload.
    #[test]
    fn endpoint_metadata_is_istios_workload_encoding() {
        use mesh_proto::envoy::config::endpoint::v3 as pe;
        let pod = |name: &str, ip: &str, labels: &str, owner: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{tier: web, {labels}}}\n  ownerReferences: [{owner}]\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let rs = "{apiVersion: apps/v1, kind: ReplicaSet, name: echo-v1-5d8f9c7b4, uid: u, controller: true}";
        let mut text = String::from(
            r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}], selector: {tier: web}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#,
        );
        // Istio's own labels first, then app.kubernetes.io, then app and
        // version; else the workload's name and "latest".
        text += &pod(
            "echo-v1-5d8f9c7b4-abcde",
            "10.244.0.1",
            "app: echo, version: v1, pod-template-hash: 5d8f9c7b4, service.istio.io/canonical-name: shop, service.istio.io/canonical-revision: r1, app.kubernetes.io/name: n",
            rs,
        );
        text += &pod(
            "b",
            "10.244.0.2",
            "app: a, version: v, app.kubernetes.io/name: kname, app.kubernetes.io/version: kv",
            "",
        );
        text += &pod("c", "10.244.0.3", "app: echo, version: v3", "");
        text += &pod("d", "10.244.0.4", "role: db", "");
        let (objs, errs) = crate::manifest::parse_file(&text, "t.yaml").unwrap();
        assert!(errs.is_empty(), "{errs:?}");
        let model = Model::from_objects(objs);
        let opts = Options {
            cluster_id: "east".into(),
            ..Options::default()
        };
        let out = translate(&opts, &model).resources;
        let cla = pe::ClusterLoadAssignment::decode(
            out[3].1["outbound|80||echo.demo.svc.cluster.local"]
                .value
                .clone(),
        )
        .unwrap();
        let got: BTreeMap<String, String> = cla.endpoints[0]
            .lb_endpoints
            .iter()
            .map(|e| {
                let Some(pe::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("{e:?}")
                };
                let ip = ep
                    .address
                    .as_ref()
                    .unwrap()
                    .socket_address
                    .as_ref()
                    .unwrap();
                let istio = &e.metadata.as_ref().unwrap().filter_metadata["istio"].fields;
                let Some(prost_types::value::Kind::StringValue(w)) = &istio["workload"].kind else {
                    panic!("{istio:?}")
                };
                (ip.address.clone(), w.clone())
            })
            .collect();
        let want = BTreeMap::from([
            ("10.244.0.1".into(), "echo-v1;demo;shop;r1;east".into()),
            ("10.244.0.2".into(), "b;demo;kname;kv;east".into()),
            ("10.244.0.3".into(), "c;demo;echo;v3;east".into()),
            ("10.244.0.4".into(), "d;demo;d;latest;east".into()),
        ]);
        assert_eq!(got, want);
    }
}
