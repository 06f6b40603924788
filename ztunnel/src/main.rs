use clap::Parser;

fn main() -> std::process::ExitCode {
    ztunnel::alloc::tune();
    let cfg = ztunnel::config::Config::parse();
    ztunnel::process::init_logging("ztunnel", cfg.log_json);
    let workers = cfg
        .worker_threads
        .map_or_else(ztunnel::config::default_worker_threads, usize::from);
    tracing::info!(workers, "data-plane worker threads");
    ztunnel::process::run("ztunnel", workers, ztunnel::app::run(cfg))
}
