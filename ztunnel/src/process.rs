//! Start-up shared by the mesh's binaries (ztunnel, waypoint): logging and
//! the runtime, so every process logs and fails alike.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
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
                    .fmt_fields(PlainFields)
                    .with_writer(LogOut::stdout()),
            )
            .with(filter)
            .init();
    }
}

/// Writes an event's fields as tracing-subscriber's default text format
/// does (`name=value` separated by spaces, the message bare and its
/// terminal control characters escaped), without the styling: the default
/// paints every name and `=` (a no-op style when colours are off, but
/// formatted all the same). An access-log line has a dozen or more fields,
/// so that was 10k of the 62k instructions the waypoint spent per request
/// with its access log on.
struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = PlainVisitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct PlainVisitor<'w> {
    writer: Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let w = &mut self.writer;
        if !std::mem::replace(&mut self.empty, false) {
            self.result = w.write_char(' ');
        }
        let name = field.name();
        self.result = self.result.and_then(|()| match name {
            "message" => write!(Escaping(w), "{value:?}"),
            _ => {
                w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
                w.write_char('=')?;
                write!(w, "{value:?}")
            }
        });
    }
}

/// Escapes what a terminal could take for control sequences, as
/// tracing-subscriber does in messages (which may carry a peer's words).
struct Escaping<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for part in s.split_inclusive(is_control) {
            match part.char_indices().last() {
                Some((i, c)) if is_control(c) => {
                    self.0.write_str(&part[..i])?;
                    match c {
                        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                            write!(self.0, "\\x{:02x}", c as u32)?
                        }
                        _ => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                    }
                }
                _ => self.0.write_str(part)?,
            }
        }
        Ok(())
    }
}

fn is_control(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines, kept in memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lines lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn events() {
        let span = tracing::info_span!("conn", id = 7, peer = %"10.0.0.1:80");
        let _in = span.enter();
        let what = "connection complete";
        tracing::info!(
            target: "access",
            direction = "outbound",
            src.addr = %"10.0.0.1:5000",
            bytes_sent = 42u64,
            duration_ms = 1.5f64,
            ok = true,
            r#type = ?Some("x"),
            "{what}"
        );
        tracing::warn!(error = %"peer said \x1b[31mred", "bad \x1b[2J peer \u{9b} {}", 1);
        tracing::info!("message only");
    }

    fn render(plain: bool) -> String {
        let lines = Lines::default();
        let out = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_writer(move || out.clone());
        let subscriber = tracing_subscriber::registry();
        if plain {
            tracing::subscriber::with_default(
                subscriber.with(layer.fmt_fields(PlainFields)),
                events,
            );
        } else {
            tracing::subscriber::with_default(subscriber.with(layer), events);
        }
        let bytes = lines.0.lock().expect("lines lock").clone();
        String::from_utf8(bytes).expect("utf-8 log")
    }

    #[test]
    fn plain_fields_write_what_the_default_format_writes() {
        let default = render(false);
        assert!(default.contains("bytes_sent=42"), "{default}");
        assert!(default.contains(r"bad \x1b[2J peer \u{9b} 1"), "{default}");
        assert_eq!(render(true), default);
    }
}
