//! The waypoint configured over Envoy v3 ADS, delta and state of the
//! world: a small ADS server in the test serves Listener /
//! RouteConfiguration / Cluster / ClusterLoadAssignment resources to a real
//! waypoint, and a client reaches it over HBONE on loopback as in the
//! other tests. Each scenario runs over both protocols.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use mesh_proto::envoy::config::cluster::v3 as pc;
use mesh_proto::envoy::config::core::v3 as core;
use mesh_proto::envoy::config::endpoint::v3 as pe;
use mesh_proto::envoy::config::listener::v3 as pl;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use mesh_proto::envoy::r#type::matcher::v3 as pm;
use mesh_proto::type_url;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use waypoint::app::{build, start, Parts, Running};
use waypoint::config::Store;
use waypoint::xds::{spawn, ApiType, XdsConfig};

// --- a minimal ADS server, delta and SotW -----------------------------------

/// type URL -> name -> encoded resource.
type Snapshot = BTreeMap<&'static str, BTreeMap<String, prost_types::Any>>;

/// An ACK or NACK, as the server got it.
#[derive(Clone, Debug)]
struct Reply {
    type_url: String,
    /// `error_detail.message`: a NACK.
    error: Option<String>,
    /// SotW's `version_info` (empty in delta).
    version: String,
    nonce: String,
}

/// In arrival order.
type Replies = Arc<Mutex<Vec<Reply>>>;

#[derive(Clone)]
struct Ads {
    snap: watch::Receiver<Snapshot>,
    replies: Replies,
    /// Bumped to end every open stream (the client must reconnect).
    kick: watch::Receiver<u64>,
    /// Streams opened so far.
    streams: Arc<std::sync::atomic::AtomicUsize>,
    /// Serve `DeltaAggregatedResources` (else: UNIMPLEMENTED, as a
    /// SotW-only control plane answers).
    delta: bool,
}

fn version(a: &prost_types::Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.value.hash(&mut h);
    format!("{:x}", h.finish())
}

