//! The JSON forms of bundles: the SPIFFE bundle (JWKS with `use`, `x5c` and the `spiffe_*`
//! members), the standard JWKS of the Workload API's `JWTBundlesResponse`, and the bundle map.
//!
//! Decoding goes through serde-derived "raw" structs whose members are loosely typed
//! (`serde_json::Value`), so an entry that is to be ignored (unknown `use` or `kty`) cannot fail
//! the document by having an odd member type; the derive also rejects a repeated known member
//! (two `kid`s, two `keys`). The interpretation rules of the spec are then applied by hand.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::{Bundle, BundleError, MAX_BUNDLE_JSON_LEN, MAX_BUNDLE_MAP_JSON_LEN};
use crate::keys::{Jwk, PublicKey};
use crate::spiffe_id::TrustDomain;

/// `use` of X.509 CA entries.
const USE_X509_SVID: &str = "x509-svid";
/// `use` of JWT signing key entries.
const USE_JWT_SVID: &str = "jwt-svid";

/// Standard base64 as in `x5c` (RFC 7517 §4.7), tolerating missing padding.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How `use` is read when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// SPIFFE bundle: `use` decides the entry's role; missing or unknown `use` ⇒ ignored.
    Spiffe,
    /// Standard JWKS of JWT authorities: entries without `use` (or `jwt-svid`, or the generic
    /// `sig`) are JWT authorities; entries with any other `use` are ignored.
    JwtJwks,
}

/// A SPIFFE bundle document as parsed, before interpretation.
#[derive(Deserialize)]
struct RawBundle {
    keys: Option<Vec<RawJwk>>,
    spiffe_sequence: Option<Value>,
    spiffe_refresh_hint: Option<Value>,
}

/// One JWK as parsed. Unknown members are ignored.
#[derive(Deserialize)]
struct RawJwk {
    #[serde(rename = "use")]
    use_: Option<Value>,
    kty: Option<Value>,
    kid: Option<Value>,
    crv: Option<Value>,
    x: Option<Value>,
    y: Option<Value>,
    n: Option<Value>,
    e: Option<Value>,
    x5c: Option<Value>,
}

/// A bundle map as parsed.
#[derive(Deserialize)]
struct RawBundleMap {
    trust_domains: Option<TrustDomainEntries>,
}

/// The `trust_domains` object as a list of entries **including repeated keys**, which a map
/// type would silently collapse.
struct TrustDomainEntries(Vec<(String, RawBundle)>);

/// What role an entry plays.
enum EntryRole {
    X509,
    Jwt,
    Ignored,
}

