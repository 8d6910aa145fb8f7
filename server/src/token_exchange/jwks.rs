//! JSON Web Key Sets of external issuers (RFC 7517), parsed with the bounds of hostile input.
//!
//! Only signature keys are kept: EC (P-256, P-384) and RSA keys with a `kid`, whose `use` (if
//! present) is `sig` and whose `alg` (if present) is an asymmetric JWS algorithm. Anything
//! else in the set (encryption keys, symmetric `oct` keys, unknown key types) is skipped, so
//! an issuer that publishes them next to its signing keys still works; a set without one
//! usable key is an error.

use std::collections::HashMap;

use serde_json::Value;
use tessera_spiffe::jwt::JwsAlgorithm;
use tessera_spiffe::keys::{Jwk, PublicKey};

/// Largest JWKS document read, in bytes.
pub const MAX_JWKS_LEN: usize = 256 * 1024;
/// Most keys kept from one set.
pub const MAX_KEYS: usize = 64;
/// Longest `kid` kept.
const MAX_KID_LEN: usize = 256;

/// One verification key of an issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKey {
    /// The key.
    pub key: PublicKey,
    /// The `alg` the JWK is restricted to, if it names one.
    pub algorithm: Option<JwsAlgorithm>,
}

/// An issuer's keys by `kid`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: HashMap<String, IssuerKey>,
}

impl KeySet {
    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&IssuerKey> {
        self.keys.get(kid)
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Parses a JWKS document (`{"keys": [...]}`).
pub fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    if bytes.len() > MAX_JWKS_LEN {
        return Err(format!("the JWKS is larger than {MAX_JWKS_LEN} bytes"));
    }
    let document: Value = serde_json::from_slice(bytes).map_err(|err| format!("the JWKS is not JSON: {err}"))?;
    let Some(Value::Array(entries)) = document.get("keys") else {
        return Err("the JWKS has no \"keys\" array".into());
    };
    let mut keys = HashMap::new();
    for entry in entries {
        if keys.len() >= MAX_KEYS {
            break;
        }
        let Some((kid, key)) = parse_key(entry) else { continue };
        keys.entry(kid).or_insert(key);
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable signature key (EC P-256/P-384 or RSA, with a kid)".into());
    }
    Ok(KeySet { keys })
}

fn text<'a>(entry: &'a Value, member: &str) -> Option<&'a str> {
    entry.get(member).and_then(Value::as_str)
}

fn parse_key(entry: &Value) -> Option<(String, IssuerKey)> {
    let kid = text(entry, "kid").filter(|kid| !kid.is_empty() && kid.len() <= MAX_KID_LEN)?;
    if entry.get("use").is_some_and(|value| value.as_str() != Some("sig")) {
        return None;
    }
    let algorithm = match entry.get("alg") {
        None | Some(Value::Null) => None,
        Some(Value::String(alg)) => Some(alg.parse::<JwsAlgorithm>().ok()?),
        Some(_) => return None,
    };
    let jwk = match text(entry, "kty")? {
        "EC" => Jwk::Ec {
            crv: text(entry, "crv")?.to_owned(),
            x: text(entry, "x")?.to_owned(),
            y: text(entry, "y")?.to_owned(),
        },
        "RSA" => Jwk::Rsa { n: text(entry, "n")?.to_owned(), e: text(entry, "e")?.to_owned() },
        _ => return None,
    };
    let key = PublicKey::from_jwk(&jwk).ok()?;
    if let Some(algorithm) = algorithm
        && !key.fits_algorithm(algorithm)
    {
        return None;
    }
    Some((kid.to_owned(), IssuerKey { key, algorithm }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_spiffe::keys::{KeyType, SigningKey};

    fn ec_jwk(kid: &str) -> Value {
        let key = SigningKey::generate(KeyType::EcP256, &ring::rand::SystemRandom::new()).unwrap();
        let mut value = serde_json::to_value(key.public_key().to_jwk()).unwrap();
        value["kid"] = json!(kid);
        value
    }

    #[test]
    fn keeps_only_signature_keys() {
        let mut enc = ec_jwk("enc");
        enc["use"] = json!("enc");
        let mut hs = ec_jwk("hs");
        hs["alg"] = json!("HS256");
        let mut mismatched = ec_jwk("rs");
        mismatched["alg"] = json!("RS256");
        let jwks =
            json!({"keys": [ec_jwk("a"), enc, hs, mismatched, {"kty": "oct", "kid": "o", "k": "AAAA"}, {"kty": "EC"}]});
        let set = parse_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.get("a").is_some());
        assert!(parse_jwks(br#"{"keys": []}"#).unwrap_err().contains("no usable"));
        assert!(parse_jwks(b"[]").unwrap_err().contains("no \"keys\""));
        assert!(parse_jwks(b"{").unwrap_err().contains("not JSON"));
        assert!(parse_jwks(&vec![b' '; MAX_JWKS_LEN + 1]).unwrap_err().contains("larger"));
    }
}
