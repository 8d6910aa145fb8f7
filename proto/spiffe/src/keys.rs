//! Signing keys (CA and JWT authorities) and public keys in SPKI and JWK form.
//!
//! - [`KeyType`] is the operator-facing choice of key (`ec-p256`, `ec-p384`, `rsa-2048`).
//! - [`SigningKey`] holds a private key as PKCS#8 DER (the form rcgen, storage and the Workload
//!   API use) next to the parsed ring key pair that produces JWS signatures.
//! - [`PublicKey`] is a parsed SubjectPublicKeyInfo of a supported family (EC P-256, P-384,
//!   P-521 or RSA) that converts to and from its JWK parameters, which is how trust bundles carry
//!   keys.
//!
//! Randomness is always injected as `&dyn ring::rand::SecureRandom`; this module draws none of
//! its own. Private key material never appears in `Debug` output.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use ring::rand::SecureRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use serde::{Deserialize, Serialize};
use spki::der::asn1::{BitStringRef, Null, ObjectIdentifier, UintRef};
use spki::der::{Decode as _, Encode as _};
use spki::{AlgorithmIdentifier, SubjectPublicKeyInfo, SubjectPublicKeyInfoRef};
use zeroize::Zeroizing;

use crate::jwt::JwsAlgorithm;

/// `id-ecPublicKey` (RFC 5480).
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` (RFC 5480).
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// `secp384r1` (RFC 5480).
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// `secp521r1` (RFC 5480).
const SECP521R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
/// `rsaEncryption` (RFC 8017).
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Largest SubjectPublicKeyInfo accepted, in bytes. An 8192-bit RSA key needs about 1.1 KiB;
/// the cap only keeps hostile input bounded.
pub const MAX_SPKI_LEN: usize = 4096;

/// Smallest RSA modulus accepted when parsing a public key, in bits. Verification through ring
/// additionally requires 2048 bits; smaller keys are still parsed so that bundles carrying
/// legacy CA certificates can be read (and re-served) without failing as a whole.
pub const MIN_RSA_MODULUS_BITS: usize = 1024;

/// Largest RSA modulus accepted, in bits (ring's verification limit).
pub const MAX_RSA_MODULUS_BITS: usize = 8192;

/// Modulus size of [`KeyType::Rsa2048`], in bits.
const RSA_2048_BITS: usize = 2048;

/// Base64url without padding (RFC 7515 §2), lenient about padding on input: JWK producers
/// occasionally pad, and padding carries no meaning.
const BASE64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key could not be generated, loaded, converted or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The injected random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// RSA key generation failed.
    #[error("RSA key generation failed")]
    RsaGeneration(#[source] rsa::Error),
    /// A generated RSA key could not be encoded as PKCS#8.
    #[error("could not encode RSA private key as PKCS#8")]
    Pkcs8Encoding(#[source] rsa::pkcs8::Error),
    /// The PKCS#8 document is not a supported private key (EC P-256, EC P-384 or RSA-2048).
    #[error("private key is not a supported PKCS#8 key (ec-p256, ec-p384, rsa-2048): {0}")]
    UnsupportedPrivateKey(String),
    /// The SubjectPublicKeyInfo could not be parsed.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(String),
    /// The public key algorithm or curve is not supported.
    #[error("unsupported public key algorithm")]
    UnsupportedPublicKey,
    /// The JWK is malformed or inconsistent.
    #[error("invalid JWK: {0}")]
    InvalidJwk(String),
    /// The key cannot produce signatures of this algorithm (e.g. ES384 with a P-256 key).
    #[error("a {key_type} key cannot produce {algorithm} signatures")]
    AlgorithmMismatch {
        /// The key's type.
        key_type: KeyType,
        /// The requested algorithm.
        algorithm: JwsAlgorithm,
    },
    /// The signature operation failed (ring gives no details).
    #[error("signing failed")]
    Signing,
}

/// The kind of signing key to generate: the configuration value for CA, JWT and workload keys.
///
/// Spelled `ec-p256`, `ec-p384` and `rsa-2048` in configuration files (the SPIRE spellings),
/// through [`FromStr`], [`fmt::Display`] and serde alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA on NIST P-256; signs JWT-SVIDs with ES256. The default, as in SPIRE.
    #[default]
    #[serde(rename = "ec-p256")]
    EcP256,
    /// ECDSA on NIST P-384; signs JWT-SVIDs with ES384.
    #[serde(rename = "ec-p384")]
    EcP384,
    /// RSA with a 2048-bit modulus; signs JWT-SVIDs with RS256.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

/// Error for an unknown [`KeyType`] spelling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key type {0:?} (expected one of \"ec-p256\", \"ec-p384\", \"rsa-2048\")")]
pub struct UnknownKeyType(pub String);

/// An EC curve a [`PublicKey`] can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EcCurve {
    /// NIST P-256 (secp256r1), JWK `crv` `P-256`.
    P256,
    /// NIST P-384 (secp384r1), JWK `crv` `P-384`.
    P384,
    /// NIST P-521 (secp521r1), JWK `crv` `P-521`. Parsed and re-served, but ring cannot verify
    /// ES512 signatures, so JWT-SVIDs signed with such a key are rejected.
    P521,
}

/// The family of a [`PublicKey`], which decides the JWS algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyFamily {
    /// An EC key on the given curve.
    Ec(EcCurve),
    /// An RSA key.
    Rsa,
}

/// A private signing key: PKCS#8 DER plus the ring key pair that signs with it.
///
/// EC keys use ring's *fixed* (`r || s`) signature encoding, which is what JWS requires; X.509
/// signing goes through rcgen, which loads the same key from [`SigningKey::pkcs8_der`].
/// `Debug` prints the key type and public key only.
pub struct SigningKey {
    key_type: KeyType,
    pkcs8: Zeroizing<Vec<u8>>,
    key_pair: KeyPairInner,
    public_key: PublicKey,
}

/// The parsed ring key pair behind a [`SigningKey`].
enum KeyPairInner {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A public key of a supported family, parsed from (and re-encoded to canonical)
/// SubjectPublicKeyInfo DER.
///
/// Equality is equality of the key material. Two encodings of the same key (for example RSA
/// algorithm parameters `NULL` versus absent) compare equal because the SPKI is re-encoded in
/// one canonical form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    spki_der: Vec<u8>,
    material: KeyMaterial,
}

/// The public parameters of a [`PublicKey`].
#[derive(Clone, PartialEq, Eq, Hash)]
enum KeyMaterial {
    /// Uncompressed SEC1 point (`0x04 || x || y`).
    Ec { curve: EcCurve, point: Vec<u8> },
    /// Big-endian modulus and exponent without leading zero bytes.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// The public parameters of a key as a JSON Web Key (RFC 7517/7518), without `use`, `kid` or
/// `x5c` (the bundle module adds those).
///
/// All values are base64url without padding. Serializes with `kty` first:
/// `{"kty":"EC","crv":"P-256","x":"…","y":"…"}` or `{"kty":"RSA","n":"…","e":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kty")]
pub enum Jwk {
    /// An elliptic-curve key.
    #[serde(rename = "EC")]
    Ec {
        /// Curve name: `P-256`, `P-384` or `P-521`.
        crv: String,
        /// X coordinate, full curve size.
        x: String,
        /// Y coordinate, full curve size.
        y: String,
    },
    /// An RSA key.
    #[serde(rename = "RSA")]
    Rsa {
        /// Modulus.
        n: String,
        /// Public exponent.
        e: String,
    },
}

/// Adapts an injected ring [`SecureRandom`] to the `rand_core` traits the `rsa` crate expects,
/// so RSA key generation draws from the same caller-provided source as everything else and
/// reports its failure instead of panicking.
struct RingRng<'a>(&'a dyn SecureRandom);

