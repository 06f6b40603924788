//! TLS of the xDS/CA port, terminated here rather than by tonic so that
//! the cipher order is ours: AES-128-GCM first, then ring's defaults
//! (AES-256-GCM, ChaCha20-Poly1305) for clients that offer only those.
//!
//! A first sync encrypts the whole state once per client (100 clients:
//! hundreds of megabytes); AES-128 does 10 rounds per block where AES-256
//! does 14, on the server and on every client. The server's order wins
//! (`ignore_client_order`): rustls clients offer AES-256 first.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use rustls::{CipherSuite, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side: `cert_pem` (chain) and `key_pem`, ALPN `h2`.
pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let mut provider = rustls::crypto::ring::default_provider();
    // Stable: AES-128-GCM moves first, the rest keep their order.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the server certificate")?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("reading the server key")?
        .ok_or_else(|| anyhow!("no private key in the server key PEM"))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the server certificate and key")?;
    cfg.ignore_client_order = true;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepted connections, handshakes done (each on its own task, so a slow
/// client delays no other); a failed handshake is logged and dropped.
/// Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: pause, retry.
                    warn!(error = %e, "accepting an xDS/CA connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use ztunnel::identity::LocalCa;

    use super::*;

    /// A rustls client offers AES-256-GCM first; the server picks
    /// AES-128-GCM, and h2.
    #[tokio::test]
    async fn aes_128_wins_over_the_clients_order() {
        let ca = LocalCa::load_or_generate(None, None, "cluster.local").unwrap();
        let (cert, key) = ca
            .sign_server(&["localhost".into()], Duration::from_secs(3600))
            .unwrap();
        let server_cfg = server_config(&cert, &key).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = incoming(listener, server_cfg);

        let mut roots = RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.root_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut client_cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client_cfg.alpn_protocols = vec![b"h2".to_vec()];
        assert_eq!(
            client_cfg.crypto_provider().cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client's own preference"
        );
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, tcp), async {
            use futures::StreamExt;
            conns.next().await.unwrap().unwrap()
        });
        let mut client = client.unwrap();
        let mut server = server;
        let (_, conn) = server.get_ref();
        assert_eq!(
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn a_key_is_required() {
        let ca = LocalCa::load_or_generate(None, None, "cluster.local").unwrap();
        let (cert, _) = ca
            .sign_server(&["localhost".into()], Duration::from_secs(3600))
            .unwrap();
        let err = server_config(&cert, "").unwrap_err();
        assert!(err.to_string().contains("no private key"), "{err:#}");
    }
}
