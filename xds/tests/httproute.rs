//! HTTPRoutes served as Envoy resources: a raw delta ADS client subscribes
//! the way the waypoint does (LDS/CDS wildcard, RDS/EDS by name), ACKs
//! what the waypoint's own translation accepts, and checks the routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::envoy::config::cluster::v3 as pc;
use mesh_proto::envoy::config::endpoint::v3 as pe;
use mesh_proto::envoy::config::listener::v3 as pl;
use mesh_proto::envoy::config::route::v3 as pr;
use mesh_proto::type_url::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION};
use prost::Message;
use waypoint::config::model as m;
use waypoint::xds::translate as wt;

const WAYPOINT: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: demo}
spec:
  selector: {app: echo, version: v1}
  clusterIP: 10.96.0.11
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: demo}
spec:
  selector: {app: echo, version: v2}
  clusterIP: 10.96.0.12
  ports: [{port: 80, targetPort: 8080}]
"#;

const ROUTE: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-split, value: "yes"}]}
    backendRefs:
    - {name: echo-v1, port: 80, weight: 80}
    - {name: echo-v2, port: 80, weight: 20}
    timeouts: {request: 1500ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: Glob, value: /x}}]
    backendRefs: [{name: echo-v1, port: 80}]
"#;

fn manifests(routes: &str) -> String {
    let mut s = NS.to_string();
    s += &pod(
        "echo-1",
        "node-b",
        "10.244.2.10",
        "echo",
        "app: echo, version: v1",
    );
    s += &pod(
        "echo-2",
        "node-b",
        "10.244.2.11",
        "echo",
        "app: echo, version: v2",
    );
    s += &SERVICE.replace(
        "metadata: {name: echo, namespace: demo}",
        "metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}",
    );
    s += WAYPOINT;
    s += &waypoint_pod("wp-1", "node-a", "10.244.1.99", "wp");
    s += routes;
    s
}

fn sub(t: &str, names: &[String]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: t.into(),
        resource_names_subscribe: names.to_vec(),
        ..Default::default()
    }
}

fn decode<M: Message + Default>(r: &DeltaDiscoveryResponse) -> Vec<M> {
    r.resources
        .iter()
        .map(|x| M::decode(x.resource.as_ref().unwrap().value.as_slice()).unwrap())
        .collect()
}

/// Next response of type `t` (others are ACKed and skipped).
async fn next(d: &mut Delta, t: &str) -> DeltaDiscoveryResponse {
    loop {
        let r = d.recv().await.unwrap();
        d.ack(&r).await;
        if r.type_url == t {
            return r;
        }
    }
}

