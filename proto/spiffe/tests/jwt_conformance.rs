//! JWT-SVID conformance: cases 25-37 of the conformance checklist §8, plus signing shape,
//! algorithm round trips and hostile-input checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use ring::rand::SystemRandom;
use serde_json::{Value, json};
use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::jwt::{
    self, JwsAlgorithm, JwtSignError, JwtSvidClaims, JwtSvidError, MAX_TOKEN_LEN, ValidatedJwtSvid,
};
use tessera_spiffe::keys::{Jwk, KeyType, PublicKey, SigningKey};
use tessera_spiffe::{SpiffeId, TrustDomain};

/// A fixed "now" so every case is deterministic.
const NOW_SECS: u64 = 1_800_000_000;
const SUBJECT: &str = "spiffe://example.org/workload";

struct Keys {
    p256: SigningKey,
    p384: SigningKey,
    rsa: SigningKey,
    /// A P-256 key of the federated trust domain `other.org`.
    other: SigningKey,
}

/// Keys are generated once per test binary: RSA generation is slow in debug builds.
static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let rng = SystemRandom::new();
    Keys {
        p256: SigningKey::generate(KeyType::EcP256, &rng).unwrap(),
        p384: SigningKey::generate(KeyType::EcP384, &rng).unwrap(),
        rsa: SigningKey::generate(KeyType::Rsa2048, &rng).unwrap(),
        other: SigningKey::generate(KeyType::EcP256, &rng).unwrap(),
    }
});

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// example.org trusts kids `p256`, `p384`, `rsa`; other.org trusts `other` and, under the
/// colliding kid `p256`, its own key.
fn bundles() -> BundleSet {
    let keys = &*KEYS;
    let mut own = Bundle::new(td("example.org"));
    own.add_jwt_authority("p256", keys.p256.public_key().clone()).unwrap();
    own.add_jwt_authority("p384", keys.p384.public_key().clone()).unwrap();
    own.add_jwt_authority("rsa", keys.rsa.public_key().clone()).unwrap();
    let mut other = Bundle::new(td("other.org"));
    other.add_jwt_authority("other", keys.other.public_key().clone()).unwrap();
    other.add_jwt_authority("p256", keys.other.public_key().clone()).unwrap();
    let mut set = BundleSet::new(own);
    set.insert_federated(other).unwrap();
    set
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Builds a compact JWS from raw header and claims JSON text, signed by `key` with `alg`.
fn craft_raw(header: &str, claims: &str, key: &SigningKey, alg: JwsAlgorithm) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = key.sign(alg, input.as_bytes(), &SystemRandom::new()).unwrap();
    format!("{input}.{}", b64(signature))
}

fn craft(header: &Value, claims: &Value, key: &SigningKey, alg: JwsAlgorithm) -> String {
    craft_raw(&header.to_string(), &claims.to_string(), key, alg)
}

fn header(alg: &str, kid: &str) -> Value {
    json!({"alg": alg, "kid": kid, "typ": "JWT"})
}