impl Bundle {
    /// Decodes a SPIFFE bundle (conformance §4) for `trust_domain`.
    ///
    /// - spec: the top-level `keys` member MUST be present (go-spiffe: `no authorities found`);
    ///   `keys: []` gives a bundle without authorities, which trusts nothing.
    /// - spec: entries with a missing or unknown `use`, or an unknown `kty`, are ignored.
    /// - `x509-svid` entries need exactly one `x5c` certificate (go-spiffe's strictness: the
    ///   spec would let a consumer skip entries with none and use the first of several; a
    ///   producer doing either is broken, and failing loudly beats silently trusting less or
    ///   differently), whose public key must equal the entry's key parameters. A `kid` on them
    ///   is ignored.
    /// - `jwt-svid` entries need a non-empty `kid`, unique within the bundle.
    /// - `spiffe_sequence` must be a non-negative integer; `spiffe_refresh_hint` an integer
    ///   number of seconds, where zero or negative means "no hint".
    ///
    /// Input longer than [`MAX_BUNDLE_JSON_LEN`] is refused.
    pub fn from_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_JSON_LEN {
            return Err(BundleError::TooLarge { max: MAX_BUNDLE_JSON_LEN });
        }
        let raw: RawBundle = serde_json::from_slice(json).map_err(BundleError::Json)?;
        raw.interpret(trust_domain, Dialect::Spiffe)
    }

    /// Decodes the standard JWKS of a Workload API `JWTBundlesResponse` value: every key is a
    /// JWT authority and needs a unique, non-empty `kid` (go-spiffe requires it). Entries whose
    /// `use` is present and is neither `jwt-svid` nor `sig` are ignored; `keys` must be present.
    /// `spiffe_sequence`/`spiffe_refresh_hint`, if a producer added them, are read as in
    /// [`Bundle::from_json`].
    pub fn from_jwt_jwks(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_JSON_LEN {
            return Err(BundleError::TooLarge { max: MAX_BUNDLE_JSON_LEN });
        }
        let raw: RawBundle = serde_json::from_slice(json).map_err(BundleError::Json)?;
        raw.interpret(trust_domain, Dialect::JwtJwks)
    }

    /// Encodes the full SPIFFE bundle (conformance §4), as served by a bundle endpoint.
    ///
    /// `x509-svid` entries carry `use`, the key parameters and `x5c` with exactly one standard
    /// base64 DER certificate, and no `kid`; `jwt-svid` entries carry `use`, `kid` and the key
    /// parameters. `spiffe_sequence` is omitted when 0 and `spiffe_refresh_hint` when unset
    /// (as SPIRE does); a hint with a fractional second is rounded up to whole seconds.
    pub fn to_json(&self) -> String {
        self.to_json_value(true).to_string()
    }

    /// Encodes the JWT authorities as a standard JWKS for the Workload API's
    /// `JWTBundlesResponse`: `{"keys":[…]}` with `kid` and key parameters only, no `use`, no
    /// X.509 entries, no `spiffe_*` members (what SPIRE emits).
    pub fn to_jwt_jwks(&self) -> String {
        let keys = self
            .jwt_authorities
            .iter()
            .map(|(kid, key)| Value::Object(jwk_object(None, key, Some(kid), None)))
            .collect();
        let mut document = Map::new();
        document.insert("keys".to_owned(), Value::Array(keys));
        Value::Object(document).to_string()
    }

    /// The bundle as a JSON value; the refresh hint only when `with_refresh_hint`.
    fn to_json_value(&self, with_refresh_hint: bool) -> Value {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for authority in &self.x509_authorities {
            // spec: one JWK per CA cert, `use` x509-svid, no `kid`, `x5c` with exactly one
            // standard-base64 DER certificate.
            keys.push(Value::Object(jwk_object(
                Some(USE_X509_SVID),
                &authority.public_key,
                None,
                Some(STANDARD.encode(&authority.der)),
            )));
        }
        for (kid, key) in &self.jwt_authorities {
            // spec: one JWK per JWT signing key, `use` jwt-svid, `kid` set and unique.
            keys.push(Value::Object(jwk_object(Some(USE_JWT_SVID), key, Some(kid), None)));
        }
        let mut document = Map::new();
        document.insert("keys".to_owned(), Value::Array(keys));
        if self.sequence != 0 {
            document.insert("spiffe_sequence".to_owned(), Value::from(self.sequence));
        }
        let refresh_hint = self.refresh_hint.map(ceil_seconds).filter(|s| *s > 0);
        if let (true, Some(seconds)) = (with_refresh_hint, refresh_hint) {
            document.insert("spiffe_refresh_hint".to_owned(), Value::from(seconds));
        }
        Value::Object(document)
    }
}

impl RawBundle {
    /// Applies the decoding rules to a parsed document.
    fn interpret(self, trust_domain: TrustDomain, dialect: Dialect) -> Result<Bundle, BundleError> {
        // spec: top-level `keys` MUST be present (it may be empty).
        let keys = self.keys.ok_or(BundleError::MissingKeys)?;
        let mut bundle = Bundle::new(trust_domain);
        bundle.sequence = match self.spiffe_sequence {
            None | Some(Value::Null) => 0,
            // spec: parse `spiffe_sequence` into at least 64 bits (unsigned, as go-spiffe).
            Some(value) => value.as_u64().ok_or(BundleError::InvalidSequence)?,
        };
        bundle.refresh_hint = match self.spiffe_refresh_hint {
            None | Some(Value::Null) => None,
            // spec: integer seconds (go-spiffe reads an int64).
            Some(value) => match (value.as_i64(), value.as_u64()) {
                (Some(seconds), _) if seconds <= 0 => None,
                (_, Some(seconds)) => Some(Duration::from_secs(seconds)),
                _ => return Err(BundleError::InvalidRefreshHint),
            },
        };
        let mut kids = BTreeSet::new();
        for (index, entry) in keys.into_iter().enumerate() {
            match entry.role(dialect) {
                EntryRole::Ignored => {}
                EntryRole::X509 => {
                    let Some(key) = entry.public_key(index)? else {
                        continue;
                    };
                    let der = entry.single_certificate(index)?;
                    let authority = super::X509Authority::parse(&der)
                        .map_err(|error| BundleError::InvalidEntry { index, reason: error.to_string() })?;
                    // The certificate and the JWK must describe the same key; otherwise a
                    // consumer reading `x5c` and one reading the parameters would disagree.
                    if authority.public_key != key {
                        return Err(BundleError::CertificateKeyMismatch { index });
                    }
                    bundle.push_x509_authority(authority);
                }
                EntryRole::Jwt => {
                    let Some(key) = entry.public_key(index)? else {
                        continue;
                    };
                    // spec: `kid` MUST be set on JWT authorities and be unique.
                    let kid = match &entry.kid {
                        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
                        _ => return Err(BundleError::MissingKeyId { index }),
                    };
                    if !kids.insert(kid.clone()) {
                        return Err(BundleError::DuplicateKeyId(kid));
                    }
                    bundle.jwt_authorities.insert(kid, key);
                }
            }
        }
        Ok(bundle)
    }
}

