//! JWT-SVIDs: signing and validation.
//!
//! A JWT-SVID is a JWS in compact serialization whose claims name a SPIFFE ID (`sub`), one or
//! more audiences (`aud`) and an expiry (`exp`). [`sign`] issues them the way SPIRE does
//! (header `alg`, `kid`, `typ: "JWT"`; claims `sub`, `aud` as an array, `exp`, `iat`, optional
//! `iss` and `jti`). [`validate`] checks them in the order of the conformance checklist §3.2
//! with the error texts of go-spiffe/SPIRE, choosing the signing key from the bundle of the
//! **subject's** trust domain through the [`JwtAuthorities`] trait.
//!
//! Bounds on untrusted input: tokens longer than [`MAX_TOKEN_LEN`] are refused before any
//! decoding; JSON objects with duplicate keys are refused at every depth; JSON nesting is bounded
//! by serde_json's recursion limit (128).

mod strict_json;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::keys::{KeyError, KeyFamily, PublicKey, SigningKey};
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Largest token accepted by [`validate`] and produced by [`sign`], in bytes (16 KiB).
///
/// No SPIFFE document sets a limit. Real JWT-SVIDs are well under 2 KiB (an RSA-4096 signature
/// is 683 base64 characters); 16 KiB leaves room for many audiences and private claims while
/// keeping the work done on a hostile token small.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Clock-skew leeway for `exp`, `nbf` and `iat` (go-jose's default, which go-spiffe and SPIRE
/// inherit).
pub const LEEWAY: Duration = Duration::from_secs(60);

/// The JWS `typ` header value [`sign`] emits.
const TYP_JWT: &str = "JWT";

/// The allow-list in the order SPIRE prints it in its error message.
const ALLOWED_ALGORITHMS_TEXT: &str = r#"["ES256" "ES384" "ES512" "RS256" "RS384" "RS512" "PS256" "PS384" "PS512"]"#;

/// A JWS signature algorithm allowed for JWT-SVIDs.
///
/// spec: validators MUST reject every algorithm outside RS256/384/512, ES256/384/512 and
/// PS256/384/512, explicitly including `none` and the HMAC family; this enum has no variant for
/// them, so a token naming one fails to parse.
///
/// ES512 parses, but ring cannot verify P-521 signatures, so such tokens are rejected at the
/// signature step ([`JwtSvidError::UnsupportedKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JwsAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// ECDSA on P-521 with SHA-512 (parsed, not verifiable with ring).
    Es512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
}

/// Error for an `alg` outside the JWT-SVID allow-list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected signature algorithm {0:?}; expected {ALLOWED_ALGORITHMS_TEXT}")]
pub struct UnsupportedAlgorithm(pub String);

/// Which part of a JWT authority lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingJwtAuthority {
    /// There is no bundle (or no JWT bundle) for the trust domain.
    NoBundle,
    /// The trust domain's bundle has no JWT authority with that key ID.
    UnknownKeyId,
}

/// The JWT signing keys a validator trusts, per trust domain.
///
/// spec: the key that verifies a JWT-SVID MUST come from the bundle of the trust domain of the
/// token's `sub`; implementations never pool keys across trust domains.
pub trait JwtAuthorities {
    /// The JWT authority with `key_id` in the bundle of `trust_domain`.
    fn jwt_authority(&self, trust_domain: &TrustDomain, key_id: &str) -> Result<&PublicKey, MissingJwtAuthority>;
}

/// The claims of a JWT-SVID to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidClaims {
    /// `sub`: the workload's SPIFFE ID (must have a path).
    pub subject: SpiffeId,
    /// `aud`: one or more audiences, always emitted as a JSON array.
    pub audience: Vec<String>,
    /// `iat`: issuance time (whole seconds; sub-second parts are dropped).
    pub issued_at: SystemTime,
    /// `exp`: expiry (whole seconds; must be after `iat`).
    pub expires_at: SystemTime,
    /// `iss`: optional issuer.
    pub issuer: Option<String>,
    /// `jti`: optional token ID.
    pub jwt_id: Option<String>,
}

