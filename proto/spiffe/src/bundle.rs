//! SPIFFE trust bundles: the X.509 and JWT authorities of one trust domain.
//!
//! A [`Bundle`] is always stored with the trust domain it belongs to (a bundle document does
//! not name its own trust domain). It converts to and from:
//!
//! - the SPIFFE bundle JSON of the bundle endpoint ([`Bundle::to_json`], [`Bundle::from_json`]),
//! - the standard JWKS of the Workload API's `JWTBundlesResponse` ([`Bundle::to_jwt_jwks`],
//!   [`Bundle::from_jwt_jwks`]),
//! - PEM `CERTIFICATE` blocks and concatenated DER for the X.509 authorities (SDS, the Workload
//!   API's byte fields, operator-supplied bootstrap bundles),
//! - the multi-trust-domain bundle map ([`encode_bundle_map`], [`decode_bundle_map`]).
//!
//! A [`BundleSet`] holds the own trust domain's bundle plus federated ones and is what
//! validators consult: it implements [`JwtAuthorities`] and [`X509Authorities`](crate::x509::X509Authorities), always
//! choosing the bundle of the credential's own trust domain.
//!
//! Size caps on untrusted input, all checked before parsing: one bundle document
//! [`MAX_BUNDLE_JSON_LEN`] (1 MiB, about 1,000 RSA CA certificates), a bundle map
//! [`MAX_BUNDLE_MAP_JSON_LEN`] (8 MiB, twice gRPC's default message cap), PEM or DER authority
//! lists [`MAX_X509_AUTHORITIES_LEN`] (1 MiB).

mod certificates;
mod json;
mod x509_authorities;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::jwt::{JwtAuthorities, MissingJwtAuthority};
use crate::keys::{KeyError, PublicKey};
use crate::spiffe_id::TrustDomain;

pub use certificates::{encode_pem_certificates, parse_pem_certificates, split_der_certificates};
pub use json::{decode_bundle_map, encode_bundle_map};

/// Largest SPIFFE bundle or JWKS document accepted, in bytes (1 MiB).
pub const MAX_BUNDLE_JSON_LEN: usize = 1024 * 1024;

/// Largest bundle map document accepted, in bytes (8 MiB).
pub const MAX_BUNDLE_MAP_JSON_LEN: usize = 8 * 1024 * 1024;

/// Largest PEM or concatenated-DER list of X.509 authorities accepted, in bytes (1 MiB).
pub const MAX_X509_AUTHORITIES_LEN: usize = 1024 * 1024;

