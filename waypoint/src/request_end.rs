//! When the client has sent its whole request: Envoy's route timeout and
//! per-try timeout start there, not when the request starts, so a long
//! upload or a client-streaming gRPC call is not cut short by them.
//!
//! [`watch`] wraps the client's body; it counts the request bytes and tells
//! the [`RequestEnd`] when the body ends (or fails, or is dropped unread:
//! the request is over either way). A body that is empty from the start
//! (most requests) needs no signal at all.
//!
//! A [`Deadline`] runs out a given time after that. The route timeout's
//! covers the whole response, as Envoy's does: the same deadline bounds
//! the wait for the response head and then the response body
//! ([`Deadline::limit`]), which ends with [`RouteTimeout`] if the backend
//! has not finished by then (a stream that outlives it is reset). A
//! per-try timeout covers its attempt up to the response head only: once
//! the response has started there is nothing left to retry.
//!
//! An HTTP/1.1 connection has one request in progress at a time, so its
//! requests take turns with one timer ([`ConnTimer`]) instead of each
//! making, registering and removing a timer of its own (an allocation and
//! two visits to the timer wheel per request). A deadline later than the
//! timer's leaves it as it is; when it fires before the holder's time, the
//! holder moves it on.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::upstream::connector::BoxError;
use crate::upstream::Body;

/// Whether, or when, the client's request has ended.
#[derive(Clone)]
pub enum RequestEnd {
    Now,
    Later(watch::Receiver<bool>),
}

impl RequestEnd {
    /// A deadline `t` after the request has ended: on `conn`'s timer when
    /// the request has ended already and the timer is free.
    pub fn deadline(&self, t: Duration, conn: Option<&ConnTimer>) -> Deadline {
        if let (RequestEnd::Now, Some(conn)) = (self, conn) {
            if let Some(d) = conn.take(t) {
                return d;
            }
        }
        let end = self.clone();
        Deadline(Kind::Own(Box::pin(async move {
            if let RequestEnd::Later(mut rx) = end {
                // An error: the body was dropped, which also ends it.
                let _ = rx.wait_for(|ended| *ended).await;
            }
            tokio::time::sleep(t).await;
        })))
    }
}

/// The timer an HTTP/1.1 connection's requests take in turns for their
/// route timeouts. One [`Deadline`] holds it at a time; a request that
/// finds it held (a pipelined request while the previous response is still
/// being written) gets a timer of its own.
#[derive(Default)]
pub struct ConnTimer(Arc<Mutex<Turns>>);

#[derive(Default)]
struct Turns {
    /// Made at the first turn; left as it is between turns, where its
    /// firing only wakes the connection once for nothing.
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the holder's time is up; `None` between turns.
    at: Option<Instant>,
    /// The waker the timer was last polled with, while it has not fired or
    /// been moved: it wakes that one, so polling it again with the same
    /// one is skipped (a poll registers the waker anew, two atomic
    /// read-modify-writes, at every poll of the request).
    registered: Option<Waker>,
}

impl ConnTimer {
    fn take(&self, t: Duration) -> Option<Deadline> {
        let mut turns = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if turns.at.is_some() {
            return None;
        }
        let at = Instant::now() + t;
        turns.at = Some(at);
        match &mut turns.sleep {
            // Later than the timer's deadline (the usual case: one route
            // timeout after another) it is left as it is: when it fires
            // early, `poll` moves it on.
            Some(s) if at < s.deadline() => {
                s.as_mut().reset(at);
                turns.registered = None;
            }
            Some(_) => {}
            None => turns.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        Some(Deadline(Kind::Turn(self.0.clone())))
    }
}

impl Turns {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (Some(s), Some(at)) = (&mut self.sleep, self.at) else {
            return Poll::Pending;
        };
        let waker = cx.waker();
        let same = |r: &Option<Waker>| r.as_ref().is_some_and(|w| w.will_wake(waker));
        if !s.is_elapsed() && same(&self.registered) {
            return Poll::Pending;
        }
        while s.as_mut().poll(&mut Context::from_waker(waker)).is_ready() {
            if Instant::now() >= at {
                self.registered = None;
                return Poll::Ready(());
            }
            s.as_mut().reset(at);
        }
        if !same(&self.registered) {
            self.registered = Some(waker.clone());
        }
        Poll::Pending
    }
}

/// A time limit that starts when the request ends (see
/// [`RequestEnd::deadline`]). Boxed or shared: only routes with a timeout
/// make one, so it costs the others nothing in their request's future.
pub struct Deadline(Kind);

