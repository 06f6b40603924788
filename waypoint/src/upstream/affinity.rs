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
//! hand-off wakes the task. [`drive`] polls the side that was woken again
//! at once when that happens while it is polling, instead of going back to
//! the scheduler (which would queue the task behind every other task on
//! the worker, several times per request), and leaves the other side be.
//!
//! A request that switched protocols (WebSocket) ends the HTTP exchange on
//! both connections: the upstream one leaves the set once hyper has handed
//! it to the response's `OnUpgrade` (it is never put back in `idle`), and
//! the tunnel joining the two ([`Affinity::set_upgraded`]) is run by the
//! downstream connection's task once hyper has let go of that connection.

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
    /// The tunnel of a request that switched protocols.
    upgraded: Mutex<Option<ConnFuture>>,
}

impl Affinity {
    pub fn new(driver: UnboundedSender<ConnFuture>) -> Self {
        Affinity {
            driver,
            idle: Mutex::new(HashMap::new()),
            upgraded: Mutex::new(None),
        }
    }

    /// Keeps the tunnel of a request that switched protocols, for the
    /// connection's task to run after hyper's server hands the connection
    /// over: so it stays on that task (counted as open, drained as one).
    pub fn set_upgraded(&self, tunnel: ConnFuture) {
        *self.upgraded.lock().expect("affinity lock") = Some(tunnel);
    }

    pub fn take_upgraded(&self) -> Option<ConnFuture> {
        self.upgraded.lock().expect("affinity lock").take()
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

/// What both sides' wakers share: the task's waker, and whether [`drive`]
/// is polling right now.
#[derive(Default)]
struct Shared {
    task: AtomicWaker,
    polling: AtomicBool,
}

/// The waker of one side of what [`drive`] polls (the downstream
/// connection, or the upstream connections): a wake-up notes that this
/// side is to be polled again, and while [`drive`] is polling only asks
/// for another round; otherwise it also wakes the task.
struct Side {
    shared: Arc<Shared>,
    woken: AtomicBool,
}

impl ArcWake for Side {
    fn wake_by_ref(side: &Arc<Self>) {
        side.woken.store(true, SeqCst);
        if !side.shared.polling.load(SeqCst) {
            side.shared.task.wake();
        }
    }
}

/// Polls `main` (the downstream connection) and the upstream connections
/// sent through `new` together until `main` is ready. Each round polls
/// only the side that was woken: a request handed from one side to the
/// other wakes that side alone, and polling the other (hyper's whole
/// dispatcher, to find nothing to do) was a good part of the cost of a
/// hand-off. `each_turn` is called once per turn of the task, before the
/// rounds, with the task's own context: for what wakes the connection
/// rarely (drain, timers), and need not be polled at every hand-off; it
/// returns whether `main` must be polled for it.
pub async fn drive<T>(
    mut new: UnboundedReceiver<ConnFuture>,
    mut each_turn: impl FnMut(&mut Context<'_>) -> bool,
    mut main: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> T {
    let shared = Arc::new(Shared::default());
    // Both sides are polled first.
    let side = || {
        Arc::new(Side {
            shared: shared.clone(),
            woken: AtomicBool::new(true),
        })
    };
    let (down, up) = (side(), side());
    let down_waker = futures::task::waker(down.clone());
    let up_waker = futures::task::waker(up.clone());
    let mut upstreams = FuturesUnordered::new();
    std::future::poll_fn(move |cx| {
        shared.task.register(cx.waker());
        if each_turn(cx) {
            down.woken.store(true, SeqCst);
        }
        for _ in 0..ROUNDS {
            shared.polling.store(true, SeqCst);
            if up.woken.swap(false, SeqCst) {
                let mut c = Context::from_waker(&up_waker);
                while let Poll::Ready(Some(f)) = new.poll_recv(&mut c) {
                    upstreams.push(f);
                }
                // Finished upstream connections just leave the set.
                while let Poll::Ready(Some(())) = upstreams.poll_next_unpin(&mut c) {}
            }
            if down.woken.swap(false, SeqCst) {
                if let Poll::Ready(r) = main(&mut Context::from_waker(&down_waker)) {
                    return Poll::Ready(r);
                }
            }
            // A wake-up from here on (another thread) wakes the task; one
            // before this store is seen by the loads below.
            shared.polling.store(false, SeqCst);
            if !up.woken.load(SeqCst) && !down.woken.load(SeqCst) {
                return Poll::Pending;
            }
        }
        // Still busy (a side is still marked woken, so the next turn polls
        // it): let the worker's other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}
