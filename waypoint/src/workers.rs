//! Thread per core, as nginx's worker processes: each worker thread runs
//! its own single-threaded event loop, accepts on its own copy of the
//! listening sockets, and keeps its own upstream connection pools
//! ([`Proxy::for_worker`]), so a request is read, routed, forwarded and
//! answered on one thread, with no hand-off to another thread and no
//! cross-thread wake-up. (With one work-stealing runtime shared by all,
//! the downstream connection, the upstream connection and the I/O driver
//! handed each request between threads; on a busy machine those wake-ups
//! were a large share of the waypoint's CPU time.)
//!
//! The configuration, the certificates, the balancer's view of the
//! endpoints and the metrics are shared by all workers. Each worker's copy
//! of a listening socket is the same socket (a duplicated descriptor)
//! registered with that worker's event loop: whichever worker is free
//! first accepts a new connection, as nginx's workers do.

use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;

use crate::Proxy;

/// Starts `n` worker threads serving HBONE on `hbone` and, if given,
/// plaintext HTTP on `plaintext`; returns once each has its listeners.
/// Workers stop accepting when `proxy.drain` stops, and end once the
/// drain has finished.
pub fn start(
    proxy: &Arc<Proxy>,
    n: usize,
    hbone: TcpListener,
    plaintext: Option<TcpListener>,
) -> anyhow::Result<()> {
    let hbone = hbone.into_std()?;
    let plaintext = plaintext.map(TcpListener::into_std).transpose()?;
    let (started, results) = mpsc::channel();
    let n = n.max(1);
    for i in 0..n {
        let hbone = hbone
            .try_clone()
            .context("duplicating the HBONE listener")?;
        let plaintext = plaintext
            .as_ref()
            .map(std::net::TcpListener::try_clone)
            .transpose()
            .context("duplicating the plaintext listener")?;
        let proxy = proxy.clone();
        let started = started.clone();
        std::thread::Builder::new()
            .name(format!("waypoint-worker-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started.send(Err(anyhow!("worker {i}: runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listen = || -> anyhow::Result<_> {
                        let h = TcpListener::from_std(hbone)?;
                        let p = plaintext.map(TcpListener::from_std).transpose()?;
                        Ok((h, p))
                    };
                    let (hbone, plaintext) = match listen() {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = started.send(Err(e.context(format!("worker {i}"))));
                            return;
                        }
                    };
                    let proxy = Arc::new(proxy.for_worker());
                    let drain = proxy.drain.clone();
                    if let Some(l) = plaintext {
                        tokio::spawn(crate::plaintext::run(proxy.clone(), l));
                    }
                    tokio::spawn(crate::inbound::run(proxy.clone(), hbone));
                    let tables = tokio::spawn(crate::app::keep_tables(proxy));
                    let _ = started.send(Ok(()));
                    drop(started);
                    // This worker's connections run on this runtime: keep
                    // it until the drain is over.
                    drain.stop.cancelled().await;
                    drain.connections.wait().await;
                    tables.abort();
                });
            })
            .context("starting a worker thread")?;
    }
    drop(started);
    for _ in 0..n {
        results
            .recv()
            .map_err(|_| anyhow!("a worker thread ended while starting"))??;
    }
    Ok(())
}
