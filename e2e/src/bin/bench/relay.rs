//! A plain TCP relay, the least work any two-hop tunnel can do.
//!
//! `bench ztunnel` runs its bulk stream a third time through two of these
//! (one per node, on the same path as the two ztunnels: loopback into the
//! first, the node-to-node link, loopback out of the second). Each relay
//! reads every byte into user space and writes it out again, as anything
//! that encrypts must, but adds no TLS, no HTTP/2 and no event loop. Its
//! throughput is the ceiling a user-space tunnel can reach on the machine
//! in the same minute, so the mesh can be judged against what is possible
//! there and not only against a direct connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use anyhow::{Context, Result};

/// Read size of each relay direction, the largest ztunnel's copy uses.
const BUFFER: usize = 256 * 1024;

/// Listens on `listen` inside `netns` and relays every accepted connection
/// to `upstream` (connected from the same namespace), both directions, each
/// in its own thread. The threads are detached and live as long as the
/// bench, like its servers.
pub fn start(netns: &str, listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let l = e2e::tcp_listen_in(netns, listen)
        .with_context(|| format!("relay listening on {listen} in {netns}"))?;
    let netns = netns.to_string();
    std::thread::Builder::new()
        .name("relay-accept".into())
        .spawn(move || {
            for client in l.incoming() {
                let client = match client {
                    Ok(c) => c,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("bench: relay {listen}: accept failed: {e}");
                        return;
                    }
                };
                if let Err(e) = relay(&netns, client, upstream) {
                    eprintln!("bench: relay {listen} -> {upstream}: {e:#}");
                }
            }
        })
        .context("spawning the relay's accept thread")?;
    Ok(())
}

fn relay(netns: &str, client: TcpStream, upstream: SocketAddr) -> Result<()> {
    let server = e2e::tcp_connect_in(netns, upstream)
        .with_context(|| format!("connecting to {upstream} in {netns}"))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let (client2, server2) = (client.try_clone()?, server.try_clone()?);
    std::thread::Builder::new()
        .name("relay-up".into())
        .spawn(move || copy(client, server))?;
    std::thread::Builder::new()
        .name("relay-down".into())
        .spawn(move || copy(server2, client2))?;
    Ok(())
}

/// Copies until EOF or an error, then passes the end on: a clean EOF as a
/// half-close, an error as a full shutdown so the other direction ends too.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; BUFFER];
    let end = loop {
        match from.read(&mut buf) {
            Ok(0) => break Shutdown::Write,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break Shutdown::Both;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break Shutdown::Both,
        }
    };
    let _ = to.shutdown(end);
    if end == Shutdown::Both {
        let _ = from.shutdown(Shutdown::Both);
    }
}
