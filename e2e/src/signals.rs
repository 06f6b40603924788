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

/// For test processes, which have no stop-signal handling of their own: on
/// SIGINT, SIGTERM or SIGHUP, removes every test bed of this process (kills
/// the processes in its namespaces and cgroups, deletes namespaces,
/// cgroups, bpffs pins and temp dirs) and exits with status 130. Without
/// it a Ctrl-C leaves the mesh's processes running in their namespaces
/// until the next test bed's stale cleanup. Binaries that shut down
/// gracefully (the demo) use [`on_stop_signal`] instead.
pub fn cleanup_on_stop_signal() -> io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = on_stop_signal(|sig| {
            eprintln!("e2e: {sig}: removing this process's test beds");
            if let Err(e) = crate::cleanup::remove_own() {
                eprintln!("e2e: {e:#}");
            }
            std::process::exit(130);
        });
    });
    result
}