/// The injected generator failed (ring reports no details).
#[derive(Debug, thiserror::Error)]
#[error("random number generator failed")]
struct RngFailure;

impl rand_core::TryRng for RingRng<'_> {
    type Error = RngFailure;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0u8; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0u8; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst).map_err(|_| RngFailure)
    }
}

// ring's `SecureRandom` is a CSPRNG by contract (its docs: "a secure random number generator").
impl rand_core::TryCryptoRng for RingRng<'_> {}

impl KeyType {
    /// All key types, in configuration order.
    pub const ALL: [KeyType; 3] = [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048];

    /// The configuration spelling: `ec-p256`, `ec-p384` or `rsa-2048`.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    /// The JWS algorithm a key of this type signs JWT-SVIDs with by default
    /// (ES256, ES384, RS256 — as SPIRE does).
    pub const fn default_jws_algorithm(self) -> JwsAlgorithm {
        match self {
            KeyType::EcP256 => JwsAlgorithm::Es256,
            KeyType::EcP384 => JwsAlgorithm::Es384,
            KeyType::Rsa2048 => JwsAlgorithm::Rs256,
        }
    }

    /// The ring signing algorithm for EC key types, `None` for RSA.
    fn ecdsa_signing_algorithm(self) -> Option<&'static signature::EcdsaSigningAlgorithm> {
        match self {
            KeyType::EcP256 => Some(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
            KeyType::EcP384 => Some(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
            KeyType::Rsa2048 => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL.into_iter().find(|key_type| key_type.as_str() == s).ok_or_else(|| UnknownKeyType(s.to_owned()))
    }
}

impl EcCurve {
    /// The JWK `crv` name (`P-256`, `P-384`, `P-521`).
    pub const fn jwk_name(self) -> &'static str {
        match self {
            EcCurve::P256 => "P-256",
            EcCurve::P384 => "P-384",
            EcCurve::P521 => "P-521",
        }
    }

    /// Length of one coordinate in bytes.
    pub const fn coordinate_len(self) -> usize {
        match self {
            EcCurve::P256 => 32,
            EcCurve::P384 => 48,
            EcCurve::P521 => 66,
        }
    }

    fn from_jwk_name(name: &str) -> Option<Self> {
        [EcCurve::P256, EcCurve::P384, EcCurve::P521].into_iter().find(|curve| curve.jwk_name() == name)
    }

    fn oid(self) -> ObjectIdentifier {
        match self {
            EcCurve::P256 => SECP256R1,
            EcCurve::P384 => SECP384R1,
            EcCurve::P521 => SECP521R1,
        }
    }

    fn from_oid(oid: ObjectIdentifier) -> Option<Self> {
        [EcCurve::P256, EcCurve::P384, EcCurve::P521].into_iter().find(|curve| curve.oid() == oid)
    }
}

impl fmt::Display for EcCurve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.jwk_name())
    }
}

