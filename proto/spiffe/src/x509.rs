//! X.509-SVIDs: certificate templates for the CA and its workloads, and the validator.
//!
//! Two halves share one error type ([`X509SvidError`]):
//!
//! - **Issuance** ([`CaTemplate`], [`X509SvidTemplate`], [`X509Issuer`]): pure templating on
//!   rcgen. The caller passes the time, the random source for serial numbers and the keys; the
//!   SPIFFE ID, DNS names and TTL always come from the caller's template, never from a CSR,
//!   and every lifetime is capped by the issuer through [`crate::ttl::validity`].
//! - **Validation** ([`verify_x509_svid`], [`X509Svid::parse`]): the checks of the SPIFFE
//!   X.509-SVID standard on x509-parser, with path validation against the bundle of the
//!   leaf's own trust domain ([`X509Authorities`]). Every function here accepts arbitrary bytes
//!   and answers with an error rather than a panic; chain length and the work spent building a
//!   path are bounded so hostile input cannot loop.
//!
//! Certificate shapes produced (documented here because peers depend on them):
//!
//! | | CA (root or intermediate) | X.509-SVID (leaf) |
//! |---|---|---|
//! | Subject | `C=US, O=Tessera, serialNumber=<decimal serial>` | `C=US, O=Tessera` (+ `CN=<first DNS name>` when DNS names are given and it fits 64 bytes) |
//! | URI SAN | trust domain ID `spiffe://<td>` | the SPIFFE ID (exactly one) |
//! | DNS SANs | none | the template's DNS names |
//! | basicConstraints (critical) | `cA=TRUE` (+ optional pathLen) | `cA=FALSE` |
//! | keyUsage (critical) | keyCertSign, cRLSign | digitalSignature, keyEncipherment, keyAgreement |
//! | extKeyUsage | none | serverAuth, clientAuth |
//! | Serial | 126 random bits, positive, 16 bytes | same |
//! | Key identifiers | SKI; AKI unless self-signed | SKI, AKI |
//! | Validity | `now - 10s` .. `min(now + ttl, issuer notAfter)` | same |
//!
//! One caveat on purity: rcgen's ECDSA signing draws its per-signature nonce from ring's
//! system random source internally; every decision this module makes (serials) uses the
//! random source the caller passes in.

mod template;
mod validate;

use std::fmt;
use std::time::{Duration, SystemTime};

use x509_parser::time::ASN1Time;

use crate::spiffe_id::{SpiffeIdError, TrustDomain};

pub use template::{CaTemplate, X509Issuer, X509SvidTemplate, verify_csr};
pub use validate::{
    SignatureMemo, VerifiedX509Svid, X509Authorities, X509Svid, verify_issued_x509_svid, verify_x509_svid,
};

/// Most certificates accepted in a presented chain (leaf plus intermediates).
///
/// SPIFFE deployments use a leaf and at most a handful of intermediates; the bound keeps path
/// building over hostile input small.
pub const MAX_CHAIN_CERTIFICATES: usize = 8;

/// Longest verified path, in certificates, from the leaf to a bundle authority inclusive.
pub const MAX_PATH_LENGTH: usize = 8;

/// Where a certificate sits, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChainPosition {
    /// The leaf (the X.509-SVID itself), index 0 of the presented chain.
    Leaf,
    /// A presented intermediate, by its index in the presented chain (the leaf is 0).
    Intermediate(usize),
    /// A CA certificate of the trust bundle, by its index in the bundle.
    Authority(usize),
}

impl ChainPosition {
    /// The position of index `index` of a presented chain (leaf first).
    pub fn in_chain(index: usize) -> Self {
        if index == 0 { Self::Leaf } else { Self::Intermediate(index) }
    }
}

impl fmt::Display for ChainPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Leaf => f.write_str("leaf certificate"),
            Self::Intermediate(index) => write!(f, "certificate {index} of the chain"),
            Self::Authority(index) => write!(f, "bundle authority {index}"),
        }
    }
}

