//! HBONE termination (15008): mutual TLS with the waypoint's own
//! certificate, then HTTP/2 `CONNECT` streams from ztunnels (or other
//! HBONE clients).
//!
//! The client's identity is the SPIFFE ID in its certificate (for traffic
//! a ztunnel sends on a workload's behalf that is the workload's identity);
//! its address comes from the `Forwarded` header; the original destination
//! is the `CONNECT` authority. The filter chain matching that destination
//! decides what the stream carries: HTTP (served by [`crate::serve`]) or
//! opaque TCP (L4 policy only, bytes passed to the chain's cluster).
//!
//! Per stream: not `CONNECT` or a bad authority: 400; no filter chain for
//! the destination: 404; L4 policy denies: 401; upstream unreachable
//! (TCP): 503; otherwise 200 and the stream is proxied.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};
use ztunnel::identity::Identity;
use ztunnel::proxy::hbone::{self, H2Stream};
use ztunnel::socket::canonical;

use crate::config::runtime::ChainKind;
use crate::h2io::H2Io;
use crate::serve::{serve_http, Downstream};
use crate::Proxy;

/// Concurrent CONNECT streams per HBONE connection.
const MAX_STREAMS: u32 = 1000;

pub async fn run(proxy: Arc<Proxy>, listener: TcpListener) {
    let drain = proxy.drain.clone();
    loop {
        let accepted = tokio::select! {
            _ = drain.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        drain
            .connections
            .spawn(serve_accepted(proxy.clone(), stream, peer));
    }
}

/// Serves one accepted HBONE connection until it ends.
pub async fn serve_accepted(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = serve_connection(proxy, stream, canonical(peer)).await {
        warn!(%peer, error = %format!("{e:#}"), "HBONE connection rejected");
    }
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
) -> anyhow::Result<()> {
    let cert = proxy.secrets.fetch(&proxy.identity).await?;
    let stop = proxy.drain.stop.clone();
    hbone::serve(
        stream,
        peer,
        cert.server_config(),
        MAX_STREAMS,
        &stop,
        |src_id, (req, respond)| {
            let tracker = proxy.drain.connections.clone();
            tracker.spawn(serve_stream(
                proxy.clone(),
                peer,
                src_id.clone(),
                req,
                respond,
            ));
        },
    )
    .await
}

fn status(respond: &mut h2::server::SendResponse<Bytes>, code: StatusCode) {
    if let Ok(resp) = Response::builder().status(code).body(()) {
        let _ = respond.send_response(resp, true);
    }
}

async fn serve_stream(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    src_id: Identity,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    if req.method() != Method::CONNECT {
        return status(&mut respond, StatusCode::BAD_REQUEST);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .map(canonical)
    else {
        debug!(%peer, uri = %req.uri(), "CONNECT authority is not ip:port");
        return status(&mut respond, StatusCode::BAD_REQUEST);
    };
    let src_ip = req
        .headers()
        .get(hbone::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(hbone::parse_forwarded_for)
        .unwrap_or(peer.ip());
    let cfg = proxy.store.get();
    if cfg.needs_sniffing(target) {
        drop(cfg);
        return sniff_and_serve(proxy, src_id, src_ip, target, respond, req).await;
    }
    let Some(chain) = cfg.chain_for(target) else {
        debug!(%target, "no filter chain for this destination");
        return status(&mut respond, StatusCode::NOT_FOUND);
    };
    let ds = Arc::new(Downstream::new(
        &proxy.peers,
        proxy.metrics.clone(),
        Some(src_id),
        src_ip,
        target,
        None,
    ));
    match &chain.kind {
        ChainKind::Http(http) => {
            let http = http.clone();
            drop(cfg);
            let Some(mut io) = accept(&mut respond, req) else {
                return;
            };
            io.end_on_drop();
            serve_http(proxy, io, ds, http).await;
        }
        ChainKind::Tcp(tcp) => {
            let tcp = tcp.clone();
            drop(cfg);
            crate::tcp::serve(proxy, ds, tcp, respond, req).await;
        }
    }
}

/// The chain depends on the protocol: accept the tunnel, sniff its first
/// bytes, then hand it (bytes replayed) to the chain they select. Refusals
/// from here on are a reset stream: the 200 has been sent.
async fn sniff_and_serve(
    proxy: Arc<Proxy>,
    src_id: Identity,
    src_ip: std::net::IpAddr,
    target: SocketAddr,
    mut respond: h2::server::SendResponse<Bytes>,
    req: Request<h2::RecvStream>,
) {
    let Some(mut io) = accept(&mut respond, req) else {
        return;
    };
    let (prefix, protocol) = match crate::sniff::sniff(&mut io).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%target, error = %e, "tunnel failed while sniffing");
            return;
        }
    };
    let ds = Arc::new(Downstream::new(
        &proxy.peers,
        proxy.metrics.clone(),
        Some(src_id),
        src_ip,
        target,
        protocol,
    ));
    let kind = match proxy.store.get().chain_for_protocol(target, protocol) {
        Some(c) => match &c.kind {
            ChainKind::Http(h) => ChainKind::Http(h.clone()),
            ChainKind::Tcp(t) => ChainKind::Tcp(t.clone()),
        },
        None => {
            debug!(%target, ?protocol, "no filter chain for this destination and protocol");
            return;
        }
    };
    if matches!(kind, ChainKind::Http(_)) {
        io.end_on_drop();
    }
    let io = crate::sniff::Prefixed::new(prefix, io);
    match kind {
        ChainKind::Http(http) => serve_http(proxy, io, ds, http).await,
        ChainKind::Tcp(tcp) => crate::tcp::serve_accepted(proxy, ds, tcp, io).await,
    }
}

/// Answers 200 and returns the tunnel as a byte stream.
pub(crate) fn accept(
    respond: &mut h2::server::SendResponse<Bytes>,
    req: Request<h2::RecvStream>,
) -> Option<H2Io> {
    let ok = Response::builder().status(StatusCode::OK).body(()).ok()?;
    let send = respond.send_response(ok, false).ok()?;
    Some(H2Io::new(H2Stream {
        send,
        recv: req.into_body(),
    }))
}
