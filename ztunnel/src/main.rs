use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

fn main() -> std::process::ExitCode {
    ztunnel::alloc::tune();
    let cfg = ztunnel::config::Config::parse();
    // RUST_LOG takes `level` and `target=level` directives, e.g.
    // `info,ztunnel::proxy=debug`; a bad value falls back to info.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| match v.parse::<Targets>() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("ztunnel: ignoring RUST_LOG={v:?}: {e}");
                None
            }
        })
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    if cfg.log_json {
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(ztunnel::app::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ztunnel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
