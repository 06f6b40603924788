//! The waypoint binary: flags (see `app::Args`), logging, the runtime.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = waypoint::app::Args::parse();
    ztunnel::process::init_logging("waypoint", args.log_json);
    let workers = args.worker_threads;
    ztunnel::process::run("waypoint", workers, waypoint::app::run(args))
}