impl fmt::Display for KeyFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFamily::Ec(curve) => write!(f, "EC {curve}"),
            KeyFamily::Rsa => f.write_str("RSA"),
        }
    }
}

impl SigningKey {
    /// Generates a new key of `key_type` with randomness drawn from `rng` only.
    ///
    /// EC keys come from ring. RSA-2048 keys come from the `rsa` crate (ring cannot generate RSA
    /// keys), fed by the same `rng` through an adapter, then exported as PKCS#8 and loaded into
    /// ring, which does all signing. The `rsa` crate is never used to sign or decrypt, so its
    /// timing side channel in decryption (RUSTSEC-2023-0071) does not apply. RSA generation is
    /// slow (hundreds of milliseconds in release builds, seconds in debug builds).
    pub fn generate(key_type: KeyType, rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        match key_type.ecdsa_signing_algorithm() {
            Some(algorithm) => {
                let document = EcdsaKeyPair::generate_pkcs8(algorithm, rng).map_err(|_| KeyError::Rng)?;
                Self::from_pkcs8_der(document.as_ref(), rng)
            }
            None => {
                use rsa::pkcs8::EncodePrivateKey as _;
                let private_key =
                    rsa::PrivateKey::new(&mut RingRng(rng), RSA_2048_BITS).map_err(|error| match error {
                        rsa::Error::Rng => KeyError::Rng,
                        other => KeyError::RsaGeneration(other),
                    })?;
                let document = private_key.to_pkcs8_der().map_err(KeyError::Pkcs8Encoding)?;
                Self::from_pkcs8_der(document.as_bytes(), rng)
            }
        }
    }