enum Kind {
    Own(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// A turn of its connection's [`ConnTimer`].
    Turn(Arc<Mutex<Turns>>),
}

impl Deadline {
    /// Runs `f` until the deadline; `None` when the deadline came first.
    /// `f` comes pinned by the caller: taken by value it would be stored
    /// twice in this future (as argument and in the select), and a
    /// request's future is copied whole into its box.
    pub async fn bound<F: Future>(&mut self, f: Pin<&mut F>) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = f => Some(out),
            () = std::future::poll_fn(|cx| self.poll(cx)) => None,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Kind::Own(f) => f.as_mut().poll(cx),
            Kind::Turn(turns) => turns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .poll(cx),
        }
    }

    /// `body`, ended with [`RouteTimeout`] if it is not complete by the
    /// deadline.
    pub fn limit(self, body: Incoming) -> Body {
        Limited {
            inner: body,
            deadline: self,
        }
        .boxed_unsync()
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Kind::Turn(turns) = &self.0 {
            turns.lock().unwrap_or_else(PoisonError::into_inner).at = None;
        }
    }
}

/// How a response body ends when the route's timeout passes before the
/// backend has finished it. The client sees its stream reset (HTTP/2) or
/// its connection closed (HTTP/1.1); telemetry flags it `UT`.
#[derive(Debug, thiserror::Error)]
#[error("route timeout passed before the response was complete")]
pub struct RouteTimeout;

struct Limited {
    inner: Incoming,
    deadline: Deadline,
}

impl hyper::body::Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(RouteTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's body, counted into `counter` (made here if it has one),
/// and when it ends.
pub fn watch(body: Incoming, counter: &mut Option<Arc<AtomicU64>>) -> (Body, RequestEnd) {
    if body.is_end_stream() {
        // Nothing to read: an empty body in its place, which boxes without
        // an allocation.
        let empty = Empty::new().map_err(|never| match never {});
        return (empty.boxed_unsync(), RequestEnd::Now);
    }
    let (tx, rx) = watch::channel(false);
    let watched = Watched {
        inner: body,
        counter: counter.get_or_insert_with(Default::default).clone(),
        ended: Some(tx),
    };
    (watched.boxed_unsync(), RequestEnd::Later(rx))
}

struct Watched {
    inner: Incoming,
    counter: Arc<AtomicU64>,
    ended: Option<watch::Sender<bool>>,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.end();
                }
            }
            Poll::Ready(_) => self.end(),
            Poll::Pending => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Watched {
    fn end(&mut self) {
        if let Some(tx) = self.ended.take() {
            tx.send_replace(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polled(d: &mut Deadline) -> Poll<()> {
        let waker = futures::task::noop_waker();
        d.poll(&mut Context::from_waker(&waker))
    }

    async fn fires(d: &mut Deadline) {
        tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| d.poll(cx)),
        )
        .await
        .expect("the deadline never fired");
    }

    #[tokio::test]
    async fn a_connections_requests_take_turns_with_one_timer() {
        let conn = ConnTimer::default();
        let first = RequestEnd::Now.deadline(Duration::from_secs(60), Some(&conn));
        assert!(matches!(first.0, Kind::Turn(_)));
        // Taken: the next one (a pipelined request) times itself.
        let mut second = RequestEnd::Now.deadline(Duration::from_millis(20), Some(&conn));
        assert!(matches!(second.0, Kind::Own(_)));
        fires(&mut second).await;
        drop(first);
        let third = RequestEnd::Now.deadline(Duration::from_secs(60), Some(&conn));
        assert!(matches!(third.0, Kind::Turn(_)));
    }

    /// A deadline of `first` takes `conn`'s timer, arms it (polled) and
    /// ends; then one of `second` takes its turn.
    fn turn_after(conn: &ConnTimer, first: Duration, second: Duration) -> Deadline {
        let mut d = RequestEnd::Now.deadline(first, Some(conn));
        assert!(polled(&mut d).is_pending());
        drop(d);
        RequestEnd::Now.deadline(second, Some(conn))
    }

    #[tokio::test]
    async fn an_earlier_deadline_moves_the_timer_back() {
        let conn = ConnTimer::default();
        let mut short = turn_after(&conn, Duration::from_secs(60), Duration::from_millis(20));
        fires(&mut short).await;
    }

    #[tokio::test]
    async fn a_later_deadline_outlives_the_timer_left_from_before() {
        let conn = ConnTimer::default();
        let mut long = turn_after(&conn, Duration::from_millis(20), Duration::from_secs(60));
        // The timer still fires at the first deadline; the second's holder
        // sees that its own has not come and moves the timer on.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(polled(&mut long).is_pending());
        let Kind::Turn(turns) = &long.0 else {
            panic!("not on the connection's timer")
        };
        let turns = turns.lock().unwrap();
        assert_eq!(turns.sleep.as_ref().map(|s| s.deadline()), turns.at);
    }

    #[tokio::test]
    async fn a_request_still_sending_its_body_times_itself() {
        let conn = ConnTimer::default();
        let (_tx, rx) = watch::channel(false);
        let d = RequestEnd::Later(rx).deadline(Duration::from_secs(60), Some(&conn));
        assert!(matches!(d.0, Kind::Own(_)));
    }
}