type Out = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
type SotwOut = ReceiverStream<Result<DiscoveryResponse, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwOut;
    type DeltaAggregatedResourcesStream = Out;

    /// State of the world: per type, the names last asked for (LDS/CDS:
    /// empty, everything; RDS/EDS: empty also answered with everything,
    /// as our control plane does); a response whenever they change or the
    /// snapshot does, holding every resource asked for.
    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwOut>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut snap = self.snap.clone();
        let replies = self.replies.clone();
        let mut kick = self.kick.clone();
        kick.borrow_and_update();
        self.streams
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let mut watches: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut nonce = 0u64;
            loop {
                let due: Vec<String> = tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(r)) = m else { return };
                        if !r.response_nonce.is_empty() {
                            replies.lock().unwrap().push(Reply {
                                type_url: r.type_url.clone(),
                                error: r.error_detail.as_ref().map(|e| e.message.clone()),
                                version: r.version_info.clone(),
                                nonce: r.response_nonce.clone(),
                            });
                        }
                        let mut names = r.resource_names.clone();
                        names.sort();
                        if watches.get(&r.type_url) == Some(&names) {
                            continue;
                        }
                        watches.insert(r.type_url.clone(), names);
                        vec![r.type_url]
                    }
                    c = snap.changed() => {
                        if c.is_err() { return }
                        watches.keys().cloned().collect()
                    }
                    _ = kick.changed() => return,
                };
                let cur = snap.borrow().clone();
                for t in due {
                    let names = &watches[&t];
                    nonce += 1;
                    let resp = DiscoveryResponse {
                        version_info: format!("v{nonce}"),
                        resources: cur
                            .get(t.as_str())
                            .into_iter()
                            .flatten()
                            .filter(|(n, _)| names.is_empty() || names.contains(n))
                            .map(|(_, a)| a.clone())
                            .collect(),
                        type_url: t,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Out>, Status> {
        if !self.delta {
            return Err(Status::unimplemented("state of the world only"));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut snap = self.snap.clone();
        let replies = self.replies.clone();
        let mut kick = self.kick.clone();
        kick.borrow_and_update();
        self.streams
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            // type -> (wildcard, names); type -> name -> version sent.
            let mut subs: HashMap<String, (bool, Vec<String>)> = HashMap::new();
            let mut sent: HashMap<String, HashMap<String, String>> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(r)) = m else { return };
                        if !r.response_nonce.is_empty() {
                            replies.lock().unwrap().push(Reply {
                                type_url: r.type_url.clone(),
                                error: r.error_detail.as_ref().map(|e| e.message.clone()),
                                version: String::new(),
                                nonce: r.response_nonce.clone(),
                            });
                        }
                        let first = !subs.contains_key(&r.type_url);
                        let s = subs.entry(r.type_url.clone()).or_default();
                        if first && r.resource_names_subscribe.is_empty() {
                            s.0 = true;
                        }
                        if first {
                            sent.insert(r.type_url.clone(), r.initial_resource_versions.clone());
                        }
                        s.1.extend(r.resource_names_subscribe.iter().cloned());
                        s.1.retain(|n| !r.resource_names_unsubscribe.contains(n));
                    }
                    c = snap.changed() => if c.is_err() { return },
                    _ = kick.changed() => return,
                }
                let cur = snap.borrow().clone();
                for (t, (wild, names)) in &subs {
                    let have = sent.entry(t.clone()).or_default();
                    let empty = BTreeMap::new();
                    let all = cur.get(t.as_str()).unwrap_or(&empty);
                    let wanted: BTreeMap<&String, &prost_types::Any> = all
                        .iter()
                        .filter(|(n, _)| *wild || names.contains(n))
                        .collect();
                    let mut resources = Vec::new();
                    for (n, a) in &wanted {
                        let v = version(a);
                        if have.get(*n) != Some(&v) {
                            have.insert((*n).clone(), v.clone());
                            resources.push(Resource {
                                name: (*n).clone(),
                                version: v,
                                resource: Some((*a).clone()),
                                ..Default::default()
                            });
                        }
                    }
                    let removed: Vec<String> = have
                        .keys()
                        .filter(|n| !wanted.contains_key(n))
                        .cloned()
                        .collect();
                    for n in &removed {
                        have.remove(n);
                    }
                    if resources.is_empty() && removed.is_empty() {
                        continue;
                    }
                    nonce += 1;
                    let resp = DeltaDiscoveryResponse {
                        type_url: t.clone(),
                        resources,
                        removed_resources: removed,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct ControlPlane {
    addr: SocketAddr,
    snap: watch::Sender<Snapshot>,
    replies: Replies,
    kick: watch::Sender<u64>,
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl ControlPlane {
    async fn start() -> ControlPlane {
        ControlPlane::serving(true).await
    }

    /// `delta`: whether `DeltaAggregatedResources` is served.
    async fn serving(delta: bool) -> ControlPlane {
        let (snap, rx) = watch::channel(Snapshot::new());
        let replies = Arc::new(Mutex::new(Vec::new()));
        let (kick, kick_rx) = watch::channel(0);
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ads = Ads {
            snap: rx,
            replies: replies.clone(),
            kick: kick_rx,
            streams: streams.clone(),
            delta,
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(ads))
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        ControlPlane {
            addr,
            snap,
            replies,
            kick,
            streams,
        }
    }

    fn set<M: Message>(&self, t: &'static str, name: &str, m: &M) {
        let a = any(t, m);
        self.snap.send_modify(|s| {
            s.entry(t).or_default().insert(name.to_string(), a);
        });
    }

    fn remove(&self, t: &'static str, name: &str) {
        self.snap.send_modify(|s| {
            s.entry(t).or_default().remove(name);
        });
    }

    /// Ends every open stream.
    fn drop_streams(&self) {
        self.kick.send_modify(|k| *k += 1);
    }

    fn streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn nacks(&self) -> Vec<String> {
        self.replies
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.error.clone())
            .collect()
    }

    fn replies(&self) -> Vec<Reply> {
        self.replies.lock().unwrap().clone()
    }
}

fn any<M: Message>(t: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: t.to_string(),
        value: m.encode_to_vec(),
    }
}

// --- Envoy resources ------------------------------------------------------

fn listener() -> pl::Listener {
    listener_with(vec![])
}

fn listener_with(http_filters: Vec<hcm::HttpFilter>) -> pl::Listener {
    listener_rds("echo", http_filters)
}

/// The listener, its HTTP chain's routes over RDS `route`.
fn listener_rds(route: &str, http_filters: Vec<hcm::HttpFilter>) -> pl::Listener {
    let h = hcm::HttpConnectionManager {
        http_filters,
        stat_prefix: "echo".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: route.into(),
            },
        )),
        ..Default::default()
    };
    pl::Listener {
        name: "waypoint".into(),
        filter_chains: vec![pl::FilterChain {
            name: "echo-http".into(),
            filter_chain_match: Some(pl::FilterChainMatch {
                destination_port: Some(80),
                prefix_ranges: vec![core::CidrRange {
                    address_prefix: "10.96.0.10".into(),
                    prefix_len: Some(32),
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
        }],
        ..Default::default()
    }
}

fn prefix(p: &str) -> Option<pr::RouteMatch> {
    Some(pr::RouteMatch {
        path_specifier: Some(pr::route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    })
}

fn to_cluster(c: &str) -> Option<pr::route::Action> {
    Some(pr::route::Action::Route(pr::RouteAction {
        cluster_specifier: Some(pr::route_action::ClusterSpecifier::Cluster(c.into())),
        ..Default::default()
    }))
}

/// `x-version: v2` → v2, then the given default route.
fn routes(default: Vec<pr::Route>) -> pr::RouteConfiguration {
    let mut rs = vec![pr::Route {
        name: "v2-by-header".into(),
        r#match: Some(pr::RouteMatch {
            path_specifier: Some(pr::route_match::PathSpecifier::Prefix("/".into())),
            headers: vec![pr::HeaderMatcher {
                name: "x-version".into(),
                header_match_specifier: Some(
                    pr::header_matcher::HeaderMatchSpecifier::StringMatch(pm::StringMatcher {
                        match_pattern: Some(pm::string_matcher::MatchPattern::Exact("v2".into())),
                        ignore_case: false,
                    }),
                ),
                invert_match: false,
            }],
            ..Default::default()
        }),
        action: to_cluster("v2"),
        ..Default::default()
    }];
    rs.extend(default);
    pr::RouteConfiguration {
        name: "echo".into(),
        virtual_hosts: vec![pr::VirtualHost {
            name: "echo".into(),
            domains: vec!["*".into()],
            routes: rs,
        }],
    }
}

fn split(w1: u32, w2: u32) -> pr::Route {
    let cw = |n: &str, w| pr::weighted_cluster::ClusterWeight {
        name: n.into(),
        weight: Some(w),
        ..Default::default()
    };
    pr::Route {
        name: "split".into(),
        r#match: prefix("/"),
        action: Some(pr::route::Action::Route(pr::RouteAction {
            cluster_specifier: Some(pr::route_action::ClusterSpecifier::WeightedClusters(
                pr::WeightedCluster {
                    clusters: vec![cw("v1", w1), cw("v2", w2)],
                },
            )),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn eds_cluster(name: &str) -> pc::Cluster {
    pc::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
            pc::cluster::DiscoveryType::Eds as i32,
        )),
        connect_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A cluster with its one endpoint inline (`load_assignment`), no EDS.
fn static_cluster(name: &str, at: SocketAddr) -> pc::Cluster {
    let mut c = eds_cluster(name);
    c.cluster_discovery_type = None;
    c.load_assignment = Some(assignment(name, at));
    c
}

fn assignment(name: &str, at: SocketAddr) -> pe::ClusterLoadAssignment {
    pe::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![pe::LocalityLbEndpoints {
            lb_endpoints: vec![pe::LbEndpoint {
                host_identifier: Some(pe::lb_endpoint::HostIdentifier::Endpoint(pe::Endpoint {
                    address: Some(core::Address {
                        socket_address: Some(core::SocketAddress {
                            address: at.ip().to_string(),
                            port_value: at.port().into(),
                        }),
                    }),
                })),
                metadata: None,
            }],
        }],
    }
}

// --- harness ----------------------------------------------------------------

async fn xds_waypoint(
    ca: Arc<dyn ztunnel::identity::CaClient>,
    cp: &ControlPlane,
    api_type: ApiType,
) -> Running {
    xds_waypoint_with(ca, cp, Duration::from_secs(15), api_type).await
}

async fn xds_waypoint_with(
    ca: Arc<dyn ztunnel::identity::CaClient>,
    cp: &ControlPlane,
    warming_timeout: Duration,
    api_type: ApiType,
) -> Running {
    let store = Store::empty();
    let proxy = build(Parts {
        identity: id("waypoint"),
        ca,
        cert_ttl: Duration::from_secs(3600),
        own_ip: "127.0.0.1".parse().unwrap(),
        mark: 0,
        pool_max_streams: 100,
        store: store.clone(),
    });
    spawn(
        XdsConfig {
            address: format!("http://{}", cp.addr),
            root_cert: None,
            server_name: None,
            token_file: None,
            node_id: "router~127.0.0.1~waypoint.default~default.svc.cluster.local".into(),
            node_name: None,
            node_cluster: "waypoint".into(),
            warming_timeout,
            api_type,
        },
        store,
    );
    let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start(proxy, hbone, vec![admin]).await.unwrap()
}

/// Polls `f` until it holds (the update is asynchronous); fails after a
/// generous bound rather than hanging.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn xds_routes_apply_update_nack_and_removal_delta() {
    routes_apply_update_nack_and_removal(ApiType::DeltaGrpc).await
}

#[tokio::test]
async fn xds_routes_apply_update_nack_and_removal_sotw() {
    routes_apply_update_nack_and_removal(ApiType::Grpc).await
}

async fn routes_apply_update_nack_and_removal(api: ApiType) {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let cp = ControlPlane::start().await;
    let wp = xds_waypoint(ca.clone(), &cp, api).await;

    // Not ready before the control plane has sent a complete configuration.
    assert!(!wp.proxy.store.synced());
    assert!(admin_get(&wp, "/healthz/ready").await.contains("not ready"));

    cp.set(type_url::CLUSTER, "v1", &eds_cluster("v1"));
    cp.set(type_url::CLUSTER, "v2", &eds_cluster("v2"));
    cp.set(
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        "v1",
        &assignment("v1", v1.addr),
    );
    cp.set(
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        "v2",
        &assignment("v2", v2.addr),
    );
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(80, 20)]),
    );
    cp.set(type_url::LISTENER, "waypoint", &listener());
    let store = wp.proxy.store.clone();
    eventually("first config", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    assert_eq!(admin_get(&wp, "/healthz/ready").await, "ready\n");

    let c = client(ca, "client", &wp);
    // Header route.
    assert_eq!(c.get("/a", &[("x-version", "v2")]).await.body, "v2 /a");
    // Weighted split, per request on one HTTP/2 connection.
    let mut h2 = c.h2(VIP).await;
    let n = 300;
    let (h1_before, h2_before) = (v1.hits(), v2.hits());
    for _ in 0..n {
        let req = http::Request::builder()
            .uri("http://echo.default.svc.cluster.local/split")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    }
    let (d1, d2) = (v1.hits() - h1_before, v2.hits() - h2_before);
    assert_eq!(d1 + d2, n);
    let share = d1 as f64 / n as f64;
    assert!((0.65..=0.95).contains(&share), "v1 got {share}");

    // An update changes behaviour without a restart: everything to v2.
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![pr::Route {
            name: "all-v2".into(),
            r#match: prefix("/"),
            action: to_cluster("v2"),
            ..Default::default()
        }]),
    );
    eventually("route update", || {
        let s = store.clone();
        async move {
            s.get()
                .source
                .route_configurations
                .iter()
                .any(|r| r.virtual_hosts[0].routes.iter().any(|r| r.name == "all-v2"))
        }
    })
    .await;
    for _ in 0..20 {
        assert_eq!(c.get("/b", &[]).await.body, "v2 /b");
    }

    // A bad regex is NACKed with the field path; the last good config
    // stays in force.
    let mut bad = routes(vec![pr::Route {
        name: "bad".into(),
        r#match: Some(pr::RouteMatch {
            path_specifier: Some(pr::route_match::PathSpecifier::SafeRegex(
                pm::RegexMatcher {
                    regex: "/(unclosed".into(),
                },
            )),
            ..Default::default()
        }),
        action: to_cluster("v1"),
        ..Default::default()
    }]);
    bad.virtual_hosts[0].routes.push(pr::Route {
        name: "all-v1".into(),
        r#match: prefix("/"),
        action: to_cluster("v1"),
        ..Default::default()
    });
    cp.set(type_url::ROUTE_CONFIGURATION, "echo", &bad);
    eventually("NACK", || {
        let n = cp.nacks();
        async move { !n.is_empty() }
    })
    .await;
    let nack = cp.nacks().pop().unwrap();
    assert!(nack.contains("RouteConfiguration \"echo\""), "{nack}");
    assert!(nack.contains("routes[1].match.safe_regex.regex"), "{nack}");
    assert!(nack.contains("invalid regex \"/(unclosed\""), "{nack}");
    assert!(store.last_error().unwrap().contains("invalid regex"));
    if api == ApiType::Grpc {
        // SotW: the NACK carries the version last accepted, not the
        // rejected response's.
        let rs = cp.replies();
        let i = rs.iter().rposition(|r| r.error.is_some()).unwrap();
        let prev = rs[..i]
            .iter()
            .rev()
            .find(|r| r.type_url == rs[i].type_url && r.error.is_none())
            .unwrap();
        assert_eq!(rs[i].version, prev.version, "{rs:?}");
        assert_ne!(rs[i].version, format!("v{}", rs[i].nonce), "{rs:?}");
    }
    assert_eq!(c.get("/c", &[]).await.body, "v2 /c");
    assert_eq!(c.get("/c", &[("x-version", "v2")]).await.body, "v2 /c");

    // Removal: the header route goes, then the v2 cluster (make before
    // break); requests go to v1 and v2 sees no more.
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &pr::RouteConfiguration {
            name: "echo".into(),
            virtual_hosts: vec![pr::VirtualHost {
                name: "echo".into(),
                domains: vec!["*".into()],
                routes: vec![pr::Route {
                    name: "all-v1".into(),
                    r#match: prefix("/"),
                    action: to_cluster("v1"),
                    ..Default::default()
                }],
            }],
        },
    );
    cp.remove(type_url::CLUSTER, "v2");
    cp.remove(type_url::CLUSTER_LOAD_ASSIGNMENT, "v2");
    eventually("cluster removal", || {
        let s = store.clone();
        async move {
            let cfg = s.get();
            !cfg.source.clusters.iter().any(|c| c.name == "v2")
                && cfg.source.route_configurations[0].virtual_hosts[0]
                    .routes
                    .len()
                    == 1
        }
    })
    .await;
    let v2_hits = v2.hits();
    assert_eq!(c.get("/d", &[("x-version", "v2")]).await.body, "v1 /d");
    assert_eq!(c.get("/d", &[]).await.body, "v1 /d");
    assert_eq!(v2.hits(), v2_hits);

    // The listener removed: no filter chain for the destination.
    cp.remove(type_url::LISTENER, "waypoint");
    eventually("listener removal", || {
        let s = store.clone();
        async move { s.get().source.listeners.is_empty() }
    })
    .await;
    assert!(c.tunnel(VIP).await.is_err() || c.get("/e", &[]).await.status == 404);
}

