//! Stop signals for the test bed's binaries (demo, bench).
//!
//! Handled with real handlers (tokio's) on a thread of their own, never by
//! blocking them: children inherit a blocked signal mask, and a ztunnel
//! started with SIGTERM blocked could not be stopped gracefully.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks long waits ([`crate::cluster::wait_for`]) to give up: a stop
/// signal arrived and the caller wants to clean up and exit.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// True once [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Calls `on_signal` with "SIGINT", "SIGTERM" or "SIGHUP" each time one
/// arrives, on a dedicated thread. The handlers are registered before this
/// returns, so a signal right after it is not lost.
pub fn on_stop_signal(mut on_signal: impl FnMut(&'static str) + Send + 'static) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term, mut hup) = rt.block_on(async {
        Ok::<_, io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    let sig = tokio::select! {
                        _ = int.recv() => "SIGINT",
                        _ = term.recv() => "SIGTERM",
                        _ = hup.recv() => "SIGHUP",
                    };
                    on_signal(sig);
                }
            })
        })?;
    Ok(())
}
