//! Key generation and certificate signing requests for the agent SVID and workload SVIDs.
//!
//! Every key is a fresh EC P-256 key generated on this node; only the CSR (public key plus a
//! proof of possession) is sent to the server, which takes the SPIFFE ID and lifetime from the
//! entry, never from the CSR, so the CSR carries no subject at all.

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use zeroize::Zeroizing;

/// A new private key and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 DER of the private key.
    pub private_key_pkcs8: Zeroizing<Vec<u8>>,
    /// DER PKCS#10 request signed with the key.
    pub csr_der: Vec<u8>,
    /// The public key as a certificate's subjectPublicKey holds it (the uncompressed point).
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr").field("csr_bytes", &self.csr_der.len()).finish_non_exhaustive()
    }
}

/// Generates an EC P-256 key and a CSR for it.
pub fn new_key_and_csr() -> Result<KeyAndCsr, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|error| format!("key generation: {error}"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|error| format!("certificate signing request: {error}"))?;
    Ok(KeyAndCsr {
        private_key_pkcs8: Zeroizing::new(key.serialize_der()),
        csr_der: csr.der().to_vec(),
        public_key: key.public_key_raw().to_vec(),
    })
}

/// Test helper: a fresh key and an X.509-SVID for `spiffe_id` signed by `issuer`.
#[cfg(test)]
pub(crate) fn test_svid(
    issuer: &tessera_spiffe::x509::X509Issuer,
    spiffe_id: &str,
) -> (Vec<Vec<u8>>, Zeroizing<Vec<u8>>) {
    use tessera_spiffe::SpiffeId;
    use tessera_spiffe::x509::X509SvidTemplate;
    let generated = new_key_and_csr().unwrap();
    let template =
        X509SvidTemplate::new(SpiffeId::parse(spiffe_id).unwrap(), std::time::Duration::from_secs(600)).unwrap();
    let leaf = issuer
        .sign_x509_svid_from_csr(
            &template,
            &generated.csr_der,
            std::time::SystemTime::now(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
    (vec![leaf, issuer.certificate_der().to_vec()], generated.private_key_pkcs8)
}

/// Test helper: a self-signed CA for `trust_domain`.
#[cfg(test)]
pub(crate) fn test_issuer(trust_domain: &str) -> tessera_spiffe::x509::X509Issuer {
    use tessera_spiffe::TrustDomain;
    use tessera_spiffe::x509::{CaTemplate, X509Issuer};
    let rng = ring::rand::SystemRandom::new();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let template =
        CaTemplate::new(TrustDomain::new(trust_domain).unwrap(), std::time::Duration::from_secs(3600)).unwrap();
    let der = template.self_signed(&key, std::time::SystemTime::now(), &rng).unwrap();
    X509Issuer::new(der, key).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_verifies_and_keys_differ() {
        let a = new_key_and_csr().unwrap();
        let b = new_key_and_csr().unwrap();
        assert_ne!(a.private_key_pkcs8.as_slice(), b.private_key_pkcs8.as_slice());
        tessera_spiffe::x509::verify_csr(&a.csr_der).unwrap();
    }
}
