//! Benchmarks of the mesh on the namespace test bed.
//!
//! ```text
//! cargo build --release -p ztunnel
//! cargo run --release -p e2e --bin bench -- ztunnel [--duration-secs N] [--out-dir DIR]
//! cargo build --release -p ztunnel -p ztunnel-cni
//! cargo run --release -p e2e --bin bench -- capture [--duration-secs N] [--out-dir DIR]
//! cargo build --release -p ztunnel -p waypoint
//! cargo run --release -p e2e --bin bench -- waypoint [--concurrency N] [--out-dir DIR]
//! cargo build --release -p ztunnel -p ztunnel-cni -p xds -p waypoint
//! cargo run --release -p e2e --bin bench -- all [--out-dir DIR] [--only NAME]...
//! ```
//!
//! Needs root (network namespaces) and iptables. Each benchmark prints a
//! table and, with `--out-dir`, writes `<DIR>/<benchmark>.json` and `.md` in
//! a shape shared by all benchmarks (see `report.rs`). Ctrl-C stops the run
//! and removes the test bed.

#[path = "bench/all.rs"]
mod all;
#[path = "bench/capture.rs"]
mod capture;
#[path = "bench/httpload.rs"]
mod httpload;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/procstat.rs"]
mod procstat;
#[path = "bench/relay.rs"]
mod relay;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/waypoint.rs"]
mod waypoint;
#[path = "bench/xds.rs"]
mod xds;
#[path = "bench/ztunnel.rs"]
mod ztunnel;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks of the ambient mesh on a network-namespace test bed")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Data path through two ztunnels (iptables capture, HBONE) vs direct:
    /// throughput, request/response latency, connections/s, ztunnel memory
    /// and CPU.
    Ztunnel(ztunnel::ZtunnelArgs),
    /// The control plane at scale on loopback: first full sync, change ->
    /// all clients acked (p50/p99), server and ztunnel memory.
    Xds(xds::XdsArgs),
    /// eBPF capture vs iptables REDIRECT feeding the same ztunnel's in-pod
    /// listeners: throughput, latency, connections/s, and the time to set
    /// up capture for one pod.
    Capture(capture::CaptureArgs),
    /// HTTP/1.1 and HTTP/2 requests/s and p50/p99 at a fixed concurrency:
    /// waypoint vs nginx as reverse proxies (same workers), and the mesh
    /// path through the waypoint vs L4-only vs direct.
    Waypoint(waypoint::WaypointArgs),
    /// Every benchmark above in sequence, each writing its own files, plus
    /// one combined table (`all.md`, `all.json`) of every scenario's
    /// baseline, mesh figure and ratio, and every mesh process's RSS and CPU.
    All(all::AllArgs),
}

/// Handles SIGINT/SIGTERM/SIGHUP on a dedicated thread (tokio's signal
/// handling: a real handler, so the signal mask stays empty and the children
/// the test bed spawns can still be stopped with SIGTERM). The first signal
/// sets [`load::STOP`], which every loop checks, so the run unwinds normally
/// and the test bed's `Drop` removes everything; a second one, or a cleanup
/// that takes too long, exits at once (the next test bed then removes the
/// leftovers).
fn install_signal_thread() -> std::io::Result<()> {
    e2e::on_stop_signal(|sig| {
        if load::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("bench: {sig} again, exiting now without cleanup");
            std::process::exit(130);
        }
        eprintln!("bench: {sig}: stopping and removing the test bed (again to exit at once)");
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(|| {
                std::thread::sleep(Duration::from_secs(30));
                eprintln!("bench: cleanup is taking too long, exiting");
                std::process::exit(130);
            });
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !e2e::require_root() {
        return ExitCode::FAILURE;
    }
    if let Err(e) = install_signal_thread() {
        eprintln!("bench: cannot set up signal handling: {e}");
        return ExitCode::FAILURE;
    }
    let result = match &cli.bench {
        Bench::Xds(args) => xds::run(args).map(|t| println!("{t}")),
        Bench::Ztunnel(args) => ztunnel::run(args).and_then(|report| {
            println!("{}", report.text());
            if let Some(dir) = &args.out_dir {
                report.write(dir)?;
            }
            Ok(())
        }),
        Bench::Capture(args) => capture::run(args).and_then(|report| {
            println!("{}", report.text());
            if let Some(dir) = &args.out_dir {
                report.write(dir)?;
            }
            Ok(())
        }),
        Bench::All(args) => all::run(args).map(|md| println!("{md}")),
        Bench::Waypoint(args) => waypoint::run(args).and_then(|report| {
            println!("{}", report.text());
            if let Some(dir) = &args.out_dir {
                report.write(dir)?;
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if load::stopped() => {
            eprintln!("bench: interrupted, test bed removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