    /// Loads an unencrypted PKCS#8 DER private key of one of the [`KeyType`]s.
    ///
    /// `rng` is needed because ring checks EC key pairs with a randomized self-test on load.
    pub fn from_pkcs8_der(pkcs8: &[u8], rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let Some(algorithm) = key_type.ecdsa_signing_algorithm() else {
                continue;
            };
            if let Ok(key_pair) = EcdsaKeyPair::from_pkcs8(algorithm, pkcs8, rng) {
                let curve = if key_type == KeyType::EcP256 { EcCurve::P256 } else { EcCurve::P384 };
                let public_key = PublicKey::from_ec_point(curve, key_pair.public_key().as_ref())?;
                return Ok(SigningKey {
                    key_type,
                    pkcs8: Zeroizing::new(pkcs8.to_vec()),
                    key_pair: KeyPairInner::Ec(key_pair),
                    public_key,
                });
            }
        }
        let key_pair =
            RsaKeyPair::from_pkcs8(pkcs8).map_err(|rejected| KeyError::UnsupportedPrivateKey(rejected.to_string()))?;
        if key_pair.public().modulus_len() * 8 != RSA_2048_BITS {
            return Err(KeyError::UnsupportedPrivateKey(format!(
                "RSA modulus is {} bits, only 2048 is supported",
                key_pair.public().modulus_len() * 8
            )));
        }
        let components = signature::RsaPublicKeyComponents::<Vec<u8>>::from(key_pair.public());
        let public_key = PublicKey::from_rsa_components(&components.n, &components.e)?;
        Ok(SigningKey {
            key_type: KeyType::Rsa2048,
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            key_pair: KeyPairInner::Rsa(key_pair),
            public_key,
        })
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The private key as unencrypted PKCS#8 DER (for rcgen, storage, or the Workload API).
    ///
    /// The returned bytes are secret; the owned copy is wiped when the key is dropped.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half of the key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The JWS algorithm this key signs JWT-SVIDs with by default.
    pub fn default_jws_algorithm(&self) -> JwsAlgorithm {
        self.key_type.default_jws_algorithm()
    }

