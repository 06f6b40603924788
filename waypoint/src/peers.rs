//! Who a client is, beyond its certificate: the workload at its address,
//! as the control plane's workload discovery describes it. Istio's
//! waypoints label their metrics this way (peer metadata by workload
//! discovery), so dashboards show the client's Deployment, canonical
//! service and cluster rather than only its service account.
//!
//! The waypoint follows `istio.workload.Address` on a stream of its own,
//! with ztunnel's client and store (the same resources ztunnels get). A
//! workload is taken for the client only if its identity is the one the
//! client's certificate proves: the address alone comes from the client's
//! ztunnel, the certificate from the CA.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Context;
use ztunnel::identity::Identity;
use ztunnel::state::Store;
use ztunnel::xds::ControlPlane;

use crate::metrics::PeerLabels;
use crate::xds::XdsConfig;

/// The labels of a client at `ip` presenting `id` (none: a plaintext
/// client, known by its address only).
pub fn source_labels(peers: &Store, id: Option<&Identity>, ip: IpAddr) -> PeerLabels {
    let snap = peers.snapshot();
    match snap.workload_by_ip(ip) {
        Some(w) if id.is_none_or(|id| w.identity() == *id) => PeerLabels::source_workload(w, id),
        _ => PeerLabels::source(id),
    }
}

/// Follows the control plane's workloads into `peers`, over the same
/// address, TLS and token as `cfg`; reconnects with backoff, as ztunnel
/// does. Readiness does not wait for it: until it has synced, clients are
/// labelled by their certificate.
pub fn discover(cfg: &XdsConfig, trust_domain: &str, peers: Arc<Store>) -> anyhow::Result<()> {
    let cp = ControlPlane {
        address: cfg.address.clone(),
        root_cert: cfg.root_cert.clone(),
        server_name: cfg.server_name.clone().unwrap_or_default(),
        token_file: cfg.token_file.clone(),
    };
    // Named as on the main stream: the pod's node id (which istiod
    // parses), and the node a token is checked against.
    let node = ztunnel::xds::ClientNode {
        id: cfg.node_id.clone(),
        node_name: cfg.node_name.clone().unwrap_or_else(|| cfg.node_id.clone()),
        user_agent: "waypoint",
    };
    let (synced, _) = tokio::sync::watch::channel(false);
    ztunnel::xds::spawn(cp, node, trust_domain.to_string(), peers, synced)
        .context("starting workload discovery")
}
