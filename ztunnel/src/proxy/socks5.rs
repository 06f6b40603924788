//! A SOCKS5 listener (RFC 1928, CONNECT, no authentication), opt-in like
//! Istio's on 15080: a way into the mesh for clients that are not captured.
//! The client's source address identifies the workload, exactly as for a
//! captured connection; the requested address is the destination.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::outbound::{self, OutboundError};
use super::{accept_loop, ProxyInputs};
use crate::socket::canonical;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;

#[repr(u8)]
#[derive(Clone, Copy)]
enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    CommandNotSupported = 7,
    AddressNotSupported = 8,
}

pub async fn run(pi: Arc<ProxyInputs>, listener: TcpListener) {
    let drain = pi.drain.clone();
    accept_loop(listener, "SOCKS5", drain, move |stream, peer| {
        let pi = pi.clone();
        async move {
            if let Err(e) = handle(pi, stream, peer).await {
                debug!(%peer, error = %e, "socks5 request failed");
            }
        }
    })
    .await;
}

async fn reply(stream: &mut TcpStream, code: Reply) -> std::io::Result<()> {
    stream
        .write_all(&[VERSION, code as u8, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
}

async fn handle(
    pi: Arc<ProxyInputs>,
    mut stream: TcpStream,
    src: SocketAddr,
) -> anyhow::Result<()> {
    let dst = match tokio::time::timeout(Duration::from_secs(10), negotiate(&mut stream)).await {
        Ok(Ok(dst)) => dst,
        Ok(Err((code, e))) => {
            if let Some(code) = code {
                let _ = reply(&mut stream, code).await;
            }
            return Err(e);
        }
        Err(_) => bail!("client did not finish the SOCKS5 handshake in time"),
    };
    match outbound::connect(&pi, src, dst).await {
        Ok(out) => {
            reply(&mut stream, Reply::Succeeded).await?;
            out.serve(&mut stream).await;
            Ok(())
        }
        Err(e) => {
            let code = match e {
                OutboundError::Denied(_) => Reply::NotAllowed,
                OutboundError::NoRoute(_) => Reply::HostUnreachable,
                OutboundError::Failed(_) => Reply::GeneralFailure,
            };
            reply(&mut stream, code).await?;
            Ok(())
        }
    }
}

type NegotiateError = (Option<Reply>, anyhow::Error);

/// Reads the greeting and the CONNECT request; returns the destination.
async fn negotiate(s: &mut TcpStream) -> Result<SocketAddr, NegotiateError> {
    let io = |e: std::io::Error| (None, anyhow!(e));
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.map_err(io)?;
    if head[0] != VERSION {
        return Err((None, anyhow!("not SOCKS5 (version byte {})", head[0])));
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await.map_err(io)?;
    if !methods.contains(&NO_AUTH) {
        let _ = s.write_all(&[VERSION, NO_ACCEPTABLE]).await;
        return Err((None, anyhow!("client offers no acceptable auth method")));
    }
    s.write_all(&[VERSION, NO_AUTH]).await.map_err(io)?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await.map_err(io)?;
    if req[0] != VERSION {
        return Err((None, anyhow!("bad request version {}", req[0])));
    }
    if req[1] != CMD_CONNECT {
        return Err((
            Some(Reply::CommandNotSupported),
            anyhow!("command {} not supported", req[1]),
        ));
    }
    let ip = match req[3] {
        1 => {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.map_err(io)?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            s.read_exact(&mut b).await.map_err(io)?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        3 => {
            let len = s.read_u8().await.map_err(io)? as usize;
            let mut name = vec![0u8; len];
            s.read_exact(&mut name).await.map_err(io)?;
            let mut port = [0u8; 2];
            s.read_exact(&mut port).await.map_err(io)?;
            let name = String::from_utf8(name).map_err(|_| {
                (
                    Some(Reply::AddressNotSupported),
                    anyhow!("hostname is not UTF-8"),
                )
            })?;
            let port = u16::from_be_bytes(port);
            let addr = tokio::net::lookup_host((name.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    (
                        Some(Reply::HostUnreachable),
                        anyhow!("cannot resolve {name}"),
                    )
                })?;
            return Ok(canonical(addr));
        }
        t => {
            return Err((
                Some(Reply::AddressNotSupported),
                anyhow!("address type {t} not supported"),
            ))
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await.map_err(io)?;
    Ok(canonical(SocketAddr::new(ip, u16::from_be_bytes(port))))
}
