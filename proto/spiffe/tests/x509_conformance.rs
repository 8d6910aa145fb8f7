#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! X.509-SVID conformance: cases 11-24 of the conformance checklist (§8), numbered as there,
//! plus the issuance rules around them (CSR proof of possession, TTL capping, intermediates)
//! and property tests that the validator never panics.
//!
//! Issuance cases (11-18) inspect certificates produced by Tessera's own templates with
//! x509-parser. Validation cases (19-24) feed certificates crafted with rcgen at test time,
//! independently of Tessera's templates, so that each rule can be broken on purpose.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use ring::rand::SystemRandom;
use tessera_spiffe::x509::{
    CaTemplate, ChainPosition, SignatureMemo, X509Issuer, X509Svid, X509SvidError, X509SvidTemplate,
    concat_der_certificates, split_der_certificates, verify_csr, verify_issued_x509_svid, verify_x509_svid,
};
use tessera_spiffe::{SpiffeId, TrustDomain};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Two RSA-2048 keys (PKCS#8), generated once with `openssl genpkey` for these tests: ring
/// cannot generate RSA keys, and a key (unlike a certificate) never expires.
const RSA_KEY_1: &str = "
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDstj/VKAdHmSY+
vpS+kR0//hpWnra0/khzfqFxwHqKeMdRgvZN9HVZs6hx/uZnNL+Pj2mm86CzgmFY
LPsbzNLqYcPr2G4OwEynT3sDa7TXS/PAe0CDUANsatgACyX6uwjcwrsQXuDaHdkB
u8fByibwao3EkgZaTAuugwwEHkkmk5tMBiuRemdfH81QOz7Jnkh0Q6IIZsmkJE6h
HzbltIHCAMEmG/IvklU56Nh6fmNBibO6K88kVZ9nAHiaIfgoNYxep3zLfJccLjF7
QzGOZaFLc+GYWey6aRJwvoxAeBjV8FRfT1y6lOVkaOrwnOFRiPyVt8zxn/TYosdV
htF8Fx0nAgMBAAECggEABM3GCdtgGnHfNtLDTgK/5zaO7kcWSiIG8mEVgat4USsW
UG8p9HcLkqB0wKt9nYaShKVSbZLwJfR1aUawaeYEOcF2KmkgAqigZZzVUEJ1TxE5
hyR5MLEFAMRCUe3n/WiiS2igRzrFsWd9qe1XpnUlySdAbUbRXi/A5O+/5K2Aqom2
VQjhPOeAb8ohR/qXSX53uBFKNpPi4XzkE5KxExc7jJOFKX6simNYcPn24mHkav14
ijGpyDleXgP2E6OeD04umsmw7zmcfDQl5mFnlfetSurWkflpEy19FRLkgHsRFpGd
QBhcKQCNQkoxeygSFVxOoVz+z79oWyeylFZZojg9EQKBgQD5jnrJ/b44Bda0ngOw
AOdBJkDlAktlxoePywUrc9i5zENkz4uXC5hHZ+zgTJiQefOgjdIpRh7tnBAEZPWG
ZbsyyYAjTlhqxlIW0aA6W6i4g630B+L5ckUQuIEHdr5MUdmzVNDI02AspTARD30G
DdtlBXIhsMOOXykyWrElwjtpFQKBgQDy0t57BrJNgyMp/557548k2ASb8UzE/yXg
PR+xylc7GbhoE5yrAh88VrfboBUFCjTFFyNfcQw8HN9/ctOTdXBbtKnnv6J/I07N
kYSPYRNIhYjRTkE9FNUKFKLYcgmRr9bClrIdEpHVEnq5SGFyR3PZdKB8h6be3APV
pZQ7l58ESwKBgQD2fcDSmoq0EzBLHnhN89Z3By26BVYrpLhpUwI8NSSwAA3hGQ6r
loxGm2Pg+EcJDSuSPgKDOft6fldjv8SzhvAr7dNfDBdQ/6o9V7iHa9luxsGe89tA
v5lwNo1brfGwuHfrJa9DbWTlNBQSBdZbkHxPf92HYW0Gxv+N+P5YaUz9MQKBgGmU
5sf3kW/CpXeNfgvCE6uhgd+MfCTsDDwEV9Omd2drN5OJc4Wn1o0V57vHT1xxo6BO
/0JwlTFOHJ/9/aEQX1qAo5/w42cEoy8fJtRxEUFnTqYzsIoulLNdZbFXZHHEU00o
2Slq+Z37+wC1SCm4h9b1rxJ2qUgdwk0TQfDnbG0hAoGBAKhIgYEW7tUNUVut0dHY
1D3afF0n0v4/xTlfkbY/cZaPExtNpKGt4qIqy9ytdIsJYHWUjr/wCSTEJ6lPKA/f
3F36ucU9iQtV7nzBDq4abqYwCFYK4bISfCUUNsZJILxZTzz/kC20IOYsrUc9mvWv
wckaomgKbK+soXpg8yIBbbKT
-----END PRIVATE KEY-----";
const RSA_KEY_2: &str = "
-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQDCQaQ4GbhEPSh1
jwFkYg5gAb+N2xeLjgiXZBuhXT9/4h0rMIRfdWsgMbv5GT/c4zehBRJwWUa9nCYz
yWwEvN+IE4+sapQ96GxW9162Su506ZYhr+WcHz4tEizcDxvQB383YG0CBDmpTPXw
Xm4eMUXpqXjb+0b9/xHW4P6yh68oFy2I/HxDwTGhEh0vqGxQyvZ3CyeQtShEGrRi
fDDVx8CJ2vzlCXLmf6RSt8LB3JLYln/08Dg3OOi2fXGvd0jpyLzjSlMxtijToa7u
IQ85R2FSDuzdPEfJVPKnxY9iGVtzIAXVqrd+UrpxTGsr2kzE0CIqMYnwUnltSYXA
ecSAJ1MDAgMBAAECggEAPfO7UNz7BGBQ1/Usp3wSQ5IrKi2We75nhQi7OyJHDxzo
2o5VmTAUYycZYN8pm+OnKSY59DS0t+Hl2RxC49vsmjRK3Nz8vCW076NixFZvaD/a
zpGPc9QO+0bRobj70MOjUeDhwwPf89uEkA09p0lll5ih395qjLTdVp9Y+00Eko8L
LmWI0OVyRdHBXOZIUl8IIrFRjoa883whg9WvORRdaqb1GS7H22VQtt5ABR7MJwBU
hu3NCMJl26fJQaWxA/63T0gd+kcF3aCVIQmjtfmM+/PSeni3EEHTwES1Rbwh+Yca
7E9R8yLY2t2FepYYObWXH5Ip3rg8jvGmXuPONPV38QKBgQDvkfUoqaUWivUvWOKk
6PSoCEaD2XCZff1LEayG5ilCbVsw8cwiH/peN+kGzYR3uhSchyO1F36QoZqeZkww
toFzBw6F0CNWSGyfmUWjcWCqfeACJDUYM/Lw1Kfrt4p2abF58DBMqSOGJcajAn93
fWTt0Rj7ol4/H+Z49xiEttNr2wKBgQDPlCCzyC8y3oF48jmk9KNoqNTUH2xMHclg
WbNxdl3m1VhAD8E9l7SvcwtNkamaLCI8T6CjuMnhJpbNPfyBpihlEEiGZdxC0LK6
xkECxPVdEVdLQnaD/6MxKbFbw4b/hYrCxoxoIe8okJLMKlcDlGOKBbgCkObGmnmC
Yy24QCOx+QKBgQDE8nPd8uECEEiSnPrt4YlIHk2CFR6pQNcbgLMZz1s5/dbK/Oz5
XNqh3ErYydnN548MQ1jKhj8JPaFz+NtH7LGs069PuJVkWHPcHNAQFqQGZSbj+8oe
VI6zB8/oS2IsCKXbfebnDuFiZenPlr0diVuQ2qY0L/5U3K/G4DQq3nYeowKBgQCx
ccfOx6aJTqnREQdz2mjB8+kTd9Uk8CWQBr4dlPjKdb/d61neZAviG28jHQylrWqK
ser5aeKxZEJvKrjqv3Yyhovoz7RNLYhLn2Q9kM7KgyNjQ2p6hhIj2acycV+6mJa4
z++AqNl/jK7gdqUxeyzn9OGK2AFe7vhGHLAdnD6nSQKBgQCJWNSONMdPpWBnxkhH
HBuKOfGaDB2nK0V3IfujcrY4sg9uQ4dW8iWuquaGIUMElIoJWSUbQ6gwfa2S5Wvw
Cftvz7WA0qQsVlkUfGLTDUIBZ6CtFb11FhQ45bBbz0wqxSV1FVpoIoN1Gg94ITjF
6bfA9nKgRUOp0Rp+WExz4qLt5w==
-----END PRIVATE KEY-----";

/// X.509 authorities by trust domain, as the validator consumes them.
type Bundles = HashMap<TrustDomain, Vec<Vec<u8>>>;

/// The fixed "current time" of every test (2030-03-17T17:46:40Z).
const NOW: u64 = 1_900_000_000;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn now() -> SystemTime {
    at(NOW)
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(3600 * n)
}

fn x509_time(secs: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap()).unwrap()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn rng() -> SystemRandom {
    SystemRandom::new()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    P256,
    P384,
    Rsa1,
    Rsa2,
}

fn key(alg: Alg) -> KeyPair {
    let rsa = |pem_text: &str| KeyPair::try_from(pem::parse(pem_text).unwrap().contents()).unwrap();
    match alg {
        Alg::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        Alg::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        Alg::Rsa1 => rsa(RSA_KEY_1),
        Alg::Rsa2 => rsa(RSA_KEY_2),
    }
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Some(san) = cert.subject_alternative_name().unwrap() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

fn bundles(entries: &[(&str, Vec<Vec<u8>>)]) -> Bundles {
    entries.iter().map(|(name, certs)| (td(name), certs.clone())).collect()
}

fn verify(chain: &[Vec<u8>], bundles: &Bundles) -> Result<SpiffeId, X509SvidError> {
    let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    verify_x509_svid(&refs, bundles, now()).map(|v| v.spiffe_id().clone())
}

// ------------------------------------------------------------------------------------------------
// Issuance with Tessera's own templates

/// A Tessera root CA, loaded back from PKCS#8 so every key type goes through that path.
fn tessera_root(trust_domain: &str, alg: Alg, ttl: Duration) -> X509Issuer {
    let key = key(alg);
    let der = CaTemplate::new(td(trust_domain), ttl).unwrap().self_signed(&key, now(), &rng()).unwrap();
    X509Issuer::from_pkcs8_der(der, key.serialized_der()).unwrap()
}

/// A Tessera intermediate CA for `trust_domain` signed by `upstream`.
fn tessera_intermediate(upstream: &X509Issuer, trust_domain: &str, alg: Alg, ttl: Duration) -> X509Issuer {
    let key = key(alg);
    let template = CaTemplate::new(td(trust_domain), ttl).unwrap();
    let der = upstream.sign_intermediate_ca(&template, &key.subject_public_key_info(), now(), &rng()).unwrap();
    X509Issuer::new(der, key).unwrap()
}

#[derive(Clone, Copy)]
enum KeyPath {
    Csr,
    PublicKey,
}

fn csr_for(key: &KeyPair) -> Vec<u8> {
    CertificateParams::default().serialize_request(key).unwrap().der().to_vec()
}

fn tessera_leaf(issuer: &X509Issuer, template: &X509SvidTemplate, alg: Alg, path: KeyPath) -> (Vec<u8>, KeyPair) {
    let key = key(alg);
    let der = match path {
        KeyPath::Csr => issuer.sign_x509_svid_from_csr(template, &csr_for(&key), now(), &rng()).unwrap(),
        KeyPath::PublicKey => issuer.sign_x509_svid(template, &key.subject_public_key_info(), now(), &rng()).unwrap(),
    };
    (der, key)
}

/// One X.509-SVID as the Workload API would serve it.
struct Issued {
    name: &'static str,
    spiffe_id: SpiffeId,
    /// Leaf first, then the intermediates (`x509_svid`).
    chain: Vec<Vec<u8>>,
    /// `x509_svid_key`.
    key_pkcs8: Vec<u8>,
    /// The certificate that signed the leaf.
    issuer_der: Vec<u8>,
    /// The trust domain's X.509 authorities (`bundle`).
    bundle: Vec<Vec<u8>>,
}

/// The issuance table: every supported issuer and workload key type, both key paths, direct
/// and intermediate-signed leaves.
fn issued_svids() -> &'static [Issued] {
    static ISSUED: OnceLock<Vec<Issued>> = OnceLock::new();
    ISSUED.get_or_init(|| {
        let ttl = hours(1);
        let make =
            |name, issuer: &X509Issuer, intermediates: Vec<Vec<u8>>, bundle: Vec<Vec<u8>>, alg, path, dns: &[&str]| {
                let spiffe_id = id("spiffe://example.org/ns/default/sa/web");
                let template =
                    X509SvidTemplate::new(spiffe_id.clone(), ttl).unwrap().with_dns_names(dns.to_vec()).unwrap();
                let (leaf, key) = tessera_leaf(issuer, &template, alg, path);
                let mut chain = vec![leaf];
                chain.extend(intermediates);
                Issued {
                    name,
                    spiffe_id,
                    chain,
                    key_pkcs8: key.serialize_der(),
                    issuer_der: issuer.certificate_der().to_vec(),
                    bundle,
                }
            };
        let p256 = tessera_root("example.org", Alg::P256, hours(24));
        let p384 = tessera_root("example.org", Alg::P384, hours(24));
        let rsa = tessera_root("example.org", Alg::Rsa1, hours(24));
        let inter = tessera_intermediate(&p256, "example.org", Alg::P384, hours(12));
        let upstream = tessera_root("upstream.test", Alg::Rsa2, hours(48));
        let upstream_inter = tessera_intermediate(&upstream, "example.org", Alg::P256, hours(12));
        let root = |i: &X509Issuer| vec![i.certificate_der().to_vec()];
        vec![
            make(
                "p256 root, p256 leaf from CSR, DNS names",
                &p256,
                vec![],
                root(&p256),
                Alg::P256,
                KeyPath::Csr,
                &["web.example.org", "web"],
            ),
            make(
                "p384 root, p256 leaf from public key",
                &p384,
                vec![],
                root(&p384),
                Alg::P256,
                KeyPath::PublicKey,
                &[],
            ),
            make("rsa root, p384 leaf from CSR", &rsa, vec![], root(&rsa), Alg::P384, KeyPath::Csr, &[]),
            make("p256 root, rsa leaf from CSR", &p256, vec![], root(&p256), Alg::Rsa2, KeyPath::Csr, &[]),
            make(
                "p256 root -> p384 intermediate -> p256 leaf",
                &inter,
                root(&inter),
                root(&p256),
                Alg::P256,
                KeyPath::Csr,
                &[],
            ),
            make(
                "upstream rsa root -> intermediate -> leaf",
                &upstream_inter,
                root(&upstream_inter),
                root(&upstream),
                Alg::P384,
                KeyPath::PublicKey,
                &["api.example.org"],
            ),
        ]
    })
}

#[test]
fn case_11_leaf_has_exactly_one_uri_san_equal_to_the_spiffe_id() {
    for svid in issued_svids() {
        let leaf = parse(&svid.chain[0]);
        assert_eq!(uri_sans(&leaf), vec![svid.spiffe_id.to_string()], "{}", svid.name);
        let served = X509Svid::parse(&concat_der_certificates(&svid.chain), &svid.key_pkcs8, &rng()).unwrap();
        assert_eq!(served.spiffe_id(), &svid.spiffe_id, "{}", svid.name);
    }
}

#[test]
fn case_12_leaf_is_not_a_ca_and_key_usage_is_critical_digital_signature_only_signing() {
    for svid in issued_svids() {
        let leaf = parse(&svid.chain[0]);
        let bc = leaf.basic_constraints().unwrap().expect("basicConstraints present");
        assert!(!bc.value.ca, "{}", svid.name);
        let ku = leaf.key_usage().unwrap().expect("keyUsage present");
        assert!(ku.critical, "{}", svid.name);
        assert!(ku.value.digital_signature(), "{}", svid.name);
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign(), "{}", svid.name);
        assert!(ku.value.key_encipherment() && ku.value.key_agreement(), "{}", svid.name);
    }
}

