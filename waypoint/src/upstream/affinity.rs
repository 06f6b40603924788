//! Upstream HTTP/1.1 connections owned by one downstream HTTP/1.1
//! connection, driven by that connection's own task.
//!
//! A downstream HTTP/1.1 connection sends one request at a time, so it can
//! keep its own upstream connection per endpoint. Its futures are polled
//! by the task that serves the downstream connection ([`drive`]), so a
//! request goes down and up without waking another task or thread, the
//! way an nginx worker handles it in one event loop. Shared pooling
//! (hyper's client) remains for everything else.
//!
//! Within that task the downstream side and the upstream connections hand
//! each request and response to one another through channels, and every
//! hand-off wakes the task. [`drive`] polls them again at once when that
//! happens while it is polling, instead of going back to the scheduler
//! (which would queue the task behind every other task on the worker,
//! several times per request).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::{ArcWake, AtomicWaker};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

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

/// Rounds of polling in one turn of the task before yielding to others.
const ROUNDS: usize = 8;

/// The waker handed to everything [`drive`] polls: a wake-up while it is
/// polling only asks for another round; otherwise it wakes the task.
#[derive(Default)]
struct Flag {
    task: AtomicWaker,
    polling: AtomicBool,
    woken: AtomicBool,
}

impl ArcWake for Flag {
    fn wake_by_ref(flag: &Arc<Self>) {
        flag.woken.store(true, SeqCst);
        if !flag.polling.load(SeqCst) {
            flag.task.wake();
        }
    }
}

/// Polls `main` (the downstream connection) and the upstream connections
/// sent through `new` together until `main` is ready. `each_turn` is
/// called once per turn of the task, before the rounds, with the task's
/// own context: for what wakes the connection rarely (drain, timers), and
/// need not be polled at every hand-off of a request.
pub async fn drive<T>(
    mut new: UnboundedReceiver<ConnFuture>,
    mut each_turn: impl FnMut(&mut Context<'_>),
    mut main: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> T {
    let flag = Arc::new(Flag::default());
    let waker = futures::task::waker(flag.clone());
    let mut upstreams = FuturesUnordered::new();
    std::future::poll_fn(move |cx| {
        flag.task.register(cx.waker());
        each_turn(cx);
        let mut inner = Context::from_waker(&waker);
        for _ in 0..ROUNDS {
            flag.polling.store(true, SeqCst);
            flag.woken.store(false, SeqCst);
            while let Poll::Ready(Some(f)) = new.poll_recv(&mut inner) {
                upstreams.push(f);
            }
            // Finished upstream connections just leave the set.
            while let Poll::Ready(Some(())) = upstreams.poll_next_unpin(&mut inner) {}
            let r = main(&mut inner);
            // A wake-up from here on (another thread) wakes the task; one
            // before this store is seen by the load below.
            flag.polling.store(false, SeqCst);
            if r.is_ready() || !flag.woken.load(SeqCst) {
                return r;
            }
        }
        // Still busy: let the worker's other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}
