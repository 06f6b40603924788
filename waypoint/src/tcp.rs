//! Opaque TCP through the waypoint: the chain's network RBAC (principals,
//! namespaces, ports; L7 conditions never match) decides, then the bytes
//! go to an endpoint of the chain's cluster, picked like any request's.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use tracing::{debug, info};

use crate::config::runtime::TcpChain;
use crate::rbac::{self, AuthzRequest, Decision};
use crate::serve::Downstream;
use crate::upstream::balancer::Outcome;
use crate::upstream::connector::Target;
use crate::Proxy;

pub async fn serve(
    proxy: Arc<Proxy>,
    ds: Arc<Downstream>,
    chain: Arc<TcpChain>,
    mut respond: h2::server::SendResponse<Bytes>,
    req: Request<h2::RecvStream>,
) {
    let reply = |respond: &mut h2::server::SendResponse<Bytes>, code: StatusCode| {
        if let Ok(r) = http::Response::builder().status(code).body(()) {
            let _ = respond.send_response(r, true);
        }
    };
    let authz = AuthzRequest {
        source: ds.identity.as_ref(),
        destination_port: ds.dst.port(),
        http: None,
    };
    if let Decision::Deny(why) = rbac::authorize(&chain.rbac, &authz) {
        info!(target: "access", src_addr = %ds.src_ip, dst_addr = %ds.dst, error = %why, "tcp connection denied");
        return reply(&mut respond, StatusCode::UNAUTHORIZED);
    }
    let cluster = &chain.cluster;
    let Some(picked) = proxy.upstream.balancer.pick(cluster, None) else {
        return reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
    };
    let ep = picked.endpoint.config.clone();
    proxy.upstream.dialer.set_target(
        ep.address,
        Target {
            identity: ep.identity.clone(),
            hbone_port: ep.hbone_port,
            connect_timeout: cluster.connect_timeout,
        },
    );
    let mut up = match proxy.upstream.dialer.dial(ep.address).await {
        Ok(u) => {
            proxy
                .upstream
                .balancer
                .record(cluster, &picked, Outcome::Success);
            u
        }
        Err(e) => {
            proxy
                .upstream
                .balancer
                .record(cluster, &picked, Outcome::Failure);
            debug!(endpoint = %ep.address, error = %e, "tcp upstream connect failed");
            return reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let Some(mut down) = crate::inbound::accept(&mut respond, req) else {
        return;
    };
    let start = std::time::Instant::now();
    let res = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    let (sent_up, sent_down) = res.as_ref().map(|r| *r).unwrap_or((0, 0));
    info!(
        target: "access",
        src_addr = %ds.src_ip,
        src_principal = %ds.identity.as_ref().map(ToString::to_string).unwrap_or_default(),
        dst_addr = %ds.dst,
        cluster = %cluster.name,
        upstream = %ep.address,
        bytes_received = sent_up,
        bytes_sent = sent_down,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        error = %res.err().map(|e| e.to_string()).unwrap_or_default(),
        "tcp connection"
    );
}
