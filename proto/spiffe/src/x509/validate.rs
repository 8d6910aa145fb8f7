//! X.509-SVID validation (conformance §2.3) and the client-side parse of a Workload API SVID.
//!
//! Path validation is done here rather than by a general-purpose verifier because SPIFFE
//! needs two things such verifiers do not offer: the trust anchors are chosen by the trust
//! domain of the leaf's SPIFFE ID (never a pooled root store), and the leaf's identity is a URI
//! SAN rather than a DNS name. The checks are those of RFC 5280 that matter for SPIFFE:
//! signatures, validity at `now`, CA flag and keyCertSign on every issuer, pathLen, issuer /
//! subject name chaining, URI and DNS name constraints, and refusal of unknown critical
//! extensions. Revocation and certificate policies are out of scope, as in SPIFFE itself.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::time::SystemTime;

use ring::rand::SecureRandom;
use ring::signature::{self, KeyPair as _};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{BasicConstraints, GeneralName, KeyUsage, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

use super::{
    ChainPosition, MAX_CHAIN_CERTIFICATES, MAX_PATH_LENGTH, X509SvidError, der_sequence_len, from_asn1_time,
    split_der_certificates, unsigned_framing_is_der,
};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Most signature verifications spent building one path; bounds the work hostile chains
/// with many same-named certificates can cause.
const MAX_SIGNATURE_CHECKS: usize = 32;

/// The context-specific tag of a `uniformResourceIdentifier` GeneralName.
const URI_TAG: u32 = 6;

/// A source of X.509 authorities (the DER CA certificates of a trust bundle), per trust domain.
///
/// Implemented for maps from [`TrustDomain`] to DER certificates so tests and simple callers
/// need nothing else; bundle types implement it too.
pub trait X509Authorities {
    /// The DER CA certificates trusted for `trust_domain`, or `None` if there is no bundle
    /// for it.
    fn x509_authorities(&self, trust_domain: &TrustDomain) -> Option<Vec<&[u8]>>;
}

impl<S: BuildHasher> X509Authorities for HashMap<TrustDomain, Vec<Vec<u8>>, S> {
    fn x509_authorities(&self, trust_domain: &TrustDomain) -> Option<Vec<&[u8]>> {
        self.get(trust_domain).map(|certs| certs.iter().map(Vec::as_slice).collect())
    }
}

impl X509Authorities for BTreeMap<TrustDomain, Vec<Vec<u8>>> {
    fn x509_authorities(&self, trust_domain: &TrustDomain) -> Option<Vec<&[u8]>> {
        self.get(trust_domain).map(|certs| certs.iter().map(Vec::as_slice).collect())
    }
}

impl<T: X509Authorities + ?Sized> X509Authorities for &T {
    fn x509_authorities(&self, trust_domain: &TrustDomain) -> Option<Vec<&[u8]>> {
        (**self).x509_authorities(trust_domain)
    }
}

/// An X.509-SVID that passed [`verify_x509_svid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedX509Svid {
    spiffe_id: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    verified_chain: Vec<Vec<u8>>,
}

impl VerifiedX509Svid {
    /// The authenticated SPIFFE ID (the leaf's URI SAN).
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The verified path in DER: the leaf, the intermediates used, and the bundle authority
    /// it ends at.
    pub fn verified_chain(&self) -> &[Vec<u8>] {
        &self.verified_chain
    }

    /// The leaf certificate in DER.
    pub fn leaf_der(&self) -> &[u8] {
        self.verified_chain.first().map_or(&[], Vec::as_slice)
    }
}

/// Authenticates a presented X.509-SVID chain (leaf first, then intermediates, each DER)
/// against the X.509 authorities of the leaf's trust domain at `now` (conformance §2.3).
///
/// Use [`super::split_der_certificates`] first for chains delivered as concatenated DER.
/// Authorization on the returned SPIFFE ID is the caller's next step.
pub fn verify_x509_svid<A: X509Authorities + ?Sized>(
    chain: &[&[u8]],
    authorities: &A,
    now: SystemTime,
) -> Result<VerifiedX509Svid, X509SvidError> {
    verify_chain(chain, authorities, now, None, None)
}

