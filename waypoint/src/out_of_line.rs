//! A future polled by a function of its own, never inlined into the
//! future that awaits it.
//!
//! A request's async functions compile to one state machine whose `poll`
//! holds the code of every future awaited inline, taken or not. Wrapping
//! the branches an HTTP/1.1 request does not take (the HTTP/2 upstream,
//! hyper's shared connection pool) took `Upstream::send`'s code from 28 to
//! 13 KB and 140 instructions off each request (callgrind): a request
//! touches about 110 KB of code, against 70 KB for a bare hyper proxy, and
//! the instruction-cache misses that follow cost it more than its
//! instructions do.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// `F`, polled out of line: see the module docs.
    pub struct OutOfLine<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for OutOfLine<F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// `f`, polled out of line.
pub fn out_of_line<F: Future>(f: F) -> OutOfLine<F> {
    OutOfLine { inner: f }
}