    /// Signs `message` with `algorithm`, returning the JWS signature bytes (`r || s` for ECDSA,
    /// the modulus-sized signature for RSA).
    ///
    /// EC keys sign only with the algorithm of their curve (ES256 for P-256, ES384 for P-384);
    /// RSA keys sign with any of RS256/384/512 and PS256/384/512. `rng` supplies the ECDSA nonce
    /// and the PSS salt.
    pub fn sign(&self, algorithm: JwsAlgorithm, message: &[u8], rng: &dyn SecureRandom) -> Result<Vec<u8>, KeyError> {
        let mismatch = || KeyError::AlgorithmMismatch { key_type: self.key_type, algorithm };
        match &self.key_pair {
            KeyPairInner::Ec(key_pair) => {
                if algorithm != self.key_type.default_jws_algorithm() {
                    return Err(mismatch());
                }
                let signature = key_pair.sign(rng, message).map_err(|_| KeyError::Signing)?;
                Ok(signature.as_ref().to_vec())
            }
            KeyPairInner::Rsa(key_pair) => {
                let padding: &'static dyn signature::RsaEncoding = match algorithm {
                    JwsAlgorithm::Rs256 => &signature::RSA_PKCS1_SHA256,
                    JwsAlgorithm::Rs384 => &signature::RSA_PKCS1_SHA384,
                    JwsAlgorithm::Rs512 => &signature::RSA_PKCS1_SHA512,
                    JwsAlgorithm::Ps256 => &signature::RSA_PSS_SHA256,
                    JwsAlgorithm::Ps384 => &signature::RSA_PSS_SHA384,
                    JwsAlgorithm::Ps512 => &signature::RSA_PSS_SHA512,
                    JwsAlgorithm::Es256 | JwsAlgorithm::Es384 | JwsAlgorithm::Es512 => {
                        return Err(mismatch());
                    }
                };
                let mut signature = vec![0u8; key_pair.public().modulus_len()];
                key_pair.sign(padding, rng, message, &mut signature).map_err(|_| KeyError::Signing)?;
                Ok(signature)
            }
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the PKCS#8 bytes or the ring key pair.
        f.debug_struct("SigningKey")
            .field("key_type", &self.key_type)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo of a supported family.
    ///
    /// EC keys must use named-curve parameters and an uncompressed point; RSA keys must have a
    /// modulus of [`MIN_RSA_MODULUS_BITS`]..=[`MAX_RSA_MODULUS_BITS`] bits and an odd exponent
    /// ≥ 3. Whether an EC point lies on its curve is checked by ring when a signature is
    /// verified. Anything else (Ed25519, explicit curve parameters, trailing bytes) is an error.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        if der.len() > MAX_SPKI_LEN {
            return Err(KeyError::InvalidPublicKey(format!(
                "SubjectPublicKeyInfo is longer than {MAX_SPKI_LEN} bytes"
            )));
        }
        let spki =
            SubjectPublicKeyInfoRef::from_der(der).map_err(|error| KeyError::InvalidPublicKey(error.to_string()))?;
        let key_bytes = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| KeyError::InvalidPublicKey("public key bit string has unused bits".to_owned()))?;
        let (algorithm, parameters) =
            spki.algorithm.oids().map_err(|error| KeyError::InvalidPublicKey(error.to_string()))?;
        match (algorithm, parameters) {
            (ID_EC_PUBLIC_KEY, Some(curve_oid)) => {
                let curve = EcCurve::from_oid(curve_oid).ok_or(KeyError::UnsupportedPublicKey)?;
                Self::from_ec_point(curve, key_bytes)
            }
            (RSA_ENCRYPTION, None) => {
                let rsa_key = pkcs1::RsaPublicKeyRef::from_der(key_bytes)
                    .map_err(|error| KeyError::InvalidPublicKey(error.to_string()))?;
                Self::from_rsa_components(rsa_key.modulus.as_bytes(), rsa_key.public_exponent.as_bytes())
            }
            _ => Err(KeyError::UnsupportedPublicKey),
        }
    }

    /// Builds a public key from its JWK parameters.
    ///
    /// EC coordinates must be exactly the curve's size (RFC 7518 §6.2.1.2); RSA values may carry
    /// leading zero bytes, which are dropped. Padding on the base64url values is tolerated.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, KeyError> {
        match jwk {
            Jwk::Ec { crv, x, y } => {
                let curve = EcCurve::from_jwk_name(crv)
                    .ok_or_else(|| KeyError::InvalidJwk(format!("unsupported curve {crv:?}")))?;
                let x = decode_jwk_value("x", x)?;
                let y = decode_jwk_value("y", y)?;
                if x.len() != curve.coordinate_len() || y.len() != curve.coordinate_len() {
                    return Err(KeyError::InvalidJwk(format!(
                        "{curve} coordinates must be {} bytes long",
                        curve.coordinate_len()
                    )));
                }
                let mut point = Vec::with_capacity(1 + 2 * curve.coordinate_len());
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Self::from_ec_point(curve, &point)
            }
            Jwk::Rsa { n, e } => {
                let n = decode_jwk_value("n", n)?;
                let e = decode_jwk_value("e", e)?;
                Self::from_rsa_components(&n, &e).map_err(|error| match error {
                    KeyError::InvalidPublicKey(reason) => KeyError::InvalidJwk(reason),
                    other => other,
                })
            }
        }
    }

    /// The key's JWK parameters (`kty` and `crv`/`x`/`y` or `n`/`e`), base64url without padding.
    pub fn to_jwk(&self) -> Jwk {
        let encode = |bytes: &[u8]| general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        match &self.material {
            KeyMaterial::Ec { curve, point } => {
                // `point` is `0x04 || x || y`, checked on construction.
                let coordinates = point.get(1..).unwrap_or_default();
                let (x, y) = coordinates.split_at(coordinates.len() / 2);
                Jwk::Ec { crv: curve.jwk_name().to_owned(), x: encode(x), y: encode(y) }
            }
            KeyMaterial::Rsa { n, e } => Jwk::Rsa { n: encode(n), e: encode(e) },
        }
    }

    /// The canonical SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key family (EC curve or RSA).
    pub fn family(&self) -> KeyFamily {
        match &self.material {
            KeyMaterial::Ec { curve, .. } => KeyFamily::Ec(*curve),
            KeyMaterial::Rsa { .. } => KeyFamily::Rsa,
        }
    }

    /// A key ID (`kid`) derived from the key: the RFC 7638 JWK SHA-256 thumbprint, base64url
    /// without padding (43 characters).
    ///
    /// Deriving the kid from the key (instead of drawing a random one, as SPIRE does) makes it
    /// stable across restarts and recomputable by anyone holding the public key, and two keys
    /// can only share a kid through a SHA-256 collision. Any other unique string is an equally
    /// valid kid: validation only looks kids up, it never recomputes them.
    pub fn thumbprint(&self) -> String {
        // RFC 7638 §3: the required members in lexicographic order, no whitespace. The values
        // are base64url or fixed curve names, so no JSON escaping is needed.
        let canonical = match self.to_jwk() {
            Jwk::Ec { crv, x, y } => {
                format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
            Jwk::Rsa { n, e } => format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    /// Whether a signature of `algorithm` can be made by a key of this family
    /// (RS*/PS* need RSA, ES256 P-256, ES384 P-384, ES512 P-521).
    pub fn fits_algorithm(&self, algorithm: JwsAlgorithm) -> bool {
        match (self.family(), algorithm) {
            (KeyFamily::Ec(curve), JwsAlgorithm::Es256) => curve == EcCurve::P256,
            (KeyFamily::Ec(curve), JwsAlgorithm::Es384) => curve == EcCurve::P384,
            (KeyFamily::Ec(curve), JwsAlgorithm::Es512) => curve == EcCurve::P521,
            (KeyFamily::Ec(_), _) => false,
            (KeyFamily::Rsa, algorithm) => {
                !matches!(algorithm, JwsAlgorithm::Es256 | JwsAlgorithm::Es384 | JwsAlgorithm::Es512)
            }
        }
    }

    /// Verifies a JWS signature over `message` made with `algorithm`.
    ///
    /// Returns `false` when the key does not fit the algorithm, when ring does not support the
    /// algorithm (ES512), or when the signature is wrong.
    pub(crate) fn verify(&self, algorithm: JwsAlgorithm, message: &[u8], sig: &[u8]) -> bool {
        if !self.fits_algorithm(algorithm) {
            return false;
        }
        match &self.material {
            KeyMaterial::Ec { point, .. } => {
                let verification: &'static signature::EcdsaVerificationAlgorithm = match algorithm {
                    JwsAlgorithm::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
                    JwsAlgorithm::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return false,
                };
                signature::UnparsedPublicKey::new(verification, point).verify(message, sig).is_ok()
            }
            KeyMaterial::Rsa { n, e } => {
                let parameters: &'static signature::RsaParameters = match algorithm {
                    JwsAlgorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    JwsAlgorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    JwsAlgorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    JwsAlgorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    JwsAlgorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    JwsAlgorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                signature::RsaPublicKeyComponents { n, e }.verify(parameters, message, sig).is_ok()
            }
        }
    }

    /// Builds an EC key from an uncompressed SEC1 point.
    fn from_ec_point(curve: EcCurve, point: &[u8]) -> Result<Self, KeyError> {
        if point.len() != 1 + 2 * curve.coordinate_len() || point.first() != Some(&0x04) {
            return Err(KeyError::InvalidPublicKey(format!(
                "{curve} public key must be an uncompressed point of {} bytes",
                1 + 2 * curve.coordinate_len()
            )));
        }
        let spki = SubjectPublicKeyInfo {
            algorithm: AlgorithmIdentifier { oid: ID_EC_PUBLIC_KEY, parameters: Some(curve.oid()) },
            subject_public_key: bit_string(point)?,
        };
        Ok(PublicKey {
            spki_der: spki.to_der().map_err(der_encoding_error)?,
            material: KeyMaterial::Ec { curve, point: point.to_vec() },
        })
    }

    /// Builds an RSA key from big-endian modulus and exponent.
    fn from_rsa_components(n: &[u8], e: &[u8]) -> Result<Self, KeyError> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let modulus_bits = bit_length(n);
        if !(MIN_RSA_MODULUS_BITS..=MAX_RSA_MODULUS_BITS).contains(&modulus_bits) {
            return Err(KeyError::InvalidPublicKey(format!(
                "RSA modulus must be {MIN_RSA_MODULUS_BITS} to {MAX_RSA_MODULUS_BITS} bits, got {modulus_bits}"
            )));
        }
        let e_is_odd = e.last().is_some_and(|last| last & 1 == 1);
        if e.len() > 8 || !e_is_odd || e == [1] {
            return Err(KeyError::InvalidPublicKey(
                "RSA public exponent must be odd, at least 3 and at most 64 bits".to_owned(),
            ));
        }
        let rsa_key = pkcs1::RsaPublicKeyRef {
            modulus: UintRef::new(n).map_err(der_encoding_error)?,
            public_exponent: UintRef::new(e).map_err(der_encoding_error)?,
        };
        let rsa_key_der = rsa_key.to_der().map_err(der_encoding_error)?;
        let spki = SubjectPublicKeyInfo {
            algorithm: AlgorithmIdentifier { oid: RSA_ENCRYPTION, parameters: Some(Null) },
            subject_public_key: bit_string(&rsa_key_der)?,
        };
        Ok(PublicKey {
            spki_der: spki.to_der().map_err(der_encoding_error)?,
            material: KeyMaterial::Rsa { n: n.to_vec(), e: e.to_vec() },
        })
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey").field("family", &self.family()).field("thumbprint", &self.thumbprint()).finish()
    }
}

