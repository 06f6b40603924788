//! Workload identity: SPIFFE IDs, the certificates that prove them, and
//! where those certificates come from.
//!
//! ztunnel holds one key and certificate per identity that has a workload on
//! its node (never for identities elsewhere). [`SecretManager`] fetches them
//! through a [`CaClient`] (today the in-process [`LocalCa`]; the control
//! plane's CSR client plugs in through the same trait), renews them at half
//! life, and keeps serving the old certificate while a renewal fails.

mod ca;
mod manager;
mod spiffe;

pub use ca::{CaClient, CertificateRequest, IssuedCertificate, LocalCa};
pub use manager::{CertificateInfo, SecretManager, WorkloadCertificate};
pub use spiffe::{Identity, IdentityError};