/// A JWT-SVID that passed [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwtSvid {
    spiffe_id: SpiffeId,
    key_id: String,
    algorithm: JwsAlgorithm,
    audience: Vec<String>,
    expires_at: SystemTime,
    claims: Map<String, Value>,
}

/// Why a JWT-SVID could not be issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSignError {
    /// The key ID is empty.
    #[error("cannot sign JWT-SVID: key id must not be empty")]
    EmptyKeyId,
    /// The audience list is empty or contains an empty string.
    #[error("cannot sign JWT-SVID: audience must contain at least one non-empty value")]
    InvalidAudience,
    /// The subject names a trust domain, not a workload.
    #[error("cannot sign JWT-SVID: subject {0} has no path")]
    SubjectWithoutPath(SpiffeId),
    /// `expires_at` is not after `issued_at`, or a time lies before 1970.
    #[error("cannot sign JWT-SVID: expiry must be after issuance and after 1970")]
    InvalidLifetime,
    /// The token would exceed [`MAX_TOKEN_LEN`].
    #[error("cannot sign JWT-SVID: token would be longer than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// The key refused the algorithm or the signing operation failed.
    #[error("cannot sign JWT-SVID")]
    Key(#[from] KeyError),
    /// Claims could not be serialized.
    #[error("cannot sign JWT-SVID: JSON encoding failed")]
    Json(#[from] serde_json::Error),
}

/// Why a JWT-SVID failed validation, worded like go-spiffe/SPIRE (conformance §3.2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// No expected audience was given (validation fails closed instead of skipping the check).
    #[error("expected audience must not be empty")]
    NoExpectedAudience,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("unable to parse JWT token: token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// Not a well-formed compact JWS (including JWS JSON serialization and JWE input).
    #[error("unable to parse JWT token: {0}")]
    Malformed(String),
    /// `alg` is outside the allow-list (`none`, `HS256`, …).
    #[error("unable to parse JWT token: {0}")]
    UnsupportedAlgorithm(#[source] UnsupportedAlgorithm),
    /// `typ` is present and neither `JWT` nor `JOSE`.
    #[error("token header type not equal to either JWT or JOSE")]
    InvalidType,
    /// `kid` is missing, empty or not a string.
    #[error("token header missing key id")]
    MissingKeyId,
    /// `sub` is missing.
    #[error("token missing subject claim")]
    MissingSubject,
    /// `exp` is missing.
    #[error("token missing exp claim")]
    MissingExpiry,
    /// A registered claim has the wrong JSON type.
    #[error("token has an invalid {claim} claim: {reason}")]
    InvalidClaim {
        /// The claim name.
        claim: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `sub` is not a SPIFFE ID.
    #[error("token has an invalid subject claim: {0}")]
    InvalidSubject(#[source] SpiffeIdError),
    /// There is no JWT bundle for the subject's trust domain.
    #[error("no bundle found for trust domain {:?}", .0.name())]
    NoBundle(TrustDomain),
    /// The subject's trust domain has no JWT authority with the token's `kid`.
    #[error("no JWT authority {key_id:?} found for trust domain {:?}", trust_domain.name())]
    UnknownKeyId {
        /// The token's `kid`.
        key_id: String,
        /// The subject's trust domain.
        trust_domain: TrustDomain,
    },
    /// The authority's key type does not fit the token's `alg` (e.g. ES256 with a P-384 key).
    #[error("JWT authority {key_id:?} is an {family} key and cannot verify {algorithm} signatures")]
    KeyAlgorithmMismatch {
        /// The token's `kid`.
        key_id: String,
        /// The token's `alg`.
        algorithm: JwsAlgorithm,
        /// The authority's key family.
        family: KeyFamily,
    },
    /// The algorithm is allowed but cannot be verified here (ES512: ring has no P-521).
    #[error("unable to verify {0} signatures: the algorithm is not supported by this validator")]
    UnsupportedKey(JwsAlgorithm),
    /// The signature does not verify.
    #[error("unable to get claims from token: invalid signature")]
    InvalidSignature,
    /// None of the token's audiences is expected.
    #[error("expected audience in {} (audience={})", go_list(expected), go_list(actual))]
    AudienceMismatch {
        /// The audiences the validator accepts.
        expected: Vec<String>,
        /// The token's audiences (empty when `aud` is absent).
        actual: Vec<String>,
    },
    /// `exp` is more than [`LEEWAY`] in the past.
    #[error("token has expired")]
    Expired,
    /// `nbf` is more than [`LEEWAY`] in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// `iat` is more than [`LEEWAY`] in the future.
    #[error("token issued in the future")]
    IssuedInFuture,
}

/// The decoded parts of a compact JWS, before any trust decision.
struct ParsedToken<'a> {
    algorithm: JwsAlgorithm,
    header: Map<String, Value>,
    claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// The registered claims of a parsed token, type-checked.
struct RegisteredClaims {
    subject: SpiffeId,
    audience: Vec<String>,
    expiry: i64,
    not_before: Option<i64>,
    issued_at: Option<i64>,
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

#[derive(Serialize)]
struct ClaimsOut<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<&'a str>,
}

impl JwsAlgorithm {
    /// Every allowed algorithm.
    pub const ALL: [JwsAlgorithm; 9] = [
        JwsAlgorithm::Es256,
        JwsAlgorithm::Es384,
        JwsAlgorithm::Es512,
        JwsAlgorithm::Rs256,
        JwsAlgorithm::Rs384,
        JwsAlgorithm::Rs512,
        JwsAlgorithm::Ps256,
        JwsAlgorithm::Ps384,
        JwsAlgorithm::Ps512,
    ];

    /// The JWS `alg` name (`ES256`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            JwsAlgorithm::Rs256 => "RS256",
            JwsAlgorithm::Rs384 => "RS384",
            JwsAlgorithm::Rs512 => "RS512",
            JwsAlgorithm::Es256 => "ES256",
            JwsAlgorithm::Es384 => "ES384",
            JwsAlgorithm::Es512 => "ES512",
            JwsAlgorithm::Ps256 => "PS256",
            JwsAlgorithm::Ps384 => "PS384",
            JwsAlgorithm::Ps512 => "PS512",
        }
    }
}

impl fmt::Display for JwsAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JwsAlgorithm {
    type Err = UnsupportedAlgorithm;

    /// Exact, case-sensitive match against the allow-list (RFC 7515 `alg` values are
    /// case-sensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JwsAlgorithm::ALL
            .into_iter()
            .find(|algorithm| algorithm.as_str() == s)
            .ok_or_else(|| UnsupportedAlgorithm(s.to_owned()))
    }
}

impl ValidatedJwtSvid {
    /// The SPIFFE ID from `sub`.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The `kid` of the authority that verified the token.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The token's `alg`.
    pub fn algorithm(&self) -> JwsAlgorithm {
        self.algorithm
    }

    /// The token's audiences, normalized to a list (whether `aud` was a string or an array).
    pub fn audience(&self) -> &[String] {
        &self.audience
    }

    /// The expiry from `exp`.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// All claims exactly as the token carried them (for `ValidateJWTSVIDResponse.claims`).
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// Takes the claims out.
    pub fn into_claims(self) -> Map<String, Value> {
        self.claims
    }
}

/// Signs a JWT-SVID with `key` under `key_id`, using the key's default algorithm
/// (ES256 for P-256, ES384 for P-384, RS256 for RSA).
pub fn sign(
    claims: &JwtSvidClaims,
    key: &SigningKey,
    key_id: &str,
    rng: &dyn SecureRandom,
) -> Result<String, JwtSignError> {
    sign_with_algorithm(claims, key, key_id, key.default_jws_algorithm(), rng)
}

/// Signs a JWT-SVID with an explicit algorithm (RSA keys can also use RS384/512, PS256/384/512).
///
/// Header: exactly `alg`, `kid` and `typ: "JWT"`. Claims: `sub`, `aud` (always an array), `exp`,
/// `iat`, then `iss` and `jti` when set. Output: compact serialization.
pub fn sign_with_algorithm(
    claims: &JwtSvidClaims,
    key: &SigningKey,
    key_id: &str,
    algorithm: JwsAlgorithm,
    rng: &dyn SecureRandom,
) -> Result<String, JwtSignError> {
    // Always emit `kid`: go-spiffe and SPIRE refuse tokens without one.
    if key_id.is_empty() {
        return Err(JwtSignError::EmptyKeyId);
    }
    // spec: `aud` is REQUIRED with one or more values.
    if claims.audience.is_empty() || claims.audience.iter().any(String::is_empty) {
        return Err(JwtSignError::InvalidAudience);
    }
    // spec: `sub` is REQUIRED and is the workload's SPIFFE ID (leaf IDs have a path).
    if claims.subject.is_trust_domain_id() {
        return Err(JwtSignError::SubjectWithoutPath(claims.subject.clone()));
    }
    let issued_at = unix_seconds(claims.issued_at).ok_or(JwtSignError::InvalidLifetime)?;
    let expires_at = unix_seconds(claims.expires_at).ok_or(JwtSignError::InvalidLifetime)?;
    // spec: `exp` is REQUIRED (NumericDate, integer seconds).
    if expires_at <= issued_at {
        return Err(JwtSignError::InvalidLifetime);
    }
    // spec: the header carries only `alg`, `kid` and `typ` (which, if present, is `JWT`).
    let header = serde_json::to_vec(&HeaderOut { alg: algorithm.as_str(), kid: key_id, typ: TYP_JWT })?;
    let payload = serde_json::to_vec(&ClaimsOut {
        sub: claims.subject.as_str(),
        aud: &claims.audience,
        exp: expires_at,
        iat: issued_at,
        iss: claims.issuer.as_deref(),
        jti: claims.jwt_id.as_deref(),
    })?;
    // spec: JWS Compact Serialization only.
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let signature = key.sign(algorithm, token.as_bytes(), rng)?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtSignError::TooLarge);
    }
    Ok(token)
}

