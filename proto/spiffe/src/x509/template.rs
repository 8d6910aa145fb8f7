//! Certificate templates: CA certificates and X.509-SVIDs, built and signed with rcgen.
//!
//! Templating is separated from key custody: a template ([`CaTemplate`], [`X509SvidTemplate`])
//! says *what* to certify, an [`X509Issuer`] holds the CA certificate and key that sign it, and
//! the caller supplies `now` and the random source for serial numbers.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::SecureRandom;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

use super::{X509SvidError, from_asn1_time, to_x509_time};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::ttl;

/// Organization written into every subject Tessera issues.
const ORGANIZATION: &str = "Tessera";
/// Country written into every subject Tessera issues (SPIFFE implementations use `US`).
const COUNTRY: &str = "US";
/// OID of the X.520 `serialNumber` attribute (2.5.4.5), used in CA subjects.
const OID_AT_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];
/// RFC 5280 upper bound on a commonName, in bytes.
const MAX_COMMON_NAME_LEN: usize = 64;
/// Bytes of randomness in a serial number (the top two bits are fixed, leaving 126 random).
const SERIAL_LEN: usize = 16;
/// RSA modulus sizes certified, in bits.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// What a CA certificate certifies: a trust domain, for how long, and how deep it may delegate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaTemplate {
    trust_domain: TrustDomain,
    ttl: Duration,
    path_len: Option<u8>,
}

impl CaTemplate {
    /// A CA template for `trust_domain` with lifetime `ttl` and no path length constraint.
    pub fn new(trust_domain: TrustDomain, ttl: Duration) -> Result<Self, X509SvidError> {
        if ttl.is_zero() {
            return Err(X509SvidError::ZeroTtl);
        }
        Ok(Self { trust_domain, ttl, path_len: None })
    }

    /// Limits how many intermediate CAs may follow this one in a path (RFC 5280 pathLen).
    #[must_use]
    pub fn with_path_len(mut self, max_intermediates: u8) -> Self {
        self.path_len = Some(max_intermediates);
        self
    }

    /// The trust domain whose ID becomes the URI SAN.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The requested lifetime (before capping by an issuer).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The path length constraint, if any.
    pub fn path_len(&self) -> Option<u8> {
        self.path_len
    }

    /// Builds and self-signs a root CA certificate with `key`; returns its DER.
    ///
    /// Valid from `now - 10s` to `now + ttl`. Wrap the result and the key in an [`X509Issuer`]
    /// to sign with it.
    pub fn self_signed(
        &self,
        key: &KeyPair,
        now: SystemTime,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, X509SvidError> {
        supported_signing_algorithm(key.algorithm())?;
        let params = self.params(rng, ttl::validity(now, self.ttl, None), false)?;
        let cert = params.self_signed(key).map_err(X509SvidError::Sign)?;
        Ok(cert.der().to_vec())
    }

    fn params(
        &self,
        rng: &dyn SecureRandom,
        validity: ttl::Validity,
        signed_by_other: bool,
    ) -> Result<CertificateParams, X509SvidError> {
        let serial = random_serial(rng)?;
        let mut params = base_params(&serial, validity)?;
        // spec: the CA's URI SAN, if any, is the trust domain ID without a path.
        params.subject_alt_names = vec![SanType::URI(ia5(self.trust_domain.id().as_str())?)];
        params.distinguished_name.push(
            DnType::CustomDnType(OID_AT_SERIAL_NUMBER.to_vec()),
            DnValue::PrintableString(printable(&u128::from_be_bytes(serial).to_string())?),
        );
        // spec: signing certificates have cA=TRUE; pathLen MAY be set.
        params.is_ca = IsCa::Ca(match self.path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        // spec: keyUsage critical with keyCertSign (MUST) and cRLSign (MAY), nothing leaf-only.
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = signed_by_other;
        Ok(params)
    }
}

/// What an X.509-SVID certifies: the SPIFFE ID, optional DNS names, and the lifetime.
///
/// These come from the registration entry; nothing in a CSR can change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509SvidTemplate {
    spiffe_id: SpiffeId,
    dns_names: Vec<String>,
    ttl: Duration,
}

impl X509SvidTemplate {
    /// A template for `spiffe_id` valid for `ttl`, without DNS names.
    ///
    /// Fails if the ID has no path (a trust domain ID cannot name a workload) or `ttl` is zero.
    pub fn new(spiffe_id: SpiffeId, ttl: Duration) -> Result<Self, X509SvidError> {
        // spec: the leaf SPIFFE ID MUST have a non-empty path.
        if spiffe_id.is_trust_domain_id() {
            return Err(X509SvidError::LeafPathMissing);
        }
        if ttl.is_zero() {
            return Err(X509SvidError::ZeroTtl);
        }
        Ok(Self { spiffe_id, dns_names: Vec::new(), ttl })
    }

