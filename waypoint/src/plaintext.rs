//! An optional plaintext HTTP listener (`--plaintext-addr`), off by
//! default: the connection's local address stands for the original
//! destination and there is no client identity (principal-based policies
//! never match it). It exists to measure and debug the L7 engine without
//! HBONE in front, e.g. against another reverse proxy on the same footing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;
use ztunnel::socket::canonical;

use crate::config::runtime::ChainKind;
use crate::serve::{serve_http, Downstream};
use crate::Proxy;

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
                warn!(error = %e, "plaintext accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        drain
            .connections
            .spawn(serve_accepted(proxy.clone(), stream, peer));
    }
}

/// Serves one accepted plaintext connection until it ends.
pub async fn serve_accepted(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let local = canonical(local);
    let chain = match proxy.store.get().chain_for(local).map(|c| &c.kind) {
        Some(ChainKind::Http(h)) => h.clone(),
        _ => return,
    };
    let ds = Arc::new(Downstream::new(
        &proxy.peers,
        proxy.metrics.clone(),
        None,
        canonical(peer).ip(),
        local,
        None,
    ));
    serve_http(proxy, stream, ds, chain).await;
}