impl TryFrom<&Jwk> for PublicKey {
    type Error = KeyError;

    fn try_from(jwk: &Jwk) -> Result<Self, Self::Error> {
        PublicKey::from_jwk(jwk)
    }
}

impl From<&PublicKey> for Jwk {
    fn from(key: &PublicKey) -> Self {
        key.to_jwk()
    }
}

impl Jwk {
    /// Converts JWK parameters straight to SubjectPublicKeyInfo DER.
    pub fn to_spki_der(&self) -> Result<Vec<u8>, KeyError> {
        Ok(PublicKey::from_jwk(self)?.spki_der)
    }

    /// Reads JWK parameters straight from SubjectPublicKeyInfo DER.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        Ok(PublicKey::from_spki_der(der)?.to_jwk())
    }
}

/// Decodes one base64url JWK member.
fn decode_jwk_value(member: &str, value: &str) -> Result<Vec<u8>, KeyError> {
    BASE64URL_LENIENT.decode(value).map_err(|_| KeyError::InvalidJwk(format!("{member:?} is not valid base64url")))
}

fn bit_string(bytes: &[u8]) -> Result<BitStringRef<'_>, KeyError> {
    BitStringRef::from_bytes(bytes).map_err(der_encoding_error)
}

fn der_encoding_error(error: spki::der::Error) -> KeyError {
    KeyError::InvalidPublicKey(format!("DER encoding failed: {error}"))
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first_non_zero = bytes.iter().position(|byte| *byte != 0).unwrap_or(bytes.len());
    bytes.get(first_non_zero..).unwrap_or_default()
}

