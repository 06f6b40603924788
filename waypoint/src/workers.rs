//! Thread per core, as nginx's worker processes: each worker thread runs
//! its own single-threaded event loop and keeps its own upstream
//! connection pools ([`Proxy::for_worker`]), and a connection, once handed
//! to a worker, is served there until it ends: a request is read, routed,
//! forwarded and answered on one thread, with no hand-off to another
//! thread and no cross-thread wake-up. (With one work-stealing runtime
//! shared by all, the downstream connection, the upstream connection and
//! the I/O driver handed each request between threads; on a busy machine
//! those wake-ups were a large share of the waypoint's CPU time.)
//!
//! The listeners are accepted on the main thread, which hands each new
//! connection to the worker with the fewest open connections (Envoy's
//! "exact" connection balance). Letting every worker accept on the shared
//! socket instead gave whichever worker woke first most of a burst of new
//! connections: all four HTTP/2 connections of the benchmark, or two
//! thirds of its HTTP/1.1 ones, on one worker while the other idled.
//!
//! The configuration, the certificates, the balancer's view of the
//! endpoints and the metrics are shared by all workers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, Context};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tracing::warn;

use crate::Proxy;

#[derive(Clone, Copy, Debug)]
enum Listener {
    Hbone,
    Plaintext,
}

/// A connection on its way to a worker: deregistered from the main
/// thread's event loop, to be registered with the worker's.
struct Accepted {
    listener: Listener,
    stream: std::net::TcpStream,
    peer: SocketAddr,
}

struct Worker {
    connections: UnboundedSender<Accepted>,
    /// Connections handed to this worker and not yet ended.
    open: Arc<AtomicUsize>,
}

/// Counts a connection as open on its worker until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts `n` worker threads, and on the current runtime the accept loops
/// of `hbone` and, if given, `plaintext`, which hand connections to the
/// workers. With `pin`, worker `i` runs only on the `i`-th CPU the process
/// may use (round again if there are more workers than CPUs). Returns once
/// every worker runs. Accepting stops when `proxy.drain` stops; workers end
/// once the drain has finished.
pub fn start(
    proxy: &Arc<Proxy>,
    n: usize,
    pin: bool,
    hbone: TcpListener,
    plaintext: Option<TcpListener>,
) -> anyhow::Result<()> {
    let cpus = if pin { allowed_cpus()? } else { Vec::new() };
    let (started, results) = mpsc::channel();
    let mut workers = Vec::new();
    for i in 0..n.max(1) {
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let (tx, mut rx) = unbounded_channel::<Accepted>();
        let open = Arc::new(AtomicUsize::new(0));
        workers.push(Worker {
            connections: tx,
            open: open.clone(),
        });
        let proxy = proxy.clone();
        let started = started.clone();
        std::thread::Builder::new()
            .name(format!("waypoint-worker-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = pin_current_thread(cpu) {
                        let _ = started.send(Err(anyhow!("worker {i}: pinning to CPU {cpu}: {e}")));
                        return;
                    }
                    tracing::info!(worker = i, cpu, "worker pinned");
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started.send(Err(anyhow!("worker {i}: runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let proxy = Arc::new(proxy.for_worker());
                    let drain = proxy.drain.clone();
                    let tables = tokio::spawn(crate::app::keep_tables(proxy.clone()));
                    let _ = started.send(Ok(()));
                    drop(started);
                    // Until the accept loops end (the drain stopped them).
                    while let Some(a) = rx.recv().await {
                        let open = Open(open.clone());
                        let stream = match TcpStream::from_std(a.stream) {
                            Ok(s) => s,
                            Err(e) => {
                                warn!(peer = %a.peer, error = %e, "cannot register a connection");
                                continue;
                            }
                        };
                        let proxy = proxy.clone();
                        drain.connections.spawn(async move {
                            let _open = open;
                            match a.listener {
                                Listener::Hbone => {
                                    crate::inbound::serve_accepted(proxy, stream, a.peer).await
                                }
                                Listener::Plaintext => {
                                    crate::plaintext::serve_accepted(proxy, stream, a.peer).await
                                }
                            }
                        });
                    }
                    // This worker's connections run on this runtime: keep
                    // it until the drain is over.
                    drain.stop.cancelled().await;
                    drain.connections.wait().await;
                    tables.abort();
                });
            })
            .context("starting a worker thread")?;
    }
    drop(started);
    for _ in 0..workers.len() {
        results
            .recv()
            .map_err(|_| anyhow!("a worker thread ended while starting"))??;
    }
    let workers = Arc::new(workers);
    tokio::spawn(accept(
        proxy.clone(),
        hbone,
        Listener::Hbone,
        workers.clone(),
    ));
    if let Some(l) = plaintext {
        tokio::spawn(accept(proxy.clone(), l, Listener::Plaintext, workers));
    }
    Ok(())
}

/// The CPUs this process may run on (its affinity mask: a container's
/// cpuset, `taskset`), in order.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU affinity")?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        anyhow::bail!("the CPU affinity names no CPU");
    }
    Ok(cpus)
}

/// Restricts the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    // Pid 0: the calling thread (Linux applies affinity per thread).
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// Accepts on `listener` until the drain stops, handing each connection
/// to the worker with the fewest open connections.
async fn accept(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    kind: Listener,
    workers: Arc<Vec<Worker>>,
) {
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = proxy.drain.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(listener = ?kind, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand a connection to a worker");
                continue;
            }
        };
        // Fewest open connections; ties go round the workers in turn.
        next = (next + 1) % workers.len();
        let w = (0..workers.len())
            .map(|i| &workers[(next + i) % workers.len()])
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .expect("at least one worker");
        w.open.fetch_add(1, Ordering::Relaxed);
        let handed = w.connections.send(Accepted {
            listener: kind,
            stream,
            peer,
        });
        if handed.is_err() {
            // The worker is gone (it only ends after a drain).
            w.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each allowed CPU in turn: a thread pinned to it may then run there
    /// alone, and the process's other threads keep their mask.
    #[test]
    fn a_pinned_worker_thread_runs_on_its_cpu_only() {
        let cpus = allowed_cpus().unwrap();
        for &cpu in &cpus {
            let mask = std::thread::spawn(move || {
                pin_current_thread(cpu).unwrap();
                sched_getaffinity(Pid::from_raw(0)).unwrap()
            })
            .join()
            .unwrap();
            for c in 0..CpuSet::count() {
                assert_eq!(
                    mask.is_set(c).unwrap(),
                    c == cpu,
                    "CPU {c}, pinned to {cpu}"
                );
            }
        }
        assert_eq!(
            allowed_cpus().unwrap(),
            cpus,
            "the test thread's own mask changed"
        );
    }

    #[test]
    fn pinning_to_a_cpu_out_of_range_is_an_error() {
        let e = std::thread::spawn(|| pin_current_thread(CpuSet::count()))
            .join()
            .unwrap();
        assert!(e.is_err());
    }
}
