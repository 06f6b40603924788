//! When the client has sent its whole request: Envoy's route timeout and
//! per-try timeout start there, not when the request starts, so a long
//! upload or a client-streaming gRPC call is not cut short by them.
//!
//! [`watch`] wraps the client's body; it counts the request bytes and tells
//! the [`RequestEnd`] when the body ends (or fails, or is dropped unread:
//! the request is over either way). A body that is empty from the start
//! (most requests) needs no signal at all.

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
    /// Runs `f` for at most `t` after the request has ended; `None` when
    /// the time ran out. `f` comes pinned by the caller: taken by value it
    /// would be stored twice in this future (as argument and in the
    /// select), and a request's future is copied whole into its box.
    pub async fn within<F: Future>(&self, t: Duration, f: Pin<&mut F>) -> Option<F::Output> {
        let deadline = async {
            if let RequestEnd::Later(rx) = self {
                // An error: the body was dropped, which also ends it.
                let _ = rx.clone().wait_for(|ended| *ended).await;
            }
            tokio::time::sleep(t).await;
        };
        tokio::select! {
            biased;
            out = f => Some(out),
            () = deadline => None,
        }
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
