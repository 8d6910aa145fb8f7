//! The one error type of the CA module.

use std::io;
use std::path::PathBuf;

use tessera_spiffe::bundle::BundleError;
use tessera_spiffe::jwt::JwtSignError;
use tessera_spiffe::keys::KeyError;
use tessera_spiffe::x509::X509SvidError;
use tessera_spiffe::{SpiffeId, TrustDomain};

use crate::datastore::DataStoreError;

/// What the operator can do about a damaged CA directory, appended to every such error.
fn remedy(ca_dir: &std::path::Path) -> String {
    format!("restore it from a backup or move {} away to create a new CA", ca_dir.display())
}

/// Why the CA could not be loaded, created or used.
///
/// Errors about the CA directory name the file at fault and say what to do; the CA never
/// replaces an existing CA it cannot read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "create directory"...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A CA file exists but cannot be used.
    #[error("{what} {} is corrupt: {reason}; {}", path.display(), remedy(ca_dir))]
    Corrupt {
        /// Which file ("ca key file", "ca certificate file", "ca journal file"...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
        /// The CA directory.
        ca_dir: PathBuf,
    },
    /// A CA file is missing while the CA directory holds other CA files.
    #[error("{what} {} is missing but {} holds other CA files; {}", path.display(), ca_dir.display(), remedy(ca_dir))]
    Missing {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The CA directory.
        ca_dir: PathBuf,
    },
    /// A CA key does not belong to its certificate (or to the key ID recorded for it).
    #[error("{} does not match {}: {reason}; {}", key_path.display(), other_path.display(), remedy(ca_dir))]
    Mismatch {
        /// The key file.
        key_path: PathBuf,
        /// The certificate or journal file it was checked against.
        other_path: PathBuf,
        /// What does not match.
        reason: String,
        /// The CA directory.
        ca_dir: PathBuf,
    },
    /// The CA on disk belongs to another trust domain than the configured one.
    #[error(
        "ca certificate file {} is for trust domain {found} but trust_domain is {configured}; fix trust_domain or move {} away to create a new trust domain",
        path.display(),
        ca_dir.display()
    )]
    TrustDomainChanged {
        /// The certificate file.
        path: PathBuf,
        /// The trust domain in the certificate.
        found: String,
        /// The configured trust domain.
        configured: TrustDomain,
        /// The CA directory.
        ca_dir: PathBuf,
    },
    /// An `[upstream_authority]` file cannot be used.
    #[error("upstream_authority file {}: {reason}", path.display())]
    Upstream {
        /// The file (`cert_file`, `key_file` or `bundle_file`).
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key could not be generated or loaded.
    #[error("cannot create a {what}: {source}")]
    KeyGeneration {
        /// Which key.
        what: &'static str,
        /// The key error.
        #[source]
        source: KeyError,
    },
    /// A CA certificate could not be created.
    #[error("cannot create the CA certificate: {0}")]
    CaCertificate(#[source] X509SvidError),
    /// A workload SVID was asked for in the reserved namespace of the server and agents.
    #[error(
        "spiffe id {spiffe_id} is in the reserved /tessera namespace (the server's and agents' own identities); workload SVIDs cannot use it"
    )]
    ReservedId {
        /// The refused ID.
        spiffe_id: SpiffeId,
    },
    /// The SPIFFE ID to sign is not in this CA's trust domain.
    #[error("spiffe id {spiffe_id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The refused ID.
        spiffe_id: SpiffeId,
        /// The CA's trust domain.
        trust_domain: TrustDomain,
    },
    /// An X.509-SVID could not be signed (bad CSR, unsupported key, expired CA...).
    #[error("cannot sign X.509-SVID for {spiffe_id}: {source}")]
    X509Svid {
        /// The requested ID.
        spiffe_id: SpiffeId,
        /// Why.
        #[source]
        source: X509SvidError,
    },
    /// A JWT-SVID could not be signed.
    #[error("cannot sign JWT-SVID for {spiffe_id}: {source}")]
    JwtSvid {
        /// The requested ID.
        spiffe_id: SpiffeId,
        /// Why.
        #[source]
        source: JwtSignError,
    },
    /// The JWT signing key has expired (rotation has not replaced it).
    #[error("the JWT signing key {key_id} has expired")]
    JwtKeyExpired {
        /// Its key ID.
        key_id: String,
    },
    /// The trust bundle could not be built or decoded.
    #[error("trust bundle: {0}")]
    Bundle(#[from] BundleError),
    /// The datastore failed while reading or writing the trust bundle.
    #[error("datastore: {0}")]
    DataStore(#[from] DataStoreError),
    /// A forced-rotation command names an authority that does not exist.
    #[error("no {kind} authority with id {authority_id}")]
    AuthorityNotFound {
        /// "x509" or "jwt".
        kind: &'static str,
        /// The ID given.
        authority_id: String,
    },
    /// A forced-rotation command does not apply to the authority in its state.
    #[error("{reason}")]
    AuthorityState {
        /// Why, naming the authority and its state.
        reason: String,
    },
    /// The signing self-check failed.
    #[error("CA self-check failed: {0}")]
    SelfCheck(String),
}