fn claims() -> Value {
    json!({"sub": SUBJECT, "aud": ["svc"], "exp": NOW_SECS + 300, "iat": NOW_SECS})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

/// A valid ES256 token with the given claims.
fn es256(claims: &Value) -> String {
    craft(&header("ES256", "p256"), claims, &KEYS.p256, JwsAlgorithm::Es256)
}

fn validate(token: &str) -> Result<ValidatedJwtSvid, JwtSvidError> {
    jwt::validate(token, &bundles(), &["svc"], now())
}

type Check = fn(&JwtSvidError) -> bool;

enum Expect {
    Ok,
    Err(Check),
}

fn run(cases: Vec<(&str, String, Expect)>) {
    for (name, token, expect) in cases {
        let result = validate(&token);
        match (expect, result) {
            (Expect::Ok, Ok(_)) => {}
            (Expect::Err(check), Err(error)) => {
                assert!(check(&error), "case {name:?}: unexpected error {error:?} ({error})");
            }
            (Expect::Ok, Err(error)) => panic!("case {name:?}: expected OK, got {error:?}"),
            (Expect::Err(_), Ok(v)) => panic!("case {name:?}: expected rejection, got {v:?}"),
        }
    }
}

#[test]
fn case_25_valid_es256_token_returns_id_and_claims() {
    let token = es256(&claims());
    let validated = validate(&token).unwrap();
    assert_eq!(validated.spiffe_id().as_str(), SUBJECT);
    assert_eq!(validated.key_id(), "p256");
    assert_eq!(validated.algorithm(), JwsAlgorithm::Es256);
    assert_eq!(validated.audience(), ["svc"]);
    assert_eq!(validated.expires_at(), now() + Duration::from_secs(300));
    let claims = validated.claims();
    assert_eq!(claims["sub"], json!(SUBJECT));
    assert_eq!(claims["aud"], json!(["svc"]));
    assert_eq!(claims["exp"], json!(NOW_SECS + 300));
    assert_eq!(claims["iat"], json!(NOW_SECS));
}

#[test]
fn case_26_alg_none_is_rejected() {
    let claims = claims().to_string();
    let none_kid = format!("{}.{}.", b64(r#"{"alg":"none","kid":"p256","typ":"JWT"}"#), b64(&claims));
    let none_bare = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&claims));
    let none_upper = format!("{}.{}.", b64(r#"{"alg":"NONE","kid":"p256"}"#), b64(&claims));
    for token in [none_kid, none_bare, none_upper] {
        let error = validate(&token).unwrap_err();
        assert!(matches!(error, JwtSvidError::UnsupportedAlgorithm(_)), "{error:?}");
        assert!(error.to_string().starts_with("unable to parse JWT token"));
    }
}

#[test]
fn case_27_hs256_signed_with_public_key_bytes_is_rejected() {
    let public = KEYS.p256.public_key();
    let jwk_json = serde_json::to_string(&public.to_jwk()).unwrap();
    let secrets: [&[u8]; 2] = [public.spki_der(), jwk_json.as_bytes()];
    for (alg, hmac) in
        [("HS256", ring::hmac::HMAC_SHA256), ("HS384", ring::hmac::HMAC_SHA384), ("HS512", ring::hmac::HMAC_SHA512)]
    {
        for secret in secrets {
            let input = format!("{}.{}", b64(header(alg, "p256").to_string()), b64(claims().to_string()));
            let tag = ring::hmac::sign(&ring::hmac::Key::new(hmac, secret), input.as_bytes());
            let token = format!("{input}.{}", b64(tag.as_ref()));
            let error = validate(&token).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    r#"unable to parse JWT token: unexpected signature algorithm "{alg}"; expected ["ES256" "ES384" "ES512" "RS256" "RS384" "RS512" "PS256" "PS384" "PS512"]"#
                )
            );
        }
    }
}

#[test]
fn case_28_audience_rules() {
    run(vec![
        (
            "other audience",
            es256(&with(claims(), "aud", json!(["other"]))),
            Expect::Err(|e| e.to_string() == r#"expected audience in ["svc"] (audience=["other"])"#),
        ),
        ("one of several", es256(&with(claims(), "aud", json!(["a", "svc"]))), Expect::Ok),
        ("plain string", es256(&with(claims(), "aud", json!("svc"))), Expect::Ok),
        (
            "case-sensitive",
            es256(&with(claims(), "aud", json!(["SVC"]))),
            Expect::Err(|e| matches!(e, JwtSvidError::AudienceMismatch { .. })),
        ),
        (
            "empty array",
            es256(&with(claims(), "aud", json!([]))),
            Expect::Err(|e| e.to_string() == r#"expected audience in ["svc"] (audience=[])"#),
        ),
        (
            "non-string member",
            es256(&with(claims(), "aud", json!(["svc", 1]))),
            Expect::Err(|e| matches!(e, JwtSvidError::InvalidClaim { claim: "aud", .. })),
        ),
        (
            "number",
            es256(&with(claims(), "aud", json!(7))),
            Expect::Err(|e| matches!(e, JwtSvidError::InvalidClaim { claim: "aud", .. })),
        ),
    ]);
    // Several expected audiences: any one suffices.
    let token = es256(&with(claims(), "aud", json!(["b"])));
    assert!(jwt::validate(&token, &bundles(), &["a", "b"], now()).is_ok());
    // No expected audience: fail closed.
    let none: [&str; 0] = [];
    assert!(matches!(jwt::validate(&token, &bundles(), &none, now()), Err(JwtSvidError::NoExpectedAudience)));
}

#[test]
fn case_29_missing_required_claims() {
    run(vec![
        (
            "no aud",
            es256(&without(claims(), "aud")),
            Expect::Err(|e| e.to_string() == r#"expected audience in ["svc"] (audience=[])"#),
        ),
        ("no exp", es256(&without(claims(), "exp")), Expect::Err(|e| e.to_string() == "token missing exp claim")),
        (
            "null exp",
            es256(&with(claims(), "exp", Value::Null)),
            Expect::Err(|e| matches!(e, JwtSvidError::MissingExpiry)),
        ),
        ("no sub", es256(&without(claims(), "sub")), Expect::Err(|e| e.to_string() == "token missing subject claim")),
        (
            "string exp",
            es256(&with(claims(), "exp", json!("1800000300"))),
            Expect::Err(|e| matches!(e, JwtSvidError::InvalidClaim { claim: "exp", .. })),
        ),
    ]);
}

#[test]
fn case_30_expiry_with_leeway() {
    run(vec![
        (
            "expired 5 min ago",
            es256(&with(claims(), "exp", json!(NOW_SECS - 300))),
            Expect::Err(|e| e.to_string() == "token has expired"),
        ),
        ("expired 30 s ago (within leeway)", es256(&with(claims(), "exp", json!(NOW_SECS - 30))), Expect::Ok),
        (
            "expired exactly 60 s ago (boundary, still within leeway)",
            es256(&with(claims(), "exp", json!(NOW_SECS - 60))),
            Expect::Ok,
        ),
        (
            "expired 61 s ago",
            es256(&with(claims(), "exp", json!(NOW_SECS - 61))),
            Expect::Err(|e| matches!(e, JwtSvidError::Expired)),
        ),
        ("fractional exp", es256(&with(claims(), "exp", json!(NOW_SECS as f64 + 0.5))), Expect::Ok),
        (
            "nbf 5 min ahead",
            es256(&with(claims(), "nbf", json!(NOW_SECS + 300))),
            Expect::Err(|e| matches!(e, JwtSvidError::NotYetValid)),
        ),
        ("nbf 30 s ahead", es256(&with(claims(), "nbf", json!(NOW_SECS + 30))), Expect::Ok),
        (
            "iat 5 min ahead",
            es256(&with(claims(), "iat", json!(NOW_SECS + 300))),
            Expect::Err(|e| matches!(e, JwtSvidError::IssuedInFuture)),
        ),
        ("no iat", es256(&without(claims(), "iat")), Expect::Ok),
    ]);
}

#[test]
fn case_31_subject_must_be_a_spiffe_id() {
    for sub in ["spiffe://example.org/", "not-a-spiffe-id", "", "SPIFFE://example.org/x", "spiffe://Example.org/x"] {
        let error = validate(&es256(&with(claims(), "sub", json!(sub)))).unwrap_err();
        assert!(matches!(error, JwtSvidError::InvalidSubject(_)), "{sub}: {error:?}");
        assert!(error.to_string().starts_with("token has an invalid subject claim: "));
    }
    let error = validate(&es256(&with(claims(), "sub", json!(5)))).unwrap_err();
    assert!(matches!(error, JwtSvidError::InvalidClaim { claim: "sub", .. }));
}

#[test]
fn case_32_key_id_lookup() {
    let p256 = &KEYS.p256;
    run(vec![
        (
            "unknown kid",
            craft(&header("ES256", "nope"), &claims(), p256, JwsAlgorithm::Es256),
            Expect::Err(|e| e.to_string() == r#"no JWT authority "nope" found for trust domain "example.org""#),
        ),
        (
            "missing kid",
            craft(&json!({"alg": "ES256", "typ": "JWT"}), &claims(), p256, JwsAlgorithm::Es256),
            Expect::Err(|e| e.to_string() == "token header missing key id"),
        ),
        (
            "empty kid",
            craft(&header("ES256", ""), &claims(), p256, JwsAlgorithm::Es256),
            Expect::Err(|e| matches!(e, JwtSvidError::MissingKeyId)),
        ),
        (
            "numeric kid",
            craft(&json!({"alg": "ES256", "kid": 1}), &claims(), p256, JwsAlgorithm::Es256),
            Expect::Err(|e| matches!(e, JwtSvidError::MissingKeyId)),
        ),
    ]);
}

#[test]
fn case_33_typ_must_be_jwt_or_jose() {
    let p256 = &KEYS.p256;
    let typed =
        |typ: Value| craft(&json!({"alg": "ES256", "kid": "p256", "typ": typ}), &claims(), p256, JwsAlgorithm::Es256);
    run(vec![
        (
            "wit+jwt",
            typed(json!("wit+jwt")),
            Expect::Err(|e| e.to_string() == "token header type not equal to either JWT or JOSE"),
        ),
        ("JOSE", typed(json!("JOSE")), Expect::Ok),
        ("JWT", typed(json!("JWT")), Expect::Ok),
        ("lowercase jwt", typed(json!("jwt")), Expect::Err(|e| matches!(e, JwtSvidError::InvalidType))),
        ("non-string", typed(json!(1)), Expect::Err(|e| matches!(e, JwtSvidError::InvalidType))),
        ("absent", craft(&json!({"alg": "ES256", "kid": "p256"}), &claims(), p256, JwsAlgorithm::Es256), Expect::Ok),
    ]);
}

#[test]
fn case_34_key_of_another_trust_domain_is_not_used() {
    let other = &KEYS.other;
    run(vec![
        (
            "other.org kid, example.org subject",
            craft(&header("ES256", "other"), &claims(), other, JwsAlgorithm::Es256),
            Expect::Err(|e| matches!(e, JwtSvidError::UnknownKeyId { .. })),
        ),
        (
            "colliding kid: example.org's key is used and fails",
            craft(&header("ES256", "p256"), &claims(), other, JwsAlgorithm::Es256),
            Expect::Err(|e| matches!(e, JwtSvidError::InvalidSignature)),
        ),
        (
            "subject in other.org verifies with other.org's key",
            craft(
                &header("ES256", "other"),
                &with(claims(), "sub", json!("spiffe://other.org/w")),
                other,
                JwsAlgorithm::Es256,
            ),
            Expect::Ok,
        ),
        (
            "subject in a trust domain without a bundle",
            craft(
                &header("ES256", "p256"),
                &with(claims(), "sub", json!("spiffe://nowhere.org/w")),
                &KEYS.p256,
                JwsAlgorithm::Es256,
            ),
            Expect::Err(|e| e.to_string() == r#"no bundle found for trust domain "nowhere.org""#),
        ),
    ]);
}

#[test]
fn case_35_tampered_tokens_are_rejected() {
    let original = es256(&claims());
    let other = es256(&with(claims(), "sub", json!("spiffe://example.org/admin")));
    let parts: Vec<&str> = original.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();
    let spliced = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[5] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], b64(&signature));
    let edited_claims = with(claims(), "aud", json!(["svc", "evil"])).to_string();
    let edited = format!("{}.{}.{}", parts[0], b64(edited_claims), parts[2]);
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    for token in [spliced, flipped, edited, stripped] {
        assert!(matches!(validate(&token), Err(JwtSvidError::InvalidSignature)));
    }
}

#[test]
fn case_36_jws_json_serialization_is_rejected() {
    let token = es256(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let general = json!({
        "payload": parts[1],
        "signatures": [{"protected": parts[0], "signature": parts[2]}],
    })
    .to_string();
    let flattened = json!({"payload": parts[1], "protected": parts[0], "signature": parts[2]}).to_string();
    for input in [general, flattened.clone(), format!("  {flattened}")] {
        let error = validate(&input).unwrap_err();
        assert!(matches!(error, JwtSvidError::Malformed(_)), "{error:?}");
        assert!(error.to_string().contains("JSON serialization"));
    }
}

#[test]
fn case_37_key_type_must_fit_algorithm() {
    let keys = &*KEYS;
    let mismatch: Check = |e| matches!(e, JwtSvidError::KeyAlgorithmMismatch { .. });
    run(vec![
        (
            "ES256 header, P-384 key",
            craft(&header("ES256", "p384"), &claims(), &keys.p384, JwsAlgorithm::Es384),
            Expect::Err(mismatch),
        ),
        (
            "ES256 header, RSA key",
            craft(&header("ES256", "rsa"), &claims(), &keys.rsa, JwsAlgorithm::Rs256),
            Expect::Err(mismatch),
        ),
        (
            "ES384 header, P-256 key",
            craft(&header("ES384", "p256"), &claims(), &keys.p256, JwsAlgorithm::Es256),
            Expect::Err(mismatch),
        ),
        (
            "RS256 header, EC key",
            craft(&header("RS256", "p256"), &claims(), &keys.p256, JwsAlgorithm::Es256),
            Expect::Err(mismatch),
        ),
        (
            "PS256 header, RS256 signature",
            craft(&header("PS256", "rsa"), &claims(), &keys.rsa, JwsAlgorithm::Rs256),
            Expect::Err(|e| matches!(e, JwtSvidError::InvalidSignature)),
        ),
    ]);
}

#[test]
fn es512_parses_but_cannot_be_verified() {
    // A structurally valid P-521 JWK (ring does no curve-membership check until verification,
    // which never happens for ES512).
    let coordinate = b64([7u8; 66]);
    let p521 = PublicKey::from_jwk(&Jwk::Ec { crv: "P-521".into(), x: coordinate.clone(), y: coordinate }).unwrap();
    let mut bundle = Bundle::new(td("example.org"));
    bundle.add_jwt_authority("p521", p521).unwrap();
    let token =
        format!("{}.{}.{}", b64(header("ES512", "p521").to_string()), b64(claims().to_string()), b64([1u8; 132]));
    assert!(matches!(
        jwt::validate(&token, &bundle, &["svc"], now()),
        Err(JwtSvidError::UnsupportedKey(JwsAlgorithm::Es512))
    ));
}

#[test]
fn duplicate_json_keys_are_rejected() {
    let p256 = &KEYS.p256;
    let header_ok = header("ES256", "p256").to_string();
    let cases = [
        (
            header_ok.clone(),
            format!(
                r#"{{"sub":"{SUBJECT}","sub":"spiffe://example.org/admin","aud":["svc"],"exp":{}}}"#,
                NOW_SECS + 300
            ),
        ),
        (header_ok.clone(), format!(r#"{{"sub":"{SUBJECT}","aud":["svc"],"aud":"evil","exp":{}}}"#, NOW_SECS + 300)),
        (
            header_ok,
            format!(r#"{{"sub":"{SUBJECT}","aud":["svc"],"exp":{},"nested":{{"a":1,"a":2}}}}"#, NOW_SECS + 300),
        ),
        (r#"{"alg":"ES256","kid":"p256","kid":"p384"}"#.to_owned(), claims().to_string()),
        (r#"{"alg":"none","alg":"ES256","kid":"p256"}"#.to_owned(), claims().to_string()),
    ];
    for (header, claims) in cases {
        let token = craft_raw(&header, &claims, p256, JwsAlgorithm::Es256);
        let error = validate(&token).unwrap_err();
        assert!(matches!(&error, JwtSvidError::Malformed(reason) if reason.contains("duplicate key")), "{error:?}");
    }
}

#[test]
fn malformed_compact_serializations_are_rejected() {
    let token = es256(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let crit = craft(
        &json!({"alg": "ES256", "kid": "p256", "crit": ["exp"], "exp": 1}),
        &claims(),
        &KEYS.p256,
        JwsAlgorithm::Es256,
    );
    let cases = [
        String::new(),
        "a.b".to_owned(),
        format!("{token}.extra"),
        format!("{token}.x.y"),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!(" {token}"),
        format!("{}.{}.{}", b64("[]"), parts[1], parts[2]),
        format!("{}.{}.{}", b64(r#"{"kid":"p256"}"#), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], b64("not json"), parts[2]),
        format!("{}.{}.{}", parts[0], b64("[1]"), parts[2]),
        crit,
    ];
    for input in cases {
        let error = validate(&input).unwrap_err();
        assert!(matches!(error, JwtSvidError::Malformed(_)), "{input:?}: {error:?}");
    }
    let too_large = "a".repeat(MAX_TOKEN_LEN + 1);
    assert!(matches!(validate(&too_large), Err(JwtSvidError::TooLarge)));
}

fn issue(key: &SigningKey, algorithm: JwsAlgorithm, kid: &str) -> String {
    let claims = JwtSvidClaims {
        subject: SpiffeId::parse(SUBJECT).unwrap(),
        audience: vec!["svc".into(), "other".into()],
        issued_at: now(),
        expires_at: now() + Duration::from_secs(300),
        issuer: None,
        jwt_id: None,
    };
    jwt::sign_with_algorithm(&claims, key, kid, algorithm, &SystemRandom::new()).unwrap()
}

#[test]
fn every_supported_algorithm_round_trips() {
    let keys = &*KEYS;
    let cases = [
        (&keys.p256, JwsAlgorithm::Es256, "p256"),
        (&keys.p384, JwsAlgorithm::Es384, "p384"),
        (&keys.rsa, JwsAlgorithm::Rs256, "rsa"),
        (&keys.rsa, JwsAlgorithm::Rs384, "rsa"),
        (&keys.rsa, JwsAlgorithm::Rs512, "rsa"),
        (&keys.rsa, JwsAlgorithm::Ps256, "rsa"),
        (&keys.rsa, JwsAlgorithm::Ps384, "rsa"),
        (&keys.rsa, JwsAlgorithm::Ps512, "rsa"),
    ];
    for (key, algorithm, kid) in cases {
        let token = issue(key, algorithm, kid);
        let validated = validate(&token).unwrap_or_else(|e| panic!("{algorithm}: {e}"));
        assert_eq!(validated.algorithm(), algorithm);
        assert_eq!(validated.audience(), ["svc", "other"]);
        // The same token also validates for the second audience.
        assert!(jwt::validate(&token, &bundles(), &["other"], now()).is_ok());
    }
}

#[test]
fn signed_tokens_have_the_spire_shape() {
    let claims = JwtSvidClaims {
        subject: SpiffeId::parse(SUBJECT).unwrap(),
        audience: vec!["svc".into()],
        issued_at: now() + Duration::from_millis(900),
        expires_at: now() + Duration::from_secs(300),
        issuer: Some("https://issuer.example".into()),
        jwt_id: Some("id-1".into()),
    };
    let token = jwt::sign(&claims, &KEYS.p256, "p256", &SystemRandom::new()).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header, json!({"alg": "ES256", "kid": "p256", "typ": "JWT"}));
    let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(
        payload,
        json!({
            "sub": SUBJECT,
            "aud": ["svc"],
            "exp": NOW_SECS + 300,
            "iat": NOW_SECS,
            "iss": "https://issuer.example",
            "jti": "id-1",
        })
    );
    // ES256 signatures are the fixed 64-byte `r || s` form.
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 64);
    let validated = validate(&token).unwrap();
    assert_eq!(validated.claims()["iss"], json!("https://issuer.example"));

    // Without iss/jti, the members are absent (not null).
    let plain = JwtSvidClaims { issuer: None, jwt_id: None, ..claims };
    let token = jwt::sign(&plain, &KEYS.rsa, "rsa", &SystemRandom::new()).unwrap();
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], json!("RS256"));
    let validated = validate(&token).unwrap();
    assert!(!validated.claims().contains_key("iss"));
    assert!(!validated.claims().contains_key("jti"));
}

#[test]
fn signing_refuses_invalid_input() {
    let rng = SystemRandom::new();
    let base = JwtSvidClaims {
        subject: SpiffeId::parse(SUBJECT).unwrap(),
        audience: vec!["svc".into()],
        issued_at: now(),
        expires_at: now() + Duration::from_secs(300),
        issuer: None,
        jwt_id: None,
    };
    let key = &KEYS.p256;
    assert!(matches!(jwt::sign(&base, key, "", &rng), Err(JwtSignError::EmptyKeyId)));
    let empty_audience = JwtSvidClaims { audience: vec![], ..base.clone() };
    assert!(matches!(jwt::sign(&empty_audience, key, "k", &rng), Err(JwtSignError::InvalidAudience)));
    let blank_audience = JwtSvidClaims { audience: vec![String::new()], ..base.clone() };
    assert!(matches!(jwt::sign(&blank_audience, key, "k", &rng), Err(JwtSignError::InvalidAudience)));
    let trust_domain_subject =
        JwtSvidClaims { subject: SpiffeId::parse("spiffe://example.org").unwrap(), ..base.clone() };
    assert!(matches!(jwt::sign(&trust_domain_subject, key, "k", &rng), Err(JwtSignError::SubjectWithoutPath(_))));
    let backwards = JwtSvidClaims { expires_at: now(), ..base.clone() };
    assert!(matches!(jwt::sign(&backwards, key, "k", &rng), Err(JwtSignError::InvalidLifetime)));
    assert!(matches!(jwt::sign_with_algorithm(&base, key, "k", JwsAlgorithm::Rs256, &rng), Err(JwtSignError::Key(_))));
    let huge = JwtSvidClaims { audience: vec!["a".repeat(MAX_TOKEN_LEN)], ..base };
    assert!(matches!(jwt::sign(&huge, key, "k", &rng), Err(JwtSignError::TooLarge)));
}

#[test]
fn validation_against_a_decoded_bundle() {
    // The validator works the same with a bundle that went through its JSON form.
    let set = bundles();
    let json = set.own().to_json();
    let decoded = Bundle::from_json(td("example.org"), json.as_bytes()).unwrap();
    let token = es256(&claims());
    assert!(jwt::validate(&token, &decoded, &["svc"], now()).is_ok());
    let jwks = set.own().to_jwt_jwks();
    let decoded = Bundle::from_jwt_jwks(td("example.org"), jwks.as_bytes()).unwrap();
    assert!(jwt::validate(&token, &decoded, &["svc"], now()).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_strings_never_panic(input in ".{0,300}") {
        let _ = validate(&input);
    }

    #[test]
    fn arbitrary_three_part_tokens_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0..80),
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        signature in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let token = format!("{}.{}.{}", b64(header), b64(payload), b64(signature));
        prop_assert!(validate(&token).is_err());
    }

    #[test]
    fn bit_flips_in_a_valid_token_are_rejected(index in 0usize..1000, bit in 0u8..8) {
        let token = es256(&claims());
        let mut bytes = token.into_bytes();
        let index = index % bytes.len();
        bytes[index] ^= 1 << bit;
        if let Ok(mutated) = String::from_utf8(bytes) {
            // A flip may land on base64 padding bits the decoder rejects or on a part
            // separator; either way the result must not validate as the original.
            if let Ok(validated) = validate(&mutated) {
                // Only possible if the flip hit nothing meaningful, which canonical base64
                // decoding rules out.
                prop_assert!(false, "mutated token validated: {validated:?}");
            }
        }
    }
}
