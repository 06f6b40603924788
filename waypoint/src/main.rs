//! The waypoint binary: flags (see `app::Args`), logging, the runtime.
//!
//! The main thread's single-threaded runtime runs configuration, xDS, the
//! admin endpoints and shutdown; the listeners are served by
//! `--worker-threads` threads of their own (see `waypoint::workers`).

use std::process::ExitCode;

use clap::Parser;

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