#[tokio::test]
async fn xds_stream_loss_keeps_config_and_resumes_delta() {
    stream_loss_keeps_config_and_resumes(ApiType::DeltaGrpc).await
}

#[tokio::test]
async fn xds_stream_loss_keeps_config_and_resumes_sotw() {
    stream_loss_keeps_config_and_resumes(ApiType::Grpc).await
}

async fn stream_loss_keeps_config_and_resumes(api: ApiType) {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let cp = ControlPlane::start().await;
    let wp = xds_waypoint(ca.clone(), &cp, api).await;
    // Static cluster (inline load_assignment) and an inline-free RDS route.
    let c1 = static_cluster("v1", v1.addr);
    cp.set(type_url::CLUSTER, "v1", &c1);
    cp.set(type_url::CLUSTER, "v2", &eds_cluster("v2"));
    cp.set(
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        "v2",
        &assignment("v2", v2.addr),
    );
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(100, 0)]),
    );
    cp.set(type_url::LISTENER, "waypoint", &listener());
    let store = wp.proxy.store.clone();
    eventually("first config", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/a", &[]).await.body, "v1 /a");

    // The stream breaks; the configuration in force keeps serving.
    let opened = cp.streams();
    cp.drop_streams();
    assert_eq!(c.get("/b", &[]).await.body, "v1 /b");
    assert_eq!(c.get("/b", &[("x-version", "v2")]).await.body, "v2 /b");
    // It reconnects, resumes, and picks up what changed meanwhile.
    eventually("reconnect", || {
        let n = cp.streams();
        async move { n > opened }
    })
    .await;
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(0, 100)]),
    );
    eventually("update after reconnect", || {
        let s = store.clone();
        async move {
            s.get().source.route_configurations[0].virtual_hosts[0].routes[1]
                .route
                .as_ref()
                .and_then(|r| r.weighted_clusters.as_ref())
                .is_some_and(|w| w.clusters[0].weight == 0)
        }
    })
    .await;
    assert_eq!(c.get("/c", &[]).await.body, "v2 /c");
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());
}