#[test]
fn case_13_leaf_eku_contains_server_and_client_auth() {
    for svid in issued_svids() {
        let leaf = parse(&svid.chain[0]);
        let eku = leaf.extended_key_usage().unwrap().expect("extKeyUsage present");
        assert!(eku.value.server_auth && eku.value.client_auth, "{}", svid.name);
    }
}

#[test]
fn case_14_leaf_validity_within_issuer_and_started() {
    for svid in issued_svids() {
        let leaf = parse(&svid.chain[0]);
        let issuer = parse(&svid.issuer_der);
        assert!(leaf.validity().not_after <= issuer.validity().not_after, "{}", svid.name);
        let not_before = leaf.validity().not_before.timestamp();
        assert!(not_before <= i64::try_from(NOW).unwrap(), "{}", svid.name);
        // [ref] SPIRE's 10 s clock-skew cushion.
        assert_eq!(not_before, i64::try_from(NOW - 10).unwrap(), "{}", svid.name);
        assert_eq!(leaf.validity().not_after.timestamp(), i64::try_from(NOW + 3600).unwrap(), "{}", svid.name);
    }
}

#[test]
fn case_15_key_is_unencrypted_pkcs8_matching_the_leaf() {
    let wrong_p256 = key(Alg::P256).serialize_der();
    let wrong_p384 = key(Alg::P384).serialize_der();
    let wrong_rsa = key(Alg::Rsa1).serialize_der();
    for svid in issued_svids() {
        let leaf = parse(&svid.chain[0]);
        let loaded = KeyPair::try_from(svid.key_pkcs8.as_slice()).expect("PKCS#8 DER");
        assert_eq!(loaded.public_key_raw(), leaf.public_key().subject_public_key.data.as_ref(), "{}", svid.name);
        let chain = concat_der_certificates(&svid.chain);
        assert!(X509Svid::parse(&chain, &svid.key_pkcs8, &rng()).is_ok(), "{}", svid.name);
        for wrong in [&wrong_p256, &wrong_p384, &wrong_rsa] {
            assert!(matches!(X509Svid::parse(&chain, wrong, &rng()), Err(X509SvidError::KeyMismatch)), "{}", svid.name);
        }
        assert!(matches!(X509Svid::parse(&chain, b"not a key", &rng()), Err(X509SvidError::InvalidPrivateKey)));
    }
}

