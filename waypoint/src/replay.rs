//! A request body that can be sent again: for retries and mirrors.
//!
//! The client's body streams to the first attempt as it arrives, as it
//! would with no retry policy, and what has been read is kept (up to a
//! limit) so that a retry, or a mirror running alongside, can replay it and
//! then go on reading where the others left off. So a streaming upload, or
//! a gRPC call that streams both ways, flows through a route with retries;
//! a body larger than the limit still goes through, it just cannot be
//! retried any more (Envoy's "retry overflow").
//!
//! Each attempt and mirror gets its own reader ([`ReplayBody`]) of the one
//! [`Replay`]: a reader behind the others replays kept chunks, the reader
//! at the front polls the client's body. A reader that needs a chunk that
//! was not kept (past the limit, or after [`Replay::stop_keeping`]) fails,
//! which resets its upstream request.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use crate::upstream::connector::BoxError;
use crate::upstream::Body as RequestBody;

/// How much of a request body is kept for replays: Envoy's default
/// per-connection buffer limit.
pub const REPLAY_LIMIT: usize = 1024 * 1024;

/// The client's request body, shared by the readers made from it.
pub struct Replay<B = RequestBody> {
    shared: Arc<Mutex<Shared<B>>>,
}

/// One reader of a shared request body (see the module docs).
pub struct ReplayBody<B = RequestBody> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Index of the next chunk this reader yields (counted from the
    /// stream's first chunk).
    next: usize,
    /// Whether this reader has yielded the trailers.
    trailers_done: bool,
    /// The attempt this reader sends (`None`: a mirror's, never superseded).
    attempt: Option<u64>,
}

struct Shared<B> {
    /// The client's body; `None` once it has ended.
    source: Option<B>,
    /// Kept chunks: `kept[0]` is chunk number `first_kept`.
    kept: Vec<Bytes>,
    first_kept: usize,
    /// Chunks read from the source so far.
    read: usize,
    kept_bytes: usize,
    limit: usize,
    /// Set once a chunk was not kept: no reader may start over any more.
    lost: bool,
    keep: bool,
    /// The latest attempt; readers of earlier ones fail, so that an
    /// upstream connection still sending a failed attempt's body cannot
    /// take chunks from the one under way.
    attempt: u64,
    trailers: Option<HeaderMap>,
    /// The source failed: every reader that reaches the end fails too.
    failed: Option<String>,
    /// Readers waiting for the source. The source is polled with a waker
    /// that wakes them all: each may be waiting for the next chunk, and
    /// the one that polled last may not poll again soon (a mirror whose
    /// upstream is slow).
    waiting: Arc<Waiting>,
    waker: Waker,
}

#[derive(Default)]
struct Waiting(Mutex<Vec<Waker>>);

impl Waiting {
    fn add(&self, w: &Waker) {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|o| o.will_wake(w)) {
            list.push(w.clone());
        }
    }
}

impl Wake for Waiting {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let list = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for w in list {
            w.wake();
        }
    }
}

/// A panic while holding the lock leaves consistent state (every update
/// is a single step), so a poisoned lock is still usable.
fn lock<B>(m: &Mutex<Shared<B>>) -> std::sync::MutexGuard<'_, Shared<B>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B> Replay<B> {
    /// Keeps up to `limit` bytes of `source` for replays. Also returns the
    /// first attempt's body.
    pub fn new(source: B, limit: usize) -> (Self, ReplayBody<B>) {
        let waiting = Arc::new(Waiting::default());
        let replay = Replay {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                kept: Vec::new(),
                first_kept: 0,
                read: 0,
                kept_bytes: 0,
                limit,
                lost: false,
                keep: true,
                attempt: 1,
                trailers: None,
                failed: None,
                waker: Waker::from(waiting.clone()),
                waiting,
            })),
        };
        let first = replay.reader(Some(1));
        (replay, first)
    }

    /// The body for a new attempt, from the start; the readers of earlier
    /// attempts fail from now on. `None` when part of the body was not
    /// kept, so it cannot be sent again.
    pub fn attempt(&self) -> Option<ReplayBody<B>> {
        let mut s = lock(&self.shared);
        if s.lost || !s.keep {
            return None;
        }
        s.attempt += 1;
        Some(self.reader(Some(s.attempt)))
    }

    /// The body for a mirror, from the start, running alongside the
    /// attempts (`None` as for [`Replay::attempt`]).
    pub fn mirror(&self) -> Option<ReplayBody<B>> {
        let s = lock(&self.shared);
        (!s.lost && s.keep).then(|| self.reader(None))
    }

    fn reader(&self, attempt: Option<u64>) -> ReplayBody<B> {
        ReplayBody {
            shared: self.shared.clone(),
            next: 0,
            trailers_done: false,
            attempt,
        }
    }

    /// No more replays will be asked for: chunks read from now on are not
    /// kept, and those kept are let go.
    pub fn stop_keeping(&self) {
        let mut s = lock(&self.shared);
        s.keep = false;
        s.drop_kept();
    }
}

