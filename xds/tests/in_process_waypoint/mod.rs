//! A real waypoint in the test process, configured by the test control
//! plane the way a deployed one is: delta (or SotW) ADS over TLS with node
//! `node-a`'s token, as pod `wp-1` (10.244.1.99) of Gateway `demo/wp`. The tests that
//! drive L7 behaviour end to end share it; the manifests must hold that pod.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use waypoint::app::{build, start, Parts, Running};
use waypoint::config::Store;
use waypoint::xds::{spawn, ApiType, XdsConfig};
use ztunnel::identity::CaClient;

/// The waypoint, the CA its clients get certificates from, and the
/// directory holding its xDS root and token (re-read on each connect).
pub struct InProcessWaypoint {
    pub wp: Running,
    pub ca: Arc<dyn CaClient>,
    pub _secrets: tempfile::TempDir,
}

/// Starts the waypoint against `server` over delta ADS; returns once it
/// has its first full configuration.
#[allow(dead_code)]
pub async fn start_waypoint(server: &xds::Running) -> InProcessWaypoint {
    start_waypoint_over(server, ApiType::DeltaGrpc).await
}

/// The same, over the given ADS protocol.
#[allow(dead_code)]
pub async fn start_waypoint_over(server: &xds::Running, api_type: ApiType) -> InProcessWaypoint {
    let secrets = tempfile::tempdir().unwrap();
    let root = secrets.path().join("root.pem");
    std::fs::write(&root, &server.root_pem).unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, "tok-a").unwrap();
    let ca = crate::wcommon::ca();
    let store = Store::empty();
    let proxy = build(Parts {
        identity: crate::wcommon::id("waypoint"),
        ca: ca.clone(),
        cert_ttl: Duration::from_secs(3600),
        own_ip: "127.0.0.1".parse().unwrap(),
        mark: 0,
        pool_max_streams: 100,
        store: store.clone(),
    });
    let cfg = XdsConfig {
        address: format!("https://{}", server.addr),
        root_cert: Some(root),
        server_name: Some("localhost".into()),
        token_file: Some(token),
        node_id: "router~10.244.1.99~wp-1.demo~demo.svc.cluster.local".into(),
        node_name: Some("node-a".into()),
        node_cluster: "waypoint".into(),
        warming_timeout: Duration::from_secs(15),
        api_type,
    };
    // As `waypoint::app::run` does: workloads on a stream of their own.
    waypoint::peers::discover(&cfg, crate::wcommon::TD, proxy.peers.clone()).unwrap();
    spawn(cfg, store.clone());
    let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wp = start(proxy, hbone, vec![admin]).await.unwrap();
    crate::common::wait_for("the waypoint's first full config", || store.synced()).await;
    InProcessWaypoint {
        wp,
        ca,
        _secrets: secrets,
    }
}