#[tokio::test]
async fn httproute_served_as_envoy_resources_the_waypoint_accepts() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &manifests(ROUTE));
    let server = start(dir.path()).await;

    // The invalid route is reported with file, object and field, and skipped.
    let errors = server.errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("mesh.yaml")
            && errors[0].contains("HTTPRoute demo/broken")
            && errors[0].contains("spec.rules[0].matches[0].path.type"),
        "{}",
        errors[0]
    );

    let mut first = sub(LISTENER, &[]);
    first.node = waypoint_node("wp-1", "10.244.1.99", "node-a");
    let mut d = Delta::open(channel(&server).await, "tok-a", first)
        .await
        .unwrap();
    let lds = next(&mut d, LISTENER).await;
    let listeners: Vec<pl::Listener> = decode(&lds);
    assert_eq!(listeners.len(), 1);
    let l = wt::listener(&listeners[0]).unwrap().listener;
    assert_eq!(l.name, "demo/wp");
    // The port declares no protocol: HTTP when sniffed as HTTP, else
    // opaque TCP to the Service.
    assert_eq!(l.filter_chains.len(), 2);
    let fc = &l.filter_chains[0];
    assert_eq!(
        fc.filter_chain_match.application_protocols,
        vec!["http/1.1", "h2c"]
    );
    let tcp = &l.filter_chains[1];
    assert_eq!(tcp.name, "demo/echo:80/tcp");
    assert!(tcp.filter_chain_match.application_protocols.is_empty());
    assert_eq!(tcp.filter_chain_match.destination_port, Some(80));
    let echo = "outbound|80||echo.demo.svc.cluster.local";
    assert_eq!(tcp.tcp_proxy.as_ref().unwrap().cluster, echo);
    assert_eq!(fc.filter_chain_match.destination_port, Some(80));
    assert_eq!(fc.filter_chain_match.prefix_ranges, vec!["10.96.0.10/32"]);
    let rds_name = fc
        .http_connection_manager
        .as_ref()
        .unwrap()
        .route_config_name
        .clone();

    d.send(sub(ROUTE_CONFIGURATION, std::slice::from_ref(&rds_name)))
        .await;
    let rds = next(&mut d, ROUTE_CONFIGURATION).await;
    let rcs: Vec<pr::RouteConfiguration> = decode(&rds);
    let rc = wt::route_configuration(&rcs[0]).unwrap();
    assert_eq!(rc.name, rds_name);
    let routes = &rc.virtual_hosts[0].routes;
    // Only the valid route's two rules; no default route.
    assert_eq!(routes.len(), 2, "{routes:?}");
    let by_header = &routes[0];
    assert_eq!(by_header.route_match.prefix.as_deref(), Some("/"));
    assert_eq!(by_header.route_match.headers[0].name, "x-version");
    assert_eq!(
        by_header.route_match.headers[0]
            .string_match
            .as_ref()
            .unwrap()
            .exact
            .as_deref(),
        Some("v2")
    );
    let v1 = "outbound|80||echo-v1.demo.svc.cluster.local";
    let v2 = "outbound|80||echo-v2.demo.svc.cluster.local";
    assert_eq!(
        by_header.route.as_ref().unwrap().cluster.as_deref(),
        Some(v2)
    );
    let split = routes[1].route.as_ref().unwrap();
    let weights: Vec<(String, u32)> = split
        .weighted_clusters
        .as_ref()
        .unwrap()
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight))
        .collect();
    assert_eq!(weights, vec![(v1.to_string(), 80), (v2.to_string(), 20)]);
    assert_eq!(split.timeout.as_deref(), Some("1.500000000s"));
    assert_eq!(routes[1].request_headers_to_add[0].header.key, "x-split");
    assert_eq!(
        routes[1].request_headers_to_add[0].append_action,
        m::AppendAction::OverwriteIfExistsOrAdd
    );

    d.send(sub(CLUSTER, &[])).await;
    let cds = next(&mut d, CLUSTER).await;
    let clusters: Vec<pc::Cluster> = decode(&cds);
    let mut names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        vec![v1.to_string(), v2.to_string(), echo.to_string()]
    );
    let eds_names: Vec<String> = clusters.iter().filter_map(wt::eds_name).collect();
    d.send(sub(CLUSTER_LOAD_ASSIGNMENT, &eds_names)).await;
    let eds = next(&mut d, CLUSTER_LOAD_ASSIGNMENT).await;
    let clas: Vec<pe::ClusterLoadAssignment> = decode(&eds);
    assert_eq!(clas.len(), 3);
    for c in &clusters {
        let a = clas.iter().find(|a| a.cluster_name == c.name).unwrap();
        let mc = wt::cluster(c, Some(a)).unwrap();
        let eps = &mc.load_assignment.endpoints[0].lb_endpoints;
        if c.name == echo {
            // Both versions, for the TCP chain.
            assert_eq!(eps.len(), 2, "{}", c.name);
            continue;
        }
        assert_eq!(eps.len(), 1, "{}", c.name);
        let e = &eps[0];
        let want_ip = if c.name == v1 {
            "10.244.2.10"
        } else {
            "10.244.2.11"
        };
        assert_eq!(e.endpoint.address.socket_address.address, want_ip);
        assert_eq!(e.endpoint.address.socket_address.port_value, 8080);
        assert_eq!(
            e.metadata.identity.as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/echo")
        );
        assert_eq!(e.metadata.hbone_port, Some(15008));
    }

    // Removing the route falls back to one default route to the service.
    write(dir.path(), "mesh.yaml", &manifests(""));
    let rds = next(&mut d, ROUTE_CONFIGURATION).await;
    let rc = wt::route_configuration(&decode::<pr::RouteConfiguration>(&rds)[0]).unwrap();
    let routes = &rc.virtual_hosts[0].routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(
        routes[0].route.as_ref().unwrap().cluster.as_deref(),
        Some("outbound|80||echo.demo.svc.cluster.local")
    );
    server.stop().await;
}

