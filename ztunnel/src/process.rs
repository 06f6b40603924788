//! Start-up shared by the mesh's binaries (ztunnel, waypoint): logging and
//! the multi-threaded runtime, so every process logs and fails alike.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// Installs the global subscriber: JSON lines or human-readable text.
/// `RUST_LOG` takes `level` and `target=level` directives, e.g.
/// `info,ztunnel::proxy=debug`; a bad value is reported and info is used.
pub fn init_logging(program: &str, json: bool) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| match v.parse::<Targets>() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{program}: ignoring RUST_LOG={v:?}: {e}");
                None
            }
        })
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    if json {
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().json())
            .with(filter)
            .init();
    } else {
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .with(filter)
            .init();
    }
}

/// Runs `main` on a runtime with `worker_threads` workers; an error ends
/// the process with a failure status after being logged.
pub fn run<F>(program: &str, worker_threads: usize, main: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
