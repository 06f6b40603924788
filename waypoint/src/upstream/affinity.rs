//! Upstream HTTP/1.1 connections owned by one downstream HTTP/1.1
//! connection, driven by that connection's own task.
//!
//! A downstream HTTP/1.1 connection sends one request at a time, so it can
//! keep its own upstream connection per endpoint. Its futures are polled
//! by the task that serves the downstream connection (see
//! [`crate::serve`]), so a request goes down and up without waking another
//! task or thread, the way an nginx worker handles it in one event loop.
//! Shared pooling (hyper's client) remains for everything else.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;

use hyper::client::conn::http1::SendRequest;
use tokio::sync::mpsc::UnboundedSender;

use super::Body;

pub type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Affinity {
    /// Where new upstream connection futures go to be driven.
    pub driver: UnboundedSender<ConnFuture>,
    /// Idle senders by endpoint.
    pub idle: Mutex<HashMap<SocketAddr, SendRequest<Body>>>,
}

impl Affinity {
    pub fn new(driver: UnboundedSender<ConnFuture>) -> Self {
        Affinity {
            driver,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// An idle, ready sender to `addr`, if this connection has one.
    pub fn take(&self, addr: SocketAddr) -> Option<SendRequest<Body>> {
        self.idle
            .lock()
            .expect("affinity lock")
            .remove(&addr)
            .filter(|s| s.is_ready())
    }

    pub fn put(&self, addr: SocketAddr, s: SendRequest<Body>) {
        self.idle.lock().expect("affinity lock").insert(addr, s);
    }
}
