//! What a Service port carries, by Istio's conventions: the port's
//! `appProtocol`, else its name's prefix (`<protocol>[-<suffix>]`). The
//! answer decides the waypoint filter chain: HTTP routing, opaque TCP
//! (L4 policy only), or, when nothing is declared, both, chosen by
//! sniffing the first bytes (Envoy's http_inspector, which the waypoint
//! implements).

use k8s_openapi::api::core::v1::ServicePort;

/// The `application_protocols` the waypoint sniffs HTTP as.
pub const SNIFFED_HTTP: [&str; 2] = ["http/1.1", "h2c"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1.1, HTTP/2 or gRPC: routed by the HTTP connection manager.
    Http,
    /// Anything else the waypoint passes through as opaque bytes
    /// (including TLS, which it cannot read).
    Tcp,
    /// Not declared (or not recognised): sniffed per connection.
    Detect,
    /// Not TCP at all (UDP, SCTP): the waypoint does not proxy it.
    NotTcp,
}

/// Istio's protocol names (`protocol.Parse`), case-insensitive.
fn parse(p: &str) -> PortProtocol {
    match p.to_ascii_lowercase().as_str() {
        "http" | "http2" | "grpc" | "grpc-web" | "http_proxy" | "h2c" | "kubernetes.io/h2c"
        | "kubernetes.io/ws" => PortProtocol::Http,
        "tcp" | "https" | "tls" | "kubernetes.io/wss" | "mongo" | "redis" | "mysql" => {
            PortProtocol::Tcp
        }
        "udp" => PortProtocol::NotTcp,
        _ => PortProtocol::Detect,
    }
}

/// The protocol a port declares: its `appProtocol`, else its name's
/// prefix.
fn declared(p: &ServicePort) -> Option<&str> {
    if let Some(a) = p.app_protocol.as_deref().filter(|a| !a.is_empty()) {
        return Some(a);
    }
    p.name
        .as_deref()
        .map(|n| n.split_once('-').map_or(n, |(prefix, _)| prefix))
}

pub fn port_protocol(p: &ServicePort) -> PortProtocol {
    if p.protocol
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("TCP"))
    {
        return PortProtocol::NotTcp;
    }
    declared(p).map_or(PortProtocol::Detect, parse)
}

/// Whether the port's server speaks HTTP/2 (cleartext, prior knowledge):
/// `http2`, `grpc`, `grpc-web`, `h2c`, `kubernetes.io/h2c`, as Istio's
/// `IsHTTP2`. Its cluster then tells the waypoint to speak HTTP/2 upstream
/// whatever the client spoke; other HTTP ports get the client's protocol.
pub fn upstream_http2(p: &ServicePort) -> bool {
    port_protocol(p) == PortProtocol::Http
        && declared(p).is_some_and(|d| {
            matches!(
                d.to_ascii_lowercase().as_str(),
                "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: Option<&str>, app: Option<&str>, proto: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            app_protocol: app.map(Into::into),
            protocol: proto.map(Into::into),
            port: 80,
            ..Default::default()
        }
    }

    #[test]
    fn app_protocol_then_name_prefix() {
        use PortProtocol::*;
        for (name, app, proto, want) in [
            (None, Some("tcp"), None, Tcp),
            (Some("http-web"), Some("tcp"), None, Tcp),
            (Some("tcp-db"), Some("HTTP"), None, Http),
            (None, Some("kubernetes.io/h2c"), None, Http),
            (None, Some("grpc"), None, Http),
            (Some("grpc-api"), None, None, Http),
            (Some("http2"), None, None, Http),
            (Some("http"), None, Some("TCP"), Http),
            (Some("tcp"), None, None, Tcp),
            (Some("redis-cache"), None, None, Tcp),
            (Some("mongo"), None, None, Tcp),
            (Some("https"), None, None, Tcp),
            (Some("web"), None, None, Detect),
            (None, None, None, Detect),
            (None, Some("example.com/custom"), None, Detect),
            (Some("dns"), None, Some("UDP"), NotTcp),
            (Some("tcp"), None, Some("SCTP"), NotTcp),
        ] {
            assert_eq!(
                port_protocol(&port(name, app, proto)),
                want,
                "{name:?} {app:?} {proto:?}"
            );
        }
    }

    #[test]
    fn http2_upstreams() {
        for (name, app, proto, want) in [
            (None, Some("grpc"), None, true),
            (None, Some("kubernetes.io/h2c"), None, true),
            (Some("http2-api"), None, None, true),
            (Some("grpc-web"), None, None, true),
            (Some("GRPC"), None, None, true),
            // appProtocol wins over the name.
            (Some("grpc"), Some("http"), None, false),
            (Some("http"), None, None, false),
            (Some("web"), None, None, false),
            (None, None, None, false),
            (Some("grpc"), None, Some("UDP"), false),
        ] {
            assert_eq!(
                upstream_http2(&port(name, app, proto)),
                want,
                "{name:?} {app:?} {proto:?}"
            );
        }
    }
}
