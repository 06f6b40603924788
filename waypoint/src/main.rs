//! The waypoint binary: flags (see `app::Args`), logging, the runtime.
//!
//! The main thread's single-threaded runtime runs configuration, xDS, the
//! admin endpoints and shutdown; the listeners are served by
//! `--worker-threads` threads of their own (see `waypoint::workers`).

use std::process::ExitCode;

use clap::Parser;

/// jemalloc, as Istio's ztunnel uses: an HTTP request allocates and frees
/// dozens of small objects (header maps, bodies, futures), and with it the
/// waypoint spends 5-12% less CPU per proxied HTTP/1.1 request than with
/// glibc's malloc (alternating runs of `bench waypoint`), for about 2 MiB
/// more resident memory (idle 9.3 against 7.6 MiB). mimalloc saved as much
/// CPU but held 18 MiB idle. (ztunnel keeps glibc's, tuned in its `alloc`
/// module, for its 7 MiB idle budget: mimalloc took it to 16.8 MiB.)
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = waypoint::app::Args::parse();
    ztunnel::process::init_logging("waypoint", args.log_json);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("waypoint: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(waypoint::app::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("waypoint: {e:#}");
            ExitCode::FAILURE
        }
    }
}