/// Why a bundle could not be decoded or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The input exceeds its size cap.
    #[error("bundle input is larger than {max} bytes")]
    TooLarge {
        /// The cap that was exceeded.
        max: usize,
    },
    /// The document is not valid JSON of the expected shape (including a repeated member).
    #[error("invalid bundle JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The top-level `keys` member is missing.
    #[error("no authorities found")]
    MissingKeys,
    /// `spiffe_sequence` is not a non-negative integer.
    #[error("spiffe_sequence must be a non-negative integer")]
    InvalidSequence,
    /// `spiffe_refresh_hint` is not an integer number of seconds.
    #[error("spiffe_refresh_hint must be an integer number of seconds")]
    InvalidRefreshHint,
    /// An `x509-svid` entry's `x5c` does not hold exactly one certificate.
    #[error("expected a single certificate in x509-svid entry {index}; got {count}")]
    X5cCount {
        /// Index of the entry in `keys`.
        index: usize,
        /// Number of certificates found.
        count: usize,
    },
    /// An `x509-svid` entry's certificate key differs from its JWK parameters.
    #[error("x509-svid entry {index}: certificate public key does not match the key parameters")]
    CertificateKeyMismatch {
        /// Index of the entry in `keys`.
        index: usize,
    },
    /// A JWT authority entry has no (or an empty) `kid`.
    #[error("jwt-svid entry {index}: keyID cannot be empty")]
    MissingKeyId {
        /// Index of the entry in `keys`.
        index: usize,
    },
    /// Two JWT authorities share a `kid` (or one is added again with a different key).
    #[error("duplicate JWT authority key id {0:?}")]
    DuplicateKeyId(String),
    /// An entry of a known `use` and `kty` is malformed.
    #[error("invalid key entry {index}: {reason}")]
    InvalidEntry {
        /// Index of the entry in `keys`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A certificate could not be parsed, or has trailing bytes.
    #[error("invalid X.509 authority certificate: {0}")]
    InvalidCertificate(String),
    /// A certificate's key is not of a supported family (EC P-256/P-384/P-521, RSA).
    #[error("unsupported X.509 authority key")]
    UnsupportedCertificateKey(#[source] KeyError),
    /// The PEM document could not be parsed.
    #[error("invalid PEM: {0}")]
    Pem(#[source] pem::PemError),
    /// A PEM block other than `CERTIFICATE`.
    #[error("unexpected PEM block {0:?}; only CERTIFICATE blocks are allowed")]
    UnexpectedPemBlock(String),
    /// Concatenated DER is not a sequence of well-formed DER SEQUENCEs.
    #[error("invalid DER certificate list at byte {offset}: {reason}")]
    DerFraming {
        /// Byte offset of the offending element.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A bundle map has no `trust_domains` member.
    #[error("bundle map has no trust_domains member")]
    MissingTrustDomains,
    /// A bundle map key is not a bare, valid trust domain name.
    #[error("invalid trust domain {0:?} in bundle map")]
    InvalidTrustDomain(String),
    /// A bundle map names a trust domain twice.
    #[error("duplicate trust domain {0:?} in bundle map")]
    DuplicateTrustDomain(String),
    /// A bundle inside a bundle map is invalid.
    #[error("bundle of trust domain {trust_domain:?}: {source}")]
    InMap {
        /// The map key.
        trust_domain: String,
        /// What is wrong with its bundle.
        source: Box<BundleError>,
    },
    /// A bundle was put into the wrong slot of a [`BundleSet`].
    #[error("bundle of trust domain {actual:?} where {expected} was required")]
    WrongTrustDomain {
        /// What the slot requires (a trust domain name, or "a federated trust domain").
        expected: String,
        /// The bundle's trust domain.
        actual: String,
    },
}

/// The X.509 and JWT authorities of one trust domain.
///
/// Built empty by [`Bundle::new`] or decoded by the `from_*` functions; every certificate in
/// it parsed as X.509 with a supported key, and every JWT authority has a unique, non-empty
/// key ID. X.509 authorities keep their insertion order (the order of the encodings);
/// JWT authorities are ordered by key ID so encodings are deterministic.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<X509Authority>,
    jwt_authorities: BTreeMap<String, PublicKey>,
    sequence: u64,
    refresh_hint: Option<Duration>,
}

/// A CA certificate with its parsed public key (needed for the JWK parameters of its entry).
#[derive(Clone, PartialEq, Eq)]
struct X509Authority {
    der: Vec<u8>,
    public_key: PublicKey,
}

/// The own trust domain's bundle plus the federated ones, keyed by trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSet {
    own: Bundle,
    federated: BTreeMap<TrustDomain, Bundle>,
}

impl X509Authority {
    fn parse(der: &[u8]) -> Result<Self, BundleError> {
        let (rest, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| BundleError::InvalidCertificate(error.to_string()))?;
        if !rest.is_empty() {
            return Err(BundleError::InvalidCertificate("trailing bytes after the certificate".to_owned()));
        }
        let public_key =
            PublicKey::from_spki_der(certificate.public_key().raw).map_err(BundleError::UnsupportedCertificateKey)?;
        Ok(X509Authority { der: der.to_vec(), public_key })
    }
}

impl Bundle {
    /// An empty bundle (no authorities: trusts nothing) with sequence 0 and no refresh hint.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Bundle {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// A bundle whose X.509 authorities are the `CERTIFICATE` blocks of a PEM document.
    pub fn from_x509_authorities_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let mut bundle = Bundle::new(trust_domain);
        for der in parse_pem_certificates(pem)? {
            bundle.add_x509_authority(&der)?;
        }
        Ok(bundle)
    }

    /// A bundle whose X.509 authorities are the concatenated DER certificates of `der`
    /// (the Workload API's `bundle` / `federated_bundles` values).
    pub fn from_x509_authorities_der(trust_domain: TrustDomain, der: &[u8]) -> Result<Self, BundleError> {
        let mut bundle = Bundle::new(trust_domain);
        for certificate in split_der_certificates(der)? {
            bundle.add_x509_authority(certificate)?;
        }
        Ok(bundle)
    }

    /// The trust domain this bundle belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 authorities (DER CA certificates), in insertion order.
    pub fn x509_authorities(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.x509_authorities.iter().map(|authority| authority.der.as_slice())
    }

    /// The X.509 authorities as consecutive PEM `CERTIFICATE` blocks.
    pub fn x509_authorities_pem(&self) -> String {
        encode_pem_certificates(self.x509_authorities())
    }

    /// The X.509 authorities as concatenated DER.
    pub fn x509_authorities_der(&self) -> Vec<u8> {
        self.x509_authorities().flatten().copied().collect()
    }

    /// Adds a DER CA certificate. Returns `false` (and changes nothing) if the identical
    /// certificate is already present.
    ///
    /// The certificate must parse as X.509 with nothing after it and carry a supported key
    /// (its JWK parameters are part of the bundle's JSON form). CA flags are not checked here:
    /// they are the X.509-SVID validator's business.
    pub fn add_x509_authority(&mut self, der: &[u8]) -> Result<bool, BundleError> {
        if self.has_x509_authority(der) {
            return Ok(false);
        }
        let authority = X509Authority::parse(der)?;
        self.x509_authorities.push(authority);
        Ok(true)
    }

    /// Removes a DER CA certificate; `false` if it was not present.
    pub fn remove_x509_authority(&mut self, der: &[u8]) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|authority| authority.der.as_slice() != der);
        self.x509_authorities.len() != before
    }

    /// Whether the identical DER certificate is an X.509 authority of this bundle.
    pub fn has_x509_authority(&self, der: &[u8]) -> bool {
        self.x509_authorities.iter().any(|authority| authority.der.as_slice() == der)
    }

    /// The JWT authorities by key ID.
    pub fn jwt_authorities(&self) -> &BTreeMap<String, PublicKey> {
        &self.jwt_authorities
    }

    /// The JWT authority with `key_id`, if any.
    pub fn jwt_authority_by_key_id(&self, key_id: &str) -> Option<&PublicKey> {
        self.jwt_authorities.get(key_id)
    }

    /// Adds a JWT authority under `key_id`.
    ///
    /// Adding the same key under the same ID again is a no-op; an empty ID, or an ID already
    /// used by a different key, is an error (spec: `kid` MUST be set and unique).
    pub fn add_jwt_authority(&mut self, key_id: impl Into<String>, key: PublicKey) -> Result<(), BundleError> {
        let key_id = key_id.into();
        if key_id.is_empty() {
            return Err(BundleError::MissingKeyId { index: self.jwt_authorities.len() });
        }
        match self.jwt_authorities.get(&key_id) {
            Some(existing) if *existing == key => Ok(()),
            Some(_) => Err(BundleError::DuplicateKeyId(key_id)),
            None => {
                self.jwt_authorities.insert(key_id, key);
                Ok(())
            }
        }
    }

    /// Removes the JWT authority with `key_id`, returning its key.
    pub fn remove_jwt_authority(&mut self, key_id: &str) -> Option<PublicKey> {
        self.jwt_authorities.remove(key_id)
    }

    /// Whether the bundle has no authorities at all (every SVID of the trust domain is then
    /// untrusted).
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_authorities.is_empty()
    }

    /// The `spiffe_sequence` (0 when unset).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Sets the `spiffe_sequence`. spec: it MUST change whenever the bundle's contents change;
    /// the publisher (the server) is responsible for bumping it.
    pub fn set_sequence(&mut self, sequence: u64) {
        self.sequence = sequence;
    }

    /// The `spiffe_refresh_hint`, if any.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// Sets the `spiffe_refresh_hint` (encoded as whole seconds, rounded up; `None` or zero
    /// omits it).
    pub fn set_refresh_hint(&mut self, refresh_hint: Option<Duration>) {
        self.refresh_hint = refresh_hint;
    }

    /// Adds an already parsed authority unless an identical one is present.
    fn push_x509_authority(&mut self, authority: X509Authority) {
        if !self.has_x509_authority(&authority.der) {
            self.x509_authorities.push(authority);
        }
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("trust_domain", &self.trust_domain)
            .field("x509_authorities", &self.x509_authorities.len())
            .field("jwt_authorities", &self.jwt_authorities.keys().collect::<Vec<_>>())
            .field("sequence", &self.sequence)
            .field("refresh_hint", &self.refresh_hint)
            .finish()
    }
}

