//! Helpers for driving a mesh on the test bed: ztunnel's HTTP endpoints and
//! the iptables rules that capture a host pod's traffic the way Istio's
//! iptables mode does. Tests, the demo and the benchmarks share these.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::{ip_netns_exec, tcp_connect_in};

/// `SO_MARK` ztunnel puts on its own sockets; capture rules skip it.
pub const ZTUNNEL_MARK: &str = "0x539";

/// A minimal HTTP/1.0 GET to `addr` from inside `netns`: status and body.
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tcp_connect_in(netns, addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    parse_response(&raw).ok_or_else(|| anyhow!("bad HTTP response from {addr}{path}: {raw:.200}"))
}

/// Status code and body of a raw HTTP/1.x response.
pub fn parse_response(raw: &str) -> Option<(u16, String)> {
    let code = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map_or("", |x| x.1);
    Some((code, body.to_string()))
}

/// Sends `pod_ip`'s outbound TCP to ztunnel's 15001 on its node, except
/// ztunnel's own (marked) sockets.
pub fn capture_outbound(node_netns: &str, pod_ip: IpAddr) -> Result<()> {
    ip_netns_exec(
        node_netns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-s",
            &pod_ip.to_string(),
            "-m",
            "mark",
            "!",
            "--mark",
            ZTUNNEL_MARK,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    )
    .map(drop)
    .context("installing the outbound REDIRECT rule")
}

/// Sends TCP arriving for `pod_ip` to ztunnel's 15006 on its node, except
/// HBONE on 15008, which ztunnel serves itself.
pub fn capture_inbound(node_netns: &str, pod_ip: IpAddr) -> Result<()> {
    ip_netns_exec(
        node_netns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-d",
            &pod_ip.to_string(),
            "!",
            "--dport",
            "15008",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
    )
    .map(drop)
    .context("installing the inbound REDIRECT rule")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\nnot ready\n"),
            Some((503, "not ready\n".into()))
        );
        assert_eq!(parse_response("garbage"), None);
    }
}