/// Number of significant bits of a big-endian integer without leading zero bytes.
fn bit_length(bytes: &[u8]) -> usize {
    match bytes.first() {
        Some(first) => bytes.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;

    use super::*;

    #[test]
    fn key_type_spellings_round_trip() {
        for key_type in KeyType::ALL {
            assert_eq!(key_type.to_string().parse::<KeyType>().unwrap(), key_type);
            let json = serde_json::to_string(&key_type).unwrap();
            assert_eq!(json, format!("\"{key_type}\""));
            assert_eq!(serde_json::from_str::<KeyType>(&json).unwrap(), key_type);
        }
        assert!("EC-P256".parse::<KeyType>().is_err());
        assert!(serde_json::from_str::<KeyType>("\"rsa-4096\"").is_err());
    }

    #[test]
    fn ec_keys_round_trip_through_jwk_and_spki() {
        let rng = SystemRandom::new();
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let key = SigningKey::generate(key_type, &rng).unwrap();
            let public = key.public_key();
            let jwk = public.to_jwk();
            assert_eq!(&PublicKey::from_jwk(&jwk).unwrap(), public);
            assert_eq!(&PublicKey::from_spki_der(public.spki_der()).unwrap(), public);
            assert_eq!(jwk.to_spki_der().unwrap(), public.spki_der());
            assert_eq!(Jwk::from_spki_der(public.spki_der()).unwrap(), jwk);
            let reloaded = SigningKey::from_pkcs8_der(key.pkcs8_der(), &rng).unwrap();
            assert_eq!(reloaded.public_key(), public);
            assert_eq!(reloaded.key_type(), key_type);
        }
    }

    #[test]
    fn spki_matches_rcgen() {
        let rng = SystemRandom::new();
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let key = SigningKey::generate(key_type, &rng).unwrap();
            let rcgen_key = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
            assert_eq!(rcgen::PublicKeyData::subject_public_key_info(&rcgen_key), key.public_key().spki_der());
        }
    }

    #[test]
    fn rsa_key_generation_round_trips_and_signs() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(KeyType::Rsa2048, &rng).unwrap();
        assert_eq!(key.key_type(), KeyType::Rsa2048);
        let public = key.public_key();
        assert_eq!(public.family(), KeyFamily::Rsa);
        assert_eq!(&PublicKey::from_jwk(&public.to_jwk()).unwrap(), public);
        assert_eq!(&PublicKey::from_spki_der(public.spki_der()).unwrap(), public);
        let rcgen_key = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
        assert_eq!(rcgen::PublicKeyData::subject_public_key_info(&rcgen_key), public.spki_der());
        for algorithm in [JwsAlgorithm::Rs256, JwsAlgorithm::Ps256, JwsAlgorithm::Rs512] {
            let signature = key.sign(algorithm, b"message", &rng).unwrap();
            assert!(public.verify(algorithm, b"message", &signature));
            assert!(!public.verify(algorithm, b"massage", &signature));
        }
        assert!(key.sign(JwsAlgorithm::Es256, b"m", &rng).is_err());
        let reloaded = SigningKey::from_pkcs8_der(key.pkcs8_der(), &rng).unwrap();
        assert_eq!(reloaded.public_key(), public);
    }

    #[test]
    fn debug_never_prints_private_key() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(KeyType::EcP256, &rng).unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("EcP256"));
        let pkcs8_hex = hex::encode(key.pkcs8_der());
        let pkcs8_b64 = general_purpose::STANDARD.encode(key.pkcs8_der());
        assert!(!debug.contains(&pkcs8_hex) && !debug.contains(&pkcs8_b64));
        assert!(!debug.contains("pkcs8"));
    }

    #[test]
    fn ec_key_refuses_foreign_algorithms() {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(KeyType::EcP256, &rng).unwrap();
        assert!(key.sign(JwsAlgorithm::Es256, b"m", &rng).is_ok());
        for algorithm in [JwsAlgorithm::Es384, JwsAlgorithm::Rs256, JwsAlgorithm::Ps256] {
            assert!(matches!(key.sign(algorithm, b"m", &rng), Err(KeyError::AlgorithmMismatch { .. })));
        }
    }

    #[test]
    fn jwk_rejects_short_coordinates_and_bad_base64() {
        let bad = Jwk::Ec { crv: "P-256".to_owned(), x: "AQAB".to_owned(), y: "AQAB".to_owned() };
        assert!(matches!(PublicKey::from_jwk(&bad), Err(KeyError::InvalidJwk(_))));
        let bad = Jwk::Rsa { n: "!!".to_owned(), e: "AQAB".to_owned() };
        assert!(matches!(PublicKey::from_jwk(&bad), Err(KeyError::InvalidJwk(_))));
        let bad = Jwk::Ec { crv: "P-192".to_owned(), x: String::new(), y: String::new() };
        assert!(PublicKey::from_jwk(&bad).is_err());
    }

    #[test]
    fn spki_parser_rejects_garbage_without_panicking() {
        for input in [&b""[..], b"\x30", b"\x30\x82\xff\xff", b"\x30\x03\x02\x01\x00"] {
            assert!(PublicKey::from_spki_der(input).is_err());
        }
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 §3.1 example key and its published thumbprint.
        let jwk = Jwk::Rsa {
            n: "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".to_owned(),
            e: "AQAB".to_owned(),
        };
        let key = PublicKey::from_jwk(&jwk).unwrap();
        assert_eq!(key.thumbprint(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }
}