#[tokio::test]
async fn xds_missing_route_configuration_stops_warming_delta() {
    missing_route_configuration_stops_warming(ApiType::DeltaGrpc).await
}

#[tokio::test]
async fn xds_missing_route_configuration_stops_warming_sotw() {
    missing_route_configuration_stops_warming(ApiType::Grpc).await
}

async fn missing_route_configuration_stops_warming(api: ApiType) {
    let ca = ca();
    let v1 = backend("v1").await;
    let cp = ControlPlane::start().await;
    let wp = xds_waypoint_with(ca.clone(), &cp, Duration::from_millis(200), api).await;
    let c1 = static_cluster("v1", v1.addr);
    cp.set(type_url::CLUSTER, "v1", &c1);
    // The listener names RDS "echo", which the control plane never sends.
    cp.set(type_url::LISTENER, "waypoint", &listener());
    let store = wp.proxy.store.clone();
    eventually("config without the missing route configuration", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    // In force, with an empty "echo": no route.
    assert_eq!(c_get(&ca, &wp, "/a").await, 404);
    // When it does arrive, it applies.
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![pr::Route {
            name: "all-v1".into(),
            r#match: prefix("/"),
            action: to_cluster("v1"),
            ..Default::default()
        }]),
    );
    eventually("late route configuration", || {
        let s = store.clone();
        async move {
            !s.get().source.route_configurations[0]
                .virtual_hosts
                .is_empty()
        }
    })
    .await;
    assert_eq!(c_get(&ca, &wp, "/b").await, 200);
}