    /// Adds DNS SANs; the first one also becomes the subject commonName (when it fits the
    /// 64-byte bound of RFC 5280).
    pub fn with_dns_names<I, S>(mut self, names: I) -> Result<Self, X509SvidError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for name in names {
            let name = name.into();
            if !is_dns_name(&name) {
                return Err(X509SvidError::InvalidDnsName { name });
            }
            self.dns_names.push(name);
        }
        Ok(self)
    }

    /// The SPIFFE ID to certify.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The DNS names to certify.
    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }

    /// The requested lifetime (before capping by the issuer).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn params(&self, rng: &dyn SecureRandom, validity: ttl::Validity) -> Result<CertificateParams, X509SvidError> {
        let serial = random_serial(rng)?;
        let mut params = base_params(&serial, validity)?;
        if let Some(first) = self.dns_names.first().filter(|n| n.len() <= MAX_COMMON_NAME_LEN) {
            params.distinguished_name.push(DnType::CommonName, first.as_str());
        }
        // spec: exactly one URI SAN, the SPIFFE ID; other SAN types MAY be added.
        let mut sans = Vec::with_capacity(1 + self.dns_names.len());
        sans.push(SanType::URI(ia5(self.spiffe_id.as_str())?));
        for name in &self.dns_names {
            sans.push(SanType::DnsName(ia5(name)?));
        }
        params.subject_alt_names = sans;
        // spec: basicConstraints present with cA=FALSE.
        params.is_ca = IsCa::ExplicitNoCa;
        // spec: keyUsage critical, digitalSignature set, keyCertSign/cRLSign not set.
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement];
        // spec: extKeyUsage, when present, includes both serverAuth and clientAuth.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// A CA certificate together with its signing key, ready to sign X.509-SVIDs and intermediate
/// CA certificates.
///
/// Built only by [`X509Issuer::new`] / [`X509Issuer::from_pkcs8_der`], which check that the
/// certificate is a CA allowed to sign certificates, that the key is its key, and that its
/// subject can be reproduced byte for byte as the issuer name of what it signs.
pub struct X509Issuer {
    certificate_der: Vec<u8>,
    key: KeyPair,
    /// The issuer's subject and key identifier, in the form rcgen signs with.
    signing_params: CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
    trust_domain: Option<TrustDomain>,
    path_len: Option<u32>,
}

impl X509Issuer {
    /// Pairs a DER CA certificate with its key (EC P-256, EC P-384 or RSA).
    pub fn new(certificate_der: Vec<u8>, key: KeyPair) -> Result<Self, X509SvidError> {
        supported_signing_algorithm(key.algorithm())?;
        let (rest, cert) =
            X509Certificate::from_der(&certificate_der).map_err(|_| invalid_issuer("certificate is not DER X.509"))?;
        if !rest.is_empty() {
            return Err(invalid_issuer("trailing data after the certificate"));
        }
        let basic = cert.basic_constraints().map_err(|_| invalid_issuer("malformed basic constraints"))?;
        let Some(basic) = basic.filter(|bc| bc.value.ca) else {
            return Err(invalid_issuer("certificate is not a CA"));
        };
        let path_len = basic.value.path_len_constraint;
        let key_usage = cert.key_usage().map_err(|_| invalid_issuer("malformed key usage"))?;
        if !key_usage.is_some_and(|ku| ku.value.key_cert_sign()) {
            return Err(invalid_issuer("certificate lacks keyCertSign key usage"));
        }
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(invalid_issuer("key does not match the certificate"));
        }
        let validity = cert.validity();
        let not_before = from_asn1_time(validity.not_before).ok_or_else(|| invalid_issuer("validity out of range"))?;
        let not_after = from_asn1_time(validity.not_after).ok_or_else(|| invalid_issuer("validity out of range"))?;
        let trust_domain = ca_trust_domain(&cert)?;

