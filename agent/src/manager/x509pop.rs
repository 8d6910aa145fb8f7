//! The agent's half of `x509pop` node attestation: the node certificate chain it presents and
//! the signature over the server's challenge (see [`tessera_common::x509pop`]).

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use tessera_common::x509pop::{MAX_CHAIN_LEN, MAX_PAYLOAD_LEN, challenge_message};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::X509PopConfig;

/// Largest key file read, in bytes.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// A node certificate chain and the key of its leaf, checked to belong together.
pub struct NodeCredential {
    /// The chain as PEM, the leaf first: the attestation payload.
    chain_pem: Vec<u8>,
    signer: Signer,
}

impl std::fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredential").field("chain_pem_len", &self.chain_pem.len()).finish_non_exhaustive()
    }
}

enum Signer {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

impl NodeCredential {
    /// Reads `certificate_path` and `private_key_path`. Errors name the configuration key,
    /// the file and what is wrong.
    pub fn load(config: &X509PopConfig) -> Result<Self, String> {
        let cert_key = "node_attestor.x509pop.certificate_path";
        let key_key = "node_attestor.x509pop.private_key_path";
        let cert_file = |reason: String| format!("{cert_key} {}: {reason}", config.certificate_path.display());
        let key_file = |reason: String| format!("{key_key} {}: {reason}", config.private_key_path.display());

        let chain_pem = read_limited(&config.certificate_path, MAX_PAYLOAD_LEN as u64).map_err(cert_file)?;
        let blocks = pem::parse_many(&chain_pem).map_err(|error| cert_file(format!("not PEM: {error}")))?;
        let certificates: Vec<&pem::Pem> = blocks.iter().filter(|block| block.tag() == "CERTIFICATE").collect();
        if certificates.is_empty() {
            return Err(cert_file("no CERTIFICATE block".to_owned()));
        }
        if certificates.len() > MAX_CHAIN_LEN {
            return Err(cert_file(format!("more than {MAX_CHAIN_LEN} certificates")));
        }
        // Only the certificates travel: the file may carry other blocks (a key, comments).
        let chain_pem: String = certificates.iter().map(|block| pem::encode(block)).collect();
        let leaf = certificates[0].contents();
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|_| cert_file("the first certificate is not DER X.509".to_owned()))?;
        let leaf_public_key = parsed.public_key().subject_public_key.data.to_vec();

        let key_pem = read_limited(&config.private_key_path, MAX_KEY_FILE_LEN).map_err(key_file)?;
        let key_blocks = pem::parse_many(&key_pem).map_err(|error| key_file(format!("not PEM: {error}")))?;
        let pkcs8 = match key_blocks.iter().find(|block| block.tag().ends_with("PRIVATE KEY")) {
            Some(block) if block.tag() == "PRIVATE KEY" => block.contents(),
            Some(block) => {
                return Err(key_file(format!(
                    "{} blocks are not supported; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`",
                    block.tag()
                )));
            }
            None => return Err(key_file("no PRIVATE KEY block".to_owned())),
        };
        let signer = Signer::from_pkcs8(pkcs8).map_err(key_file)?;
        if signer.public_key() != leaf_public_key.as_slice() {
            return Err(key_file(format!(
                "is not the key of the node certificate in {}",
                config.certificate_path.display()
            )));
        }
        Ok(Self { chain_pem: chain_pem.into_bytes(), signer })
    }

    /// The attestation payload: the certificate chain as PEM.
    pub fn payload(&self) -> Vec<u8> {
        self.chain_pem.clone()
    }

    /// Signs the server's challenge for the CSR this attestation sent.
    pub fn sign_challenge(&self, nonce: &[u8], csr_der: &[u8]) -> Result<Vec<u8>, String> {
        let message = challenge_message(nonce, csr_der);
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Ecdsa(pair) => pair.sign(&rng, &message).map(|sig| sig.as_ref().to_vec()),
            Signer::Ed25519(pair) => Ok(pair.sign(&message).as_ref().to_vec()),
            Signer::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, &message, &mut signature).map(|()| signature)
            }
        }
        .map_err(|_| "cannot sign the x509pop challenge".to_owned())
    }
}

