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

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::task::{ArcWake, AtomicWaker};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::Body;
use crate::request_end::ConnTimer;

pub type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Affinity {
    /// Where new upstream connection futures go to be driven.
    pub driver: UnboundedSender<ConnFuture>,
    /// Idle senders and their endpoints. A list, not a map: a connection
    /// holds one per endpoint its requests went to, mostly one, and a scan
    /// of a few addresses costs less than hashing one.
    idle: Mutex<Vec<(SocketAddr, SendRequest<Body>)>>,
    /// The tunnel of a request that switched protocols.
    upgraded: Mutex<Option<ConnFuture>>,
    /// The route timeout's timer, which the connection's requests take in
    /// turns.
    pub timer: ConnTimer,
}

impl Affinity {
    pub fn new(driver: UnboundedSender<ConnFuture>) -> Self {
        Affinity {
            driver,
            idle: Mutex::new(Vec::new()),
            upgraded: Mutex::new(None),
            timer: ConnTimer::default(),
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
        let mut idle = self.idle.lock().expect("affinity lock");
        let i = idle.iter().position(|(a, _)| *a == addr)?;
        Some(idle.swap_remove(i).1).filter(|s| s.is_ready())
    }

    /// Keeps `s` for the next request to `addr` (replacing any other).
    pub fn put(&self, addr: SocketAddr, s: SendRequest<Body>) {
        let mut idle = self.idle.lock().expect("affinity lock");
        match idle.iter_mut().find(|(a, _)| *a == addr) {
            Some(slot) => slot.1 = s,
            None => idle.push((addr, s)),
        }
    }
}

/// Rounds of polling in one turn of the task before yielding to others.
const ROUNDS: usize = 8;

/// What the sides' wakers share: the task's waker, and whether [`drive`]
/// is polling right now.
#[derive(Default)]
struct Shared {
    task: AtomicWaker,
    polling: AtomicBool,
}

/// What marks one side of what [`drive`] polls as woken: a wake-up notes
/// that this side is to be polled again, and while [`drive`] is polling
/// only asks for another round; otherwise it also wakes the task.
struct Mark {
    shared: Arc<Shared>,
    woken: AtomicBool,
}

impl ArcWake for Mark {
    fn wake_by_ref(mark: &Arc<Self>) {
        mark.woken.store(true, SeqCst);
        if !mark.shared.polling.load(SeqCst) {
            mark.shared.task.wake();
        }
    }
}

/// One side of what [`drive`] polls, with the waker that marks it.
struct Side {
    mark: Arc<Mark>,
    waker: Waker,
}

impl Side {
    /// Marked woken: a new side is polled first.
    fn new(shared: &Arc<Shared>) -> Self {
        let mark = Arc::new(Mark {
            shared: shared.clone(),
            woken: AtomicBool::new(true),
        });
        Side {
            waker: futures::task::waker(mark.clone()),
            mark,
        }
    }

    /// Whether it was woken since the last call, clearing the mark.
    fn take(&self) -> bool {
        self.mark.woken.swap(false, SeqCst)
    }

    fn is_woken(&self) -> bool {
        self.mark.woken.load(SeqCst)
    }

    /// Marks it to be polled this round.
    fn set_woken(&self) {
        self.mark.woken.store(true, SeqCst);
    }

    fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

/// Polls `main` (the downstream connection) and the upstream connections
/// sent through `new` together until `main` is ready. Each round polls
/// only the sides that were woken, each upstream connection being a side
/// of its own: a request handed from one side to another wakes that side
/// alone, and polling the others (hyper's whole dispatcher, to find
/// nothing to do) was a good part of the cost of a hand-off. What wakes
/// rarely has sides of its own, so that a hand-off does not poll it
/// either: `new` (a new upstream connection), and `rarely` (drain,
/// timers), which returns whether `main` must be polled for what it found.
pub async fn drive<T>(
    mut new: UnboundedReceiver<ConnFuture>,
    mut rarely: impl FnMut(&mut Context<'_>) -> bool,
    mut main: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> T {
    let shared = Arc::new(Shared::default());
    let (down, added, rare) = (Side::new(&shared), Side::new(&shared), Side::new(&shared));
    // A connection holds one per endpoint its requests went to, mostly one.
    let mut upstreams: Vec<(Side, ConnFuture)> = Vec::new();
    std::future::poll_fn(move |cx| {
        shared.task.register(cx.waker());
        for _ in 0..ROUNDS {
            shared.polling.store(true, SeqCst);
            if rare.take() && rarely(&mut rare.context()) {
                down.set_woken();
            }
            if added.take() {
                while let Poll::Ready(Some(f)) = new.poll_recv(&mut added.context()) {
                    upstreams.push((Side::new(&shared), f));
                }
            }
            // Finished upstream connections just leave.
            let mut i = 0;
            while i < upstreams.len() {
                let (side, conn) = &mut upstreams[i];
                if side.take() && conn.as_mut().poll(&mut side.context()).is_ready() {
                    drop(upstreams.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            if down.take() {
                if let Poll::Ready(r) = main(&mut down.context()) {
                    return Poll::Ready(r);
                }
            }
            // A wake-up from here on (another thread) wakes the task; one
            // before this store is seen by the loads below.
            shared.polling.store(false, SeqCst);
            let woken = down.is_woken()
                || added.is_woken()
                || rare.is_woken()
                || upstreams.iter().any(|(side, _)| side.is_woken());
            if !woken {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::time::Duration;

    /// Fails rather than hangs when `drive` misses a wake-up.
    async fn soon<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("drive missed a wake-up")
    }

    #[tokio::test]
    async fn the_rare_side_is_polled_when_it_wakes_and_not_at_each_hand_off() {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let timer = std::pin::pin!(tokio::time::sleep(Duration::from_millis(50)));
        let mut timer = Some(timer);
        let fired = AtomicBool::new(false);
        let rare_calls = AtomicUsize::new(0);
        let mut hand_offs = 0;
        soon(drive(
            rx,
            |cx| {
                rare_calls.fetch_add(1, Relaxed);
                let ready = timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if ready {
                    timer = None;
                    fired.store(true, Relaxed);
                }
                ready
            },
            |cx| {
                if fired.load(Relaxed) {
                    return Poll::Ready(());
                }
                // A busy connection: it wakes itself, as a hand-off does.
                if hand_offs < 100 {
                    hand_offs += 1;
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            },
        ))
        .await;
        assert_eq!(hand_offs, 100);
        // Once first, once when the timer fired.
        assert_eq!(rare_calls.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn new_upstream_connections_are_driven() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let mut sent = Some((tx, done_tx));
        soon(drive(
            rx,
            |_| false,
            |cx| {
                // The first poll opens a connection that answers later.
                if let Some((tx, done)) = sent.take() {
                    let conn: ConnFuture = Box::pin(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = done.send(());
                    });
                    tx.send(conn).expect("drive is running");
                }
                Pin::new(&mut done_rx)
                    .poll(cx)
                    .map(|r| r.expect("answered"))
            },
        ))
        .await;
    }

    #[tokio::test]
    async fn an_upstream_connection_is_polled_only_when_it_wakes() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let idle_polls = Arc::new(AtomicUsize::new(0));
        let counted = idle_polls.clone();
        // Never ready, never wakes: an idle keep-alive connection.
        let idle: ConnFuture = Box::pin(std::future::poll_fn(move |_| {
            counted.fetch_add(1, Relaxed);
            Poll::Pending
        }));
        // Busy: wakes itself 100 times, then answers.
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let mut done_tx = Some(done_tx);
        let mut wakes = 0;
        let busy: ConnFuture = Box::pin(std::future::poll_fn(move |cx| {
            if wakes < 100 {
                wakes += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let _ = done_tx.take().expect("polled once done").send(());
            Poll::Ready(())
        }));
        tx.send(idle).expect("open");
        tx.send(busy).expect("open");
        soon(drive(
            rx,
            |_| false,
            |cx| {
                Pin::new(&mut done_rx)
                    .poll(cx)
                    .map(|r| r.expect("answered"))
            },
        ))
        .await;
        assert_eq!(idle_polls.load(Relaxed), 1);
    }
}
