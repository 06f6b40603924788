//! The CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! A ztunnel asks on behalf of a workload on its node: the CSR's public key
//! is signed for the identity named in `metadata.ImpersonatedIdentity` (as
//! Istio's ztunnel sends it) or, failing that, the CSR's URI SAN. The
//! caller's token names its node, and the identity must be that of a pod in
//! the mesh, or of a gateway (waypoint) pod asking for its own, scheduled
//! on that node (from the current translation);
//! anything else is refused with `PERMISSION_DENIED` naming node and
//! identity. Signing itself is ztunnel's [`LocalCa::sign_csr`]: the CA, not
//! the CSR, decides what goes into the certificate.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{CertificateSigningRequestParams, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use ztunnel::identity::{Identity, LocalCa};

use crate::ads::Snapshot;
use crate::auth::{Auth, Caller};
use crate::metrics::Metrics;

pub struct CaService {
    pub ca: Arc<LocalCa>,
    pub auth: Auth,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub max_ttl: Duration,
    pub default_ttl: Duration,
}

fn requested_identity(req: &IstioCertificateRequest, csr_der: &[u8]) -> Result<String, Status> {
    if let Some(v) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("ImpersonatedIdentity"))
    {
        if let Some(prost_types::value::Kind::StringValue(s)) = &v.kind {
            return Ok(s.clone());
        }
        return Err(Status::invalid_argument(
            "metadata.ImpersonatedIdentity must be a string",
        ));
    }
    let der = CertificateSigningRequestDer::from(csr_der);
    let params = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| Status::invalid_argument(format!("csr: not a valid PKCS#10 request: {e}")))?;
    params
        .params
        .subject_alt_names
        .iter()
        .find_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .ok_or_else(|| {
            Status::invalid_argument(
                "no identity: set metadata.ImpersonatedIdentity or a URI SAN in the CSR",
            )
        })
}

impl CaService {
    #[allow(clippy::result_large_err)]
    fn create(
        &self,
        caller: Option<Caller>,
        req: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let pem = pem::parse(req.csr.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("csr: not PEM: {e}")))?;
        let id_str = requested_identity(&req, pem.contents())?;
        let identity = Identity::from_str(&id_str)
            .map_err(|e| Status::invalid_argument(format!("requested identity: {e}")))?;
        if let Some(own) = caller.as_ref().and_then(|c| c.identity.as_deref()) {
            // A workload (a waypoint) asks for itself only.
            if own != identity.to_string() {
                self.metrics.certs_denied.inc();
                warn!(caller = %own, %identity, "certificate refused: not the caller's own identity");
                return Err(Status::permission_denied(format!(
                    "{own} may only ask for its own certificate, not {identity}"
                )));
            }
        } else if let Some(node) = caller.as_ref().map(|c| &c.node) {
            let snap = self.snapshots.borrow().clone();
            let allowed = snap
                .resources
                .node_identities
                .get(node.as_str())
                .is_some_and(|ids| ids.contains(identity.to_string().as_str()));
            if !allowed {
                self.metrics.certs_denied.inc();
                warn!(%node, %identity, "certificate refused: no pod with that identity on the node");
                return Err(Status::permission_denied(format!(
                    "node {node:?} runs no pod in the mesh with identity {identity}"
                )));
            }
        }
        // Whatever was asked or defaulted, never past the maximum.
        let ttl = match req.validity_duration {
            d if d <= 0 => self.default_ttl,
            d => Duration::from_secs(d as u64),
        }
        .min(self.max_ttl);
        let leaf = self
            .ca
            .sign_csr(pem.contents(), &identity, ttl)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        self.metrics.certs_issued.inc();
        info!(node = ?caller.as_ref().map(|c| &c.node), %identity, ?ttl, "certificate issued");
        let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.to_vec()));
        Ok(IstioCertificateResponse {
            cert_chain: vec![leaf_pem, self.ca.root_pem().to_string()],
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.auth.authenticate(req.metadata()).await?;
        self.create(caller, req.into_inner()).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn csr_pem(identity: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_workload_caller_gets_its_own_identity_only() {
        let svc = CaService {
            ca: Arc::new(LocalCa::generate("cluster.local").unwrap()),
            auth: Auth::insecure(),
            snapshots: watch::channel(Arc::new(Snapshot::default())).1,
            metrics: Arc::new(Metrics::default()),
            max_ttl: Duration::from_secs(3600),
            default_ttl: Duration::from_secs(3600),
        };
        let wp = "spiffe://cluster.local/ns/demo/sa/wp";
        let caller = Caller {
            node: "node-a".into(),
            identity: Some(wp.into()),
        };
        let req = |id: &str| IstioCertificateRequest {
            csr: csr_pem(id),
            validity_duration: 60,
            metadata: None,
        };
        let ok = svc.create(Some(caller.clone()), req(wp)).unwrap();
        assert_eq!(ok.cert_chain.len(), 2);
        let other = "spiffe://cluster.local/ns/demo/sa/echo";
        let e = svc.create(Some(caller), req(other)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("its own"), "{}", e.message());
        // A node agent on a node with no such pod: refused too.
        let agent = Caller {
            node: "node-a".into(),
            identity: None,
        };
        let e = svc.create(Some(agent), req(wp)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    /// Seconds the issued leaf certificate is valid for.
    fn lifetime(resp: &IstioCertificateResponse) -> i64 {
        let der = pem::parse(&resp.cert_chain[0]).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        let v = cert.validity();
        v.not_after.timestamp() - v.not_before.timestamp()
    }

    #[test]
    fn the_lifetime_never_exceeds_the_maximum() {
        let max = 600;
        let svc = CaService {
            ca: Arc::new(LocalCa::generate("cluster.local").unwrap()),
            auth: Auth::insecure(),
            snapshots: watch::channel(Arc::new(Snapshot::default())).1,
            metrics: Arc::new(Metrics::default()),
            max_ttl: Duration::from_secs(max),
            // Configured above the maximum.
            default_ttl: Duration::from_secs(24 * 3600),
        };
        let id = "spiffe://cluster.local/ns/demo/sa/echo";
        for asked in [0, -5, 3600, 300] {
            let req = IstioCertificateRequest {
                csr: csr_pem(id),
                validity_duration: asked,
                metadata: None,
            };
            let got = lifetime(&svc.create(None, req).unwrap());
            let want = if asked == 300 { 300 } else { max as i64 };
            // The CA backdates not_before a minute for clock skew.
            assert!(
                (want..=want + 120).contains(&got),
                "asked {asked}s: got {got}s, want {want}s"
            );
        }
    }
}
