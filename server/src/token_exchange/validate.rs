//! The checks on a subject token, as pure functions of the token, the issuer's settings, its
//! key and the time.
//!
//! The exchange runs them in this order (the order is part of the contract: the issuer is
//! known before anything is fetched, and nothing is believed before the signature is):
//!
//! 1. [`decode`]: one compact JWS within the size cap, strict JSON, `alg` on the JWS allow-list
//!    (`none` and `HS*` never parse), a string `iss` and `kid`;
//! 2. the issuer is looked up by the exact `iss` (unknown: refused, nothing fetched);
//! 3. the key is looked up by `kid` (the JWKS may be refreshed at a bounded rate);
//! 4. [`verify`]: `alg` allowed for this issuer and fitting the key, the signature, `aud`,
//!    `exp`/`nbf`/`iat` with the issuer's leeway, the lifetime `exp - iat`, `jti`;
//! 5. then (in `super`) `jti` single use, the policy condition, the SPIFFE ID mapping; or, for
//!    node attestation, the attestor's own checks (`crate::agent_api::node_token`).
//!
//! Steps 2 to 4 are [`super::IssuerSet::verify`], shared by the exchange and the node
//! attestors.

use std::time::Duration;

use serde_json::{Map, Value};
use tessera_spiffe::jwt::{self, UnverifiedJws};

use super::jwks::IssuerKey;
use super::policy::IssuerSettings;

/// Longest `jti` accepted, in bytes.
pub const MAX_JTI_LEN: usize = 256;

/// Which check refused a token; recorded in the audit line, never told to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailedCheck {
    /// The request itself (parameters, CSR, audience).
    Request,
    /// Not a decodable JWS with an allowed `alg`, or no `iss`/`kid`/`exp`/`iat`.
    Malformed,
    /// `iss` is not a trusted issuer.
    UnknownIssuer,
    /// No key of the issuer has the token's `kid` (after a refresh, when one was allowed).
    UnknownKey,
    /// `alg` is not allowed for the issuer, or does not fit the key.
    Algorithm,
    /// The signature does not verify.
    Signature,
    /// `aud` does not contain the issuer's audience.
    Audience,
    /// `exp` is past (beyond the leeway), or too little of the token's life is left.
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    NotYetValid,
    /// `exp - iat` is above the issuer's `max_token_lifetime`.
    Lifetime,
    /// No `jti` while the issuer requires one, or a malformed one.
    Jti,
    /// The `jti` was already exchanged.
    Replay,
    /// No policy's condition holds.
    Condition,
    /// The matching policy could not build a SPIFFE ID from the claims.
    Mapping,
    /// Node attestation (`k8s_psat`): `sub` is not the service account the claims name, or
    /// that service account is not on the cluster's allow list.
    ServiceAccount,
    /// Node attestation (`k8s_psat`): the token does not name its pod and node (not a bound
    /// pod token, or a Kubernetes release older than 1.30).
    NodeClaims,
    /// Node attestation: a claim value cannot be a node selector.
    Selector,
    /// Node attestation: the agent is banned.
    Banned,
    /// The server failed (datastore, CA, key fetch).
    Internal,
}

impl FailedCheck {
    /// The name written in audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Malformed => "malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_kid",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Audience => "audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Lifetime => "lifetime",
            Self::Jti => "jti",
            Self::Replay => "replay",
            Self::Condition => "condition",
            Self::Mapping => "mapping",
            Self::ServiceAccount => "service_account",
            Self::NodeClaims => "node_claims",
            Self::Selector => "selector",
            Self::Banned => "banned",
            Self::Internal => "internal",
        }
    }
}

/// A decoded, not yet trusted, subject token.
#[derive(Debug)]
pub struct Unverified {
    /// The JWS.
    pub jws: UnverifiedJws,
    /// `iss` as the token claims it.
    pub issuer: String,
    /// `kid` from the header.
    pub key_id: String,
}

impl Unverified {
    /// A claim as the token carries it, for the audit line of a refused token.
    pub fn claimed(&self, claim: &str) -> Option<&str> {
        self.jws.claims.get(claim).and_then(Value::as_str)
    }
}

