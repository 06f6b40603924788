//! Small sample apps for the mesh's end-to-end tests and the demo: an HTTP
//! server ([`http`]), a gRPC service ([`grpc`], also the `sample-grpc`
//! binary) and a raw TCP echo ([`tcp_echo`]).
//!
//! Servers run inside a pod's network namespace: the listening socket is
//! created there ([`crate::tcp_listen_in`]) and served by a tokio runtime
//! on a thread of the calling process, so a test can ask the server what
//! it saw. Each returns a handle that stops the server when dropped.
//! Clients must be processes in the pod's cgroup (capture is per cgroup),
//! so they are `curl`, bash and `sample-grpc call`; see
//! [`crate::cluster::Cluster::http`].

pub mod grpc;
pub mod http;
pub mod tcp_echo;

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::sync::oneshot;

/// A server running on its own thread; dropping it stops the server.
#[derive(Debug)]
pub struct Background {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Background {
    /// Binds `addr` in `netns` and runs `serve(listener, stopped)` on a
    /// current-thread runtime on a new thread until `stopped` resolves.
    pub fn start<F, Fut>(netns: &str, addr: SocketAddr, name: &str, serve: F) -> Result<Background>
    where
        F: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let std_listener = crate::tcp_listen_in(netns, addr)
            .with_context(|| format!("listening on {addr} in {netns}"))?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the server's runtime")?;
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("e2e-{name}"))
            .spawn(move || {
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => serve(l, rx).await,
                        Err(e) => eprintln!("e2e: {local}: {e}"),
                    }
                })
            })
            .context("starting the server thread")?;
        Ok(Background {
            addr: local,
            stop: Some(tx),
        })
    }

    /// Where it listens (the bound address, in the pod's namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
