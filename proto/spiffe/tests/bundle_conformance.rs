//! SPIFFE bundle conformance: cases 50-51 of the conformance checklist §8 (encoding and parsing
//! rules of §4), the Workload API JWKS form, PEM/DER forms, bundle maps and bundle sets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use serde_json::{Value, json};
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::{
    Bundle, BundleError, BundleSet, MAX_BUNDLE_JSON_LEN, decode_bundle_map, encode_bundle_map, parse_pem_certificates,
    split_der_certificates,
};
use tessera_spiffe::jwt::{JwtAuthorities, MissingJwtAuthority};
use tessera_spiffe::keys::{Jwk, KeyType, PublicKey, SigningKey};
use tessera_spiffe::x509::X509Authorities;

struct Fixture {
    /// Self-signed CA certificates: P-256, RSA-2048, P-384.
    ca_p256: Vec<u8>,
    ca_rsa: Vec<u8>,
    ca_p384: Vec<u8>,
    jwt_p256: PublicKey,
    jwt_rsa: PublicKey,
}

/// Keys and certificates are made once per test binary (RSA generation is slow in debug).
static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rng = SystemRandom::new();
    let ca = |key_type| {
        let key = SigningKey::generate(key_type, &rng).unwrap();
        (self_signed_ca(&key), key)
    };
    let (ca_p256, _) = ca(KeyType::EcP256);
    let (ca_rsa, rsa_key) = ca(KeyType::Rsa2048);
    let (ca_p384, _) = ca(KeyType::EcP384);
    Fixture {
        ca_p256,
        ca_rsa,
        ca_p384,
        jwt_p256: SigningKey::generate(KeyType::EcP256, &rng).unwrap().public_key().clone(),
        jwt_rsa: rsa_key.public_key().clone(),
    }
});

fn self_signed_ca(key: &SigningKey) -> Vec<u8> {
    let key_pair = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key_pair).unwrap().der().to_vec()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// example.org with two CAs, two JWT keys, sequence 12 and a 300 s refresh hint.
fn full_bundle() -> Bundle {
    let f = &*FIXTURE;
    let mut bundle = Bundle::new(td("example.org"));
    assert!(bundle.add_x509_authority(&f.ca_p256).unwrap());
    assert!(bundle.add_x509_authority(&f.ca_rsa).unwrap());
    bundle.add_jwt_authority("kid-ec", f.jwt_p256.clone()).unwrap();
    bundle.add_jwt_authority("kid-rsa", f.jwt_rsa.clone()).unwrap();
    bundle.set_sequence(12);
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    bundle
}

fn decode(json: &Value) -> Result<Bundle, BundleError> {
    Bundle::from_json(td("example.org"), json.to_string().as_bytes())
}

fn jwk_json(key: &PublicKey) -> Value {
    serde_json::to_value(key.to_jwk()).unwrap()
}

fn merge(mut base: Value, extra: Value) -> Value {
    for (key, value) in extra.as_object().unwrap() {
        base[key] = value.clone();
    }
    base
}

fn x509_entry(der: &[u8]) -> Value {
    let key = PublicKey::from_spki_der(&spki_of(der)).unwrap();
    merge(jwk_json(&key), json!({"use": "x509-svid", "x5c": [STANDARD.encode(der)]}))
}

fn jwt_entry(kid: &str, key: &PublicKey) -> Value {
    merge(jwk_json(key), json!({"use": "jwt-svid", "kid": kid}))
}

fn spki_of(der: &[u8]) -> Vec<u8> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).unwrap();
    certificate.public_key().raw.to_vec()
}