/// Signature checks already passed by certificates above the leaf, to be skipped when the
/// same certificate is checked against the same issuer again: see
/// [`verify_issued_x509_svid`].
///
/// A signature check is a function of the bytes of the two certificates only, so a pair is
/// recorded with both certificates' full DER and matches only those exact bytes. Leaf
/// signatures are never recorded (each SVID's leaf is checked), and everything that depends
/// on the time, the bundle or the leaf (validity, CA flags, pathLen, name constraints, the
/// anchor being in the bundle) is checked again each time. At most
/// [`SignatureMemo::CAPACITY`] pairs are kept; the oldest is forgotten first.
#[derive(Debug, Default, Clone)]
pub struct SignatureMemo {
    verified: Vec<(Vec<u8>, Vec<u8>)>,
}

impl SignatureMemo {
    /// Most pairs kept.
    pub const CAPACITY: usize = 8;

    /// An empty memo.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many verified pairs are recorded.
    pub fn len(&self) -> usize {
        self.verified.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.verified.is_empty()
    }

    fn holds(&self, child: &[u8], issuer: &[u8]) -> bool {
        self.verified.iter().any(|(c, i)| c.as_slice() == child && i.as_slice() == issuer)
    }

    fn record(&mut self, child: &[u8], issuer: &[u8]) {
        if self.holds(child, issuer) {
            return;
        }
        if self.verified.len() >= Self::CAPACITY {
            self.verified.remove(0);
        }
        self.verified.push((child.to_vec(), issuer.to_vec()));
    }
}

/// [`verify_x509_svid`] for an X.509-SVID issued for a key pair the caller generated itself
/// (an agent checking what the server signed for its CSR), in one parse: besides the path
/// validation, every certificate after the leaf must be a CA with keyCertSign (the check of
/// [`X509Svid::parse`]) and the leaf's public key (the subjectPublicKey bits: for EC keys the
/// uncompressed point) must be `public_key`.
///
/// Comparing the public key stands in for [`X509Svid::parse`]'s loading of the private key
/// only because the caller generated the pair: the pair is consistent by construction.
/// Signatures of certificates above the leaf already checked against the same issuer are
/// taken from `memo` (see [`SignatureMemo`]); the leaf's signature is always checked.
pub fn verify_issued_x509_svid<A: X509Authorities + ?Sized>(
    chain: &[&[u8]],
    authorities: &A,
    now: SystemTime,
    public_key: &[u8],
    memo: &mut SignatureMemo,
) -> Result<VerifiedX509Svid, X509SvidError> {
    verify_chain(chain, authorities, now, Some(public_key), Some(memo))
}