#[test]
fn case_16_chain_is_concatenated_der_leaf_first_then_signing_cas() {
    for svid in issued_svids() {
        let served = concat_der_certificates(&svid.chain);
        let certs = split_der_certificates(&served).unwrap();
        assert_eq!(certs.len(), svid.chain.len(), "{}", svid.name);
        assert!(!parse(certs[0]).is_ca(), "{}", svid.name);
        assert_eq!(uri_sans(&parse(certs[0])), vec![svid.spiffe_id.to_string()]);
        for der in &certs[1..] {
            let cert = parse(der);
            assert!(cert.is_ca(), "{}", svid.name);
            assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign(), "{}", svid.name);
        }
        let parsed = X509Svid::parse(&served, &svid.key_pkcs8, &rng()).unwrap();
        assert_eq!(parsed.chain(), svid.chain.as_slice());
        assert_eq!(parsed.leaf_der(), svid.chain[0].as_slice());
    }
}

#[test]
fn case_17_bundle_and_intermediate_cas_are_ca_with_key_cert_sign_and_pathless_uri() {
    for svid in issued_svids() {
        for der in svid.bundle.iter().chain(&svid.chain[1..]) {
            let ca = parse(der);
            assert!(ca.basic_constraints().unwrap().unwrap().value.ca, "{}", svid.name);
            let ku = ca.key_usage().unwrap().unwrap();
            assert!(ku.critical && ku.value.key_cert_sign(), "{}", svid.name);
            assert!(!ku.value.digital_signature() && !ku.value.key_encipherment(), "{}", svid.name);
            for uri in uri_sans(&ca) {
                assert!(id(&uri).is_trust_domain_id(), "{}: {uri}", svid.name);
            }
        }
    }
}

#[test]
fn case_18_chain_verifies_against_the_bundle_now() {
    for svid in issued_svids() {
        let trust = bundles(&[("example.org", svid.bundle.clone())]);
        let refs: Vec<&[u8]> = svid.chain.iter().map(Vec::as_slice).collect();
        let verified = verify_x509_svid(&refs, &trust, now()).unwrap_or_else(|e| panic!("{}: {e}", svid.name));
        assert_eq!(verified.spiffe_id(), &svid.spiffe_id);
        assert_eq!(verified.not_after(), at(NOW + 3600));
        assert_eq!(verified.leaf_der(), svid.chain[0].as_slice());
        assert_eq!(verified.verified_chain().last(), svid.bundle.first(), "{}", svid.name);
        assert_eq!(verified.verified_chain().len(), svid.chain.len() + 1, "{}", svid.name);
    }
}

// ------------------------------------------------------------------------------------------------
// Validation of crafted certificates (rcgen directly, not Tessera's templates)

/// A CA built directly with rcgen.
struct Crafted {
    key: KeyPair,
    params: CertificateParams,
    der: Vec<u8>,
}

fn ca_params(common_name: &str, trust_domain: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(format!("spiffe://{trust_domain}")).unwrap())];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = x509_time(NOW - 3600);
    p.not_after = x509_time(NOW + 36_000);
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

fn leaf_params(spiffe_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "crafted");
    p.subject_alt_names = vec![uri(spiffe_id)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = x509_time(NOW - 60);
    p.not_after = x509_time(NOW + 3600);
    p
}

impl Crafted {
    fn root(params: CertificateParams) -> Self {
        let key = key(Alg::P256);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Self { key, params, der }
    }

    fn sign(&self, params: &CertificateParams, subject: &impl PublicKeyData) -> Vec<u8> {
        params.signed_by(subject, &Issuer::from_params(&self.params, &self.key)).unwrap().der().to_vec()
    }

    fn child_ca(&self, mut params: CertificateParams) -> Self {
        params.use_authority_key_identifier_extension = true;
        let key = key(Alg::P256);
        let der = self.sign(&params, &key);
        Self { key, params, der }
    }