/// Validates a JWT-SVID at `now` for any of `expected_audiences`.
///
/// Steps, in the order of conformance §3.2: size cap; compact-JWS parse with the algorithm
/// allow-list (JWS JSON serialization, JWE and `crit` headers are refused); `typ`; `kid`; `sub`
/// and `exp` present; `sub` a SPIFFE ID; authority lookup in the bundle of `sub`'s trust domain
/// by `kid`; key family fits `alg`; signature; audience; `exp`, `nbf`, `iat` with [`LEEWAY`].
/// Header parameters that could redirect key selection (`jwk`, `jku`, `x5u`, `x5c`) are ignored.
///
/// An empty `expected_audiences` is refused ([`JwtSvidError::NoExpectedAudience`]) rather than
/// treated as "any audience".
pub fn validate<A, S>(
    token: &str,
    authorities: &A,
    expected_audiences: &[S],
    now: SystemTime,
) -> Result<ValidatedJwtSvid, JwtSvidError>
where
    A: JwtAuthorities + ?Sized,
    S: AsRef<str>,
{
    if expected_audiences.is_empty() {
        return Err(JwtSvidError::NoExpectedAudience);
    }
    // Steps 1-2: one compact JWS, allowed algorithm.
    let parsed = parse_compact(token)?;
    // Step 3. spec: `typ`, if present, MUST be `JWT` or `JOSE`.
    match parsed.header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(_) => return Err(JwtSvidError::InvalidType),
    }
    // Step 4: `kid` is required in practice (go-spiffe and SPIRE reject tokens without it).
    let key_id = match parsed.header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err(JwtSvidError::MissingKeyId),
    };
    // Steps 5-6: registered claims.
    let registered = registered_claims(&parsed.claims)?;
    // Step 7. spec: use the bundle of the subject's trust domain.
    let trust_domain = registered.subject.trust_domain();
    let key = authorities.jwt_authority(&trust_domain, &key_id).map_err(|missing| match missing {
        MissingJwtAuthority::NoBundle => JwtSvidError::NoBundle(trust_domain.clone()),
        MissingJwtAuthority::UnknownKeyId => {
            JwtSvidError::UnknownKeyId { key_id: key_id.clone(), trust_domain: trust_domain.clone() }
        }
    })?;
    // Step 8. spec: the key type must fit the algorithm; then the signature must verify.
    if !key.fits_algorithm(parsed.algorithm) {
        return Err(JwtSvidError::KeyAlgorithmMismatch { key_id, algorithm: parsed.algorithm, family: key.family() });
    }
    if parsed.algorithm == JwsAlgorithm::Es512 {
        return Err(JwtSvidError::UnsupportedKey(parsed.algorithm));
    }
    if !key.verify(parsed.algorithm, parsed.signing_input.as_bytes(), &parsed.signature) {
        return Err(JwtSvidError::InvalidSignature);
    }
    // Step 9. spec: `aud` must contain an expected audience (exact, case-sensitive match).
    let audience_ok =
        registered.audience.iter().any(|actual| expected_audiences.iter().any(|expected| expected.as_ref() == actual));
    if !audience_ok {
        return Err(JwtSvidError::AudienceMismatch {
            expected: expected_audiences.iter().map(|audience| audience.as_ref().to_owned()).collect(),
            actual: registered.audience,
        });
    }
    // spec: reject expired tokens; a small leeway is acceptable (60 s, as go-jose).
    let now = signed_unix_seconds(now);
    let leeway = i128::from(LEEWAY.as_secs());
    if now - leeway > i128::from(registered.expiry) {
        return Err(JwtSvidError::Expired);
    }
    if registered.not_before.is_some_and(|not_before| i128::from(not_before) > now + leeway) {
        return Err(JwtSvidError::NotYetValid);
    }
    if registered.issued_at.is_some_and(|issued_at| i128::from(issued_at) > now + leeway) {
        return Err(JwtSvidError::IssuedInFuture);
    }
    // Not expired means `exp` ≥ now − 60 s, so it is representable unless `now` itself is
    // absurd; refuse rather than guess.
    let expires_at = u64::try_from(registered.expiry)
        .ok()
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .ok_or(JwtSvidError::InvalidClaim { claim: "exp", reason: "out of range" })?;
    Ok(ValidatedJwtSvid {
        spiffe_id: registered.subject,
        key_id,
        algorithm: parsed.algorithm,
        audience: registered.audience,
        expires_at,
        claims: parsed.claims,
    })
}