        let mut signing_params = CertificateParams::default();
        signing_params.distinguished_name = rcgen_name(cert.subject())?;
        if let Some(ski) = cert.iter_extensions().find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        }) {
            // AKI of what we sign = SKI of the issuer, as RFC 5280 intends.
            signing_params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        ensure_name_round_trips(&signing_params, &key, cert.subject())?;
        drop(cert);

        Ok(Self { certificate_der, key, signing_params, not_before, not_after, trust_domain, path_len })
    }

    /// Like [`X509Issuer::new`] with the key given as unencrypted PKCS#8 DER; the key type
    /// (EC P-256, EC P-384, RSA signing with SHA-256) is detected.
    pub fn from_pkcs8_der(certificate_der: Vec<u8>, key_pkcs8_der: &[u8]) -> Result<Self, X509SvidError> {
        let key = KeyPair::try_from(key_pkcs8_der).map_err(|_| invalid_issuer("key is not a supported PKCS#8 key"))?;
        Self::new(certificate_der, key)
    }

    /// The issuer's DER certificate (the next element of chains it signs).
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    /// The issuer's signing key.
    pub fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// Start of the issuer's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the issuer's validity; nothing it signs outlives this.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The trust domain of the issuer's SPIFFE ID URI SAN, if it has one.
    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        self.trust_domain.as_ref()
    }

    /// Signs an X.509-SVID for `template` over a public key given as DER SubjectPublicKeyInfo.
    ///
    /// For callers that have already established possession of the private key (otherwise use
    /// [`X509Issuer::sign_x509_svid_from_csr`]). Returns the leaf DER; the chain to serve is the
    /// leaf followed by [`X509Issuer::certificate_der`] (and the issuer's own intermediates).
    ///
    /// When the issuer certificate carries a SPIFFE ID, the template's SPIFFE ID must be in its
    /// trust domain. The lifetime is `now - 10s` to `min(now + ttl, issuer notAfter)`.
    pub fn sign_x509_svid(
        &self,
        template: &X509SvidTemplate,
        subject_public_key_info_der: &[u8],
        now: SystemTime,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, X509SvidError> {
        let key = subject_key_from_spki_der(subject_public_key_info_der)?;
        self.sign_leaf(template, &key, now, rng)
    }

    /// Signs an X.509-SVID for `template` over the public key of a DER PKCS#10 CSR.
    ///
    /// The CSR's self-signature is verified first (proof of possession); everything else in
    /// the CSR (subject, SANs, requested extensions) is ignored.
    pub fn sign_x509_svid_from_csr(
        &self,
        template: &X509SvidTemplate,
        csr_der: &[u8],
        now: SystemTime,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, X509SvidError> {
        let key = csr_subject_key(csr_der)?;
        self.sign_leaf(template, &key, now, rng)
    }

    /// Signs an intermediate CA certificate for `template` over a DER SubjectPublicKeyInfo
    /// (for example a Tessera server CA signed by an upstream authority).
    ///
    /// The intermediate's trust domain need not be the issuer's.
    pub fn sign_intermediate_ca(
        &self,
        template: &CaTemplate,
        subject_public_key_info_der: &[u8],
        now: SystemTime,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, X509SvidError> {
        // A CA with pathLen 0 may sign only leaves; what it signed here would never verify.
        if self.path_len == Some(0) {
            return Err(invalid_issuer("path length constraint forbids signing CA certificates"));
        }
        let key = subject_key_from_spki_der(subject_public_key_info_der)?;
        let validity = self.validity_at(now, template.ttl)?;
        let params = template.params(rng, validity, true)?;
        let issuer = rcgen::Issuer::from_params(&self.signing_params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(X509SvidError::Sign)?;
        Ok(cert.der().to_vec())
    }

    fn sign_leaf(
        &self,
        template: &X509SvidTemplate,
        key: &SubjectKey,
        now: SystemTime,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, X509SvidError> {
        // spec: a CA SHOULD be in the trust domain of the leaves it signs; refusing otherwise
        // keeps a misconfigured entry from minting an ID the CA does not speak for.
        if let Some(td) = &self.trust_domain
            && !template.spiffe_id.is_member_of(td)
        {
            return Err(X509SvidError::TrustDomainMismatch {
                spiffe_id: template.spiffe_id.to_string(),
                issuer_trust_domain: td.clone(),
            });
        }
        let validity = self.validity_at(now, template.ttl)?;
        let params = template.params(rng, validity)?;
        let issuer = rcgen::Issuer::from_params(&self.signing_params, &self.key);
        let cert = params.signed_by(key, &issuer).map_err(X509SvidError::Sign)?;
        Ok(cert.der().to_vec())
    }

    /// The validity window of something this issuer signs at `now`.
    fn validity_at(&self, now: SystemTime, ttl: Duration) -> Result<ttl::Validity, X509SvidError> {
        if now < self.not_before || now >= self.not_after {
            return Err(X509SvidError::IssuerNotValid);
        }
        // spec: never issue a certificate that outlives its issuer (capped in one place).
        Ok(ttl::validity(now, ttl, Some(self.not_after)))
    }
}

impl fmt::Debug for X509Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("X509Issuer")
            .field("trust_domain", &self.trust_domain)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key_algorithm", self.key.algorithm())
            .finish_non_exhaustive()
    }
}

/// Verifies a DER PKCS#10 CSR's self-signature (proof of possession of the private key) and
/// returns its public key as DER SubjectPublicKeyInfo.
///
/// Only the key is taken from a CSR; nothing else in it is trusted or returned.
pub fn verify_csr(csr_der: &[u8]) -> Result<Vec<u8>, X509SvidError> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|_| X509SvidError::InvalidCsr { reason: "not DER PKCS#10" })?;
    if !rest.is_empty() {
        return Err(X509SvidError::InvalidCsr { reason: "trailing data after the request" });
    }
    check_csr(&csr)?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

fn csr_subject_key(csr_der: &[u8]) -> Result<SubjectKey, X509SvidError> {
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|_| X509SvidError::InvalidCsr { reason: "not DER PKCS#10" })?;
    if !rest.is_empty() {
        return Err(X509SvidError::InvalidCsr { reason: "trailing data after the request" });
    }
    check_csr(&csr)
}

