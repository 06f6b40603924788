//! Start-up shared by the mesh's binaries (ztunnel, waypoint): logging and
//! the runtime, so every process logs and fails alike.

use std::fs::File;
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// Standard output for log lines, written with one `write` per line and no
/// lock. The subscriber formats each line whole before writing it; std's
/// `Stdout` would then take a process-wide lock around the `write`, and
/// with an access-log line per connection the workers kept meeting there
/// (a futex wait, a wake-up and a context switch each time). The kernel
/// keeps a single `write` whole: atomic on a pipe up to 4 KiB, and file
/// offsets are updated under the file's lock.
struct LogOut(Option<File>);

impl LogOut {
    fn stdout() -> Self {
        // A copy of fd 1; if there is none, std's locked `Stdout`.
        LogOut(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(File::from),
        )
    }
}

/// What [`LogOut`] hands the subscriber for each line.
pub struct LogLine<'a>(Option<&'a File>);

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0 {
            Some(mut f) => f.write(buf),
            None => io::stdout().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0 {
            Some(_) => Ok(()),
            None => io::stdout().flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for LogOut {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine(self.0.as_ref())
    }
}

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
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(LogOut::stdout()),
            )
            .with(filter)
            .init();
    } else {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stdout().is_terminal())
                    .with_writer(LogOut::stdout()),
            )
            .with(filter)
            .init();
    }
}

/// Runs `main` on a runtime with `worker_threads` workers; an error ends
/// the process with a failure status after being logged.
///
/// One worker gets tokio's current-thread runtime: the same single thread
/// without the work-stealing scheduler's bookkeeping (its run queues,
/// LIFO slot and sibling wake-ups, all for nobody), and `main` itself runs
/// on it instead of parking a second thread. In 4 alternating pairs of
/// `bench ztunnel`, ztunnel CPU per short connection went from 248-279 to
/// 222-236 us (a + b) and per request/response round trip from 137-171 to
/// 121-136 us; one-stream bulk was the same.
pub fn run<F>(program: &str, worker_threads: usize, main: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        multi.worker_threads(worker_threads);
        multi
    };
    let rt = match builder.enable_all().build() {
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