/// A control plane without delta ADS (UNIMPLEMENTED): the waypoint, left
/// at its default (delta), asks again over SotW and gets its
/// configuration.
#[tokio::test]
async fn xds_delta_unimplemented_falls_back_to_sotw() {
    let ca = ca();
    let v1 = backend("v1").await;
    let cp = ControlPlane::serving(false).await;
    let wp = xds_waypoint(ca.clone(), &cp, ApiType::DeltaGrpc).await;
    let c1 = static_cluster("v1", v1.addr);
    cp.set(type_url::CLUSTER, "v1", &c1);
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(100, 0)]),
    );
    cp.set(type_url::LISTENER, "waypoint", &listener());
    let store = wp.proxy.store.clone();
    eventually("config over SotW", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    assert_eq!(c_get(&ca, &wp, "/a").await, 200);
    // Every ACK came over SotW (which alone carries `version_info`).
    let rs = cp.replies();
    assert!(!rs.is_empty());
    assert!(rs.iter().all(|r| r.version.starts_with('v')), "{rs:?}");
}

#[tokio::test]
async fn xds_new_route_name_warms_delta() {
    new_route_name_warms(ApiType::DeltaGrpc).await
}

#[tokio::test]
async fn xds_new_route_name_warms_sotw() {
    new_route_name_warms(ApiType::Grpc).await
}