    /// A leaf for `spiffe://example.org/workload`, edited by `edit` before signing.
    fn leaf(&self, edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        self.leaf_with_key(edit).0
    }

    fn leaf_with_key(&self, edit: impl FnOnce(&mut CertificateParams)) -> (Vec<u8>, KeyPair) {
        let mut params = leaf_params("spiffe://example.org/workload");
        edit(&mut params);
        let key = key(Alg::P256);
        (self.sign(&params, &key), key)
    }
}

type ErrorCheck = fn(&X509SvidError) -> bool;

/// A validation row: the chain presented, the bundles known, and the expected outcome
/// (`Ok(spiffe id)` or a predicate on the error).
struct Row {
    name: &'static str,
    chain: Vec<Vec<u8>>,
    bundles: Bundles,
    expect: Result<&'static str, ErrorCheck>,
}

fn run(case: u32, rows: Vec<Row>) {
    for row in rows {
        let got = verify(&row.chain, &row.bundles);
        match (&got, row.expect) {
            (Ok(got_id), Ok(want)) => assert_eq!(got_id.as_str(), want, "case {case}: {}", row.name),
            (Err(e), Err(check)) => assert!(check(e), "case {case}: {}: unexpected error {e:?}", row.name),
            _ => panic!("case {case}: {}: got {got:?}", row.name),
        }
    }
}

fn example_ca() -> Crafted {
    Crafted::root(ca_params("Example CA", "example.org"))
}

fn example_bundle(ca: &Crafted) -> Bundles {
    bundles(&[("example.org", vec![ca.der.clone()])])
}

#[test]
fn case_19_leaf_must_have_exactly_one_uri_san() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let row = |name, edit: fn(&mut CertificateParams), expect| Row {
        name,
        chain: vec![ca.leaf(edit)],
        bundles: trust.clone(),
        expect,
    };
    run(
        19,
        vec![
            row("well-formed leaf (control)", |_| {}, Ok("spiffe://example.org/workload")),
            row(
                "two URI SANs",
                |p| p.subject_alt_names.push(uri("spiffe://example.org/other")),
                Err(|e| {
                    matches!(e, X509SvidError::MultipleUriSans)
                        && e.to_string() == "certificate contains more than one URI SAN"
                }),
            ),
            row(
                "two URI SANs, second not a SPIFFE ID",
                |p| p.subject_alt_names.push(uri("https://example.org/x")),
                Err(|e| matches!(e, X509SvidError::MultipleUriSans)),
            ),
            row(
                "zero URI SANs, DNS SAN only",
                |p| p.subject_alt_names = vec![SanType::DnsName(Ia5String::try_from("w.example.org").unwrap())],
                Err(|e| matches!(e, X509SvidError::NoUriSan) && e.to_string() == "certificate contains no URI SAN"),
            ),
            row(
                "no SAN extension at all",
                |p| p.subject_alt_names.clear(),
                Err(|e| matches!(e, X509SvidError::NoUriSan)),
            ),
            row(
                "URI SAN that is not a SPIFFE ID",
                |p| p.subject_alt_names = vec![uri("https://example.org/workload")],
                Err(|e| matches!(e, X509SvidError::InvalidUriSan(_))),
            ),
        ],
    );
}

#[test]
fn case_20_leaf_must_not_be_a_ca_nor_sign_certificates_or_crls() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let row = |name, edit: fn(&mut CertificateParams), expect| Row {
        name,
        chain: vec![ca.leaf(edit)],
        bundles: trust.clone(),
        expect,
    };
    run(
        20,
        vec![
            row(
                "cA=true",
                |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
                Err(|e| {
                    matches!(e, X509SvidError::LeafIsCa) && e.to_string() == "leaf certificate with CA flag set to true"
                }),
            ),
            row(
                "keyCertSign",
                |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
                Err(|e| {
                    matches!(e, X509SvidError::LeafKeyCertSign)
                        && e.to_string() == "leaf certificate with KeyCertSign key usage"
                }),
            ),
            row(
                "cRLSign",
                |p| p.key_usages.push(KeyUsagePurpose::CrlSign),
                Err(|e| {
                    matches!(e, X509SvidError::LeafCrlSign)
                        && e.to_string() == "leaf certificate with KeyCrlSign key usage"
                }),
            ),
            row(
                "no digitalSignature",
                |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
                Err(|e| matches!(e, X509SvidError::LeafNoDigitalSignature)),
            ),
            row(
                "no keyUsage at all",
                |p| p.key_usages.clear(),
                Err(|e| matches!(e, X509SvidError::LeafNoDigitalSignature)),
            ),
            row(
                "no basicConstraints (cA defaults to false)",
                |p| p.is_ca = IsCa::NoCa,
                Ok("spiffe://example.org/workload"),
            ),
        ],
    );
}

#[test]
fn case_21_leaf_id_without_path_is_rejected() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let row = |name, edit: fn(&mut CertificateParams), expect| Row {
        name,
        chain: vec![ca.leaf(edit)],
        bundles: trust.clone(),
        expect,
    };
    run(
        21,
        vec![
            row(
                "spiffe://example.org",
                |p| p.subject_alt_names = vec![uri("spiffe://example.org")],
                Err(|e| {
                    matches!(e, X509SvidError::LeafPathMissing)
                        && e.to_string() == "leaf certificate SPIFFE ID must have a non-root path"
                }),
            ),
            row(
                "spiffe://example.org/ (trailing slash)",
                |p| p.subject_alt_names = vec![uri("spiffe://example.org/")],
                Err(|e| matches!(e, X509SvidError::InvalidUriSan(_))),
            ),
        ],
    );
}

#[test]
fn case_22_expired_or_not_yet_valid_certificates_are_rejected() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let mut expired_params = ca_params("Expired Intermediate", "example.org");
    expired_params.not_before = x509_time(NOW - 7200);
    expired_params.not_after = x509_time(NOW - 1);
    let expired_intermediate = ca.child_ca(expired_params);
    let valid_intermediate = ca.child_ca(ca_params("Valid Intermediate", "example.org"));
    let mut old_root_params = ca_params("Expired Root", "example.org");
    old_root_params.not_before = x509_time(NOW - 7200);
    old_root_params.not_after = x509_time(NOW - 1);
    let expired_root = Crafted::root(old_root_params);
    run(
        22,
        vec![
            Row {
                name: "expired leaf",
                chain: vec![ca.leaf(|p| {
                    p.not_before = x509_time(NOW - 7200);
                    p.not_after = x509_time(NOW - 1);
                })],
                bundles: trust.clone(),
                expect: Err(|e| matches!(e, X509SvidError::Expired { position: ChainPosition::Leaf })),
            },
            Row {
                name: "leaf not yet valid",
                chain: vec![ca.leaf(|p| p.not_before = x509_time(NOW + 60))],
                bundles: trust.clone(),
                expect: Err(|e| matches!(e, X509SvidError::NotYetValid { position: ChainPosition::Leaf })),
            },
            Row {
                name: "expired intermediate",
                chain: vec![expired_intermediate.leaf(|_| {}), expired_intermediate.der.clone()],
                bundles: trust.clone(),
                expect: Err(|e| matches!(e, X509SvidError::Expired { position: ChainPosition::Intermediate(1) })),
            },
            Row {
                name: "valid intermediate (control)",
                chain: vec![valid_intermediate.leaf(|_| {}), valid_intermediate.der.clone()],
                bundles: trust.clone(),
                expect: Ok("spiffe://example.org/workload"),
            },
            Row {
                name: "expired bundle authority",
                chain: vec![expired_root.leaf(|_| {})],
                bundles: example_bundle(&expired_root),
                expect: Err(|e| matches!(e, X509SvidError::Expired { position: ChainPosition::Authority(0) })),
            },
        ],
    );
}