/// A compact JWS decoded but not yet trusted: what a validator of tokens other than JWT-SVIDs
/// (an external OIDC issuer's ID tokens, say) needs to run its own checks with the same parser
/// and limits as [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct UnverifiedJws {
    /// `alg`, already on the allow-list (`none` and the HMAC family never get here).
    pub algorithm: JwsAlgorithm,
    /// The protected header (unique keys).
    pub header: Map<String, Value>,
    /// The payload as a JSON object (unique keys at every depth).
    pub claims: Map<String, Value>,
    /// `BASE64URL(header) '.' BASE64URL(payload)`, the bytes the signature covers.
    pub signing_input: String,
    /// The decoded signature.
    pub signature: Vec<u8>,
}

impl UnverifiedJws {
    /// Whether `key` verifies the signature for the token's `alg` (the key family must fit it).
    pub fn verify_with(&self, key: &PublicKey) -> bool {
        key.verify(self.algorithm, self.signing_input.as_bytes(), &self.signature)
    }
}

/// Decodes a compact JWS with the bounds of [`validate`] (size cap, strict JSON, algorithm
/// allow-list, no `crit`) and verifies nothing: the caller must check the signature with
/// [`UnverifiedJws::verify_with`] before trusting any claim.
pub fn decode_unverified(token: &str) -> Result<UnverifiedJws, JwtSvidError> {
    let parsed = parse_compact(token)?;
    Ok(UnverifiedJws {
        algorithm: parsed.algorithm,
        header: parsed.header,
        claims: parsed.claims,
        signing_input: parsed.signing_input.to_owned(),
        signature: parsed.signature,
    })
}