/// A listener update naming a route configuration that has not arrived
/// is ACKed, but the previous configuration stays in force until it
/// does (no timeout here).
async fn new_route_name_warms(api: ApiType) {
    let ca = ca();
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let cp = ControlPlane::start().await;
    let wp = xds_waypoint(ca.clone(), &cp, api).await;
    let c1 = static_cluster("v1", v1.addr);
    cp.set(type_url::CLUSTER, "v1", &c1);
    let c2 = static_cluster("v2", v2.addr);
    cp.set(type_url::CLUSTER, "v2", &c2);
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(100, 0)]),
    );
    cp.set(type_url::LISTENER, "waypoint", &listener());
    let store = wp.proxy.store.clone();
    eventually("first config", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    let c = client(ca, "client", &wp);
    assert_eq!(c.get("/a", &[]).await.body, "v1 /a");

    // The listener now names "echo2", which the server does not have.
    let acks = |cp: &ControlPlane, t: &str| {
        cp.replies()
            .iter()
            .filter(|r| r.type_url == t && r.error.is_none())
            .count()
    };
    let lds_acks = acks(&cp, type_url::LISTENER);
    cp.set(
        type_url::LISTENER,
        "waypoint",
        &listener_rds("echo2", vec![]),
    );
    eventually("the new listener ACKed", || {
        let n = acks(&cp, type_url::LISTENER);
        async move { n > lds_acks }
    })
    .await;
    // Warming: still the old listener and routes.
    let cfg = store.get();
    assert_eq!(cfg.source.route_configurations[0].name, "echo");
    assert_eq!(c.get("/b", &[]).await.body, "v1 /b");
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());

    // It arrives: the new listener and its routes go in force together.
    let mut echo2 = routes(vec![split(0, 100)]);
    echo2.name = "echo2".into();
    cp.set(type_url::ROUTE_CONFIGURATION, "echo2", &echo2);
    eventually("echo2 in force", || {
        let s = store.clone();
        async move { s.get().source.route_configurations[0].name == "echo2" }
    })
    .await;
    assert_eq!(c.get("/c", &[]).await.body, "v2 /c");
    assert_eq!(store.get().source.route_configurations.len(), 1);
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());

    // A bad listener is refused even while its routes are still missing:
    // ACKed, it would fail only once they came, and never be resent.
    let mut bad = listener_rds("echo3", vec![]);
    bad.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .prefix_ranges[0]
        .address_prefix = "not-an-address".into();
    cp.set(type_url::LISTENER, "waypoint", &bad);
    eventually("the bad listener NACKed", || {
        let n = cp.nacks().len();
        async move { n > 0 }
    })
    .await;
    assert_eq!(c.get("/d", &[]).await.body, "v2 /d");
}