impl Signer {
    fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, String> {
        let rng = SystemRandom::new();
        if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng) {
            return Ok(Self::Ecdsa(pair));
        }
        if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8, &rng) {
            return Ok(Self::Ecdsa(pair));
        }
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
            return Ok(Self::Ed25519(pair));
        }
        if let Ok(pair) = RsaKeyPair::from_pkcs8(pkcs8) {
            return Ok(Self::Rsa(pair));
        }
        Err("not a PKCS#8 EC P-256, EC P-384, Ed25519 or RSA (2048 bits or more) private key".to_owned())
    }

    fn public_key(&self) -> &[u8] {
        match self {
            Self::Ecdsa(pair) => pair.public_key().as_ref(),
            Self::Ed25519(pair) => pair.public_key().as_ref(),
            Self::Rsa(pair) => pair.public_key().as_ref(),
        }
    }
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|error| format!("cannot read: {}", crate::config::io_message(&error)))?;
    if meta.len() > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    std::fs::read(path).map_err(|error| format!("cannot read: {}", crate::config::io_message(&error)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair as RcgenKeyPair};

    fn write_node(dir: &Path, algorithm: &'static rcgen::SignatureAlgorithm) -> (X509PopConfig, RcgenKeyPair) {
        let key = RcgenKeyPair::generate_for(algorithm).unwrap();
        let mut params = CertificateParams::new(vec!["node.example.org".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "node");
        let cert = params.self_signed(&key).unwrap();
        let config = X509PopConfig { certificate_path: dir.join("node.pem"), private_key_path: dir.join("node.key") };
        std::fs::write(&config.certificate_path, cert.pem()).unwrap();
        std::fs::write(&config.private_key_path, key.serialize_pem()).unwrap();
        (config, key)
    }

    #[test]
    fn loads_and_signs_with_each_key_type() {
        let dir = tempfile::tempdir().unwrap();
        for algorithm in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let (config, key) = write_node(dir.path(), algorithm);
            let node = NodeCredential::load(&config).unwrap();
            assert!(String::from_utf8(node.payload()).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
            let signature = node.sign_challenge(&[7; 32], b"csr").unwrap();
            let verifier: &dyn signature::VerificationAlgorithm = if algorithm == &rcgen::PKCS_ED25519 {
                &signature::ED25519
            } else if algorithm == &rcgen::PKCS_ECDSA_P384_SHA384 {
                &signature::ECDSA_P384_SHA384_ASN1
            } else {
                &signature::ECDSA_P256_SHA256_ASN1
            };
            signature::UnparsedPublicKey::new(verifier, key.public_key_raw())
                .verify(&challenge_message(&[7; 32], b"csr"), &signature)
                .unwrap();
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = write_node(dir.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let other = RcgenKeyPair::generate().unwrap();
        std::fs::write(&config.private_key_path, other.serialize_pem()).unwrap();
        let error = NodeCredential::load(&config).unwrap_err();
        assert!(error.starts_with("node_attestor.x509pop.private_key_path "), "{error}");
        assert!(error.contains("is not the key of the node certificate"), "{error}");
    }

    #[test]
    fn bad_files_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = write_node(dir.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let missing = X509PopConfig { certificate_path: dir.path().join("absent.pem"), ..config.clone() };
        let error = NodeCredential::load(&missing).unwrap_err();
        assert!(
            error.contains("certificate_path") && error.contains("absent.pem") && error.contains("cannot read"),
            "{error}"
        );

        std::fs::write(
            &config.private_key_path,
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = NodeCredential::load(&config).unwrap_err();
        assert!(error.contains("PKCS#8"), "{error}");

        std::fs::write(&config.certificate_path, "no pem here").unwrap();
        let error = NodeCredential::load(&config).unwrap_err();
        assert!(error.contains("no CERTIFICATE block"), "{error}");
    }
}
