//! rustls configuration for HBONE, as Istio's ztunnel speaks it: TLS 1.3,
//! ALPN `h2`, client certificates required, and peers recognised by their
//! SPIFFE URI SAN rather than a hostname.
//!
//! The client accepts a server only if its chain leads to our roots *and*
//! its SAN is one of the identities expected for the destination. The
//! server accepts any client whose chain leads to our roots and whose SAN
//! is a SPIFFE identity in our trust domain; authorization decides the rest.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::Identity;

pub const ALPN_H2: &[u8] = b"h2";

/// ring's provider with AES-128-GCM first. Both ends of HBONE are usually
/// ours and the client's order decides, so this picks the suite. Bulk
/// HBONE spends about a quarter of ztunnel's CPU in AES-GCM, and AES-128
/// does 10 rounds per block instead of 14 (GHASH is the same): on the
/// bench machine (AES-NI, no VAES) it seals 16 KiB records about 9%
/// faster. AES-256-GCM and ChaCha20-Poly1305 stay offered, so peers that
/// prefer them (Istio's ztunnel, FIPS builds) still connect.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn root_store(roots: &[CertificateDer<'static>]) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).context("adding trust root")?;
    }
    Ok(store)
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| format!("bad certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or("certificate has no SAN")?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if uri.starts_with("spiffe://") {
                return uri.parse().map_err(|e| format!("{e}"));
            }
        }
    }
    Err("certificate has no SPIFFE URI SAN".into())
}

pub fn server_config(
    trust_domain: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &[CertificateDer<'static>],
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = provider();
    let webpki =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider.clone())
            .build()
            .context("building client verifier")?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        inner: webpki,
        trust_domain: trust_domain.to_string(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unsupported")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("server certificate")?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &[CertificateDer<'static>],
    expected: Vec<Identity>,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: roots.to_vec(),
        expected,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unsupported")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .context("client certificate")?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Each pooled connection is long-lived; resumption buys little and would
    // bypass the identity check on reconnect.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The server name passed to rustls. Verification ignores it (identities
/// are checked instead) but TLS needs one.
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_of(end_entity).map_err(TlsError::General)?;
        if id.trust_domain != self.trust_domain {
            return Err(TlsError::General(format!(
                "client identity {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Vec<CertificateDer<'static>>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let anchors = self
            .roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::General(format!("bad trust root: {e}")))?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            // Same issuer name but another key shows up as a bad signature.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                TlsError::General(format!(
                    "server certificate is not signed by a trusted root ({e:?})"
                ))
            }
            webpki::Error::CertExpired { .. } => {
                TlsError::InvalidCertificate(CertificateError::Expired)
            }
            other => TlsError::General(format!("server certificate rejected: {other:?}")),
        })?;
        let id = identity_of(end_entity).map_err(TlsError::General)?;
        if !self.expected.contains(&id) {
            return Err(TlsError::General(format!(
                "server identity {id} is not one of the expected {}",
                self.expected
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The verified SPIFFE identity of the peer of a finished handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> anyhow::Result<Identity> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("peer presented no certificate"))?;
    identity_of(leaf).map_err(|e| anyhow!(e))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::{CipherSuite, ClientConnection, ServerConnection};

    use super::*;
    use crate::identity::{LocalCa, SecretManager};

    /// Runs a handshake in memory; returns the suite both ends agreed on.
    fn handshake(
        mut client: ClientConnection,
        mut server: ServerConnection,
    ) -> Result<CipherSuite, TlsError> {
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("to a Vec");
            server.read_tls(&mut &buf[..]).expect("from a slice");
            server.process_new_packets()?;
            buf.clear();
            server.write_tls(&mut buf).expect("to a Vec");
            client.read_tls(&mut &buf[..]).expect("from a slice");
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                let c = client.negotiated_cipher_suite().expect("negotiated");
                let s = server.negotiated_cipher_suite().expect("negotiated");
                assert_eq!(c.suite(), s.suite());
                return Ok(c.suite());
            }
        }
        panic!("handshake did not finish");
    }

    #[tokio::test]
    async fn hbone_prefers_aes_128_and_still_accepts_peers_wanting_others() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let secrets = SecretManager::new(Arc::new(ca), Duration::from_secs(3600));
        let client_id = Identity::new("cluster.local", "default", "client");
        let server_id = Identity::new("cluster.local", "default", "server");
        let client_cert = secrets.fetch(&client_id).await.unwrap();
        let server_cert = secrets.fetch(&server_id).await.unwrap();
        let server = || ServerConnection::new(server_cert.server_config()).unwrap();
        let client = |cfg: rustls::ClientConfig| {
            ClientConnection::new(Arc::new(cfg), server_name([10, 0, 0, 1].into())).unwrap()
        };

        let ours = client_cert.client_config(vec![server_id.clone()]).unwrap();
        assert_eq!(
            handshake(client(ours), server()).unwrap(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );

        // A peer that only offers one of the others (Istio's ztunnel lists
        // AES-256 first; some builds offer only ChaCha20) still gets in.
        for only in [
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let ours = client_cert.client_config(vec![server_id.clone()]).unwrap();
            let mut p = (*provider()).clone();
            p.cipher_suites = vec![only];
            let p = Arc::new(p);
            let verifier = Arc::new(SpiffeServerVerifier {
                roots: client_cert.roots.clone(),
                expected: vec![server_id.clone()],
                provider: p.clone(),
            });
            let mut restricted = rustls::ClientConfig::builder_with_provider(p)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(ours.client_auth_cert_resolver.clone());
            restricted.alpn_protocols = ours.alpn_protocols.clone();
            assert_eq!(
                handshake(client(restricted), server()).unwrap(),
                only.suite()
            );
        }
    }
}