async fn c_get(ca: &Arc<dyn ztunnel::identity::CaClient>, wp: &Running, path: &str) -> u16 {
    client(ca.clone(), "client", wp)
        .get(path, &[])
        .await
        .status
        .as_u16()
}

/// Istio's shape for "DENY paths under /admin to anyone": an HTTP RBAC
/// filter in the connection manager.
#[tokio::test]
async fn xds_rbac_filter_denies() {
    use mesh_proto::envoy::config::rbac::v3 as prbac;
    use mesh_proto::envoy::extensions::filters::http::rbac::v3 as phrbac;
    let ca = ca();
    let v1 = backend("v1").await;
    let cp = ControlPlane::start().await;
    let wp = xds_waypoint(ca.clone(), &cp, ApiType::DeltaGrpc).await;
    let admin_paths = prbac::Permission {
        rule: Some(prbac::permission::Rule::UrlPath(pm::PathMatcher {
            rule: Some(pm::path_matcher::Rule::Path(pm::StringMatcher {
                match_pattern: Some(pm::string_matcher::MatchPattern::Prefix("/admin".into())),
                ignore_case: false,
            })),
        })),
    };
    let anyone = prbac::Principal {
        identifier: Some(prbac::principal::Identifier::Any(true)),
    };
    let rbac = phrbac::Rbac {
        rules: Some(prbac::Rbac {
            action: prbac::rbac::Action::Deny as i32,
            policies: [(
                "ns[default]-policy[no-admin]-rule[0]".to_string(),
                prbac::Policy {
                    permissions: vec![admin_paths],
                    principals: vec![anyone],
                },
            )]
            .into(),
        }),
    };
    let filter = hcm::HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            type_url::HTTP_RBAC,
            &rbac,
        ))),
        ..Default::default()
    };
    let c1 = static_cluster("v1", v1.addr);
    cp.set(type_url::CLUSTER, "v1", &c1);
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(100, 0)]),
    );
    cp.set(type_url::LISTENER, "waypoint", &listener_with(vec![filter]));
    let store = wp.proxy.store.clone();
    eventually("first config", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    assert_eq!(c_get(&ca, &wp, "/admin/x").await, 403);
    assert_eq!(c_get(&ca, &wp, "/public").await, 200);
    assert_eq!(v1.state.seen.lock().unwrap().len(), 1);
}