/// Everything that can go wrong issuing or validating an X.509-SVID.
///
/// Validation messages follow the wording of go-spiffe (quoted in the conformance checklist)
/// so operators see familiar texts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509SvidError {
    /// The chain holds no certificate.
    #[error("no certificates found")]
    EmptyChain,
    /// The presented chain, or the path being built, exceeds the bounds of this module.
    #[error("certificate chain is longer than {max} certificates")]
    ChainTooLong {
        /// The bound that was exceeded.
        max: usize,
    },
    /// A certificate is not well-formed DER X.509.
    #[error("could not parse {position}: {reason}")]
    Malformed {
        /// Which certificate.
        position: ChainPosition,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The leaf has no URI SAN.
    #[error("certificate contains no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("certificate contains more than one URI SAN")]
    MultipleUriSans,
    /// The leaf's URI SAN is not a SPIFFE ID.
    #[error("certificate URI SAN is not a valid SPIFFE ID")]
    InvalidUriSan(#[source] SpiffeIdError),
    /// The leaf's SPIFFE ID names only a trust domain.
    #[error("leaf certificate SPIFFE ID must have a non-root path")]
    LeafPathMissing,
    /// The leaf is a CA certificate.
    #[error("leaf certificate with CA flag set to true")]
    LeafIsCa,
    /// The leaf may sign certificates.
    #[error("leaf certificate with KeyCertSign key usage")]
    LeafKeyCertSign,
    /// The leaf may sign CRLs.
    #[error("leaf certificate with KeyCrlSign key usage")]
    LeafCrlSign,
    /// The leaf lacks keyUsage digitalSignature.
    #[error("leaf certificate must have 'digitalSignature' set as key usage")]
    LeafNoDigitalSignature,
    /// A certificate that signs another is not a CA.
    #[error("signing certificate must have CA flag set to true ({position})")]
    SigningCertNotCa {
        /// Which certificate.
        position: ChainPosition,
    },
    /// A certificate that signs another lacks keyUsage keyCertSign.
    #[error("signing certificate must have 'keyCertSign' set as key usage ({position})")]
    SigningCertNoKeyCertSign {
        /// Which certificate.
        position: ChainPosition,
    },
    /// No X.509 authorities are known for the leaf's trust domain.
    #[error("could not get X509 bundle for trust domain \"{trust_domain}\"")]
    NoBundle {
        /// The leaf's trust domain.
        trust_domain: TrustDomain,
    },
    /// A certificate of the path has expired at the validation time.
    #[error("could not verify leaf certificate: {position} has expired")]
    Expired {
        /// Which certificate.
        position: ChainPosition,
    },
    /// A certificate of the path is not yet valid at the validation time.
    #[error("could not verify leaf certificate: {position} is not yet valid")]
    NotYetValid {
        /// Which certificate.
        position: ChainPosition,
    },
    /// No path leads from the leaf to an authority of its trust domain's bundle.
    #[error("could not verify leaf certificate: certificate signed by unknown authority")]
    UnknownAuthority,
    /// An issuing certificate allows fewer intermediates below it than the path has.
    #[error("could not verify leaf certificate: path length constraint of {position} exceeded")]
    PathLenExceeded {
        /// Which certificate.
        position: ChainPosition,
    },
    /// A name of the leaf falls outside the name constraints of an issuing certificate.
    #[error("could not verify leaf certificate: leaf name not permitted by name constraints of {position}")]
    NameConstraintViolation {
        /// The constraining certificate.
        position: ChainPosition,
    },
    /// Name constraints of a form this validator does not evaluate (fails closed).
    #[error("could not verify leaf certificate: {position} has name constraints of an unsupported form")]
    UnsupportedNameConstraint {
        /// The constraining certificate.
        position: ChainPosition,
    },
    /// A critical extension this validator does not process.
    #[error("could not verify leaf certificate: {position} has an unhandled critical extension")]
    UnhandledCriticalExtension {
        /// Which certificate.
        position: ChainPosition,
    },
    /// The private key delivered with an SVID is not the leaf's key.
    #[error("leaf certificate does not match private key")]
    KeyMismatch,
    /// The private key is not an unencrypted PKCS#8 key of a supported type.
    #[error("private key is not a supported unencrypted PKCS#8 key")]
    InvalidPrivateKey,
    /// A CSR could not be parsed.
    #[error("could not parse certificate signing request: {reason}")]
    InvalidCsr {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The CSR's self-signature does not verify: the requester did not prove possession of
    /// the private key.
    #[error("certificate signing request signature is invalid")]
    CsrSignature,
    /// A public key of a type Tessera does not certify.
    #[error("unsupported public key: expected EC P-256, EC P-384 or RSA of 2048 to 8192 bits")]
    UnsupportedPublicKey,
    /// A DNS name of a template is not a valid DNS name.
    #[error("invalid DNS name {name:?}")]
    InvalidDnsName {
        /// The offending name.
        name: String,
    },
    /// A template asks for a zero lifetime.
    #[error("ttl must be greater than zero")]
    ZeroTtl,
    /// The SPIFFE ID to certify is outside the issuer's trust domain.
    #[error("SPIFFE ID \"{spiffe_id}\" is not a member of the issuer's trust domain \"{issuer_trust_domain}\"")]
    TrustDomainMismatch {
        /// The SPIFFE ID of the template.
        spiffe_id: String,
        /// The trust domain of the issuer's URI SAN.
        issuer_trust_domain: TrustDomain,
    },
    /// The issuer certificate or key cannot be used to sign.
    #[error("unusable issuer: {reason}")]
    InvalidIssuer {
        /// Why.
        reason: &'static str,
    },
    /// The issuer is expired or not yet valid at the issuance time.
    #[error("issuer certificate is expired or not yet valid at issuance time")]
    IssuerNotValid,
    /// A time outside what the certificate validity fields can hold.
    #[error("time is outside the range X.509 certificates can express")]
    TimeOutOfRange,
    /// The caller's random source failed.
    #[error("random source failed")]
    Randomness,
    /// rcgen refused to build or sign the certificate.
    #[error("could not sign certificate")]
    Sign(#[source] rcgen::Error),
}

/// Splits concatenated DER certificates, as the Workload API delivers chains and bundles, into
/// one slice per certificate.
///
/// Only the outer DER framing is checked here; the slices are parsed by whoever uses them.
/// More than [`MAX_CHAIN_CERTIFICATES`] certificates are refused.
pub fn split_der_certificates(concatenated: &[u8]) -> Result<Vec<&[u8]>, X509SvidError> {
    split_der(concatenated, MAX_CHAIN_CERTIFICATES)
}

/// Concatenates DER certificates, leaf first, into the form the Workload API delivers.
pub fn concat_der_certificates<C: AsRef<[u8]>>(certificates: &[C]) -> Vec<u8> {
    let total = certificates.iter().map(|c| c.as_ref().len()).sum();
    let mut out = Vec::with_capacity(total);
    for cert in certificates {
        out.extend_from_slice(cert.as_ref());
    }
    out
}

/// [`split_der_certificates`] with a caller-chosen bound (bundles may hold more certificates
/// than a chain).
pub(crate) fn split_der(concatenated: &[u8], max: usize) -> Result<Vec<&[u8]>, X509SvidError> {
    if concatenated.is_empty() {
        return Err(X509SvidError::EmptyChain);
    }
    let mut out = Vec::new();
    let mut rest = concatenated;
    while !rest.is_empty() {
        if out.len() == max {
            return Err(X509SvidError::ChainTooLong { max });
        }
        let position = ChainPosition::in_chain(out.len());
        let len = der_sequence_len(rest)
            .ok_or(X509SvidError::Malformed { position, reason: "not a complete DER SEQUENCE" })?;
        let (cert, tail) = rest.split_at(len);
        out.push(cert);
        rest = tail;
    }
    Ok(out)
}

/// Total length (header + content) of the DER SEQUENCE at the start of `input`, if it fits.
pub(crate) fn der_sequence_len(input: &[u8]) -> Option<usize> {
    der_element(input, TAG_SEQUENCE).map(|(_, total)| total)
}

const TAG_SEQUENCE: u8 = 0x30;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;

/// Header length and total length of the DER element with tag `tag` at the start of `input`,
/// if it is there and fits.
fn der_element(input: &[u8], tag: u8) -> Option<(usize, usize)> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (content_len, header_len) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        // Long form; 0x80 (indefinite) is not DER, and four length bytes cover any certificate.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        // DER: the shortest form only (no leading zero byte, long form only from 128 on).
        if rest[0] == 0 || len < 0x80 {
            return None;
        }
        (len, 2 + count)
    };
    let total = header_len.checked_add(content_len)?;
    (total <= input.len()).then_some((header_len, total))
}

/// Checks the parts of a certificate's encoding that its signature does not cover: the outer
/// SEQUENCE, the outer signatureAlgorithm and the signature BIT STRING must be canonical DER
/// around `tbs` (x509-parser is lenient about their tags). Keeps the set of byte strings that
/// verify as a given certificate down to one.
pub(crate) fn unsigned_framing_is_der(der: &[u8], tbs: &[u8]) -> bool {
    let Some((header, total)) = der_element(der, TAG_SEQUENCE) else { return false };
    if total != der.len() || der.get(header..header + tbs.len()) != Some(tbs) {
        return false;
    }
    let tail = &der[header + tbs.len()..];
    let Some((alg_header, alg_total)) = der_element(tail, TAG_SEQUENCE) else { return false };
    if tail.get(alg_header) != Some(&TAG_OID) {
        return false;
    }
    let signature = &tail[alg_total..];
    // Signatures are whole bytes: the BIT STRING's unused-bits count must be zero.
    der_element(signature, TAG_BIT_STRING)
        .is_some_and(|(header, total)| total == signature.len() && signature.get(header) == Some(&0))
}

/// The latest instant X.509 validity fields can hold (9999-12-31T23:59:59Z), in Unix seconds.
const MAX_X509_UNIX_SECONDS: u64 = 253_402_300_799;

/// Converts a time to the whole-second form rcgen writes, refusing times before 1970 or after
/// the year 9999 rather than letting the encoder misbehave.
pub(crate) fn to_x509_time(time: SystemTime) -> Result<time::OffsetDateTime, X509SvidError> {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| X509SvidError::TimeOutOfRange)?.as_secs();
    if secs > MAX_X509_UNIX_SECONDS {
        return Err(X509SvidError::TimeOutOfRange);
    }
    let secs = i64::try_from(secs).map_err(|_| X509SvidError::TimeOutOfRange)?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| X509SvidError::TimeOutOfRange)
}