/// The CSR checks shared by [`verify_csr`] and the signing path.
fn check_csr(csr: &X509CertificationRequest<'_>) -> Result<SubjectKey, X509SvidError> {
    // Check the key type first: an unsupported key is a clearer answer than a signature error.
    let key = subject_key(&csr.certification_request_info.subject_pki)?;
    // spec (SPIRE): the CSR signature proves possession of the key being certified.
    csr.verify_signature().map_err(|_| X509SvidError::CsrSignature)?;
    Ok(key)
}

/// A subject public key in the form rcgen writes into certificates.
struct SubjectKey {
    algorithm: &'static SignatureAlgorithm,
    raw: Vec<u8>,
}

impl PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

fn subject_key_from_spki_der(der: &[u8]) -> Result<SubjectKey, X509SvidError> {
    match SubjectPublicKeyInfo::from_der(der) {
        Ok(([], spki)) => subject_key(&spki),
        _ => Err(X509SvidError::UnsupportedPublicKey),
    }
}

/// Accepts the workload key types of the spec (EC P-256, EC P-384, RSA 2048-8192 bits).
fn subject_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<SubjectKey, X509SvidError> {
    let raw = spki.subject_public_key.data.as_ref();
    let algorithm = if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        // Uncompressed points only (0x04 || x || y), which is what every verifier accepts.
        match curve {
            Some(c) if c == OID_EC_P256 && raw.len() == 65 && raw[0] == 4 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Some(c) if c == OID_NIST_EC_P384 && raw.len() == 97 && raw[0] == 4 => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => return Err(X509SvidError::UnsupportedPublicKey),
        }
    } else if spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if RSA_BITS.contains(&rsa.key_size()) => &rcgen::PKCS_RSA_SHA256,
            _ => return Err(X509SvidError::UnsupportedPublicKey),
        }
    } else {
        return Err(X509SvidError::UnsupportedPublicKey);
    };
    Ok(SubjectKey { algorithm, raw: raw.to_vec() })
}