/// A token that passed [`verify`].
#[derive(Debug, Clone)]
pub struct Verified {
    /// All its claims.
    pub claims: Map<String, Value>,
    /// `jti`, when present.
    pub jti: Option<String>,
    /// `exp`, unix seconds.
    pub expires_at: u64,
}

/// Step 1: decode without trusting.
pub fn decode(token: &str) -> Result<Unverified, FailedCheck> {
    let jws = jwt::decode_unverified(token).map_err(|_| FailedCheck::Malformed)?;
    let issuer = match jws.claims.get("iss") {
        Some(Value::String(issuer)) if !issuer.is_empty() => issuer.clone(),
        _ => return Err(FailedCheck::Malformed),
    };
    let key_id = match jws.header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err(FailedCheck::Malformed),
    };
    Ok(Unverified { jws, issuer, key_id })
}

/// Step 4: every check that needs the key and the time (`now` in unix seconds).
pub fn verify(
    settings: &IssuerSettings,
    token: &Unverified,
    key: &IssuerKey,
    now: u64,
) -> Result<Verified, FailedCheck> {
    let algorithm = token.jws.algorithm;
    if !settings.algorithms.contains(&algorithm)
        || key.algorithm.is_some_and(|required| required != algorithm)
        || !key.key.fits_algorithm(algorithm)
    {
        return Err(FailedCheck::Algorithm);
    }
    if !token.jws.verify_with(&key.key) {
        return Err(FailedCheck::Signature);
    }
    let claims = &token.jws.claims;
    let audience_ok = match claims.get("aud") {
        Some(Value::String(audience)) => audience == &settings.audience,
        Some(Value::Array(items)) => items.iter().any(|item| item.as_str() == Some(settings.audience.as_str())),
        _ => false,
    };
    if !audience_ok {
        return Err(FailedCheck::Audience);
    }
    let leeway = settings.leeway.as_secs();
    let expires_at = numeric_date(claims, "exp")?.ok_or(FailedCheck::Malformed)?;
    let issued_at = numeric_date(claims, "iat")?.ok_or(FailedCheck::Malformed)?;
    if expires_at.saturating_add(leeway) < now {
        return Err(FailedCheck::Expired);
    }
    if numeric_date(claims, "nbf")?.is_some_and(|not_before| not_before > now.saturating_add(leeway))
        || issued_at > now.saturating_add(leeway)
    {
        return Err(FailedCheck::NotYetValid);
    }
    if expires_at <= issued_at || Duration::from_secs(expires_at - issued_at) > settings.max_token_lifetime {
        return Err(FailedCheck::Lifetime);
    }
    let jti = match claims.get("jti") {
        None | Some(Value::Null) if settings.require_jti => return Err(FailedCheck::Jti),
        None | Some(Value::Null) => None,
        Some(Value::String(jti)) if !jti.is_empty() && jti.len() <= MAX_JTI_LEN => Some(jti.clone()),
        Some(_) => return Err(FailedCheck::Jti),
    };
    Ok(Verified { claims: claims.clone(), jti, expires_at })
}

