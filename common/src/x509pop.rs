//! The `x509pop` node attestation exchange, as both ends compute it.
//!
//! The agent sends its node certificate chain (PEM: the leaf first, then intermediates) with
//! its CSR. The server checks the chain against the configured CA bundle and answers with a
//! random nonce. The agent proves possession of the node certificate's private key by signing
//! [`challenge_message`]: a fixed label, the nonce, and the SHA-256 of the CSR it sent, which
//! binds the proof to the key the agent SVID will be issued for.

/// Name of the attestor on the wire and in agent IDs (`spiffe://<td>/tessera/agent/x509pop/...`).
pub const TYPE: &str = "x509pop";

/// Length of the server's nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// Largest certificate chain payload accepted, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;

/// Most certificates in the chain payload (the leaf included).
pub const MAX_CHAIN_LEN: usize = 8;

const LABEL: &[u8] = b"tessera x509pop challenge v1\0";

/// The bytes the agent signs with the node key: label, nonce, SHA-256 of the CSR (DER).
pub fn challenge_message(nonce: &[u8], csr_der: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, csr_der);
    let mut message = Vec::with_capacity(LABEL.len() + nonce.len() + digest.as_ref().len());
    message.extend_from_slice(LABEL);
    message.extend_from_slice(nonce);
    message.extend_from_slice(digest.as_ref());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_binds_nonce_and_csr() {
        let a = challenge_message(&[1; NONCE_LEN], b"csr-a");
        assert!(a.starts_with(LABEL));
        assert_eq!(a.len(), LABEL.len() + NONCE_LEN + 32);
        assert_ne!(a, challenge_message(&[2; NONCE_LEN], b"csr-a"));
        assert_ne!(a, challenge_message(&[1; NONCE_LEN], b"csr-b"));
        assert_eq!(a, challenge_message(&[1; NONCE_LEN], b"csr-a"));
    }
}