/// Issuer keys: the signature algorithms of the supported key types.
fn supported_signing_algorithm(alg: &SignatureAlgorithm) -> Result<(), X509SvidError> {
    let supported = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_RSA_SHA256,
        &rcgen::PKCS_RSA_SHA384,
        &rcgen::PKCS_RSA_SHA512,
    ];
    if supported.contains(&alg) { Ok(()) } else { Err(invalid_issuer("key type is not EC P-256, EC P-384 or RSA")) }
}

/// Subject, serial and validity common to every certificate Tessera issues.
fn base_params(serial: &[u8; SERIAL_LEN], validity: ttl::Validity) -> Result<CertificateParams, X509SvidError> {
    let mut params = CertificateParams::default();
    params.not_before = to_x509_time(validity.not_before)?;
    params.not_after = to_x509_time(validity.not_after)?;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    let mut name = DistinguishedName::new();
    name.push(DnType::CountryName, DnValue::PrintableString(printable(COUNTRY)?));
    name.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = name;
    Ok(params)
}

/// A positive serial number of 16 bytes, 126 of its bits drawn from `rng`.
fn random_serial(rng: &dyn SecureRandom) -> Result<[u8; SERIAL_LEN], X509SvidError> {
    let mut serial = [0u8; SERIAL_LEN];
    rng.fill(&mut serial).map_err(|_| X509SvidError::Randomness)?;
    // Clear the sign bit (serials are positive) and set the next one so the encoding is always
    // 16 bytes with no leading zero to strip.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn ia5(s: &str) -> Result<Ia5String, X509SvidError> {
    Ia5String::try_from(s).map_err(X509SvidError::Sign)
}

fn printable(s: &str) -> Result<PrintableString, X509SvidError> {
    PrintableString::try_from(s).map_err(X509SvidError::Sign)
}

fn invalid_issuer(reason: &'static str) -> X509SvidError {
    X509SvidError::InvalidIssuer { reason }
}

/// The trust domain of a CA certificate's SPIFFE ID URI SAN, if any.
fn ca_trust_domain(cert: &X509Certificate<'_>) -> Result<Option<TrustDomain>, X509SvidError> {
    let san = cert.subject_alternative_name().map_err(|_| invalid_issuer("malformed subject alternative name"))?;
    let Some(san) = san else { return Ok(None) };
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Ok(id) = SpiffeId::parse(uri)
        {
            // spec: a CA's SPIFFE ID MUST NOT have a path.
            if !id.is_trust_domain_id() {
                return Err(invalid_issuer("CA SPIFFE ID must not have a path"));
            }
            return Ok(Some(id.trust_domain()));
        }
    }
    Ok(None)
}