impl<B> Shared<B> {
    fn drop_kept(&mut self) {
        if !self.kept.is_empty() || self.read > self.first_kept {
            self.lost = true;
        }
        self.first_kept = self.read;
        self.kept = Vec::new();
        self.kept_bytes = 0;
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut guard = lock(&this.shared);
        // Fields borrowed apart (the source and the rest) need a plain `&mut`.
        let s = &mut *guard;
        if this.attempt.is_some_and(|a| a != s.attempt) {
            return Poll::Ready(Some(Err("request superseded by a retry".into())));
        }
        loop {
            if this.next < s.read {
                if this.next < s.first_kept {
                    return Poll::Ready(Some(Err(
                        "request body not kept for replay (over the buffer limit)".into(),
                    )));
                }
                let chunk = s.kept[this.next - s.first_kept].clone();
                this.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            let Some(source) = s.source.as_mut() else {
                if let Some(why) = &s.failed {
                    return Poll::Ready(Some(Err(why.clone().into())));
                }
                if !this.trailers_done {
                    this.trailers_done = true;
                    if let Some(t) = &s.trailers {
                        return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                    }
                }
                return Poll::Ready(None);
            };
            s.waiting.add(cx.waker());
            match Pin::new(source).poll_frame(&mut Context::from_waker(&s.waker)) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => {
                    // The others may be waiting for this chunk.
                    s.waiting.wake_by_ref();
                    match frame {
                        None => s.source = None,
                        Some(Err(e)) => {
                            s.source = None;
                            s.failed = Some(format!("client request body: {e}"));
                        }
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => {
                                s.read += 1;
                                if s.keep && s.kept_bytes + data.len() <= s.limit {
                                    s.kept_bytes += data.len();
                                    s.kept.push(data);
                                } else {
                                    s.drop_kept();
                                    // This reader yields the chunk itself.
                                    this.next = s.read;
                                    return Poll::Ready(Some(Ok(Frame::data(data))));
                                }
                            }
                            Err(frame) => {
                                if let Ok(t) = frame.into_trailers() {
                                    s.trailers = Some(t);
                                }
                            }
                        },
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        self.next >= s.read
            && match &s.source {
                Some(source) => source.is_end_stream(),
                None => s.failed.is_none() && (self.trailers_done || s.trailers.is_none()),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        let kept_ahead: u64 = if self.next >= s.first_kept {
            s.kept[(self.next - s.first_kept).min(s.kept.len())..]
                .iter()
                .map(|b| b.len() as u64)
                .sum()
        } else {
            0
        };
        match &s.source {
            Some(source) => {
                let h = source.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + kept_ahead);
                if let Some(u) = h.upper() {
                    out.set_upper(u + kept_ahead);
                }
                out
            }
            None => SizeHint::with_exact(kept_ahead),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::sync::mpsc;

    /// A client body whose frames the test sends when it likes.
    struct Source(mpsc::UnboundedReceiver<Result<Frame<Bytes>, &'static str>>);

    impl Body for Source {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx)
        }
    }

    type Tx = mpsc::UnboundedSender<Result<Frame<Bytes>, &'static str>>;

    fn source(limit: usize) -> (Tx, Replay<Source>, ReplayBody<Source>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (replay, first) = Replay::new(Source(rx), limit);
        (tx, replay, first)
    }

    fn data(s: &'static str) -> Result<Frame<Bytes>, &'static str> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    async fn next_data<B>(b: &mut ReplayBody<B>) -> Result<Bytes, String>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        match b.frame().await {
            Some(Ok(f)) => Ok(f.into_data().unwrap()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("end".into()),
        }
    }

    #[tokio::test]
    async fn first_attempt_streams_and_a_retry_replays_then_reads_on() {
        let (tx, replay, mut first) = source(1024);
        tx.send(data("a")).unwrap();
        // Yielded before the client's body has ended: it streams.
        assert_eq!(next_data(&mut first).await.unwrap(), "a");
        tx.send(data("b")).unwrap();
        assert_eq!(next_data(&mut first).await.unwrap(), "b");
        let mut second = replay.attempt().unwrap();
        assert_eq!(next_data(&mut second).await.unwrap(), "a");
        assert_eq!(next_data(&mut second).await.unwrap(), "b");
        tx.send(data("c")).unwrap();
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(Frame::trailers(t))).unwrap();
        drop(tx);
        let rest = second.collect().await.unwrap();
        assert_eq!(rest.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(rest.to_bytes(), "c");
        // The earlier attempt is superseded.
        assert!(next_data(&mut first)
            .await
            .unwrap_err()
            .contains("superseded"));
        // A third attempt gets everything, exactly sized.
        let third = replay.attempt().unwrap();
        assert_eq!(third.size_hint().exact(), Some(3));
        let all = third.collect().await.unwrap();
        assert!(all.trailers().is_some());
        assert_eq!(all.to_bytes(), "abc");
    }

    #[tokio::test]
    async fn past_the_limit_the_body_still_flows_but_cannot_be_replayed() {
        let (tx, replay, mut first) = source(4);
        let mut mirror = replay.mirror().unwrap();
        tx.send(data("abc")).unwrap();
        tx.send(data("defg")).unwrap();
        drop(tx);
        assert_eq!(next_data(&mut first).await.unwrap(), "abc");
        assert_eq!(next_data(&mut first).await.unwrap(), "defg");
        assert!(next_data(&mut first).await.unwrap_err() == "end");
        // Not kept: no retry, and a reader behind fails instead of skipping.
        assert!(replay.attempt().is_none());
        assert!(replay.mirror().is_none());
        assert!(next_data(&mut mirror)
            .await
            .unwrap_err()
            .contains("not kept"));
    }

    #[tokio::test]
    async fn readers_waiting_for_the_client_are_all_woken() {
        let (tx, replay, first) = source(1024);
        let mirror = replay.mirror().unwrap();
        let a = tokio::spawn(async move { first.collect().await.map(|c| c.to_bytes()) });
        let b = tokio::spawn(async move { mirror.collect().await.map(|c| c.to_bytes()) });
        for chunk in ["x", "y", "z"] {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(data(chunk)).unwrap();
        }
        drop(tx);
        assert_eq!(a.await.unwrap().unwrap(), "xyz");
        assert_eq!(b.await.unwrap().unwrap(), "xyz");
    }

    #[tokio::test]
    async fn a_client_error_fails_every_reader() {
        let (tx, replay, mut first) = source(1024);
        tx.send(data("a")).unwrap();
        tx.send(Err("reset by client")).unwrap();
        assert_eq!(next_data(&mut first).await.unwrap(), "a");
        assert!(next_data(&mut first).await.unwrap_err().contains("reset"));
        let mut again = replay.attempt().unwrap();
        assert_eq!(next_data(&mut again).await.unwrap(), "a");
        assert!(next_data(&mut again).await.unwrap_err().contains("reset"));
    }

    #[tokio::test]
    async fn after_stop_keeping_nothing_more_is_kept() {
        let (tx, replay, mut first) = source(1024);
        tx.send(data("a")).unwrap();
        assert_eq!(next_data(&mut first).await.unwrap(), "a");
        replay.stop_keeping();
        assert!(replay.attempt().is_none());
        tx.send(data("b")).unwrap();
        assert_eq!(next_data(&mut first).await.unwrap(), "b");
    }

    #[test]
    fn an_empty_body_is_ended_from_the_start() {
        let (replay, first) = Replay::new(Empty::<Bytes>::new(), 1024);
        assert!(first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(0));
        let (_, sized) = Replay::new(Full::new(Bytes::from_static(b"1234")), 1024);
        assert_eq!(sized.size_hint().exact(), Some(4));
        assert!(replay.attempt().unwrap().is_end_stream());
    }
}