/// Two waypoints, each with its Service: each waypoint pod is sent only its
/// own Gateway's listener, routes and clusters; a client that is no
/// waypoint, or whose pod runs on another node than its token names, none.
#[tokio::test]
async fn each_waypoint_gets_only_its_own_resources() {
    let mut text = NS.to_string();
    text += &pod("echo-1", "node-b", "10.244.2.10", "echo", "app: echo");
    text += &SERVICE.replace(
        "metadata: {name: echo, namespace: demo}",
        "metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp-a}}",
    );
    text += &SERVICE
        .replace(
            "metadata: {name: echo, namespace: demo}",
            "metadata: {name: other, namespace: demo, labels: {istio.io/use-waypoint: wp-b}}",
        )
        .replace("10.96.0.10", "10.96.0.20");
    for gw in ["wp-a", "wp-b"] {
        text += &WAYPOINT
            .split("---")
            .nth(1)
            .unwrap()
            .replace("name: wp,", &format!("name: {gw},"))
            .replace("apiVersion", "---\napiVersion");
    }
    text += &waypoint_pod("wp-a-1", "node-a", "10.244.1.10", "wp-a");
    text += &waypoint_pod("wp-b-1", "node-b", "10.244.2.20", "wp-b");
    text += r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-only, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: other}]
  rules: [{matches: [{path: {type: Exact, value: /b}}], backendRefs: [{name: other, port: 80}]}]
"#;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &text);
    let server = start(dir.path()).await;
    assert!(server.errors.lock().unwrap().is_empty());

    // (token, node) -> listener and cluster names received.
    async fn seen(
        server: &xds::Running,
        token: &str,
        node: Option<mesh_proto::core::Node>,
    ) -> (Vec<String>, Vec<String>) {
        let mut first = sub(LISTENER, &[]);
        first.node = node;
        let mut d = Delta::open(channel(server).await, token, first)
            .await
            .unwrap();
        let lds = next(&mut d, LISTENER).await;
        d.send(sub(CLUSTER, &[])).await;
        let cds = next(&mut d, CLUSTER).await;
        let names = |r: &DeltaDiscoveryResponse| {
            let mut v: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
            v.sort();
            v
        };
        (names(&lds), names(&cds))
    }
    let a = seen(
        &server,
        "tok-a",
        waypoint_node("wp-a-1", "10.244.1.10", "node-a"),
    )
    .await;
    assert_eq!(
        a,
        (
            vec!["demo/wp-a".to_string()],
            vec!["outbound|80||echo.demo.svc.cluster.local".to_string()]
        )
    );
    let b = seen(
        &server,
        "tok-b",
        waypoint_node("wp-b-1", "10.244.2.20", "node-b"),
    )
    .await;
    assert_eq!(
        b,
        (
            vec!["demo/wp-b".to_string()],
            vec!["outbound|80||other.demo.svc.cluster.local".to_string()]
        )
    );
    // Waypoint A cannot read B's routes by name either.
    let mut first = sub(ROUTE_CONFIGURATION, &["demo/other:80".to_string()]);
    first.node = waypoint_node("wp-a-1", "10.244.1.10", "node-a");
    let mut d = Delta::open(channel(&server).await, "tok-a", first)
        .await
        .unwrap();
    let rds = next(&mut d, ROUTE_CONFIGURATION).await;
    assert!(rds.resources.is_empty(), "{:?}", rds.resources);
    // By IP when the id's pod name is not a pod (the waypoint's default id
    // names its service account).
    let a_by_ip = seen(
        &server,
        "tok-a",
        waypoint_node("waypoint", "10.244.1.10", "node-a"),
    )
    .await;
    assert_eq!(a_by_ip, a);
    // Node-a's token claiming node-b's waypoint pod, and a ztunnel: nothing.
    let none = (Vec::new(), Vec::new());
    assert_eq!(
        seen(
            &server,
            "tok-a",
            waypoint_node("wp-b-1", "10.244.2.20", "node-a")
        )
        .await,
        none
    );
    assert_eq!(seen(&server, "tok-a", node("node-a")).await, none);
    server.stop().await;
}
