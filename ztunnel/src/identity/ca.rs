//! Certificate authorities, seen from ztunnel: something that turns a CSR
//! for an identity into a certificate chain.
//!
//! The request carries a CSR rather than asking the CA for a key so that
//! private keys never leave the node, exactly as with Istio's CSR API. The
//! CA, not the CSR, decides what identity goes into the certificate.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use super::Identity;

/// What ztunnel asks a CA for.
pub struct CertificateRequest {
    pub identity: Identity,
    /// PKCS#10, DER.
    pub csr_der: Vec<u8>,
    pub ttl: Duration,
}

/// What a CA answers: the chain (leaf first, root excluded) and the roots
/// peers' certificates are checked against.
pub struct IssuedCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// The interface the local CA implements today and the control plane's CSR
/// client will implement.
pub trait CaClient: Send + Sync + 'static {
    fn sign(&self, req: CertificateRequest) -> BoxFuture<'_, anyhow::Result<IssuedCertificate>>;
}

/// An in-process CA holding a root key. Used by ztunnel until the control
/// plane's CA is configured, and by tests.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
    key_pem: String,
}

impl LocalCa {
    /// A fresh self-signed root.
    pub fn generate(trust_domain: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ambient mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Self::from_pem(&root_pem, &key_pem)
    }

    /// A root from PEM text (certificate and PKCS#8 key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing CA key")?;
        let root_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| anyhow!("no certificate in CA certificate PEM"))?
            .context("parsing CA certificate PEM")?;
        let issuer =
            Issuer::from_ca_cert_der(&root_der, key).context("CA certificate cannot sign")?;
        Ok(LocalCa {
            issuer,
            root_der,
            root_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// Root from files when both exist; otherwise generated (and written
    /// there when paths are given, so a restart keeps the same root).
    pub fn load_or_generate(
        cert: Option<&Path>,
        key: Option<&Path>,
        trust_domain: &str,
    ) -> anyhow::Result<Self> {
        match (cert, key) {
            (Some(c), Some(k)) if c.exists() && k.exists() => {
                let cert_pem = std::fs::read_to_string(c)
                    .with_context(|| format!("reading CA certificate {}", c.display()))?;
                let key_pem = std::fs::read_to_string(k)
                    .with_context(|| format!("reading CA key {}", k.display()))?;
                Self::from_pem(&cert_pem, &key_pem)
                    .with_context(|| format!("loading CA from {} and {}", c.display(), k.display()))
            }
            (Some(c), Some(k)) => {
                let ca = Self::generate(trust_domain)?;
                ca.write(c, k)?;
                Ok(ca)
            }
            (None, None) => Self::generate(trust_domain),
            _ => Err(anyhow!(
                "the CA needs both a certificate and a key file, or neither"
            )),
        }
    }

    pub fn write(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        std::fs::write(cert, &self.root_pem)
            .with_context(|| format!("writing {}", cert.display()))?;
        std::fs::write(key, &self.key_pem).with_context(|| format!("writing {}", key.display()))?;
        Ok(())
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Signs a CSR for `identity`. Everything the CSR asks for besides its
    /// public key is ignored: the identity comes from the caller, who has
    /// checked that the requester may have it.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        ttl: Duration,
    ) -> anyhow::Result<CertificateDer<'static>> {
        let csr_der = CertificateSigningRequestDer::from(csr_der);
        let csr = CertificateSigningRequestParams::from_der(&csr_der)
            .map_err(|e| anyhow!("invalid CSR: {e}"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|e| anyhow!("identity is not a valid URI: {e}"))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        // Allow for clock skew between nodes.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        let mut serial = [0u8; 16];
        fastrand::fill(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| anyhow!("signing certificate for {identity}: {e}"))?;
        Ok(cert.der().clone())
    }
    /// A TLS server certificate for the control plane itself, with DNS
    /// names or IP addresses as SANs. Returns the chain (leaf, root) and the
    /// key, both PEM.
    pub fn sign_server(&self, names: &[String], ttl: Duration) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| anyhow!("server certificate names {names:?}: {e}"))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| anyhow!("signing server certificate: {e}"))?;
        Ok((
            format!("{}{}", cert.pem(), self.root_pem),
            key.serialize_pem(),
        ))
    }
}

impl CaClient for LocalCa {
    fn sign(&self, req: CertificateRequest) -> BoxFuture<'_, anyhow::Result<IssuedCertificate>> {
        Box::pin(async move {
            let leaf = self.sign_csr(&req.csr_der, &req.identity, req.ttl)?;
            Ok(IssuedCertificate {
                chain: vec![leaf],
                roots: vec![self.root_der.clone()],
            })
        })
    }
}

/// Expiry of a DER certificate, for rotation and `/config_dump`.
pub(crate) fn validity(cert: &CertificateDer<'_>) -> anyhow::Result<(SystemTime, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| anyhow!("unparseable certificate: {e}"))?;
    let v = parsed.validity();
    let to_system = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((to_system(v.not_before), to_system(v.not_after)))
}
