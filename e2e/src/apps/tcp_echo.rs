//! The raw TCP echo sample: every byte received is sent back, until the
//! client closes. No protocol, so a waypoint or ztunnel can only carry it
//! at L4.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use anyhow::Result;

use super::Background;
use crate::cluster::App;

/// A running echo server; dropping it stops it.
#[derive(Debug)]
pub struct TcpEcho {
    bg: Background,
}

impl TcpEcho {
    /// Echoes on `[::]:<port>` in `app`'s namespace.
    pub fn start_for(app: &App, port: u16) -> Result<TcpEcho> {
        let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let bg = Background::start(
            app.pod.netns(),
            addr,
            "tcp-echo",
            |l, mut stop| async move {
                loop {
                    let conn = tokio::select! {
                        c = l.accept() => c,
                        _ = &mut stop => return,
                    };
                    let Ok((mut s, _)) = conn else { continue };
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            },
        )?;
        Ok(TcpEcho { bg })
    }

    pub fn addr(&self) -> SocketAddr {
        self.bg.addr()
    }
}