/// A NumericDate claim as whole unix seconds (fractions truncated; negative is malformed).
fn numeric_date(claims: &Map<String, Value>, claim: &str) -> Result<Option<u64>, FailedCheck> {
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => {
            if let Some(seconds) = number.as_u64() {
                Ok(Some(seconds))
            } else {
                match number.as_f64() {
                    Some(seconds) if seconds >= 0.0 && seconds < u64::MAX as f64 => Ok(Some(seconds as u64)),
                    _ => Err(FailedCheck::Malformed),
                }
            }
        }
        Some(_) => Err(FailedCheck::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::rand::SystemRandom;
    use serde_json::json;
    use tessera_spiffe::jwt::JwsAlgorithm;
    use tessera_spiffe::keys::{KeyType, SigningKey};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn settings() -> IssuerSettings {
        IssuerSettings {
            issuer: "https://issuer.example".into(),
            jwks_uri: None,
            inline_keys: None,
            algorithms: vec![JwsAlgorithm::Es256, JwsAlgorithm::Rs256],
            audience: "tessera".into(),
            leeway: Duration::from_secs(60),
            max_token_lifetime: Duration::from_secs(3600),
            require_jti: true,
            immutable_claims: BTreeSet::from(["sub".to_owned()]),
        }
    }

    fn mint(key: &SigningKey, header: Value, claims: Value) -> String {
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = key.sign(JwsAlgorithm::Es256, input.as_bytes(), &SystemRandom::new()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn good_claims() -> Value {
        json!({"iss": "https://issuer.example", "sub": "s", "aud": "tessera", "iat": NOW - 10, "exp": NOW + 600, "jti": "j1"})
    }

    fn check(key: &SigningKey, header: Value, claims: Value) -> Result<Verified, FailedCheck> {
        let token = decode(&mint(key, header, claims))?;
        verify(&settings(), &token, &IssuerKey { key: key.public_key().clone(), algorithm: None }, NOW)
    }

    #[test]
    fn each_check_refuses_its_case() {
        let key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
        let header = json!({"alg": "ES256", "kid": "k"});
        let verified = check(&key, header.clone(), good_claims()).unwrap();
        assert_eq!(verified.jti.as_deref(), Some("j1"));
        assert_eq!(verified.expires_at, NOW + 600);
        let with = |patch: Value| {
            let mut claims = good_claims();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    claims.as_object_mut().unwrap().remove(k);
                } else {
                    claims[k] = v.clone();
                }
            }
            check(&key, header.clone(), claims).map(|_| ()).unwrap_err()
        };
        assert_eq!(with(json!({"aud": "other"})), FailedCheck::Audience);
        assert_eq!(with(json!({"aud": ["a", "b"]})), FailedCheck::Audience);
        assert_eq!(with(json!({"exp": NOW - 61, "iat": NOW - 100})), FailedCheck::Expired);
        assert_eq!(with(json!({"nbf": NOW + 61})), FailedCheck::NotYetValid);
        assert_eq!(with(json!({"iat": NOW + 61, "exp": NOW + 100})), FailedCheck::NotYetValid);
        assert_eq!(with(json!({"iat": NOW - 10, "exp": NOW + 3600})), FailedCheck::Lifetime);
        assert_eq!(with(json!({"jti": null})), FailedCheck::Jti);
        assert_eq!(with(json!({"jti": 5})), FailedCheck::Jti);
        assert_eq!(with(json!({"exp": null})), FailedCheck::Malformed);
        assert_eq!(with(json!({"iat": null})), FailedCheck::Malformed);
        assert_eq!(with(json!({"exp": "soon"})), FailedCheck::Malformed);
        // Within the leeway is fine.
        check(&key, header.clone(), json!({"iss": "https://issuer.example", "aud": ["x", "tessera"], "iat": NOW + 30, "exp": NOW + 90, "jti": "j"})).unwrap();

        let other = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
        let token = decode(&mint(&other, header.clone(), good_claims())).unwrap();
        let wrong_key = IssuerKey { key: key.public_key().clone(), algorithm: None };
        assert_eq!(verify(&settings(), &token, &wrong_key, NOW).unwrap_err(), FailedCheck::Signature);
        let restricted = IssuerKey { key: key.public_key().clone(), algorithm: Some(JwsAlgorithm::Es384) };
        assert_eq!(verify(&settings(), &token, &restricted, NOW).unwrap_err(), FailedCheck::Algorithm);
        let mut only_rs = settings();
        only_rs.algorithms = vec![JwsAlgorithm::Rs256];
        let token = decode(&mint(&key, header.clone(), good_claims())).unwrap();
        assert_eq!(verify(&only_rs, &token, &wrong_key, NOW).unwrap_err(), FailedCheck::Algorithm);
    }

    #[test]
    fn decode_needs_an_allowed_alg_an_issuer_and_a_key_id() {
        let key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
        assert_eq!(decode(&mint(&key, json!({"alg": "ES256"}), good_claims())).unwrap_err(), FailedCheck::Malformed);
        let mut claims = good_claims();
        claims.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            decode(&mint(&key, json!({"alg": "ES256", "kid": "k"}), claims)).unwrap_err(),
            FailedCheck::Malformed
        );
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(good_claims().to_string())
        );
        assert_eq!(decode(&none).unwrap_err(), FailedCheck::Malformed);
        let hs = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(good_claims().to_string())
        );
        assert_eq!(decode(&hs).unwrap_err(), FailedCheck::Malformed);
        assert_eq!(decode("a.b").unwrap_err(), FailedCheck::Malformed);
    }
}