fn verify_chain<A: X509Authorities + ?Sized>(
    chain: &[&[u8]],
    authorities: &A,
    now: SystemTime,
    public_key: Option<&[u8]>,
    memo: Option<&mut SignatureMemo>,
) -> Result<VerifiedX509Svid, X509SvidError> {
    // spec: the peer chain is the leaf first, then optional intermediates.
    let (leaf_der, intermediate_ders) = chain.split_first().ok_or(X509SvidError::EmptyChain)?;
    if chain.len() > MAX_CHAIN_CERTIFICATES {
        return Err(X509SvidError::ChainTooLong { max: MAX_CHAIN_CERTIFICATES });
    }
    let leaf = Cert::parse(leaf_der, ChainPosition::Leaf)?;
    let (spiffe_id, leaf_names) = leaf_identity(&leaf)?;
    check_leaf_usage(&leaf)?;

    // spec: choose the bundle of the leaf's trust domain, never a pool across trust domains.
    let trust_domain = spiffe_id.trust_domain();
    let authority_ders = authorities
        .x509_authorities(&trust_domain)
        .filter(|certs| !certs.is_empty())
        .ok_or_else(|| X509SvidError::NoBundle { trust_domain: trust_domain.clone() })?;

    let intermediates = intermediate_ders
        .iter()
        .enumerate()
        .map(|(i, der)| Cert::parse(der, ChainPosition::Intermediate(i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(public_key) = public_key {
        // The client checks of `X509Svid::parse`: every certificate after the leaf may sign
        // certificates, and the key is the one the SVID was requested for.
        for signer in &intermediates {
            check_signing_usage(signer)?;
        }
        // spec: the private key MUST correspond to the leaf public key.
        if leaf.x509.public_key().subject_public_key.data.as_ref() != public_key {
            return Err(X509SvidError::KeyMismatch);
        }
    }
    // An authority that does not parse cannot anchor a path; it is skipped, which fails closed.
    let roots: Vec<Cert<'_>> = authority_ders
        .iter()
        .enumerate()
        .filter_map(|(i, der)| Cert::parse(der, ChainPosition::Authority(i)).ok())
        .collect();

    // spec: the validity window of every certificate is checked at "now".
    let (not_before, not_after) = check_validity(&leaf, now)?;

    let mut search = PathSearch {
        intermediates: &intermediates,
        roots: &roots,
        leaf_names: &leaf_names,
        now,
        signature_budget: MAX_SIGNATURE_CHECKS,
        used: vec![false; intermediates.len()],
        first_error: None,
        memo,
    };
    let mut path = Vec::new();
    let Some(root) = search.extend(&leaf, &mut path) else {
        return Err(search.first_error.unwrap_or(X509SvidError::UnknownAuthority));
    };

    let mut verified_chain = Vec::with_capacity(path.len() + 2);
    verified_chain.push(leaf.der.to_vec());
    verified_chain.extend(path.iter().map(|&i| intermediates[i].der.to_vec()));
    verified_chain.push(roots[root].der.to_vec());
    Ok(VerifiedX509Svid { spiffe_id, not_before, not_after, verified_chain })
}

/// An X.509-SVID with its private key, as a Workload API client receives it.
///
/// Built by [`X509Svid::parse`], which applies the checks go-spiffe clients apply to
/// `X509SVIDResponse` entries, so anything Tessera serves can be checked the same way.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    chain: Vec<Vec<u8>>,
    private_key_der: Vec<u8>,
    not_after: SystemTime,
}

impl X509Svid {
    /// Parses a chain of concatenated DER certificates (leaf first) and an unencrypted PKCS#8
    /// private key, applying the client-side checks of conformance §2.3: exactly one URI SAN
    /// holding a SPIFFE ID with a non-root path, leaf not a CA, leaf keyUsage with
    /// digitalSignature and without keyCertSign/cRLSign, every following certificate a CA with
    /// keyCertSign, and the private key matching the leaf's public key.
    ///
    /// Signatures and validity are not checked here (that needs a bundle: see
    /// [`verify_x509_svid`]). `rng` is what ring asks for when loading an EC key.
    pub fn parse(
        chain_der: &[u8],
        private_key_pkcs8_der: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Self, X509SvidError> {
        let ders = split_der_certificates(chain_der)?;
        let (leaf_der, signer_ders) = ders.split_first().ok_or(X509SvidError::EmptyChain)?;
        let leaf = Cert::parse(leaf_der, ChainPosition::Leaf)?;
        let (spiffe_id, _) = leaf_identity(&leaf)?;
        check_leaf_usage(&leaf)?;
        for (i, der) in signer_ders.iter().enumerate() {
            let signer = Cert::parse(der, ChainPosition::Intermediate(i + 1))?;
            check_signing_usage(&signer)?;
        }
        // spec: the private key MUST correspond to the leaf public key.
        check_key_matches(&leaf, private_key_pkcs8_der, rng)?;
        let not_after = from_asn1_time(leaf.x509.validity().not_after)
            .ok_or(X509SvidError::Malformed { position: ChainPosition::Leaf, reason: "validity out of range" })?;
        Ok(Self {
            spiffe_id,
            chain: ders.iter().map(|der| der.to_vec()).collect(),
            private_key_der: private_key_pkcs8_der.to_vec(),
            not_after,
        })
    }

    /// The SPIFFE ID of the leaf.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The certificates in DER, leaf first.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The leaf certificate in DER.
    pub fn leaf_der(&self) -> &[u8] {
        self.chain.first().map_or(&[], Vec::as_slice)
    }

    /// The private key, unencrypted PKCS#8 DER.
    pub fn private_key_pkcs8_der(&self) -> &[u8] {
        &self.private_key_der
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key is deliberately left out.
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("certificates", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A parsed certificate with the extensions the checks need, screened once.
struct Cert<'a> {
    der: &'a [u8],
    x509: X509Certificate<'a>,
    position: ChainPosition,
    basic_constraints: Option<BasicConstraints>,
    key_usage: Option<KeyUsage>,
}

impl<'a> Cert<'a> {
    fn parse(der: &'a [u8], position: ChainPosition) -> Result<Self, X509SvidError> {
        let malformed = |reason| X509SvidError::Malformed { position, reason };
        // x509-parser does not insist on the outer SEQUENCE tag, which no signature covers;
        // the framing is checked here so only canonical certificates are accepted.
        if der_sequence_len(der) != Some(der.len()) {
            return Err(malformed("not a single DER SEQUENCE"));
        }
        let (rest, x509) = X509Certificate::from_der(der).map_err(|_| malformed("not DER X.509"))?;
        if !rest.is_empty() {
            return Err(malformed("trailing data after the certificate"));
        }
        if !unsigned_framing_is_der(der, x509.tbs_certificate.as_ref()) {
            return Err(malformed("not canonical DER outside the signed part"));
        }
        if x509.tbs_certificate.signature != x509.signature_algorithm {
            return Err(malformed("inner and outer signature algorithms differ"));
        }
        let extensions = x509.extensions();
        // RFC 5280: an extension appears at most once (a pairwise check; lists are short).
        if extensions.iter().enumerate().any(|(i, ext)| extensions[..i].iter().any(|e| e.oid == ext.oid)) {
            return Err(malformed("duplicate extension"));
        }
        for ext in x509.extensions() {
            let parsed = ext.parsed_extension();
            if parsed.error().is_some() {
                return Err(malformed("malformed extension"));
            }
            // RFC 5280: a certificate with a critical extension the verifier does not process
            // must be rejected.
            let handled = matches!(
                parsed,
                ParsedExtension::BasicConstraints(_)
                    | ParsedExtension::KeyUsage(_)
                    | ParsedExtension::ExtendedKeyUsage(_)
                    | ParsedExtension::SubjectAlternativeName(_)
                    | ParsedExtension::NameConstraints(_)
                    | ParsedExtension::SubjectKeyIdentifier(_)
                    | ParsedExtension::AuthorityKeyIdentifier(_)
                    | ParsedExtension::CertificatePolicies(_)
            );
            if ext.critical && !handled {
                return Err(X509SvidError::UnhandledCriticalExtension { position });
            }
        }
        let basic_constraints = x509
            .basic_constraints()
            .map_err(|_| malformed("malformed basic constraints"))?
            .map(|ext| ext.value.clone());
        let key_usage = x509.key_usage().map_err(|_| malformed("malformed key usage"))?.map(|ext| *ext.value);
        Ok(Self { der, x509, position, basic_constraints, key_usage })
    }

    fn is_ca(&self) -> bool {
        self.basic_constraints.as_ref().is_some_and(|bc| bc.ca)
    }
}

/// The names of the leaf that name constraints apply to.
struct LeafNames {
    /// The host of the SPIFFE ID URI (the trust domain name).
    uri_host: String,
    dns: Vec<String>,
}

/// The leaf's SPIFFE ID and names (§2.3 step 2).
fn leaf_identity(leaf: &Cert<'_>) -> Result<(SpiffeId, LeafNames), X509SvidError> {
    let san = leaf.x509.subject_alternative_name().map_err(|_| X509SvidError::Malformed {
        position: leaf.position,
        reason: "malformed subject alternative name",
    })?;
    let names = san.map(|ext| ext.value.general_names.as_slice()).unwrap_or_default();
    let mut uri: Option<Result<SpiffeId, _>> = None;
    let mut dns = Vec::new();
    for name in names {
        let parsed = match name {
            GeneralName::URI(text) => SpiffeId::parse(text),
            // A URI SAN that is not valid IA5/UTF-8 still counts as a URI SAN.
            GeneralName::Invalid(tag, bytes) if tag.0 == URI_TAG => SpiffeId::parse_bytes(bytes),
            GeneralName::DNSName(name) => {
                dns.push(name.to_ascii_lowercase());
                continue;
            }
            _ => continue,
        };
        // spec: exactly one URI SAN; more than one is rejected.
        if uri.replace(parsed).is_some() {
            return Err(X509SvidError::MultipleUriSans);
        }
    }
    // spec: zero URI SANs is rejected.
    let spiffe_id = uri.ok_or(X509SvidError::NoUriSan)?.map_err(X509SvidError::InvalidUriSan)?;
    // spec: the leaf SPIFFE ID has a non-empty path.
    if spiffe_id.is_trust_domain_id() {
        return Err(X509SvidError::LeafPathMissing);
    }
    let uri_host = spiffe_id.trust_domain_name().to_owned();
    Ok((spiffe_id, LeafNames { uri_host, dns }))
}

/// §2.3 step 3 and the client checks: the leaf is not a CA and may sign data, not certificates.
fn check_leaf_usage(leaf: &Cert<'_>) -> Result<(), X509SvidError> {
    // spec: leaf cA is false.
    if leaf.is_ca() {
        return Err(X509SvidError::LeafIsCa);
    }
    let usage = leaf.key_usage.unwrap_or(KeyUsage { flags: 0 });
    // spec: leaf keyUsage has neither keyCertSign nor cRLSign.
    if usage.key_cert_sign() {
        return Err(X509SvidError::LeafKeyCertSign);
    }
    if usage.crl_sign() {
        return Err(X509SvidError::LeafCrlSign);
    }
    // spec: digitalSignature MUST be set.
    if !usage.digital_signature() {
        return Err(X509SvidError::LeafNoDigitalSignature);
    }
    Ok(())
}

/// Every certificate that signs another: a CA with keyCertSign.
fn check_signing_usage(signer: &Cert<'_>) -> Result<(), X509SvidError> {
    // spec: signing certificates have cA = TRUE.
    if !signer.is_ca() {
        return Err(X509SvidError::SigningCertNotCa { position: signer.position });
    }
    // spec: signing certificates have keyUsage keyCertSign (an absent keyUsage fails too, as
    // in go-spiffe).
    if !signer.key_usage.is_some_and(|ku| ku.key_cert_sign()) {
        return Err(X509SvidError::SigningCertNoKeyCertSign { position: signer.position });
    }
    Ok(())
}

/// Checks `cert`'s validity window at `now`; returns its bounds.
fn check_validity(cert: &Cert<'_>, now: SystemTime) -> Result<(SystemTime, SystemTime), X509SvidError> {
    let validity = cert.x509.validity();
    let out_of_range = || X509SvidError::Malformed { position: cert.position, reason: "validity out of range" };
    let not_before = from_asn1_time(validity.not_before).ok_or_else(out_of_range)?;
    let not_after = from_asn1_time(validity.not_after).ok_or_else(out_of_range)?;
    if now < not_before {
        return Err(X509SvidError::NotYetValid { position: cert.position });
    }
    if now > not_after {
        return Err(X509SvidError::Expired { position: cert.position });
    }
    Ok((not_before, not_after))
}

/// Depth-first search for a path from the leaf through unused presented intermediates to a
/// bundle authority.
struct PathSearch<'s, 'a> {
    intermediates: &'s [Cert<'a>],
    roots: &'s [Cert<'a>],
    leaf_names: &'s LeafNames,
    now: SystemTime,
    signature_budget: usize,
    used: Vec<bool>,
    /// The first reason a certificate that did sign its child could not be used; reported
    /// when no path is found, since it says more than "unknown authority".
    first_error: Option<X509SvidError>,
    /// Signatures above the leaf already checked (see [`SignatureMemo`]).
    memo: Option<&'s mut SignatureMemo>,
}

impl<'a> PathSearch<'_, 'a> {
    /// Extends `path` (indices of intermediates above the leaf) from `child` until a root
    /// signs; returns that root's index.
    fn extend(&mut self, child: &Cert<'a>, path: &mut Vec<usize>) -> Option<usize> {
        // The path so far holds the leaf and `path`; the next certificate makes one more.
        if path.len() + 2 > MAX_PATH_LENGTH {
            self.note(X509SvidError::ChainTooLong { max: MAX_PATH_LENGTH });
            return None;
        }
        let below = path.len();
        let roots = self.roots;
        for (i, root) in roots.iter().enumerate() {
            if self.signed_by(child, root) {
                match self.check_issuer(root, below) {
                    Ok(()) => return Some(i),
                    Err(e) => self.note(e),
                }
            }
        }
        let intermediates = self.intermediates;
        for (i, candidate) in intermediates.iter().enumerate() {
            if self.used[i] || !self.signed_by(child, candidate) {
                continue;
            }
            if let Err(e) = self.check_issuer(candidate, below) {
                self.note(e);
                continue;
            }
            self.used[i] = true;
            path.push(i);
            if let Some(root) = self.extend(candidate, path) {
                return Some(root);
            }
            path.pop();
            self.used[i] = false;
        }
        None
    }

    /// Whether `issuer` names and signed `child` (RFC 5280 name chaining and signature).
    fn signed_by(&mut self, child: &Cert<'_>, issuer: &Cert<'_>) -> bool {
        if !names_match(child.x509.issuer(), issuer.x509.subject()) {
            return false;
        }
        if self.signature_budget == 0 {
            return false;
        }
        self.signature_budget -= 1;
        // Only signatures above the leaf are remembered: they are the same for every SVID
        // issued under the same intermediates, and the memo matches the exact bytes of both.
        let memo = self.memo.as_deref_mut().filter(|_| child.position != ChainPosition::Leaf);
        if let Some(memo) = &memo
            && memo.holds(child.der, issuer.der)
        {
            return true;
        }
        // spec: path validation checks every signature.
        let verified = child.x509.verify_signature(Some(issuer.x509.public_key())).is_ok();
        if verified && let Some(memo) = memo {
            memo.record(child.der, issuer.der);
        }
        verified
    }

    /// The checks on a certificate that signed the one below it; `below` intermediates
    /// separate it from the leaf.
    fn check_issuer(&self, issuer: &Cert<'_>, below: usize) -> Result<(), X509SvidError> {
        // spec: CA flag and keyCertSign on issuing certificates.
        check_signing_usage(issuer)?;
        // spec: pathLen constraints.
        if let Some(limit) = issuer.basic_constraints.as_ref().and_then(|bc| bc.path_len_constraint)
            && u64::try_from(below).unwrap_or(u64::MAX) > u64::from(limit)
        {
            return Err(X509SvidError::PathLenExceeded { position: issuer.position });
        }
        check_validity(issuer, self.now)?;
        check_name_constraints(issuer, self.leaf_names)
    }

    fn note(&mut self, error: X509SvidError) {
        self.first_error.get_or_insert(error);
    }
}

/// RFC 5280 name chaining: byte equality, or equality after the comparison rules for
/// directory strings (case-insensitive, whitespace-insensitive).
fn names_match(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    if a.as_raw() == b.as_raw() {
        return true;
    }
    let (mut ra, mut rb) = (a.iter(), b.iter());
    loop {
        match (ra.next(), rb.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) => {
                let (mut xa, mut ya) = (x.iter(), y.iter());
                loop {
                    match (xa.next(), ya.next()) {
                        (None, None) => break,
                        (Some(p), Some(q)) => {
                            if p.attr_type() != q.attr_type() {
                                return false;
                            }
                            let same = match (p.as_str(), q.as_str()) {
                                (Ok(s), Ok(t)) => fold(s) == fold(t),
                                _ => p.attr_value() == q.attr_value(),
                            };
                            if !same {
                                return false;
                            }
                        }
                        _ => return false,
                    }
                }
            }
            _ => return false,
        }
    }
}

/// Case- and whitespace-folded form of a directory string for comparison.
fn fold(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// URI and DNS name constraints of `issuer`, applied to the leaf's names. Other forms of
/// constraint are not evaluated, so a chain carrying them fails closed.
fn check_name_constraints(issuer: &Cert<'_>, leaf: &LeafNames) -> Result<(), X509SvidError> {
    let position = issuer.position;
    let constraints = issuer
        .x509
        .name_constraints()
        .map_err(|_| X509SvidError::Malformed { position, reason: "malformed name constraints" })?;
    let Some(constraints) = constraints else { return Ok(()) };
    let permitted = constraints.value.permitted_subtrees.as_deref().unwrap_or_default();
    let excluded = constraints.value.excluded_subtrees.as_deref().unwrap_or_default();
    let all = permitted.iter().chain(excluded);
    if all.clone().any(|s| !matches!(s.base, GeneralName::URI(_) | GeneralName::DNSName(_))) {
        return Err(X509SvidError::UnsupportedNameConstraint { position });
    }

    let uri_bases = |trees: &[x509_parser::extensions::GeneralSubtree<'_>]| -> Vec<String> {
        trees
            .iter()
            .filter_map(|s| match s.base {
                GeneralName::URI(base) => Some(base.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    };
    let dns_bases = |trees: &[x509_parser::extensions::GeneralSubtree<'_>]| -> Vec<String> {
        trees
            .iter()
            .filter_map(|s| match s.base {
                GeneralName::DNSName(base) => Some(base.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    };
    let violation = X509SvidError::NameConstraintViolation { position };
    let host = leaf.uri_host.as_str();

    let permitted_uris = uri_bases(permitted);
    if !permitted_uris.is_empty() && !permitted_uris.iter().any(|b| uri_host_within(host, b)) {
        return Err(violation);
    }
    if uri_bases(excluded).iter().any(|b| uri_host_within(host, b)) {
        return Err(violation);
    }
    let permitted_dns = dns_bases(permitted);
    let excluded_dns = dns_bases(excluded);
    for name in &leaf.dns {
        if !permitted_dns.is_empty() && !permitted_dns.iter().any(|b| dns_within(name, b)) {
            return Err(violation);
        }
        if excluded_dns.iter().any(|b| dns_within(name, b)) {
            return Err(violation);
        }
    }
    Ok(())
}

/// RFC 5280 §4.2.1.10 for URIs: a base starting with `.` covers hosts below it, any other base
/// exactly that host.
fn uri_host_within(host: &str, base: &str) -> bool {
    if base.starts_with('.') { host.len() > base.len() && host.ends_with(base) } else { host == base }
}

/// RFC 5280 §4.2.1.10 for DNS names: the base and any name made by adding labels on the left.
/// A leading `.` (a common extension) means strictly below the base; an empty base covers all.
fn dns_within(name: &str, base: &str) -> bool {
    if base.is_empty() {
        return true;
    }
    if base.starts_with('.') {
        return name.len() > base.len() && name.ends_with(base);
    }
    name == base
        || (name.len() > base.len() && name.ends_with(base) && name.as_bytes()[name.len() - base.len() - 1] == b'.')
}

/// The private key (PKCS#8) is the key of the leaf's public key.
fn check_key_matches(leaf: &Cert<'_>, pkcs8: &[u8], rng: &dyn SecureRandom) -> Result<(), X509SvidError> {
    let spki = leaf.x509.public_key();
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    let leaf_kind = if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        match curve {
            Some(c) if c == OID_EC_P256 => Some(KeyKind::P256),
            Some(c) if c == OID_NIST_EC_P384 => Some(KeyKind::P384),
            _ => None,
        }
    } else if spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION {
        Some(KeyKind::Rsa)
    } else if spki.algorithm.algorithm == OID_SIG_ED25519 {
        Some(KeyKind::Ed25519)
    } else {
        None
    };
    let leaf_key = spki.subject_public_key.data.as_ref();
    if let Some(kind) = leaf_kind
        && let Some(public) = kind.public_key(pkcs8, rng)
    {
        return if public == leaf_key { Ok(()) } else { Err(X509SvidError::KeyMismatch) };
    }
    // Not loadable as the leaf's key type: a valid key of another type is a mismatch, anything
    // else is not a key at all.
    let loads_as_other = KeyKind::ALL.iter().any(|k| k.public_key(pkcs8, rng).is_some());
    Err(if loads_as_other { X509SvidError::KeyMismatch } else { X509SvidError::InvalidPrivateKey })
}

/// The private key types a Workload API SVID may carry.
#[derive(Clone, Copy)]
enum KeyKind {
    P256,
    P384,
    Rsa,
    Ed25519,
}

impl KeyKind {
    const ALL: [Self; 4] = [Self::P256, Self::P384, Self::Rsa, Self::Ed25519];

    /// The public key (as it appears in a SubjectPublicKeyInfo) of `pkcs8`, if it loads as
    /// this kind.
    fn public_key(self, pkcs8: &[u8], rng: &dyn SecureRandom) -> Option<Vec<u8>> {
        match self {
            Self::P256 => signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, rng)
                .ok()
                .map(|k| k.public_key().as_ref().to_vec()),
            Self::P384 => signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8, rng)
                .ok()
                .map(|k| k.public_key().as_ref().to_vec()),
            Self::Rsa => signature::RsaKeyPair::from_pkcs8(pkcs8).ok().map(|k| k.public_key().as_ref().to_vec()),
            Self::Ed25519 => signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                .ok()
                .map(|k| k.public_key().as_ref().to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_constraints_follow_rfc5280() {
        assert!(uri_host_within("example.org", "example.org"));
        assert!(!uri_host_within("a.example.org", "example.org"));
        assert!(uri_host_within("a.example.org", ".example.org"));
        assert!(!uri_host_within("example.org", ".example.org"));
        assert!(!uri_host_within("badexample.org", ".example.org"));
    }

    #[test]
    fn dns_constraints_follow_rfc5280() {
        assert!(dns_within("example.com", "example.com"));
        assert!(dns_within("a.example.com", "example.com"));
        assert!(!dns_within("aexample.com", "example.com"));
        assert!(dns_within("a.example.com", ".example.com"));
        assert!(!dns_within("example.com", ".example.com"));
        assert!(dns_within("anything", ""));
    }

    #[test]
    fn folding_ignores_case_and_spacing() {
        assert_eq!(fold("  Tessera   CA "), fold("tessera ca"));
    }

    #[test]
    fn maps_serve_authorities_by_trust_domain() {
        let td = TrustDomain::new("example.org").unwrap();
        let other = TrustDomain::new("other.org").unwrap();
        let mut map = HashMap::new();
        map.insert(td.clone(), vec![vec![1u8, 2], vec![3]]);
        assert_eq!(map.x509_authorities(&td), Some(vec![&[1u8, 2][..], &[3][..]]));
        assert_eq!(map.x509_authorities(&other), None);
        let tree: BTreeMap<_, _> = map.clone().into_iter().collect();
        let as_dyn: &dyn X509Authorities = &&tree;
        assert_eq!(as_dyn.x509_authorities(&td).map(|v| v.len()), Some(2));
    }

    #[test]
    fn empty_chain_is_refused() {
        let map: HashMap<TrustDomain, Vec<Vec<u8>>> = HashMap::new();
        assert!(matches!(verify_x509_svid(&[], &map, SystemTime::UNIX_EPOCH), Err(X509SvidError::EmptyChain)));
    }
}