/// Endpoint metadata as istiod sends it (`istio.workload` in its
/// `name;ns;canonical service;revision;cluster` encoding) labels the
/// metrics.
#[tokio::test]
async fn xds_istio_endpoint_metadata_labels_the_metrics() {
    let ca = ca();
    let v1 = backend("v1").await;
    let cp = ControlPlane::start().await;
    let wp = xds_waypoint(ca.clone(), &cp, ApiType::DeltaGrpc).await;
    let mut c1 = static_cluster("v1", v1.addr);
    let workload = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(
            "echo-v1;default;echo;v1;Kubernetes".into(),
        )),
    };
    let istio = prost_types::Struct {
        fields: [("workload".to_string(), workload)].into(),
    };
    c1.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints[0].metadata =
        Some(core::Metadata {
            filter_metadata: [("istio".to_string(), istio)].into(),
            ..Default::default()
        });
    cp.set(type_url::CLUSTER, "v1", &c1);
    cp.set(
        type_url::ROUTE_CONFIGURATION,
        "echo",
        &routes(vec![split(100, 0)]),
    );
    cp.set(type_url::LISTENER, "waypoint", &listener());
    let store = wp.proxy.store.clone();
    eventually("first config", || {
        let s = store.clone();
        async move { s.synced() }
    })
    .await;
    assert_eq!(c_get(&ca, &wp, "/x").await, 200);
    let metrics = admin_get(&wp, "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .expect("istio_requests_total");
    for want in [
        "destination_workload=\"echo-v1\"",
        "destination_workload_namespace=\"default\"",
        "destination_canonical_service=\"echo\"",
        "destination_canonical_revision=\"v1\"",
    ] {
        assert!(line.contains(want), "{want} in {line}");
    }
}
