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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::sync::watch;

use crate::upstream::connector::BoxError;
use crate::upstream::Body;

/// Whether, or when, the client's request has ended.
#[derive(Clone)]
pub enum RequestEnd {
    Now,
    Later(watch::Receiver<bool>),
}

impl RequestEnd {
    /// A deadline `t` after the request has ended.
    pub fn deadline(&self, t: Duration) -> Deadline {
        let end = self.clone();
        Deadline(Box::pin(async move {
            if let RequestEnd::Later(mut rx) = end {
                // An error: the body was dropped, which also ends it.
                let _ = rx.wait_for(|ended| *ended).await;
            }
            tokio::time::sleep(t).await;
        }))
    }
}

/// A time limit that starts when the request ends (see
/// [`RequestEnd::deadline`]). Boxed: only routes with a timeout make one,
/// so it costs the others nothing in their request's future.
pub struct Deadline(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Deadline {
    /// Runs `f` until the deadline; `None` when the deadline came first.
    /// `f` comes pinned by the caller: taken by value it would be stored
    /// twice in this future (as argument and in the select), and a
    /// request's future is copied whole into its box.
    pub async fn bound<F: Future>(&mut self, f: Pin<&mut F>) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = f => Some(out),
            () = self.0.as_mut() => None,
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
        match self.deadline.0.as_mut().poll(cx) {
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

/// The client's body, counted into `counter`, and when it ends.
pub fn watch(body: Incoming, counter: Arc<AtomicU64>) -> (Body, RequestEnd) {
    if body.is_end_stream() {
        return (body.map_err(Into::into).boxed_unsync(), RequestEnd::Now);
    }
    let (tx, rx) = watch::channel(false);
    let watched = Watched {
        inner: body,
        counter,
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