#[test]
fn case_23_bundle_is_chosen_by_the_leaf_trust_domain() {
    let ca_a = Crafted::root(ca_params("CA A", "a.org"));
    let ca_b = Crafted::root(ca_params("CA B", "b.org"));
    // A b.org CA with exactly a.org's subject: only the signature check can tell them apart.
    let ca_b_same_name = Crafted::root(ca_params("CA A", "b.org"));
    let mut leaf = leaf_params("spiffe://b.org/x");
    leaf.subject_alt_names = vec![uri("spiffe://b.org/x")];
    let b_leaf_signed_by_a = ca_a.sign(&leaf, &key(Alg::P256));
    let b_leaf_signed_by_b = ca_b.sign(&leaf, &key(Alg::P256));
    run(
        23,
        vec![
            Row {
                name: "b.org leaf signed by a.org's CA, bundles {a: CA_a, b: CA_b}",
                chain: vec![b_leaf_signed_by_a.clone()],
                bundles: bundles(&[("a.org", vec![ca_a.der.clone()]), ("b.org", vec![ca_b.der.clone()])]),
                expect: Err(|e| {
                    matches!(e, X509SvidError::UnknownAuthority)
                        && e.to_string().starts_with("could not verify leaf certificate")
                }),
            },
            Row {
                name: "same, b.org's CA has a.org's CA subject name",
                chain: vec![b_leaf_signed_by_a.clone()],
                bundles: bundles(&[("a.org", vec![ca_a.der.clone()]), ("b.org", vec![ca_b_same_name.der.clone()])]),
                expect: Err(|e| matches!(e, X509SvidError::UnknownAuthority)),
            },
            Row {
                name: "b.org leaf signed by b.org's CA (control)",
                chain: vec![b_leaf_signed_by_b],
                bundles: bundles(&[("a.org", vec![ca_a.der.clone()]), ("b.org", vec![ca_b.der.clone()])]),
                expect: Ok("spiffe://b.org/x"),
            },
            Row {
                name: "a.org's CA listed in b.org's own bundle is trusted for b.org",
                chain: vec![b_leaf_signed_by_a],
                bundles: bundles(&[("b.org", vec![ca_b.der.clone(), ca_a.der.clone()])]),
                expect: Ok("spiffe://b.org/x"),
            },
        ],
    );
}

#[test]
fn case_24_leaf_from_a_trust_domain_without_bundle_is_rejected() {
    let ca_a = Crafted::root(ca_params("CA A", "a.org"));
    let ca_c = Crafted::root(ca_params("CA C", "c.org"));
    let mut leaf = leaf_params("spiffe://c.org/x");
    leaf.subject_alt_names = vec![uri("spiffe://c.org/x")];
    let c_leaf = ca_c.sign(&leaf, &key(Alg::P256));
    run(
        24,
        vec![
            Row {
                name: "no bundle for c.org",
                chain: vec![c_leaf.clone()],
                bundles: bundles(&[("a.org", vec![ca_a.der.clone()])]),
                expect: Err(|e| {
                    matches!(e, X509SvidError::NoBundle { trust_domain } if trust_domain.name() == "c.org")
                        && e.to_string().starts_with("could not get X509 bundle")
                }),
            },
            Row {
                name: "c.org's CA is known only under another trust domain",
                chain: vec![c_leaf.clone()],
                bundles: bundles(&[("a.org", vec![ca_c.der.clone()])]),
                expect: Err(|e| matches!(e, X509SvidError::NoBundle { .. })),
            },
            Row {
                name: "empty bundle for c.org",
                chain: vec![c_leaf.clone()],
                bundles: bundles(&[("c.org", vec![])]),
                expect: Err(|e| matches!(e, X509SvidError::NoBundle { .. })),
            },
            Row {
                name: "no bundles at all",
                chain: vec![c_leaf],
                bundles: HashMap::new(),
                expect: Err(|e| matches!(e, X509SvidError::NoBundle { .. })),
            },
        ],
    );
}

// ------------------------------------------------------------------------------------------------
// Issuance rules beyond §8

#[test]
fn csr_with_a_bad_signature_is_refused() {
    let issuer = tessera_root("example.org", Alg::P256, hours(24));
    let template = X509SvidTemplate::new(id("spiffe://example.org/w"), hours(1)).unwrap();
    let key = key(Alg::P256);
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "requester");
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    assert_eq!(verify_csr(&csr).unwrap(), key.subject_public_key_info());

    let mut bad_signature = csr.clone();
    *bad_signature.last_mut().unwrap() ^= 0x01;
    let mut tampered_subject = csr.clone();
    let at = csr.windows(9).position(|w| w == b"requester").unwrap();
    tampered_subject[at] = b'R';
    // A CSR for one key whose signature was made by another: no proof of possession.
    let other = key_for_swap();
    let swapped = swap_csr_key(&csr, &key.subject_public_key_info(), &other.subject_public_key_info());

    for (name, input) in
        [("bad signature", &bad_signature), ("tampered subject", &tampered_subject), ("swapped key", &swapped)]
    {
        assert!(matches!(verify_csr(input), Err(X509SvidError::CsrSignature)), "{name}");
        assert!(
            matches!(issuer.sign_x509_svid_from_csr(&template, input, now(), &rng()), Err(X509SvidError::CsrSignature)),
            "{name}"
        );
    }
    let mut trailing = csr.clone();
    trailing.push(0);
    for (name, input) in
        [("garbage", &b"garbage".to_vec()), ("trailing byte", &trailing), ("truncated", &csr[..csr.len() - 1].to_vec())]
    {
        assert!(matches!(verify_csr(input), Err(X509SvidError::InvalidCsr { .. })), "{name}");
    }
}

fn key_for_swap() -> KeyPair {
    key(Alg::P256)
}

/// Replaces the public key inside a CSR (same length for P-256), leaving the signature as is.
fn swap_csr_key(csr: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    assert_eq!(old.len(), new.len());
    let at = csr.windows(old.len()).position(|w| w == old).unwrap();
    let mut out = csr.to_vec();
    out[at..at + new.len()].copy_from_slice(new);
    out
}

#[test]
fn csr_subject_sans_and_extensions_are_ignored() {
    let issuer = tessera_root("example.org", Alg::P256, hours(24));
    let key = key(Alg::P256);
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "evil");
    params.subject_alt_names = vec![
        uri("spiffe://evil.org/admin"),
        uri("spiffe://example.org/admin"),
        SanType::DnsName(Ia5String::try_from("evil.com").unwrap()),
    ];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();

    let template = X509SvidTemplate::new(id("spiffe://example.org/web"), hours(1))
        .unwrap()
        .with_dns_names(["web.example.org"])
        .unwrap();
    let leaf_der = issuer.sign_x509_svid_from_csr(&template, &csr, now(), &rng()).unwrap();
    let leaf = parse(&leaf_der);
    assert_eq!(uri_sans(&leaf), vec!["spiffe://example.org/web"]);
    let dns: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(dns, vec!["web.example.org"]);
    assert_eq!(leaf.subject().to_string(), "C=US, O=Tessera, CN=web.example.org");
    assert!(!leaf.is_ca());
    assert!(!leaf.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice());
}