impl JwtAuthorities for Bundle {
    /// The bundle answers only for its own trust domain.
    fn jwt_authority(&self, trust_domain: &TrustDomain, key_id: &str) -> Result<&PublicKey, MissingJwtAuthority> {
        if *trust_domain != self.trust_domain {
            return Err(MissingJwtAuthority::NoBundle);
        }
        self.jwt_authorities.get(key_id).ok_or(MissingJwtAuthority::UnknownKeyId)
    }
}

impl BundleSet {
    /// A set holding only the own trust domain's bundle.
    pub fn new(own: Bundle) -> Self {
        BundleSet { own, federated: BTreeMap::new() }
    }

    /// The own trust domain.
    pub fn own_trust_domain(&self) -> &TrustDomain {
        &self.own.trust_domain
    }

    /// The own trust domain's bundle.
    pub fn own(&self) -> &Bundle {
        &self.own
    }

    /// Replaces the own trust domain's bundle, returning the previous one. The new bundle must
    /// be of the same trust domain.
    pub fn replace_own(&mut self, bundle: Bundle) -> Result<Bundle, BundleError> {
        if bundle.trust_domain != self.own.trust_domain {
            return Err(BundleError::WrongTrustDomain {
                expected: self.own.trust_domain.name().to_owned(),
                actual: bundle.trust_domain.name().to_owned(),
            });
        }
        Ok(std::mem::replace(&mut self.own, bundle))
    }