/// Converts a parsed subject into rcgen's form, refusing what rcgen cannot reproduce
/// (multi-valued RDNs, repeated attribute types, unusual string types).
fn rcgen_name(name: &X509Name<'_>) -> Result<DistinguishedName, X509SvidError> {
    use x509_parser::der_parser::asn1_rs::Tag;

    const UNSUPPORTED: &str = "certificate subject cannot be reproduced as an issuer name";
    let mut dn = DistinguishedName::new();
    let mut seen: Vec<DnType> = Vec::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(invalid_issuer(UNSUPPORTED));
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or_else(|| invalid_issuer(UNSUPPORTED))?.collect();
        let ty = DnType::from_oid(&oid);
        if seen.contains(&ty) {
            return Err(invalid_issuer(UNSUPPORTED));
        }
        let value = attr.attr_value();
        let text = || std::str::from_utf8(value.data).map_err(|_| invalid_issuer(UNSUPPORTED));
        let value = match value.header.tag() {
            Tag::PrintableString => {
                DnValue::PrintableString(PrintableString::try_from(text()?).map_err(|_| invalid_issuer(UNSUPPORTED))?)
            }
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text()?).map_err(|_| invalid_issuer(UNSUPPORTED))?)
            }
            _ => return Err(invalid_issuer(UNSUPPORTED)),
        };
        seen.push(ty.clone());
        dn.push(ty, value);
    }
    Ok(dn)
}

/// Makes sure rcgen writes the issuer name exactly as the issuer's subject is encoded, so that
/// chains built by name match. Done once per issuer, by encoding the name in a throwaway CSR.
fn ensure_name_round_trips(
    signing_params: &CertificateParams,
    key: &KeyPair,
    subject: &X509Name<'_>,
) -> Result<(), X509SvidError> {
    let mut probe = CertificateParams::default();
    probe.distinguished_name = signing_params.distinguished_name.clone();
    let csr = probe.serialize_request(key).map_err(X509SvidError::Sign)?;
    let reproduced = X509CertificationRequest::from_der(csr.der())
        .map(|(_, csr)| csr.certification_request_info.subject.as_raw() == subject.as_raw())
        .unwrap_or(false);
    if reproduced { Ok(()) } else { Err(invalid_issuer("certificate subject cannot be reproduced as an issuer name")) }
}