/// Parses a compact JWS: three base64url parts, header and payload JSON objects with unique
/// keys, `alg` on the allow-list, no `crit`.
fn parse_compact(token: &str) -> Result<ParsedToken<'_>, JwtSvidError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtSvidError::TooLarge);
    }
    // spec: JWS JSON serialization MUST NOT be used; name it so the error is actionable.
    if token.trim_start().starts_with('{') {
        return Err(JwtSvidError::Malformed(
            "JWS JSON serialization is not supported; expected compact serialization".to_owned(),
        ));
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        // Five parts would be a JWE, which JWT-SVIDs never are.
        return Err(JwtSvidError::Malformed("compact JWS must have exactly three parts".to_owned()));
    };
    let header = decode_json_part(header_b64, "header")?;
    let algorithm = match header.get("alg") {
        Some(Value::String(alg)) => alg.parse::<JwsAlgorithm>().map_err(JwtSvidError::UnsupportedAlgorithm)?,
        Some(other) => {
            return Err(JwtSvidError::UnsupportedAlgorithm(UnsupportedAlgorithm(other.to_string())));
        }
        None => {
            return Err(JwtSvidError::Malformed("token header missing alg".to_owned()));
        }
    };
    // No JWS extension is understood, so any critical one must fail (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(JwtSvidError::Malformed("unsupported critical header parameters".to_owned()));
    }
    let claims = decode_json_part(payload_b64, "payload")?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtSvidError::Malformed("signature is not valid base64url".to_owned()))?;
    let signing_input_len = header_b64.len() + 1 + payload_b64.len();
    let signing_input =
        token.get(..signing_input_len).ok_or_else(|| JwtSvidError::Malformed("truncated token".to_owned()))?;
    Ok(ParsedToken { algorithm, header, claims, signing_input, signature })
}