impl RawJwk {
    fn role(&self, dialect: Dialect) -> EntryRole {
        let use_ = match &self.use_ {
            Some(Value::String(use_)) => Some(use_.as_str()),
            None => None,
            // A `use` that is not a string is as unknown as any other value.
            Some(_) => return EntryRole::Ignored,
        };
        // spec: `use` values are case-sensitive; unknown or missing ⇒ ignore the entry.
        match (dialect, use_) {
            (_, Some(USE_X509_SVID)) if dialect == Dialect::Spiffe => EntryRole::X509,
            (_, Some(USE_JWT_SVID)) => EntryRole::Jwt,
            (Dialect::JwtJwks, None | Some("sig")) => EntryRole::Jwt,
            _ => EntryRole::Ignored,
        }
    }

    /// The entry's public key; `None` when `kty` is unknown (spec: ignore such entries).
    fn public_key(&self, index: usize) -> Result<Option<PublicKey>, BundleError> {
        let invalid = |reason: String| BundleError::InvalidEntry { index, reason };
        let member = |name: &str, value: &Option<Value>| match value {
            Some(Value::String(text)) => Ok(text.clone()),
            _ => Err(invalid(format!("missing or non-string {name:?}"))),
        };
        let jwk = match &self.kty {
            Some(Value::String(kty)) if kty == "EC" => {
                Jwk::Ec { crv: member("crv", &self.crv)?, x: member("x", &self.x)?, y: member("y", &self.y)? }
            }
            Some(Value::String(kty)) if kty == "RSA" => Jwk::Rsa { n: member("n", &self.n)?, e: member("e", &self.e)? },
            // spec: every JWK MUST have `kty`; unknown `kty` ⇒ ignore that JWK.
            _ => return Ok(None),
        };
        PublicKey::from_jwk(&jwk).map(Some).map_err(|error| invalid(error.to_string()))
    }

    /// The single DER certificate of an `x509-svid` entry.
    fn single_certificate(&self, index: usize) -> Result<Vec<u8>, BundleError> {
        let certificates: &[Value] = match &self.x5c {
            None | Some(Value::Null) => &[],
            Some(Value::Array(items)) => items,
            Some(_) => {
                return Err(BundleError::InvalidEntry { index, reason: "\"x5c\" must be an array".to_owned() });
            }
        };
        let [Value::String(certificate)] = certificates else {
            if certificates.len() == 1 {
                return Err(BundleError::InvalidEntry { index, reason: "\"x5c\" must hold base64 strings".to_owned() });
            }
            return Err(BundleError::X5cCount { index, count: certificates.len() });
        };
        BASE64_LENIENT.decode(certificate).map_err(|_| BundleError::InvalidEntry {
            index,
            reason: "\"x5c\" certificate is not valid base64".to_owned(),
        })
    }
}

