//! Holds the certificate of every identity ztunnel serves and keeps each one
//! fresh.
//!
//! Each identity has a slot with a background task: it fetches a
//! certificate, publishes it on a watch channel, sleeps until half of the
//! certificate's life has passed, and renews. A failed renewal is retried
//! with backoff while the previous certificate stays in use, so a CA outage
//! shorter than half a TTL is invisible to traffic.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::ca::validity;
use super::{CaClient, CertificateRequest, Identity};
use crate::tls;

/// A key and certificate chain for one identity, with the TLS server
/// configuration built from it once.
pub struct WorkloadCertificate {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When we received it; CAs backdate `not_before` for clock skew, so
    /// half-life is counted from here.
    issued_at: SystemTime,
    key: PrivateKeyDer<'static>,
    server_config: Arc<rustls::ServerConfig>,
}

impl WorkloadCertificate {
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<Self> {
        let leaf = chain
            .first()
            .ok_or_else(|| anyhow!("empty certificate chain for {identity}"))?;
        let (not_before, not_after) = validity(leaf)?;
        let server_config = Arc::new(tls::server_config(
            &identity.trust_domain,
            chain.clone(),
            key.clone_key(),
            &roots,
        )?);
        Ok(WorkloadCertificate {
            identity,
            chain,
            roots,
            not_before,
            not_after,
            issued_at: SystemTime::now(),
            key,
            server_config,
        })
    }

    /// Server side of HBONE: presents this identity, requires a client
    /// certificate from the trust domain.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// Client side of HBONE: presents this identity and accepts only a peer
    /// holding one of `expected`.
    pub fn client_config(&self, expected: Vec<Identity>) -> anyhow::Result<rustls::ClientConfig> {
        tls::client_config(
            self.chain.clone(),
            self.key.clone_key(),
            &self.roots,
            expected,
        )
    }

    fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

/// What `/config_dump` shows of a certificate slot.
#[derive(Serialize, Clone, Debug)]
pub struct CertificateInfo {
    pub identity: String,
    pub state: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub serial: Option<String>,
    pub last_error: Option<String>,
}

struct Slot {
    cert: watch::Receiver<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct SecretManager {
    ca: Arc<dyn CaClient>,
    ttl: Duration,
    slots: Mutex<HashMap<Identity, Slot>>,
}

/// How long a caller waits for a first certificate before giving up.
const FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl SecretManager {
    pub fn new(ca: Arc<dyn CaClient>, ttl: Duration) -> Arc<Self> {
        Arc::new(SecretManager {
            ca,
            ttl,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The current certificate for `id`, fetching it first if needed.
    pub async fn fetch(&self, id: &Identity) -> anyhow::Result<Arc<WorkloadCertificate>> {
        let (mut rx, last_error) = {
            let mut slots = self.slots.lock().expect("slots lock");
            let slot = slots
                .entry(id.clone())
                .or_insert_with(|| self.start_slot(id.clone()));
            (slot.cert.clone(), slot.last_error.clone())
        };
        if let Some(cert) = rx.borrow().clone() {
            return Ok(cert);
        }
        let waited = tokio::time::timeout(FIRST_FETCH_TIMEOUT, rx.wait_for(|c| c.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|c| c.clone()));
        match waited {
            Some(cert) => Ok(cert),
            None => {
                let why = last_error
                    .lock()
                    .expect("error lock")
                    .clone()
                    .unwrap_or_else(|| "timed out".into());
                Err(anyhow!("no certificate for {id}: {why}"))
            }
        }
    }

    /// Keeps certificates for exactly `wanted`: starts fetching new ones
    /// ahead of traffic and forgets identities no longer on this node.
    pub fn retain(&self, wanted: &HashSet<Identity>) {
        let mut slots = self.slots.lock().expect("slots lock");
        slots.retain(|id, _| wanted.contains(id));
        for id in wanted {
            if !slots.contains_key(id) {
                let slot = self.start_slot(id.clone());
                slots.insert(id.clone(), slot);
            }
        }
    }

    pub fn dump(&self) -> Vec<CertificateInfo> {
        let slots = self.slots.lock().expect("slots lock");
        let mut out: Vec<CertificateInfo> = slots
            .iter()
            .map(|(id, slot)| {
                let cert = slot.cert.borrow().clone();
                let last_error = slot.last_error.lock().expect("error lock").clone();
                CertificateInfo {
                    identity: id.to_string(),
                    state: if cert.is_some() {
                        "Available".into()
                    } else {
                        "Initializing".into()
                    },
                    not_before: cert.as_ref().map(|c| rfc3339(c.not_before)),
                    not_after: cert.as_ref().map(|c| rfc3339(c.not_after)),
                    serial: cert.as_ref().and_then(|c| serial(&c.chain[0])),
                    last_error,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn start_slot(&self, id: Identity) -> Slot {
        let (tx, rx) = watch::channel(None);
        let last_error = Arc::new(Mutex::new(None));
        let task = tokio::spawn(refresh_loop(
            self.ca.clone(),
            self.ttl,
            id,
            tx,
            last_error.clone(),
        ))
        .abort_handle();
        Slot {
            cert: rx,
            last_error,
            task,
        }
    }
}

async fn refresh_loop(
    ca: Arc<dyn CaClient>,
    ttl: Duration,
    id: Identity,
    tx: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match issue(ca.as_ref(), &id, ttl).await {
            Ok(cert) => {
                info!(identity = %id, not_after = %rfc3339(cert.not_after), "certificate issued");
                backoff = Duration::from_millis(100);
                *last_error.lock().expect("error lock") = None;
                let wait = cert
                    .refresh_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tx.send_replace(Some(Arc::new(cert)));
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                warn!(identity = %id, error = %msg, retry_in = ?backoff, "certificate fetch failed; keeping the previous certificate");
                *last_error.lock().expect("error lock") = Some(msg);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn issue(
    ca: &dyn CaClient,
    id: &Identity,
    ttl: Duration,
) -> anyhow::Result<WorkloadCertificate> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e| anyhow!("identity is not a valid URI: {e}"))?,
    )];
    let csr = params.serialize_request(&key)?;
    let issued = ca
        .sign(CertificateRequest {
            identity: id.clone(),
            csr_der: csr.der().to_vec(),
            ttl,
        })
        .await
        .context("CA refused or failed")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    WorkloadCertificate::new(id.clone(), issued.chain, issued.roots, key)
}

fn rfc3339(t: SystemTime) -> String {
    let t: time::OffsetDateTime = t.into();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn serial(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.raw_serial_as_string())
}