/// Decodes one base64url part holding a JSON object with unique keys.
fn decode_json_part(part: &str, name: &str) -> Result<Map<String, Value>, JwtSvidError> {
    let bytes =
        URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtSvidError::Malformed(format!("{name} is not valid base64url")))?;
    strict_json::parse_object(&bytes).map_err(|error| JwtSvidError::Malformed(format!("invalid {name} JSON: {error}")))
}

/// Extracts and type-checks `sub`, `exp`, `aud`, `nbf` and `iat`. JSON `null` counts as absent.
fn registered_claims(claims: &Map<String, Value>) -> Result<RegisteredClaims, JwtSvidError> {
    let subject = match claims.get("sub") {
        None | Some(Value::Null) => return Err(JwtSvidError::MissingSubject),
        Some(Value::String(sub)) => sub,
        Some(_) => {
            return Err(JwtSvidError::InvalidClaim { claim: "sub", reason: "must be a string" });
        }
    };
    let expiry = numeric_date(claims, "exp")?.ok_or(JwtSvidError::MissingExpiry)?;
    // spec: `sub` MUST be a SPIFFE ID.
    let subject = SpiffeId::parse(subject).map_err(JwtSvidError::InvalidSubject)?;
    // spec: `aud` may be a single string or an array of strings; both are accepted.
    let audience = match claims.get("aud") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(audience)) => vec![audience.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(audience) => Ok(audience.clone()),
                _ => {
                    Err(JwtSvidError::InvalidClaim { claim: "aud", reason: "must be a string or an array of strings" })
                }
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(JwtSvidError::InvalidClaim { claim: "aud", reason: "must be a string or an array of strings" });
        }
    };
    Ok(RegisteredClaims {
        subject,
        audience,
        expiry,
        not_before: numeric_date(claims, "nbf")?,
        issued_at: numeric_date(claims, "iat")?,
    })
}

/// Reads a NumericDate claim as whole seconds (fractions are truncated towards −∞, as a
/// comparison "now > exp" needs); `None` when absent or `null`.
fn numeric_date(claims: &Map<String, Value>, claim: &'static str) -> Result<Option<i64>, JwtSvidError> {
    let invalid = JwtSvidError::InvalidClaim { claim, reason: "must be a number" };
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => {
            if let Some(seconds) = number.as_i64() {
                Ok(Some(seconds))
            } else if number.as_u64().is_some() {
                // Larger than i64::MAX: later than any `now`.
                Ok(Some(i64::MAX))
            } else {
                // Finite by construction (JSON has no NaN/inf); the cast saturates.
                number.as_f64().map(|seconds| Some(seconds.floor() as i64)).ok_or(invalid)
            }
        }
        Some(_) => Err(invalid),
    }
}

