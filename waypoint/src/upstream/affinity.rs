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
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use futures::task::ArcWake;
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

/// The bits of [`Shared::state`]: one per side, and one set while [`drive`]
/// polls. The sides that are always there have the low bits; upstream
/// connections take the free ones above them, and those past the last bit
/// share it ([`OVERFLOW`]), each of them polled when it is set.
const DOWN: u64 = 1 << 0;
const ADDED: u64 = 1 << 1;
const RARE: u64 = 1 << 2;
const FIXED: u64 = DOWN | ADDED | RARE;
const OVERFLOW: u64 = 1 << 62;
const POLLING: u64 = 1 << 63;

/// What the sides' wakers share with [`drive`].
///
/// Every side's mark is one bit of one word, so that a round of polling
/// takes all of them, and says it is polling, with a single atomic swap,
/// and ends with a single compare-and-swap. Atomic read-modify-writes are
/// what a request's hand-offs cost most on x86 (each drains the store
/// buffer, about 20 cycles): with a flag per side, a round took one per
/// side, and a request about 45 (waypoint README, "Where the HTTP/1.1
/// time goes").
struct Shared {
    state: AtomicU64,
    /// The task's waker, for a wake-up while [`drive`] is not polling. It
    /// stays registered across wake-ups (tokio's waker for a task is the
    /// same at every poll), so a poll only compares it.
    task: Mutex<Option<Waker>>,
}

impl Shared {
    fn wake_task(&self) {
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

/// What marks one side of what [`drive`] polls as woken: its bit.
struct Mark {
    shared: Arc<Shared>,
    bit: u64,
}

impl ArcWake for Mark {
    fn wake_by_ref(mark: &Arc<Self>) {
        // While `drive` polls it looks at the marks again before it
        // returns; otherwise only the first mark since it last looked
        // wakes the task (the others find that one).
        if mark.shared.state.fetch_or(mark.bit, AcqRel) == 0 {
            mark.shared.wake_task();
        }
    }
}

/// One side of what [`drive`] polls, with the waker that marks it.
struct Side {
    bit: u64,
    waker: Waker,
}

impl Side {
    fn new(shared: &Arc<Shared>, bit: u64) -> Self {
        let mark = Arc::new(Mark {
            shared: shared.clone(),
            bit,
        });
        Side {
            bit,
            waker: futures::task::waker(mark),
        }
    }

    fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

/// A free bit for a new upstream connection, [`OVERFLOW`] when none is.
fn free_bit(used: u64) -> u64 {
    let free = !used & !(FIXED | OVERFLOW | POLLING);
    if free == 0 {
        OVERFLOW
    } else {
        free & free.wrapping_neg()
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
    // Every side is polled first.
    let shared = Arc::new(Shared {
        state: AtomicU64::new(FIXED),
        task: Mutex::new(None),
    });
    let (down, added, rare) = (
        Side::new(&shared, DOWN),
        Side::new(&shared, ADDED),
        Side::new(&shared, RARE),
    );
    // A connection holds one per endpoint its requests went to, mostly one.
    let mut upstreams: Vec<(Side, ConnFuture)> = Vec::new();
    let mut used = 0u64;
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(move |cx| {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            registered = Some(cx.waker().clone());
            *shared.task.lock().unwrap_or_else(PoisonError::into_inner) = registered.clone();
        }
        for _ in 0..ROUNDS {
            // Takes the marks: a wake-up from here on sets its bit again,
            // and the side is polled in the next round.
            let mut woken = shared.state.swap(POLLING, Acquire);
            if woken & RARE != 0 && rarely(&mut rare.context()) {
                woken |= DOWN;
            }
            if woken & ADDED != 0 {
                while let Poll::Ready(Some(f)) = new.poll_recv(&mut added.context()) {
                    let side = Side::new(&shared, free_bit(used));
                    used |= side.bit;
                    woken |= side.bit;
                    upstreams.push((side, f));
                }
            }
            // Finished upstream connections just leave.
            let mut i = 0;
            while i < upstreams.len() {
                let (side, conn) = &mut upstreams[i];
                if woken & side.bit != 0 && conn.as_mut().poll(&mut side.context()).is_ready() {
                    // `free_bit` ignores OVERFLOW in `used`, so clearing
                    // it while others still share it changes nothing.
                    used &= !upstreams.swap_remove(i).0.bit;
                } else {
                    i += 1;
                }
            }
            if woken & DOWN != 0 {
                if let Poll::Ready(r) = main(&mut down.context()) {
                    return Poll::Ready(r);
                }
            }
            // Nothing marked while polling: done until a wake-up.
            if shared
                .state
                .compare_exchange(POLLING, 0, AcqRel, Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Still busy (sides still marked, so the next turn polls them): let
        // the worker's other tasks run first. Wake-ups until then find the
        // marks and leave the task be, woken here.
        shared.state.fetch_and(!POLLING, AcqRel);
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// Fails rather than hangs when `drive` misses a wake-up.
    async fn soon<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("drive missed a wake-up")
    }

    /// Drives the upstream connections sent on `rx` until `done` answers.
    async fn drive_until(rx: UnboundedReceiver<ConnFuture>, mut done: oneshot::Receiver<()>) {
        soon(drive(
            rx,
            |_| false,
            |cx| Pin::new(&mut done).poll(cx).map(|r| r.expect("answered")),
        ))
        .await
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
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
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
        drive_until(rx, done_rx).await;
        assert_eq!(idle_polls.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn more_upstream_connections_than_bits_are_all_driven() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let finished = Arc::new(AtomicUsize::new(0));
        const CONNS: usize = 100;
        // Each waits on a timer (woken from the timer, not by polling), so
        // the ones sharing the overflow bit are still all polled.
        for i in 0..CONNS {
            let finished = finished.clone();
            let conn: ConnFuture = Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1 + (i % 7) as u64)).await;
                finished.fetch_add(1, Relaxed);
            });
            tx.send(conn).expect("open");
        }
        let watched = finished.clone();
        let mut tick = Box::pin(tokio::time::interval(Duration::from_millis(5)));
        soon(drive(
            rx,
            |_| false,
            |cx| {
                while tick.as_mut().poll_tick(cx).is_ready() {}
                if watched.load(Relaxed) == CONNS {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            },
        ))
        .await;
    }

    #[tokio::test]
    async fn a_wake_up_from_another_thread_is_not_missed() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let mut done_tx = Some(done_tx);
        // An upstream connection woken from a thread of its own, again and
        // again, whether `drive` is polling or waiting at that moment.
        let (kick_tx, mut kick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let conn: ConnFuture = Box::pin(async move {
            for _ in 0..1000 {
                kick_rx.recv().await.expect("kicked");
            }
            let _ = done_tx.take().expect("once").send(());
        });
        tx.send(conn).expect("open");
        let kicker = std::thread::spawn(move || {
            for i in 0..1000 {
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                kick_tx.send(()).expect("receiving");
            }
        });
        drive_until(rx, done_rx).await;
        kicker.join().expect("kicker");
    }
}
