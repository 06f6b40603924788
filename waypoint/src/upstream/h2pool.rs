//! HTTP/2 to endpoints: one multiplexed connection per endpoint, opened on
//! first use and reopened when it closes.
//!
//! hyper's pooled client keys connections by the request URI's authority,
//! which for HTTP/2 is also the `:authority` sent; with our own pool the
//! connection is the endpoint's while `:authority` stays the request's host,
//! as Envoy does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::connector::{Dialer, Target};
use super::Body;

type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Body>>>>;

pub struct H2Pool {
    dialer: Arc<Dialer>,
    slots: Mutex<HashMap<SocketAddr, Slot>>,
}

impl H2Pool {
    pub fn new(dialer: Arc<Dialer>) -> Self {
        H2Pool {
            dialer,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A sender on the endpoint's connection; a burst of first requests
    /// waits for one handshake.
    pub async fn get(
        &self,
        addr: SocketAddr,
        target: &Target,
    ) -> Result<SendRequest<Body>, String> {
        let slot = self
            .slots
            .lock()
            .expect("h2 pool lock")
            .entry(addr)
            .or_default()
            .clone();
        let mut current = slot.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        // Boxed: dialing is a large future, which inline would enlarge
        // every request's future (and the copies made of it).
        let send = Box::pin(self.connect(addr, target)).await?;
        *current = Some(send.clone());
        Ok(send)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        target: &Target,
    ) -> Result<SendRequest<Body>, String> {
        let io = self
            .dialer
            .dial_to(addr, target)
            .await
            .map_err(|e| e.to_string())?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(send)
    }
}