/// A DNS name as certificates carry it: ASCII labels of letters, digits, `-` and `_`, an
/// optional leading `*` label, at most 253 bytes and 63 per label.
fn is_dns_name(name: &str) -> bool {
    let body = name.strip_prefix("*.").unwrap_or(name);
    !body.is_empty()
        && name.len() <= 253
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use x509_parser::prelude::X509Certificate;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOW: u64 = 1_900_000_000;

    fn root(td: &str, ttl: u64) -> X509Issuer {
        let key = KeyPair::generate().unwrap();
        let template = CaTemplate::new(TrustDomain::new(td).unwrap(), Duration::from_secs(ttl)).unwrap();
        let der = template.self_signed(&key, t(NOW), &SystemRandom::new()).unwrap();
        X509Issuer::new(der, key).unwrap()
    }

    #[test]
    fn issuers_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<X509Issuer>();
        assert_send_sync::<CaTemplate>();
        assert_send_sync::<X509SvidTemplate>();
    }

    #[test]
    fn dns_names_are_checked() {
        for good in ["example.org", "*.example.org", "a-b.c_d.example", "localhost"] {
            assert!(is_dns_name(good), "{good}");
        }
        let long_label = "a".repeat(64);
        for bad in ["", "*.", "a..b", ".a", "a.", "-a.b", "a b", "é.org", "*", &long_label] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
    }

    #[test]
    #[allow(deprecated)] // ring's deterministic test random sources live in its deprecated `test` module
    fn serials_are_positive_sixteen_bytes() {
        use ring::test::rand::FixedByteRandom;
        assert_eq!(random_serial(&FixedByteRandom { byte: 0xff }).unwrap()[0], 0x7f);
        assert_eq!(random_serial(&FixedByteRandom { byte: 0 }).unwrap()[0], 0x40);
        assert_eq!(random_serial(&FixedByteRandom { byte: 0 }).unwrap()[1..], [0u8; SERIAL_LEN - 1]);
    }

    #[test]
    fn root_subject_and_serial_match() {
        let issuer = root("example.org", 3600);
        let (_, cert) = X509Certificate::from_der(issuer.certificate_der()).unwrap();
        let serial = cert.tbs_certificate.serial.to_string();
        assert_eq!(cert.raw_serial().len(), SERIAL_LEN);
        let subject = cert.subject().to_string();
        assert!(subject.contains("C=US") && subject.contains("O=Tessera"), "{subject}");
        let serial_attr = cert.subject().iter_attributes().find(|a| a.attr_type().to_id_string() == "2.5.4.5").unwrap();
        assert_eq!(serial_attr.as_str().unwrap(), serial);
        assert_eq!(issuer.trust_domain().unwrap().name(), "example.org");
        assert_eq!(issuer.not_after(), t(NOW + 3600));
        assert_eq!(issuer.not_before(), t(NOW - 10));
    }

    #[test]
    fn issuer_refuses_mismatched_key_and_non_ca() {
        let issuer = root("example.org", 3600);
        let other = KeyPair::generate().unwrap();
        assert!(matches!(
            X509Issuer::new(issuer.certificate_der().to_vec(), other),
            Err(X509SvidError::InvalidIssuer { .. })
        ));
        let leaf_key = KeyPair::generate().unwrap();
        let template =
            X509SvidTemplate::new(SpiffeId::parse("spiffe://example.org/w").unwrap(), Duration::from_secs(60)).unwrap();
        let leaf = issuer
            .sign_x509_svid(&template, &leaf_key.subject_public_key_info(), t(NOW), &SystemRandom::new())
            .unwrap();
        assert!(matches!(
            X509Issuer::new(leaf, leaf_key),
            Err(X509SvidError::InvalidIssuer { reason: "certificate is not a CA" })
        ));
        assert!(X509Issuer::new(b"junk".to_vec(), KeyPair::generate().unwrap()).is_err());
    }

    #[test]
    fn issuer_outside_its_validity_refuses_to_sign() {
        let issuer = root("example.org", 3600);
        let key = KeyPair::generate().unwrap();
        let template =
            X509SvidTemplate::new(SpiffeId::parse("spiffe://example.org/w").unwrap(), Duration::from_secs(60)).unwrap();
        let spki = key.subject_public_key_info();
        for at in [t(NOW - 11), t(NOW + 3600), t(NOW + 7200)] {
            assert!(matches!(
                issuer.sign_x509_svid(&template, &spki, at, &SystemRandom::new()),
                Err(X509SvidError::IssuerNotValid)
            ));
        }
    }

    #[test]
    fn leaf_outside_issuer_trust_domain_is_refused() {
        let issuer = root("example.org", 3600);
        let key = KeyPair::generate().unwrap();
        let template =
            X509SvidTemplate::new(SpiffeId::parse("spiffe://other.org/w").unwrap(), Duration::from_secs(60)).unwrap();
        assert!(matches!(
            issuer.sign_x509_svid(&template, &key.subject_public_key_info(), t(NOW), &SystemRandom::new()),
            Err(X509SvidError::TrustDomainMismatch { .. })
        ));
    }

    #[test]
    fn templates_refuse_bad_input() {
        let td_id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(matches!(X509SvidTemplate::new(td_id, Duration::from_secs(60)), Err(X509SvidError::LeafPathMissing)));
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        assert!(matches!(X509SvidTemplate::new(id.clone(), Duration::ZERO), Err(X509SvidError::ZeroTtl)));
        assert!(matches!(
            X509SvidTemplate::new(id, Duration::from_secs(1)).unwrap().with_dns_names(["bad name"]),
            Err(X509SvidError::InvalidDnsName { .. })
        ));
        assert!(matches!(
            CaTemplate::new(TrustDomain::new("example.org").unwrap(), Duration::ZERO),
            Err(X509SvidError::ZeroTtl)
        ));
    }

    #[test]
    fn unsupported_public_keys_are_refused() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            subject_key_from_spki_der(&ed.subject_public_key_info()),
            Err(X509SvidError::UnsupportedPublicKey)
        ));
        assert!(subject_key_from_spki_der(b"").is_err());
        let p256 = KeyPair::generate().unwrap();
        let mut spki = p256.subject_public_key_info();
        spki.push(0);
        assert!(subject_key_from_spki_der(&spki).is_err(), "trailing byte");
    }
}