#[test]
fn ttl_is_capped_by_the_issuer() {
    let root = tessera_root("example.org", Alg::P256, hours(1));
    let key = key(Alg::P256);
    let long = X509SvidTemplate::new(id("spiffe://example.org/w"), hours(10)).unwrap();
    let leaf = root.sign_x509_svid(&long, &key.subject_public_key_info(), at(NOW + 600), &rng()).unwrap();
    assert_eq!(parse(&leaf).validity().not_after, parse(root.certificate_der()).validity().not_after);
    assert_eq!(root.not_after(), at(NOW + 3600));

    let inter_template = CaTemplate::new(td("example.org"), hours(10)).unwrap();
    let inter_der = root.sign_intermediate_ca(&inter_template, &key.subject_public_key_info(), now(), &rng()).unwrap();
    let inter = X509Issuer::new(inter_der, key).unwrap();
    assert_eq!(inter.not_after(), root.not_after());

    let short = X509SvidTemplate::new(id("spiffe://example.org/w"), Duration::from_secs(60)).unwrap();
    let leaf = root.sign_x509_svid(&short, &key_spki(), now(), &rng()).unwrap();
    assert_eq!(parse(&leaf).validity().not_after.timestamp(), i64::try_from(NOW + 60).unwrap());
}

fn key_spki() -> Vec<u8> {
    key(Alg::P256).subject_public_key_info()
}

#[test]
fn intermediate_chain_validates_in_any_order() {
    let root = tessera_root("example.org", Alg::P256, hours(24));
    let first = tessera_intermediate(&root, "example.org", Alg::P256, hours(12));
    let second = tessera_intermediate(&first, "example.org", Alg::P384, hours(6));
    let template = X509SvidTemplate::new(id("spiffe://example.org/deep"), hours(1)).unwrap();
    let (leaf, _) = tessera_leaf(&second, &template, Alg::P256, KeyPath::PublicKey);
    let (a, b) = (second.certificate_der().to_vec(), first.certificate_der().to_vec());
    let trust = bundles(&[("example.org", vec![root.certificate_der().to_vec()])]);
    assert_eq!(verify(&[leaf.clone(), a.clone(), b.clone()], &trust).unwrap().as_str(), "spiffe://example.org/deep");
    assert!(verify(&[leaf.clone(), b.clone(), a.clone()], &trust).is_ok());
    assert!(matches!(verify(&[leaf.clone(), a.clone()], &trust), Err(X509SvidError::UnknownAuthority)));
    assert!(matches!(verify(std::slice::from_ref(&leaf), &trust), Err(X509SvidError::UnknownAuthority)));
    // An intermediate may also be the trust anchor itself.
    let anchored_below = bundles(&[("example.org", vec![a.clone()])]);
    assert!(verify(std::slice::from_ref(&leaf), &anchored_below).is_ok());
    // Irrelevant extra certificates in the chain are tolerated.
    let stranger = tessera_root("example.org", Alg::P256, hours(24)).certificate_der().to_vec();
    assert!(verify(&[leaf, stranger, a, b], &trust).is_ok());
}

#[test]
fn upstream_signed_intermediate_ca_validates() {
    let upstream = tessera_root("upstream.test", Alg::Rsa1, hours(48));
    let intermediate = tessera_intermediate(&upstream, "example.org", Alg::P256, hours(12));
    assert_eq!(intermediate.trust_domain(), Some(&td("example.org")));
    let inter = parse(intermediate.certificate_der());
    let up = parse(upstream.certificate_der());
    assert_eq!(inter.issuer().as_raw(), up.subject().as_raw());
    let aki = inter
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
            _ => None,
        })
        .unwrap();
    let ski = up
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ski);
    assert_eq!(inter.signature_algorithm.algorithm, x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA);

    let template = X509SvidTemplate::new(id("spiffe://example.org/w"), hours(1)).unwrap();
    let (leaf, _) = tessera_leaf(&intermediate, &template, Alg::P256, KeyPath::Csr);
    let trust = bundles(&[("example.org", vec![upstream.certificate_der().to_vec()])]);
    let chain = vec![leaf, intermediate.certificate_der().to_vec()];
    assert_eq!(verify(&chain, &trust).unwrap().as_str(), "spiffe://example.org/w");
    // The upstream's own trust domain does not matter: only example.org's bundle is consulted.
    let wrong_td = bundles(&[("upstream.test", vec![upstream.certificate_der().to_vec()])]);
    assert!(matches!(verify(&chain, &wrong_td), Err(X509SvidError::NoBundle { .. })));
}

/// The check of an SVID issued for a key the caller generated: one parse, the key compared
/// with the leaf's, every presented signer a CA, and the intermediate's signature remembered
/// across SVIDs by exact bytes only, while the leaf's signature, the bundle and the validity
/// are checked every time.
#[test]
fn issued_svid_check_matches_the_key_and_remembers_only_intermediate_signatures() {
    let upstream = tessera_root("example.org", Alg::P256, hours(48));
    let intermediate = tessera_intermediate(&upstream, "example.org", Alg::P256, hours(12));
    let template = X509SvidTemplate::new(id("spiffe://example.org/w"), hours(1)).unwrap();
    let trust = bundles(&[("example.org", vec![upstream.certificate_der().to_vec()])]);
    let inter = intermediate.certificate_der().to_vec();
    let check = |chain: &[&[u8]], key: &KeyPair, trust: &Bundles, memo: &mut SignatureMemo| {
        verify_issued_x509_svid(chain, trust, now(), key.public_key_raw(), memo)
    };
    let mut memo = SignatureMemo::new();

    let (leaf1, key1) = tessera_leaf(&intermediate, &template, Alg::P256, KeyPath::Csr);
    let verified = check(&[&leaf1, &inter], &key1, &trust, &mut memo).unwrap();
    assert_eq!(verified.spiffe_id(), &id("spiffe://example.org/w"));
    assert_eq!(verified, verify_x509_svid(&[&leaf1, &inter], &trust, now()).unwrap());
    assert!(verified.not_before() <= now() && verified.not_after() > now());
    assert_eq!(memo.len(), 1, "the intermediate's signature is remembered, never the leaf's");
    let (leaf2, key2) = tessera_leaf(&intermediate, &template, Alg::P256, KeyPath::Csr);
    check(&[&leaf2, &inter], &key2, &trust, &mut memo).unwrap();
    assert_eq!(memo.len(), 1);

    // The key the SVID was requested for, and no other.
    assert!(matches!(check(&[&leaf2, &inter], &key1, &trust, &mut memo), Err(X509SvidError::KeyMismatch)));
    // A leaf whose signature is broken fails though its issuer's signature is remembered.
    let mut forged = leaf2.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert!(check(&[&forged, &inter], &key2, &trust, &mut memo).is_err());
    // So does a changed intermediate: the memo matches exact bytes.
    let mut changed = inter.clone();
    *changed.last_mut().unwrap() ^= 1;
    assert!(check(&[&leaf2, &changed], &key2, &trust, &mut memo).is_err());
    // The anchor is looked up in the bundle given each time.
    let other_root = tessera_root("example.org", Alg::P256, hours(48));
    let other = bundles(&[("example.org", vec![other_root.certificate_der().to_vec()])]);
    assert!(matches!(check(&[&leaf2, &inter], &key2, &other, &mut memo), Err(X509SvidError::UnknownAuthority)));
    let elsewhere = bundles(&[("other.org", vec![upstream.certificate_der().to_vec()])]);
    assert!(matches!(check(&[&leaf2, &inter], &key2, &elsewhere, &mut memo), Err(X509SvidError::NoBundle { .. })));
    // Validity is checked at the time given, remembered signature or not.
    let late = verify_issued_x509_svid(&[&leaf2, &inter], &trust, now() + hours(2), key2.public_key_raw(), &mut memo);
    assert!(matches!(late, Err(X509SvidError::Expired { position: ChainPosition::Leaf })), "{late:?}");
    // Every certificate after the leaf must be a CA, as `X509Svid::parse` requires, even one
    // the path does not use.
    assert!(matches!(
        check(&[&leaf2, &inter, &leaf1], &key2, &trust, &mut memo),
        Err(X509SvidError::SigningCertNotCa { position: ChainPosition::Intermediate(2) })
    ));
    assert!(memo.len() <= SignatureMemo::CAPACITY);
}

