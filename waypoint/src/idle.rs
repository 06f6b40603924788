//! The HTTP/1.1 header-read timeout, kept with one timer per connection
//! instead of one per request.
//!
//! hyper's own `header_read_timeout` arms a fresh timer each time it starts
//! reading a request head (an allocation, a timer-wheel insertion and a
//! removal per request: about 2% of the waypoint's CPU time in the
//! HTTP/1.1 benchmark). What it enforces is that a connection waiting for a
//! request head gets one within [`HEADER_READ_TIMEOUT`], else it is closed
//! (slow or silent clients, idle keep-alive connections). Here the
//! connection's task checks the same thing on a timer that fires once per
//! period: a connection that had no request in progress and started no
//! new one during a whole period is shut down gracefully. So a client gets
//! between one and two periods to send a request head, where hyper gave
//! exactly one.
//!
//! HTTP/2 connections are left alone, as before (hyper's HTTP/2 server has
//! no such timeout; a multiplexed connection idles legitimately).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How long a connection may wait for a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A downstream connection's request activity, counted by the requests
/// themselves (their start, and the end of their response body).
#[derive(Default)]
pub struct Activity {
    started: AtomicU64,
    done: AtomicU64,
    http2: AtomicBool,
}

impl Activity {
    pub fn start(&self, version: http::Version) {
        self.started.fetch_add(1, Relaxed);
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Relaxed);
        }
    }

    pub fn end(&self) {
        self.done.fetch_add(1, Relaxed);
    }
}

/// What the connection saw at the previous tick of its timer.
#[derive(Default)]
pub struct Watch {
    started: u64,
}

impl Watch {
    /// At a tick of the timer: should the connection be shut down? Yes if
    /// it speaks HTTP/1.1 (or nothing yet), no request is in progress and
    /// none started since the previous tick.
    pub fn idle(&mut self, a: &Activity) -> bool {
        let started = a.started.load(Relaxed);
        let busy = started != a.done.load(Relaxed);
        let progressed = started != self.started;
        self.started = started;
        !busy && !progressed && !a.http2.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_after_a_whole_quiet_period() {
        let a = Activity::default();
        let mut w = Watch::default();
        // A connection that never sent a request.
        assert!(w.idle(&a));
        a.start(http::Version::HTTP_11);
        // A request started during the period: not idle, and still in
        // progress at the next tick (a long response body): not idle.
        assert!(!w.idle(&a));
        assert!(!w.idle(&a));
        a.end();
        // Done during that period; nothing since: idle.
        assert!(w.idle(&a));
        a.start(http::Version::HTTP_11);
        a.end();
        assert!(!w.idle(&a));
        assert!(w.idle(&a));
    }

    #[test]
    fn http2_connections_are_left_alone() {
        let a = Activity::default();
        let mut w = Watch::default();
        a.start(http::Version::HTTP_2);
        a.end();
        assert!(!w.idle(&a));
        assert!(!w.idle(&a));
    }
}