/// Decodes a bundle map `{"trust_domains": {"example.com": {<bundle>}, …}}`.
///
/// spec: a map naming a trust domain twice MUST be rejected
/// ([`BundleError::DuplicateTrustDomain`]); keys must be bare, valid trust domain names
/// (`spiffe://…` keys are refused). Each bundle is decoded as by [`Bundle::from_json`] (a
/// per-bundle refresh hint is kept on the bundle, but must not drive map refreshes). The
/// `trust_domains` member is required. Returned sorted by trust domain. Input longer than
/// [`MAX_BUNDLE_MAP_JSON_LEN`] is refused.
pub fn decode_bundle_map(json: &[u8]) -> Result<Vec<Bundle>, BundleError> {
    if json.len() > MAX_BUNDLE_MAP_JSON_LEN {
        return Err(BundleError::TooLarge { max: MAX_BUNDLE_MAP_JSON_LEN });
    }
    let raw: RawBundleMap = serde_json::from_slice(json).map_err(BundleError::Json)?;
    let TrustDomainEntries(entries) = raw.trust_domains.ok_or(BundleError::MissingTrustDomains)?;
    let mut seen = BTreeSet::new();
    let mut bundles = Vec::with_capacity(entries.len());
    for (name, raw_bundle) in entries {
        if !seen.insert(name.clone()) {
            return Err(BundleError::DuplicateTrustDomain(name));
        }
        let trust_domain = TrustDomain::new(&name)
            .ok()
            .filter(|trust_domain| trust_domain.name() == name)
            .ok_or_else(|| BundleError::InvalidTrustDomain(name.clone()))?;
        let bundle = raw_bundle
            .interpret(trust_domain, Dialect::Spiffe)
            .map_err(|error| BundleError::InMap { trust_domain: name, source: Box::new(error) })?;
        bundles.push(bundle);
    }
    bundles.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
    Ok(bundles)
}

/// Encodes a bundle map `{"trust_domains": {"<td>": {<bundle>}, …}}` keyed by bare trust
/// domain names.
///
/// spec: producers SHOULD omit the refresh hint inside mapped bundles, so it is omitted. Two
/// bundles of one trust domain are an error rather than a silent choice.
pub fn encode_bundle_map<'a>(bundles: impl IntoIterator<Item = &'a Bundle>) -> Result<String, BundleError> {
    let mut trust_domains = Map::new();
    for bundle in bundles {
        let name = bundle.trust_domain.name().to_owned();
        if trust_domains.contains_key(&name) {
            return Err(BundleError::DuplicateTrustDomain(name));
        }
        trust_domains.insert(name, bundle.to_json_value(false));
    }
    let mut document = Map::new();
    document.insert("trust_domains".to_owned(), Value::Object(trust_domains));
    Ok(Value::Object(document).to_string())
}

/// One JWK object: optional `use`, the key parameters, optional `kid` and `x5c`.
fn jwk_object(use_: Option<&str>, key: &PublicKey, kid: Option<&str>, x5c: Option<String>) -> Map<String, Value> {
    let mut object = Map::new();
    if let Some(use_) = use_ {
        object.insert("use".to_owned(), Value::from(use_));
    }
    match key.to_jwk() {
        Jwk::Ec { crv, x, y } => {
            object.insert("kty".to_owned(), Value::from("EC"));
            object.insert("crv".to_owned(), Value::from(crv));
            object.insert("x".to_owned(), Value::from(x));
            object.insert("y".to_owned(), Value::from(y));
        }
        Jwk::Rsa { n, e } => {
            object.insert("kty".to_owned(), Value::from("RSA"));
            object.insert("n".to_owned(), Value::from(n));
            object.insert("e".to_owned(), Value::from(e));
        }
    }
    if let Some(kid) = kid {
        object.insert("kid".to_owned(), Value::from(kid));
    }
    if let Some(certificate) = x5c {
        object.insert("x5c".to_owned(), Value::Array(vec![Value::from(certificate)]));
    }
    object
}

/// Whole seconds, rounding a fractional second up.
fn ceil_seconds(duration: Duration) -> u64 {
    duration.as_secs().saturating_add(u64::from(duration.subsec_nanos() > 0))
}

struct TrustDomainEntriesVisitor;

impl<'de> Visitor<'de> for TrustDomainEntriesVisitor {
    type Value = TrustDomainEntries;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of trust domain names to bundles")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TrustDomainEntries, A::Error> {
        let mut entries = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            let bundle = map.next_value::<RawBundle>()?;
            entries.push((name, bundle));
        }
        Ok(TrustDomainEntries(entries))
    }
}

impl<'de> Deserialize<'de> for TrustDomainEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TrustDomainEntriesVisitor)
    }
}