// ------------------------------------------------------------------------------------------------
// Path validation rules beyond §8

#[test]
fn path_length_constraint_is_enforced() {
    // Tessera's templates: pathLen 1 allows one intermediate; pathLen 0 refuses to sign a CA
    // but still signs leaves.
    for path_len in [0u8, 1] {
        let key = key(Alg::P256);
        let template = CaTemplate::new(td("example.org"), hours(24)).unwrap().with_path_len(path_len);
        let der = template.self_signed(&key, now(), &rng()).unwrap();
        let root = X509Issuer::new(der, key).unwrap();
        let trust = bundles(&[("example.org", vec![root.certificate_der().to_vec()])]);
        let leaf_template = X509SvidTemplate::new(id("spiffe://example.org/w"), hours(1)).unwrap();
        let (direct, _) = tessera_leaf(&root, &leaf_template, Alg::P256, KeyPath::PublicKey);
        assert!(verify(&[direct], &trust).is_ok(), "pathLen {path_len}, direct leaf");
        let ca_template = CaTemplate::new(td("example.org"), hours(12)).unwrap();
        let signed = root.sign_intermediate_ca(&ca_template, &key_spki(), now(), &rng());
        if path_len == 0 {
            assert!(matches!(signed, Err(X509SvidError::InvalidIssuer { .. })), "{signed:?}");
        } else {
            let inter = tessera_intermediate(&root, "example.org", Alg::P256, hours(12));
            let (leaf, _) = tessera_leaf(&inter, &leaf_template, Alg::P256, KeyPath::PublicKey);
            assert!(verify(&[leaf, inter.certificate_der().to_vec()], &trust).is_ok());
        }
    }

    // Crafted chains that break the constraint.
    let constrained = |cn: &str, n: u8| {
        let mut p = ca_params(cn, "example.org");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(n));
        p
    };
    let root0 = Crafted::root(constrained("Root pathLen 0", 0));
    let below_root0 = root0.child_ca(ca_params("Below pathLen 0", "example.org"));
    let root1 = Crafted::root(constrained("Root pathLen 1", 1));
    let first = root1.child_ca(ca_params("First", "example.org"));
    let second = first.child_ca(ca_params("Second", "example.org"));
    let root9 = Crafted::root(constrained("Root pathLen 9", 9));
    let inter0 = root9.child_ca(constrained("Intermediate pathLen 0", 0));
    let below_inter0 = inter0.child_ca(ca_params("Below intermediate pathLen 0", "example.org"));
    run(
        0,
        vec![
            Row {
                name: "root pathLen 0, one intermediate",
                chain: vec![below_root0.leaf(|_| {}), below_root0.der.clone()],
                bundles: example_bundle(&root0),
                expect: Err(|e| matches!(e, X509SvidError::PathLenExceeded { position: ChainPosition::Authority(0) })),
            },
            Row {
                name: "root pathLen 1, one intermediate",
                chain: vec![first.leaf(|_| {}), first.der.clone()],
                bundles: example_bundle(&root1),
                expect: Ok("spiffe://example.org/workload"),
            },
            Row {
                name: "root pathLen 1, two intermediates",
                chain: vec![second.leaf(|_| {}), second.der.clone(), first.der.clone()],
                bundles: example_bundle(&root1),
                expect: Err(|e| matches!(e, X509SvidError::PathLenExceeded { position: ChainPosition::Authority(0) })),
            },
            Row {
                name: "intermediate pathLen 0 above another intermediate",
                chain: vec![below_inter0.leaf(|_| {}), below_inter0.der.clone(), inter0.der.clone()],
                bundles: example_bundle(&root9),
                expect: Err(|e| {
                    matches!(e, X509SvidError::PathLenExceeded { position: ChainPosition::Intermediate(2) })
                }),
            },
        ],
    );
}

#[test]
fn every_signing_certificate_must_be_a_ca_with_key_cert_sign() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let mut not_ca = ca_params("Not a CA", "example.org");
    not_ca.is_ca = IsCa::ExplicitNoCa;
    let not_ca = ca.child_ca(not_ca);
    let mut no_cert_sign = ca_params("No keyCertSign", "example.org");
    no_cert_sign.key_usages = vec![KeyUsagePurpose::CrlSign];
    let no_cert_sign = ca.child_ca(no_cert_sign);
    let mut no_key_usage = ca_params("No keyUsage", "example.org");
    no_key_usage.key_usages.clear();
    let no_key_usage = ca.child_ca(no_key_usage);
    run(
        0,
        vec![
            Row {
                name: "intermediate with cA=false",
                chain: vec![not_ca.leaf(|_| {}), not_ca.der.clone()],
                bundles: trust.clone(),
                expect: Err(|e| {
                    matches!(e, X509SvidError::SigningCertNotCa { position: ChainPosition::Intermediate(1) })
                        && e.to_string().starts_with("signing certificate must have CA flag set to true")
                }),
            },
            Row {
                name: "intermediate without keyCertSign",
                chain: vec![no_cert_sign.leaf(|_| {}), no_cert_sign.der.clone()],
                bundles: trust.clone(),
                expect: Err(|e| matches!(e, X509SvidError::SigningCertNoKeyCertSign { .. })),
            },
            Row {
                name: "intermediate without keyUsage",
                chain: vec![no_key_usage.leaf(|_| {}), no_key_usage.der.clone()],
                bundles: trust.clone(),
                expect: Err(|e| matches!(e, X509SvidError::SigningCertNoKeyCertSign { .. })),
            },
        ],
    );
}

#[test]
fn unhandled_critical_extensions_are_refused() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let private_ext = |critical| {
        let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![0x05, 0x00]);
        ext.set_criticality(critical);
        ext
    };
    let critical = ca.leaf(|p| p.custom_extensions.push(private_ext(true)));
    let harmless = ca.leaf(|p| p.custom_extensions.push(private_ext(false)));
    assert!(matches!(
        verify(&[critical], &trust),
        Err(X509SvidError::UnhandledCriticalExtension { position: ChainPosition::Leaf })
    ));
    assert!(verify(&[harmless], &trust).is_ok());
}

/// A critical nameConstraints extension with URI subtrees (rcgen has no URI subtree type).
fn uri_name_constraints(permitted: &[&str], excluded: &[&str]) -> CustomExtension {
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag, u8::try_from(content.len()).unwrap()];
        out.extend_from_slice(content);
        out
    }
    let subtrees =
        |names: &[&str]| -> Vec<u8> { names.iter().flat_map(|n| tlv(0x30, &tlv(0x86, n.as_bytes()))).collect() };
    let mut body = Vec::new();
    if !permitted.is_empty() {
        body.extend(tlv(0xa0, &subtrees(permitted)));
    }
    if !excluded.is_empty() {
        body.extend(tlv(0xa1, &subtrees(excluded)));
    }
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], tlv(0x30, &body));
    ext.set_criticality(true);
    ext
}