/// Converts a parsed certificate time to a [`SystemTime`] (`None` if unrepresentable).
pub(crate) fn from_asn1_time(time: ASN1Time) -> Option<SystemTime> {
    let secs = time.timestamp();
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_short_and_long_lengths() {
        let short = [0x30, 0x02, 0x01, 0x02];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0u8, 0x80));
        let mut two_byte = vec![0x30, 0x82, 0x01, 0x00];
        two_byte.extend(std::iter::repeat_n(7u8, 0x100));
        let all = concat_der_certificates(&[&short[..], &long[..], &two_byte[..]]);
        let parts = split_der_certificates(&all).unwrap();
        assert_eq!(parts, vec![&short[..], &long[..], &two_byte[..]]);
    }

    #[test]
    fn split_rejects_bad_framing() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "empty"),
            (&[0x31, 0x00], "not a sequence"),
            (&[0x30], "no length"),
            (&[0x30, 0x05, 0x00], "truncated content"),
            (&[0x30, 0x80, 0x00, 0x00], "indefinite length"),
            (&[0x30, 0x85, 1, 1, 1, 1, 1], "five length bytes"),
            (&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff], "length beyond input"),
            (&[0x30, 0x00, 0x30], "truncated second certificate"),
            (&[0x30, 0x81, 0x01, 0x00], "non-minimal long form"),
            (&[0x30, 0x82, 0x00, 0x80], "leading zero length byte"),
        ];
        for (input, name) in cases {
            assert!(split_der_certificates(input).is_err(), "{name}");
        }
    }

    #[test]
    fn split_bounds_the_number_of_certificates() {
        let many = [0x30u8, 0x00].repeat(MAX_CHAIN_CERTIFICATES + 1);
        assert!(matches!(split_der_certificates(&many), Err(X509SvidError::ChainTooLong { .. })));
        let enough = [0x30u8, 0x00].repeat(MAX_CHAIN_CERTIFICATES);
        assert_eq!(split_der_certificates(&enough).unwrap().len(), MAX_CHAIN_CERTIFICATES);
    }

    #[test]
    fn x509_time_range_is_enforced() {
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert!(to_x509_time(before_epoch).is_err());
        let too_late = SystemTime::UNIX_EPOCH + Duration::from_secs(MAX_X509_UNIX_SECONDS + 1);
        assert!(to_x509_time(too_late).is_err());
        let fine = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(to_x509_time(fine).unwrap().unix_timestamp(), 1);
    }

    #[test]
    fn positions_read_well() {
        assert_eq!(ChainPosition::in_chain(0).to_string(), "leaf certificate");
        assert_eq!(ChainPosition::in_chain(2).to_string(), "certificate 2 of the chain");
        assert_eq!(ChainPosition::Authority(0).to_string(), "bundle authority 0");
    }
}