/// Whole seconds since the Unix epoch, `None` before 1970.
fn unix_seconds(time: SystemTime) -> Option<u64> {
    time.duration_since(UNIX_EPOCH).ok().map(|elapsed| elapsed.as_secs())
}

/// Whole seconds since the Unix epoch, negative before 1970.
fn signed_unix_seconds(time: SystemTime) -> i128 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(elapsed) => i128::from(elapsed.as_secs()),
        Err(before) => -i128::from(before.duration().as_secs()),
    }
}

/// Formats strings like Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip_and_reject_others() {
        for algorithm in JwsAlgorithm::ALL {
            assert_eq!(algorithm.as_str().parse::<JwsAlgorithm>().unwrap(), algorithm);
        }
        for bad in ["none", "None", "HS256", "HS384", "HS512", "es256", "EdDSA", ""] {
            assert!(bad.parse::<JwsAlgorithm>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unsupported_algorithm_text_matches_spire() {
        let error = JwtSvidError::UnsupportedAlgorithm(UnsupportedAlgorithm("HS256".into()));
        assert_eq!(
            error.to_string(),
            r#"unable to parse JWT token: unexpected signature algorithm "HS256"; expected ["ES256" "ES384" "ES512" "RS256" "RS384" "RS512" "PS256" "PS384" "PS512"]"#
        );
    }

    #[test]
    fn audience_mismatch_text_matches_go_spiffe() {
        let error = JwtSvidError::AudienceMismatch { expected: vec!["FOO".into()], actual: vec!["AUDIENCE".into()] };
        assert_eq!(error.to_string(), r#"expected audience in ["FOO"] (audience=["AUDIENCE"])"#);
        let error = JwtSvidError::AudienceMismatch { expected: vec!["a".into(), "b".into()], actual: vec![] };
        assert_eq!(error.to_string(), r#"expected audience in ["a" "b"] (audience=[])"#);
    }

    #[test]
    fn numeric_dates_accept_integers_and_fractions() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"a":5,"b":5.9,"c":-1.5,"d":"5","e":null,"f":1e300}"#).unwrap();
        assert_eq!(numeric_date(&claims, "a").unwrap(), Some(5));
        assert_eq!(numeric_date(&claims, "b").unwrap(), Some(5));
        assert_eq!(numeric_date(&claims, "c").unwrap(), Some(-2));
        assert!(numeric_date(&claims, "d").is_err());
        assert_eq!(numeric_date(&claims, "e").unwrap(), None);
        assert_eq!(numeric_date(&claims, "f").unwrap(), Some(i64::MAX));
        assert_eq!(numeric_date(&claims, "missing").unwrap(), None);
    }

    #[test]
    fn decode_unverified_checks_only_structure_and_verify_with_checks_the_signature() {
        let rng = ring::rand::SystemRandom::new();
        let key = SigningKey::generate(crate::keys::KeyType::EcP256, &rng).unwrap();
        let claims = JwtSvidClaims {
            subject: SpiffeId::parse("spiffe://example.org/w").unwrap(),
            audience: vec!["a".into()],
            issued_at: UNIX_EPOCH + Duration::from_secs(100),
            expires_at: UNIX_EPOCH + Duration::from_secs(200),
            issuer: None,
            jwt_id: None,
        };
        let token = sign(&claims, &key, "k1", &rng).unwrap();
        let jws = decode_unverified(&token).unwrap();
        assert_eq!(jws.algorithm, JwsAlgorithm::Es256);
        assert_eq!(jws.header["kid"], "k1");
        assert_eq!(jws.claims["exp"], 200);
        assert!(jws.verify_with(key.public_key()));
        let other = SigningKey::generate(crate::keys::KeyType::EcP256, &rng).unwrap();
        assert!(!jws.verify_with(other.public_key()));
        // A payload changed after signing no longer verifies.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"spiffe://example.org/x","aud":["a"],"exp":200}"#);
        parts[1] = &forged;
        assert!(!decode_unverified(&parts.join(".")).unwrap().verify_with(key.public_key()));
        // `none` never decodes.
        let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(b"{}"));
        assert!(matches!(decode_unverified(&none), Err(JwtSvidError::UnsupportedAlgorithm(_))));
    }
}