#[test]
fn name_constraints_are_enforced_or_fail_closed() {
    let constrained = |edit: &dyn Fn(&mut CertificateParams)| {
        let mut params = ca_params("Constrained CA", "example.org");
        edit(&mut params);
        Crafted::root(params)
    };
    let check = |name: &str, ca: Crafted, dns: Option<&str>, ok: bool| {
        let trust = example_bundle(&ca);
        let leaf = ca.leaf(|p| {
            if let Some(d) = dns {
                p.subject_alt_names.push(SanType::DnsName(Ia5String::try_from(d).unwrap()));
            }
        });
        let got = verify(&[leaf], &trust);
        assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
    };
    check(
        "URI permitted exactly",
        constrained(&|p| p.custom_extensions.push(uri_name_constraints(&["example.org"], &[]))),
        None,
        true,
    );
    check(
        "URI permitted elsewhere",
        constrained(&|p| p.custom_extensions.push(uri_name_constraints(&["other.org"], &[]))),
        None,
        false,
    );
    check(
        "URI permitted subdomains only",
        constrained(&|p| p.custom_extensions.push(uri_name_constraints(&[".example.org"], &[]))),
        None,
        false,
    );
    check(
        "URI excluded",
        constrained(&|p| p.custom_extensions.push(uri_name_constraints(&[], &["example.org"]))),
        None,
        false,
    );
    let dns = |permitted: &str| {
        let permitted = permitted.to_owned();
        move |p: &mut CertificateParams| {
            p.name_constraints = Some(rcgen::NameConstraints {
                permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName(permitted.clone())],
                excluded_subtrees: vec![],
            })
        }
    };
    check("DNS permitted", constrained(&dns("example.org")), Some("web.example.org"), true);
    check("DNS outside permitted", constrained(&dns("example.org")), Some("web.evil.com"), false);
    check("DNS constraint, leaf without DNS SAN", constrained(&dns("example.org")), None, true);
    let directory = |p: &mut CertificateParams| {
        let mut name = rcgen::DistinguishedName::new();
        name.push(DnType::OrganizationName, "crafted");
        p.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DirectoryName(name)],
            excluded_subtrees: vec![],
        });
    };
    let ca = constrained(&directory);
    let trust = example_bundle(&ca);
    assert!(matches!(
        verify(&[ca.leaf(|_| {})], &trust),
        Err(X509SvidError::UnsupportedNameConstraint { position: ChainPosition::Authority(0) })
    ));
}

#[test]
fn overlong_chains_are_refused() {
    let ca = example_ca();
    let trust = example_bundle(&ca);
    let leaf = ca.leaf(|_| {});
    let chain = vec![leaf; 9];
    assert!(matches!(verify(&chain, &trust), Err(X509SvidError::ChainTooLong { .. })));
}

#[test]
fn unparseable_authorities_are_skipped() {
    let ca = example_ca();
    let trust = bundles(&[("example.org", vec![b"junk".to_vec(), ca.der.clone()])]);
    assert!(verify(&[ca.leaf(|_| {})], &trust).is_ok());
    let only_junk = bundles(&[("example.org", vec![b"junk".to_vec()])]);
    assert!(matches!(verify(&[ca.leaf(|_| {})], &only_junk), Err(X509SvidError::UnknownAuthority)));
}

// ------------------------------------------------------------------------------------------------
// The client-side parse of a Workload API response

#[test]
fn client_parse_applies_the_go_spiffe_checks() {
    let ca = example_ca();
    let (no_digital_signature, key1) = ca.leaf_with_key(|p| p.key_usages = vec![KeyUsagePurpose::KeyAgreement]);
    let (good_leaf, key2) = ca.leaf_with_key(|_| {});
    let (root_id_leaf, key3) = ca.leaf_with_key(|p| p.subject_alt_names = vec![uri("spiffe://example.org")]);
    let plain = concat_der_certificates(&[&good_leaf, &ca.der]);
    assert!(X509Svid::parse(&plain, &key2.serialize_der(), &rng()).is_ok());
    assert!(matches!(
        X509Svid::parse(&no_digital_signature, &key1.serialize_der(), &rng()),
        Err(X509SvidError::LeafNoDigitalSignature)
    ));
    assert!(matches!(
        X509Svid::parse(&root_id_leaf, &key3.serialize_der(), &rng()),
        Err(X509SvidError::LeafPathMissing)
    ));
    let leaf_then_leaf = concat_der_certificates(&[&good_leaf, &no_digital_signature]);
    let err = X509Svid::parse(&leaf_then_leaf, &key2.serialize_der(), &rng()).unwrap_err();
    assert!(matches!(err, X509SvidError::SigningCertNotCa { position: ChainPosition::Intermediate(1) }), "{err:?}");
    assert!(matches!(X509Svid::parse(&[], &key2.serialize_der(), &rng()), Err(X509SvidError::EmptyChain)));
    let err = X509Svid::parse(&plain, &key1.serialize_der(), &rng()).unwrap_err();
    assert_eq!(err.to_string(), "leaf certificate does not match private key");
    let svid = X509Svid::parse(&plain, &key2.serialize_der(), &rng()).unwrap();
    assert!(!format!("{svid:?}").contains(&format!("{:?}", key2.serialize_der())));
    assert_eq!(svid.private_key_pkcs8_der(), key2.serialize_der().as_slice());
    assert_eq!(svid.not_after(), at(NOW + 3600));
}

// ------------------------------------------------------------------------------------------------
// Hostile input never panics

/// A valid chain (leaf, intermediate), its bundles and the leaf's PKCS#8 key.
type Sample = (Vec<Vec<u8>>, Bundles, Vec<u8>);

fn sample_chain() -> &'static Sample {
    static SAMPLE: OnceLock<Sample> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let ca = example_ca();
        let inter = ca.child_ca(ca_params("Intermediate", "example.org"));
        let (leaf, key) = inter.leaf_with_key(|p| {
            p.subject_alt_names.push(SanType::DnsName(Ia5String::try_from("w.example.org").unwrap()))
        });
        (vec![leaf, inter.der.clone()], example_bundle(&ca), key.serialize_der())
    })
}

proptest! {
    #[test]
    fn validator_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (_, trust, key) = sample_chain();
        let _ = verify_x509_svid(&[&bytes], trust, now());
        let _ = split_der_certificates(&bytes);
        let _ = X509Svid::parse(&bytes, key, &rng());
        let _ = X509Svid::parse(&bytes, &bytes, &rng());
        let _ = verify_csr(&bytes);
    }

    #[test]
    fn validator_never_panics_on_damaged_valid_der(
        which in 0usize..2,
        cut in any::<proptest::sample::Index>(),
        flip in any::<proptest::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let (chain, trust, key) = sample_chain();
        let original = &chain[which];
        let truncated = &original[..cut.index(original.len())];
        let mut flipped = original.clone();
        let at = flip.index(flipped.len());
        flipped[at] ^= mask;
        for damaged in [truncated, flipped.as_slice()] {
            let mut presented: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
            presented[which] = damaged;
            let result = verify_x509_svid(&presented, trust, now());
            // A damaged certificate may still parse, but it can never verify.
            prop_assert!(result.is_err() || damaged == original.as_slice());
            let concatenated = concat_der_certificates(&presented);
            let _ = split_der_certificates(&concatenated);
            let _ = X509Svid::parse(&concatenated, key, &rng());
        }
    }
}

#[test]
fn no_single_bit_flip_of_a_valid_chain_verifies() {
    let (chain, trust, _) = sample_chain();
    for which in 0..chain.len() {
        for at in 0..chain[which].len() {
            for bit in 0..8 {
                let mut damaged = chain[which].clone();
                damaged[at] ^= 1 << bit;
                let mut presented: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
                presented[which] = &damaged;
                assert!(
                    verify_x509_svid(&presented, trust, now()).is_err(),
                    "certificate {which}, byte {at}, bit {bit}"
                );
            }
        }
    }
}