#[test]
fn case_50_encoding_has_the_spiffe_shape() {
    let f = &*FIXTURE;
    let bundle = full_bundle();
    let document: Value = serde_json::from_str(&bundle.to_json()).unwrap();
    assert_eq!(document["spiffe_sequence"], json!(12));
    assert_eq!(document["spiffe_refresh_hint"], json!(300));
    let keys = document["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4);
    let x509: Vec<&Value> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    let jwt: Vec<&Value> = keys.iter().filter(|k| k["use"] == "jwt-svid").collect();
    assert_eq!((x509.len(), jwt.len()), (2, 2));
    for (entry, der) in x509.iter().zip([&f.ca_p256, &f.ca_rsa]) {
        // One x5c value, standard base64 of the DER certificate, no kid.
        let x5c = entry["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(), **der);
        assert!(entry.get("kid").is_none());
        // The key parameters are those of the certificate's key.
        let key = PublicKey::from_spki_der(&spki_of(der)).unwrap();
        let params: Jwk = serde_json::from_value((*entry).clone()).unwrap();
        assert_eq!(params, key.to_jwk());
    }
    assert_eq!(x509[0]["kty"], "EC");
    assert_eq!(x509[0]["crv"], "P-256");
    assert_eq!(x509[1]["kty"], "RSA");
    assert_eq!(x509[1]["e"], "AQAB");
    for entry in &jwt {
        assert!(entry["kid"].as_str().is_some_and(|kid| !kid.is_empty()));
        assert!(entry.get("x5c").is_none());
    }
    assert_eq!(jwt[0]["kid"], "kid-ec");
    assert_eq!(jwt[1]["kid"], "kid-rsa");
}

#[test]
fn case_50_sequence_and_hint_are_omitted_when_unset() {
    let mut bundle = full_bundle();
    bundle.set_sequence(0);
    bundle.set_refresh_hint(None);
    let document: Value = serde_json::from_str(&bundle.to_json()).unwrap();
    assert!(document.get("spiffe_sequence").is_none());
    assert!(document.get("spiffe_refresh_hint").is_none());
    // A sub-second hint rounds up to whole seconds.
    bundle.set_refresh_hint(Some(Duration::from_millis(1500)));
    let document: Value = serde_json::from_str(&bundle.to_json()).unwrap();
    assert_eq!(document["spiffe_refresh_hint"], json!(2));
    // An empty bundle still has `keys`.
    let empty: Value = serde_json::from_str(&Bundle::new(td("a.org")).to_json()).unwrap();
    assert_eq!(empty, json!({"keys": []}));
}

#[test]
fn case_51_unknown_use_and_kty_are_ignored() {
    let f = &*FIXTURE;
    let ec = jwk_json(&f.jwt_p256);
    let document = json!({
        "keys": [
            merge(ec.clone(), json!({"use": "wit-svid", "kid": "w"})),
            merge(ec.clone(), json!({"use": "JWT-SVID", "kid": "upper"})),
            merge(ec.clone(), json!({"use": "sig", "kid": "sig"})),
            merge(ec.clone(), json!({"kid": "no-use"})),
            merge(ec.clone(), json!({"use": 5, "kid": "numeric-use"})),
            {"use": "jwt-svid", "kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "okp"},
            {"use": "jwt-svid", "kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"use": "x509-svid", "kty": "OKP", "x5c": "not even an array"},
            {"use": "jwt-svid", "kid": "no-kty"},
            {"use": "wit-svid", "kty": "EC", "crv": 42},
            jwt_entry("good", &f.jwt_p256),
            x509_entry(&f.ca_p384),
        ],
        "unknown_top_level": {"anything": [1, 2, 3]},
    });
    let bundle = decode(&document).unwrap();
    assert_eq!(bundle.jwt_authorities().keys().collect::<Vec<_>>(), vec!["good"]);
    assert_eq!(bundle.x509_authorities().collect::<Vec<_>>(), vec![f.ca_p384.as_slice()]);
}

#[test]
fn case_51_empty_keys_means_untrusted() {
    let bundle = decode(&json!({"keys": [], "spiffe_sequence": 3})).unwrap();
    assert!(bundle.is_empty());
    assert_eq!(bundle.sequence(), 3);
    assert_eq!(bundle.jwt_authority(&td("example.org"), "any"), Err(MissingJwtAuthority::UnknownKeyId));
    assert!(
        X509Authorities::x509_authorities(&bundle, &td("example.org")).is_none(),
        "no X.509 authorities means no X.509 bundle"
    );
    // Only ignorable entries: also untrusted.
    let bundle = decode(&json!({"keys": [{"use": "foo", "kty": "bar"}]})).unwrap();
    assert!(bundle.is_empty());
}

#[test]
fn case_51_duplicate_trust_domain_in_map_is_rejected() {
    let bundle = Bundle::new(td("example.com")).to_json();
    let map =
        format!(r#"{{"trust_domains": {{"example.com": {bundle}, "other.org": {bundle}, "example.com": {bundle}}}}}"#);
    assert!(matches!(
        decode_bundle_map(map.as_bytes()),
        Err(BundleError::DuplicateTrustDomain(name)) if name == "example.com"
    ));
    // Also when the duplicate is spelled with a JSON escape.
    let map = format!(r#"{{"trust_domains": {{"example.com": {bundle}, "example.co\u006d": {bundle}}}}}"#);
    assert!(matches!(decode_bundle_map(map.as_bytes()), Err(BundleError::DuplicateTrustDomain(_))));
}

#[test]
fn decoding_rules_table() {
    let f = &*FIXTURE;
    type Check = fn(&BundleError) -> bool;
    let two_certs =
        merge(x509_entry(&f.ca_p256), json!({"x5c": [STANDARD.encode(&f.ca_p256), STANDARD.encode(&f.ca_rsa)]}));
    let mismatched = merge(x509_entry(&f.ca_p256), json!({"x5c": [STANDARD.encode(&f.ca_p384)]}));
    let cases: Vec<(&str, Value, Check)> = vec![
        ("missing keys", json!({"spiffe_sequence": 1}), |e| {
            matches!(e, BundleError::MissingKeys) && e.to_string() == "no authorities found"
        }),
        ("null keys", json!({"keys": null}), |e| matches!(e, BundleError::MissingKeys)),
        ("keys not an array", json!({"keys": {}}), |e| matches!(e, BundleError::Json(_))),
        ("x5c with two certificates", json!({"keys": [two_certs]}), |e| {
            e.to_string() == "expected a single certificate in x509-svid entry 0; got 2"
        }),
        ("x5c empty", json!({"keys": [merge(x509_entry(&f.ca_p256), json!({"x5c": []}))]}), |e| {
            matches!(e, BundleError::X5cCount { index: 0, count: 0 })
        }),
        (
            "x5c missing",
            json!({"keys": [jwk_json(&f.jwt_p256), merge(jwk_json(&f.jwt_p256), json!({"use": "x509-svid"}))]}),
            |e| matches!(e, BundleError::X5cCount { index: 1, count: 0 }),
        ),
        ("x5c not base64", json!({"keys": [merge(x509_entry(&f.ca_p256), json!({"x5c": ["***"]}))]}), |e| {
            matches!(e, BundleError::InvalidEntry { index: 0, .. })
        }),
        ("x5c not a certificate", json!({"keys": [merge(x509_entry(&f.ca_p256), json!({"x5c": ["MAA="]}))]}), |e| {
            matches!(e, BundleError::InvalidEntry { index: 0, .. })
        }),
        ("certificate key differs from JWK params", json!({"keys": [mismatched]}), |e| {
            matches!(e, BundleError::CertificateKeyMismatch { index: 0 })
        }),
        ("jwt entry without kid", json!({"keys": [merge(jwk_json(&f.jwt_p256), json!({"use": "jwt-svid"}))]}), |e| {
            e.to_string() == "jwt-svid entry 0: keyID cannot be empty"
        }),
        ("jwt entry with empty kid", json!({"keys": [jwt_entry("", &f.jwt_p256)]}), |e| {
            matches!(e, BundleError::MissingKeyId { index: 0 })
        }),
        (
            "duplicate kid",
            json!({"keys": [jwt_entry("k", &f.jwt_p256), jwt_entry("k", &f.jwt_rsa)]}),
            |e| matches!(e, BundleError::DuplicateKeyId(kid) if kid == "k"),
        ),
        ("duplicate kid, same key", json!({"keys": [jwt_entry("k", &f.jwt_p256), jwt_entry("k", &f.jwt_p256)]}), |e| {
            matches!(e, BundleError::DuplicateKeyId(_))
        }),
        (
            "known kty with bad params",
            json!({"keys": [merge(jwt_entry("k", &f.jwt_p256), json!({"x": "AQAB"}))]}),
            |e| matches!(e, BundleError::InvalidEntry { index: 0, .. }),
        ),
        (
            "known kty with unknown curve",
            json!({"keys": [merge(jwt_entry("k", &f.jwt_p256), json!({"crv": "secp256k1"}))]}),
            |e| matches!(e, BundleError::InvalidEntry { index: 0, .. }),
        ),
        ("negative sequence", json!({"keys": [], "spiffe_sequence": -1}), |e| {
            matches!(e, BundleError::InvalidSequence)
        }),
        ("string sequence", json!({"keys": [], "spiffe_sequence": "1"}), |e| matches!(e, BundleError::InvalidSequence)),
        ("fractional refresh hint", json!({"keys": [], "spiffe_refresh_hint": 1.5}), |e| {
            matches!(e, BundleError::InvalidRefreshHint)
        }),
        ("not an object", json!([]), |e| matches!(e, BundleError::Json(_))),
    ];
    for (name, document, check) in cases {
        match decode(&document) {
            Ok(bundle) => panic!("case {name:?}: expected rejection, got {bundle:?}"),
            Err(error) => assert!(check(&error), "case {name:?}: {error:?} ({error})"),
        }
    }
}

#[test]
fn decoding_edge_cases_that_are_accepted() {
    let f = &*FIXTURE;
    // Hint zero or negative: no hint. Huge sequence: kept.
    let bundle = decode(&json!({"keys": [], "spiffe_refresh_hint": 0, "spiffe_sequence": u64::MAX})).unwrap();
    assert_eq!(bundle.refresh_hint(), None);
    assert_eq!(bundle.sequence(), u64::MAX);
    let bundle = decode(&json!({"keys": [], "spiffe_refresh_hint": -5})).unwrap();
    assert_eq!(bundle.refresh_hint(), None);
    // x5c without padding, a kid on an x509 entry (ignored), the same CA twice (deduplicated).
    let unpadded = STANDARD.encode(&f.ca_p256).trim_end_matches('=').to_owned();
    let entry = merge(x509_entry(&f.ca_p256), json!({"x5c": [unpadded], "kid": "ignored"}));
    let bundle = decode(&json!({"keys": [entry, x509_entry(&f.ca_p256)]})).unwrap();
    assert_eq!(bundle.x509_authorities().count(), 1);
    assert!(bundle.jwt_authorities().is_empty());
}

#[test]
fn repeated_members_are_rejected() {
    let f = &*FIXTURE;
    let entry = jwt_entry("a", &f.jwt_p256).to_string();
    for document in [
        format!(r#"{{"keys": [{entry}], "keys": []}}"#),
        r#"{"keys": [], "spiffe_sequence": 1, "spiffe_sequence": 2}"#.to_owned(),
        entry_with_second_kid(&entry),
    ] {
        let result = Bundle::from_json(td("example.org"), document.as_bytes());
        assert!(
            matches!(&result, Err(BundleError::Json(e)) if e.to_string().contains("duplicate field")),
            "{document}: {result:?}"
        );
    }
}

fn entry_with_second_kid(entry: &str) -> String {
    let entry = entry.trim_end_matches('}');
    format!(r#"{{"keys": [{entry}, "kid": "b"}}]}}"#)
}

#[test]
fn json_round_trip() {
    let bundle = full_bundle();
    let decoded = Bundle::from_json(td("example.org"), bundle.to_json().as_bytes()).unwrap();
    assert_eq!(decoded, bundle);
    assert_eq!(decoded.refresh_hint(), Some(Duration::from_secs(300)));
}

#[test]
fn workload_api_jwks_form() {
    let bundle = full_bundle();
    let document: Value = serde_json::from_str(&bundle.to_jwt_jwks()).unwrap();
    let object = document.as_object().unwrap();
    assert_eq!(object.keys().collect::<Vec<_>>(), vec!["keys"]);
    let keys = document["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    for key in keys {
        assert!(key["kid"].as_str().is_some_and(|kid| !kid.is_empty()));
        assert!(key.get("use").is_none());
        assert!(key.get("x5c").is_none());
    }
    let decoded = Bundle::from_jwt_jwks(td("example.org"), bundle.to_jwt_jwks().as_bytes()).unwrap();
    assert_eq!(decoded.jwt_authorities(), bundle.jwt_authorities());
    assert_eq!(decoded.x509_authorities().count(), 0);
    // Every key needs a kid; x509-svid entries are not JWT authorities.
    let f = &*FIXTURE;
    let no_kid = json!({"keys": [jwk_json(&f.jwt_p256)]}).to_string();
    assert!(matches!(
        Bundle::from_jwt_jwks(td("example.org"), no_kid.as_bytes()),
        Err(BundleError::MissingKeyId { index: 0 })
    ));
    let spiffe_form = bundle.to_json();
    let decoded = Bundle::from_jwt_jwks(td("example.org"), spiffe_form.as_bytes()).unwrap();
    assert_eq!(decoded.jwt_authorities(), bundle.jwt_authorities());
    assert_eq!(decoded.x509_authorities().count(), 0);
}

#[test]
fn pem_and_der_round_trips() {
    let bundle = full_bundle();
    let pem = bundle.x509_authorities_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    let from_pem = Bundle::from_x509_authorities_pem(td("example.org"), pem.as_bytes()).unwrap();
    assert!(from_pem.x509_authorities().eq(bundle.x509_authorities()));
    let der = bundle.x509_authorities_der();
    assert_eq!(split_der_certificates(&der).unwrap().len(), 2);
    let from_der = Bundle::from_x509_authorities_der(td("example.org"), &der).unwrap();
    assert!(from_der.x509_authorities().eq(bundle.x509_authorities()));
    // Truncated DER and trailing garbage are errors, never panics.
    for cut in [1, 10, der.len() / 2, der.len() - 1] {
        assert!(Bundle::from_x509_authorities_der(td("example.org"), &der[..cut]).is_err());
    }
    let mut trailing = der.clone();
    trailing.push(0);
    assert!(Bundle::from_x509_authorities_der(td("example.org"), &trailing).is_err());
    // A DER SEQUENCE that is not a certificate.
    assert!(matches!(
        Bundle::from_x509_authorities_der(td("example.org"), &[0x30, 0x00]),
        Err(BundleError::InvalidCertificate(_))
    ));
    // PEM with text around the blocks is fine; other block types are not.
    let decorated = format!("subject=CN=whatever\n{pem}\ntrailing comment\n");
    assert_eq!(parse_pem_certificates(decorated.as_bytes()).unwrap().len(), 2);
    let with_key = format!("{pem}-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n");
    assert!(matches!(parse_pem_certificates(with_key.as_bytes()), Err(BundleError::UnexpectedPemBlock(_))));
}

#[test]
fn bundle_map_round_trip_and_rules() {
    let own = full_bundle();
    let mut other = Bundle::new(td("other.org"));
    other.add_x509_authority(&FIXTURE.ca_p384).unwrap();
    let map = encode_bundle_map([&other, &own]).unwrap();
    let document: Value = serde_json::from_str(&map).unwrap();
    let trust_domains = document["trust_domains"].as_object().unwrap();
    assert_eq!(trust_domains.keys().collect::<Vec<_>>(), vec!["example.org", "other.org"]);
    // spec: producers SHOULD omit the refresh hint in mapped bundles.
    assert!(trust_domains["example.org"].get("spiffe_refresh_hint").is_none());
    assert_eq!(trust_domains["example.org"]["spiffe_sequence"], json!(12));
    let decoded = decode_bundle_map(map.as_bytes()).unwrap();
    let mut expected_own = own.clone();
    expected_own.set_refresh_hint(None);
    assert_eq!(decoded, vec![expected_own, other.clone()]);
    assert!(matches!(encode_bundle_map([&other, &other]), Err(BundleError::DuplicateTrustDomain(_))));

    let empty = Bundle::new(td("a.org")).to_json();
    for bad_name in ["Example.org", "spiffe://example.org", "", "exa mple.org", "a.org/x"] {
        let map = json!({"trust_domains": {bad_name: serde_json::from_str::<Value>(&empty).unwrap()}});
        assert!(
            matches!(decode_bundle_map(map.to_string().as_bytes()), Err(BundleError::InvalidTrustDomain(_))),
            "{bad_name}"
        );
    }
    assert!(matches!(decode_bundle_map(br#"{"other": {}}"#), Err(BundleError::MissingTrustDomains)));
    assert!(matches!(
        decode_bundle_map(br#"{"trust_domains": {"a.org": {"keys": [], "spiffe_sequence": -1}}}"#),
        Err(BundleError::InMap { trust_domain, .. }) if trust_domain == "a.org"
    ));
    assert!(decode_bundle_map(br#"{"trust_domains": {}}"#).unwrap().is_empty());
}

#[test]
fn bundle_set_chooses_by_trust_domain() {
    let f = &*FIXTURE;
    let own = full_bundle();
    let mut other = Bundle::new(td("other.org"));
    other.add_x509_authority(&f.ca_p384).unwrap();
    other.add_jwt_authority("kid-ec", f.jwt_rsa.clone()).unwrap();
    let mut set = BundleSet::new(own.clone());
    assert!(set.insert_federated(other.clone()).unwrap().is_none());
    assert_eq!(set.len(), 2);
    assert_eq!(set.own_trust_domain(), &td("example.org"));
    assert_eq!(set.federated().count(), 1);
    assert_eq!(set.iter().count(), 2);

    // JWT: same kid in two trust domains resolves per trust domain.
    assert_eq!(set.jwt_authority(&td("example.org"), "kid-ec"), Ok(&f.jwt_p256));
    assert_eq!(set.jwt_authority(&td("other.org"), "kid-ec"), Ok(&f.jwt_rsa));
    assert_eq!(set.jwt_authority(&td("other.org"), "kid-rsa"), Err(MissingJwtAuthority::UnknownKeyId));
    assert_eq!(set.jwt_authority(&td("nowhere.org"), "kid-ec"), Err(MissingJwtAuthority::NoBundle));
    // A single bundle answers only for its own trust domain.
    assert_eq!(own.jwt_authority(&td("other.org"), "kid-ec"), Err(MissingJwtAuthority::NoBundle));

    // X.509: never pooled across trust domains.
    assert_eq!(set.x509_authorities(&td("other.org")).unwrap(), vec![f.ca_p384.as_slice()]);
    assert_eq!(set.x509_authorities(&td("example.org")).unwrap(), vec![f.ca_p256.as_slice(), f.ca_rsa.as_slice()]);
    assert!(set.x509_authorities(&td("nowhere.org")).is_none());
    assert!(X509Authorities::x509_authorities(&own, &td("other.org")).is_none());

    // Slots are checked.
    assert!(matches!(set.insert_federated(own.clone()), Err(BundleError::WrongTrustDomain { .. })));
    assert!(matches!(set.replace_own(other.clone()), Err(BundleError::WrongTrustDomain { .. })));
    let mut newer = own.clone();
    newer.set_sequence(13);
    assert_eq!(set.replace_own(newer).unwrap().sequence(), 12);
    assert_eq!(set.own().sequence(), 13);
    // Ending federation removes the trust domain.
    assert!(set.remove_federated(&td("other.org")).is_some());
    assert!(set.get(&td("other.org")).is_none());
    assert_eq!(set.jwt_authority(&td("other.org"), "kid-ec"), Err(MissingJwtAuthority::NoBundle));
}

#[test]
fn bundle_mutation_rules() {
    let f = &*FIXTURE;
    let mut bundle = Bundle::new(td("example.org"));
    assert!(bundle.add_x509_authority(&f.ca_p256).unwrap());
    assert!(!bundle.add_x509_authority(&f.ca_p256).unwrap());
    assert!(bundle.has_x509_authority(&f.ca_p256));
    assert!(bundle.remove_x509_authority(&f.ca_p256));
    assert!(!bundle.remove_x509_authority(&f.ca_p256));
    assert!(matches!(bundle.add_x509_authority(b"not a cert"), Err(BundleError::InvalidCertificate(_))));
    let mut with_trailing = f.ca_p256.clone();
    with_trailing.push(0);
    assert!(bundle.add_x509_authority(&with_trailing).is_err());

    bundle.add_jwt_authority("k", f.jwt_p256.clone()).unwrap();
    bundle.add_jwt_authority("k", f.jwt_p256.clone()).unwrap();
    assert!(matches!(bundle.add_jwt_authority("k", f.jwt_rsa.clone()), Err(BundleError::DuplicateKeyId(_))));
    assert!(matches!(bundle.add_jwt_authority("", f.jwt_rsa.clone()), Err(BundleError::MissingKeyId { .. })));
    assert_eq!(bundle.jwt_authority_by_key_id("k"), Some(&f.jwt_p256));
    assert_eq!(bundle.remove_jwt_authority("k"), Some(f.jwt_p256.clone()));
    assert!(bundle.is_empty());
}

#[test]
fn debug_output_is_compact() {
    let debug = format!("{:?}", full_bundle());
    assert!(debug.contains("example.org"));
    assert!(debug.contains("kid-ec"));
    assert!(debug.len() < 400, "{debug}");
}

#[test]
fn size_caps_are_enforced() {
    let oversized = vec![b' '; MAX_BUNDLE_JSON_LEN + 1];
    assert!(matches!(Bundle::from_json(td("example.org"), &oversized), Err(BundleError::TooLarge { .. })));
    assert!(matches!(Bundle::from_jwt_jwks(td("example.org"), &oversized), Err(BundleError::TooLarge { .. })));
    assert!(matches!(split_der_certificates(&oversized), Err(BundleError::TooLarge { .. })));
    assert!(matches!(parse_pem_certificates(&oversized), Err(BundleError::TooLarge { .. })));
}
