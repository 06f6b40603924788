//! Processes started by a test bed, and link captures.
//!
//! Every spawned process gets its own process group so that it can be
//! signalled together with anything it forked (a shell's children, say). The
//! child is shared between its [`ChildGuard`] and the [`Testbed`](crate::Testbed)
//! so that whichever is dropped first stops it; the other then finds it
//! already reaped and does nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long a process gets between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of our locks leaves plain data behind; keep
    // going so cleanup still happens.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
pub(crate) struct ChildInner {
    child: Mutex<Child>,
    pid: u32,
    log: PathBuf,
    desc: String,
}

impl ChildInner {
    pub(crate) fn new(child: Child, log: PathBuf, desc: String) -> Self {
        ChildInner {
            pid: child.id(),
            child: Mutex::new(child),
            log,
            desc,
        }
    }

    /// Exit status if the process has exited (reaping it), None if running.
    fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("waiting for {}", self.desc))
    }

    /// Signals the process group, but only while the leader is not reaped:
    /// until then its pid (= the group id) can't be reused by someone else.
    pub(crate) fn signal(&self, sig: Signal) -> Result<bool> {
        let mut child = lock(&self.child);
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        let pgid = Pid::from_raw(self.pid as i32);
        match killpg(pgid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(true),
            Err(e) => Err(anyhow!(
                "killpg({}, {sig}) for {}: {e}",
                self.pid,
                self.desc
            )),
        }
    }

    fn wait_until(&self, deadline: Option<Instant>) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL.
    pub(crate) fn terminate(&self) -> Result<()> {
        terminate_all(&[self])
    }
}

/// Stops many processes at once: SIGTERM to all, one shared grace period,
/// then SIGKILL to the survivors. Sequential termination would make dropping
/// a test bed with N stubborn processes take N * 2 s.
pub(crate) fn terminate_all(children: &[&ChildInner]) -> Result<()> {
    let mut errors = Vec::new();
    for c in children {
        if let Err(e) = c.signal(Signal::SIGTERM) {
            errors.push(e);
        }
    }
    let deadline = Instant::now() + TERM_GRACE;
    for c in children {
        match c.wait_until(Some(deadline)) {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!("e2e: {} ignored SIGTERM, sending SIGKILL", c.desc);
                if let Err(e) = c.signal(Signal::SIGKILL) {
                    errors.push(e);
                }
                if let Err(e) = c.wait_until(None) {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    match errors.into_iter().next() {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// A process started by [`Testbed::spawn`](crate::Testbed::spawn) or
/// [`Testbed::spawn_in_pod`](crate::Testbed::spawn_in_pod).
///
/// Dropping it stops the process (and its process group): SIGTERM, then
/// SIGKILL after 2 s. stdout and stderr both go to [`ChildGuard::log_path`].
#[derive(Debug)]
pub struct ChildGuard {
    pub(crate) inner: Arc<ChildInner>,
}

impl ChildGuard {
    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The file that receives the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// The log so far (lossily decoded), or a note saying why it can't be read.
    pub fn log(&self) -> String {
        match std::fs::read(&self.inner.log) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.inner.log.display()),
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        matches!(self.inner.try_wait(), Ok(None))
    }

    /// Sends `sig` to the process group (no-op once it has exited).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        self.inner.signal(sig).map(drop)
    }

    /// Kills the process group with SIGKILL (e.g. to simulate a crash) and
    /// waits for the process to be gone.
    pub fn kill9(&self) -> Result<ExitStatus> {
        self.inner.signal(Signal::SIGKILL)?;
        self.wait_exit()
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 2 s. What drop does.
    pub fn terminate(&self) -> Result<()> {
        self.inner.terminate()
    }

    /// Waits (without a limit) for the process to exit.
    pub fn wait_exit(&self) -> Result<ExitStatus> {
        self.inner
            .wait_until(None)?
            .ok_or_else(|| anyhow!("{} did not exit", self.inner.desc))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still
    /// running then.
    pub fn wait_exit_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.inner.wait_until(Some(Instant::now() + timeout))
    }

    /// Like [`ChildGuard::wait_exit_timeout`] but an error (with the log) if
    /// the process is still running, or exited unsuccessfully.
    pub fn wait_success(&self, timeout: Duration) -> Result<()> {
        match self.wait_exit_timeout(timeout)? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("{} failed ({st}); log:\n{}", self.inner.desc, self.log()),
            None => bail!(
                "{} still running after {timeout:?}; log:\n{}",
                self.inner.desc,
                self.log()
            ),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.inner.terminate() {
            eprintln!("e2e: stopping {}: {e:#}", self.inner.desc);
        }
    }
}

/// A running `tcpdump` started by [`Testbed::capture`](crate::Testbed::capture).
///
/// Call [`Capture::stop`] to get the packets; dropping it without stopping
/// just kills tcpdump.
#[derive(Debug)]
pub struct Capture {
    pub(crate) child: ChildGuard,
    pub(crate) file: PathBuf,
}

impl Capture {
    /// Where the pcap is written (inside the test bed's temp dir).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// True while tcpdump runs.
    pub fn is_running(&self) -> bool {
        self.child.is_running()
    }

    /// Stops tcpdump (SIGINT, so it flushes and closes the file), waits for
    /// it, and returns the pcap file's bytes. The file is kept.
    pub fn stop(self) -> Result<Vec<u8>> {
        // tcpdump exits on SIGINT without draining packets still queued in
        // its kernel ring, which on a busy machine can be the last ones a
        // test sent. It writes each packet as it goes (-U), so wait until
        // the file has stopped growing before interrupting it.
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut last = size();
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(150));
            let now = size();
            if now == last {
                break;
            }
            last = now;
        }
        self.child.signal(Signal::SIGINT)?;
        if self
            .child
            .wait_exit_timeout(Duration::from_secs(5))?
            .is_none()
        {
            self.child.kill9()?;
        }
        std::fs::read(&self.file).with_context(|| {
            format!(
                "reading capture {}; tcpdump log:\n{}",
                self.file.display(),
                self.child.log()
            )
        })
    }
}