    /// Inserts or replaces a federated bundle, returning the previous one of that trust domain.
    /// A bundle of the own trust domain is refused (use [`BundleSet::replace_own`]).
    pub fn insert_federated(&mut self, bundle: Bundle) -> Result<Option<Bundle>, BundleError> {
        if bundle.trust_domain == self.own.trust_domain {
            return Err(BundleError::WrongTrustDomain {
                expected: "a federated trust domain".to_owned(),
                actual: bundle.trust_domain.name().to_owned(),
            });
        }
        Ok(self.federated.insert(bundle.trust_domain.clone(), bundle))
    }

    /// Removes a federated bundle (ending a federation relationship).
    pub fn remove_federated(&mut self, trust_domain: &TrustDomain) -> Option<Bundle> {
        self.federated.remove(trust_domain)
    }

    /// The federated bundles, sorted by trust domain.
    pub fn federated(&self) -> impl ExactSizeIterator<Item = &Bundle> + '_ {
        self.federated.values()
    }

    /// The bundle of `trust_domain` (own or federated).
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&Bundle> {
        if *trust_domain == self.own.trust_domain { Some(&self.own) } else { self.federated.get(trust_domain) }
    }

    /// All bundles: the own one first, then the federated ones sorted by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> + '_ {
        std::iter::once(&self.own).chain(self.federated.values())
    }

    /// Number of bundles (always at least 1).
    pub fn len(&self) -> usize {
        1 + self.federated.len()
    }

    /// Always `false`: a set holds at least the own bundle.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl JwtAuthorities for BundleSet {
    /// Looks only in the bundle of `trust_domain`; never in another trust domain's bundle.
    fn jwt_authority(&self, trust_domain: &TrustDomain, key_id: &str) -> Result<&PublicKey, MissingJwtAuthority> {
        self.get(trust_domain).ok_or(MissingJwtAuthority::NoBundle)?.jwt_authority(trust_domain, key_id)
    }
}
