//! The `x509pop` node attestor: the agent proves possession of the private key of a node
//! certificate that chains to a CA the operator configured (`[node_attestor.x509pop]`).
//!
//! Checks, in order (spec: server-agent-flow §2; the exchange is in
//! [`tessera_common::x509pop`]):
//!
//! 1. the payload is at most [`MAX_PAYLOAD_LEN`] bytes of PEM holding 1 to [`MAX_CHAIN_LEN`]
//!    `CERTIFICATE` blocks, the leaf first (`INVALID_ARGUMENT` otherwise);
//! 2. the leaf chains to one of the configured CA certificates through the other certificates
//!    of the payload, every certificate is valid now, and the leaf may be used for client
//!    authentication (no extended key usage, or one including clientAuth) (`PERMISSION_DENIED`
//!    otherwise: the evidence is well formed but not trusted);
//! 3. the server sends a fresh random nonce and waits at most [`RESPONSE_TIMEOUT`] for the
//!    signature of [`challenge_message`] by the leaf's key (`PERMISSION_DENIED` if it does not
//!    verify, `DEADLINE_EXCEEDED` if it does not come).
//!
//! The agent is `spiffe://<td>/tessera/agent/x509pop/<id>`, with `<id>` the SHA-256 of the leaf
//! (hex) or its subject common name (`agent_id_from`). x509pop agents may attest again: after
//! an eviction, or with a new certificate for the same name, the node record is replaced.
//!
//! Node selectors: `x509pop:subject:cn:<CN>`, `x509pop:serialnumber:<hex>`,
//! `x509pop:san:dns:<name>` per DNS name, `x509pop:ca:fingerprint:<sha256 hex>` per CA
//! certificate of the verified path (intermediates and the root), and `spiffe_id:<agent ID>`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use tessera_common::x509pop::{MAX_CHAIN_LEN, MAX_PAYLOAD_LEN, NONCE_LEN, TYPE, challenge_message};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tonic::Status;
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::{X509PopAgentId, X509PopConfig};

/// How long the agent has to answer the challenge.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest CA bundle file read, in bytes.
const MAX_BUNDLE_FILE_LEN: u64 = 1024 * 1024;

/// Signature algorithms a node key may answer the challenge with.
static CHALLENGE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
];

/// The configured attestor: the CA certificates node certificates must chain to.
#[derive(Debug)]
pub(crate) struct X509Pop {
    /// DER of each CA certificate of `ca_bundle_path`.
    roots: Vec<CertificateDer<'static>>,
    /// The trust anchor of each of `roots`, same order (parsed once, at load).
    anchors: Vec<TrustAnchor<'static>>,
    agent_id_from: X509PopAgentId,
}

/// A node certificate chain that verified; waiting for the proof of possession.
#[derive(Debug)]
pub(crate) struct PendingNode {
    leaf: CertificateDer<'static>,
    /// The agent ID this node gets.
    pub(crate) agent_id: SpiffeId,
    /// Its node selectors.
    pub(crate) selectors: SelectorSet,
    /// The nonce sent to the agent.
    pub(crate) nonce: [u8; NONCE_LEN],
}

impl X509Pop {
    /// Reads the CA bundle. The error names the file and what is wrong with it.
    pub(crate) fn load(config: &X509PopConfig) -> Result<Self, String> {
        let path = &config.ca_bundle_path;
        let roots = read_certificates(path).map_err(|reason| format!("{}: {reason}", path.display()))?;
        Self::from_roots(roots, config.agent_id_from).map_err(|reason| format!("{}: {reason}", path.display()))
    }

    fn from_roots(roots: Vec<CertificateDer<'static>>, agent_id_from: X509PopAgentId) -> Result<Self, String> {
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(i, root)| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|error| format!("certificate {} is not a usable CA certificate: {error:?}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { roots, anchors, agent_id_from })
    }

    /// Steps 1 and 2: parses the payload and verifies the chain at `now`.
    pub(crate) fn verify_chain(
        &self,
        trust_domain: &TrustDomain,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<PendingNode, Status> {
        let chain = parse_payload(payload)
            .map_err(|reason| Status::invalid_argument(format!("params.data.payload: {reason}")))?;
        let (leaf, intermediates) =
            chain.split_first().ok_or_else(|| Status::invalid_argument("params.data.payload: no certificate"))?;
        let end_entity = EndEntityCert::try_from(leaf)
            .map_err(|error| Status::invalid_argument(format!("params.data.payload: node certificate: {error:?}")))?;
        let seconds = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let path = end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                UnixTime::since_unix_epoch(seconds),
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|error| {
                Status::permission_denied(format!(
                    "node certificate is not trusted by node_attestor.x509pop: {error:?}"
                ))
            })?;

        // The CA certificates of the verified path: intermediates, then the root in DER.
        let mut ca_certificates: Vec<CertificateDer<'_>> =
            path.intermediate_certificates().map(|cert| cert.der()).collect();
        let anchor = path.anchor();
        let root = self.anchors.iter().position(|candidate| {
            candidate.subject == anchor.subject && candidate.subject_public_key_info == anchor.subject_public_key_info
        });
        if let Some(root) = root.and_then(|i| self.roots.get(i)) {
            ca_certificates.push(root.clone());
        }

        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|_| Status::invalid_argument("params.data.payload: node certificate is not DER X.509"))?;
        let common_name =
            parsed.subject().iter_common_name().next().map(|cn| cn.as_str().map(str::to_owned)).transpose().map_err(
                |_| Status::invalid_argument("params.data.payload: the subject common name is not a string"),
            )?;
        let id_segment = match self.agent_id_from {
            X509PopAgentId::Fingerprint => sha256_hex(leaf),
            X509PopAgentId::SubjectCn => common_name.clone().ok_or_else(|| {
                Status::permission_denied(
                    "node certificate has no subject common name (agent_id_from = \"subject_cn\")",
                )
            })?,
        };
        let agent_id = trust_domain.id_from_segments(&["tessera", "agent", TYPE, &id_segment]).map_err(|error| {
            Status::invalid_argument(format!("node certificate: {id_segment:?} cannot name an agent: {error}"))
        })?;

        let mut selectors = vec![selector("spiffe_id", agent_id.as_str())?];
        if let Some(cn) = &common_name {
            selectors.push(selector(TYPE, &format!("subject:cn:{cn}"))?);
        }
        let serial = tessera_spiffe::tls::certificate_serial_hex(leaf)
            .map_err(|error| Status::invalid_argument(format!("params.data.payload: node certificate: {error}")))?;
        selectors.push(selector(TYPE, &format!("serialnumber:{serial}"))?);
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    selectors.push(selector(TYPE, &format!("san:dns:{dns}"))?);
                }
            }
        }
        for ca in &ca_certificates {
            selectors.push(selector(TYPE, &format!("ca:fingerprint:{}", sha256_hex(ca)))?);
        }

        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| Status::internal("cannot generate a challenge"))?;
        Ok(PendingNode { leaf: leaf.clone(), agent_id, selectors: selectors.into_iter().collect(), nonce })
    }
}

impl PendingNode {
    /// Step 3: checks the agent's signature over the challenge for `csr`.
    pub(crate) fn verify_response(&self, csr: &[u8], signature: &[u8]) -> Result<(), Status> {
        let end_entity = EndEntityCert::try_from(&self.leaf).map_err(|_| Status::internal("node certificate"))?;
        let message = challenge_message(&self.nonce, csr);
        let proven = CHALLENGE_ALGORITHMS
            .iter()
            .any(|algorithm| end_entity.verify_signature(*algorithm, &message, signature).is_ok());
        if proven {
            Ok(())
        } else {
            Err(Status::permission_denied("the challenge response is not a signature by the node certificate's key"))
        }
    }
}

fn selector(kind: &str, value: &str) -> Result<Selector, Status> {
    Selector::new(kind, value)
        .map_err(|error| Status::invalid_argument(format!("node selector {kind}:{value:?}: {error}")))
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The certificates of a payload: PEM `CERTIFICATE` blocks only, within the size limits.
fn parse_payload(payload: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(format!("larger than {MAX_PAYLOAD_LEN} bytes"));
    }
    let blocks = pem::parse_many(payload).map_err(|error| format!("not PEM: {error}"))?;
    if blocks.is_empty() {
        return Err("no CERTIFICATE block".to_owned());
    }
    if blocks.len() > MAX_CHAIN_LEN {
        return Err(format!("more than {MAX_CHAIN_LEN} certificates"));
    }
    blocks
        .into_iter()
        .map(|block| {
            if block.tag() == "CERTIFICATE" {
                Ok(CertificateDer::from(block.into_contents()))
            } else {
                Err(format!("unexpected {} block: only CERTIFICATE blocks are accepted", block.tag()))
            }
        })
        .collect()
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let meta =
        std::fs::metadata(path).map_err(|error| format!("cannot read: {}", crate::config::io_message(&error)))?;
    if meta.len() > MAX_BUNDLE_FILE_LEN {
        return Err(format!("larger than {MAX_BUNDLE_FILE_LEN} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read: {}", crate::config::io_message(&error)))?;
    let blocks = pem::parse_many(&bytes).map_err(|error| format!("not PEM: {error}"))?;
    let roots: Vec<CertificateDer<'static>> = blocks
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| CertificateDer::from(block.into_contents()))
        .collect();
    if roots.is_empty() {
        return Err("no CERTIFICATE block".to_owned());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "node CA");
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    fn node(ca: &Ca, cn: &str, eku: Option<ExtendedKeyUsagePurpose>) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![format!("{cn}.nodes.example.org")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = eku.into_iter().collect();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.cert.der(), &ca.key).unwrap();
        (params.signed_by(&key, &issuer).unwrap().der().to_vec(), key)
    }

    fn attestor(roots: &[&Ca], agent_id_from: X509PopAgentId) -> X509Pop {
        X509Pop::from_roots(roots.iter().map(|ca| ca.cert.der().clone()).collect(), agent_id_from).unwrap()
    }

    fn pem_of(ders: &[&[u8]]) -> Vec<u8> {
        ders.iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))).collect::<String>().into_bytes()
    }

    fn sign(key: &KeyPair, message: &[u8]) -> Vec<u8> {
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        pair.sign(&ring::rand::SystemRandom::new(), message).unwrap().as_ref().to_vec()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn a_node_of_the_ca_gets_its_id_selectors_and_a_challenge() {
        let ca = ca();
        let (leaf, key) = node(&ca, "web-1", Some(ExtendedKeyUsagePurpose::ClientAuth));
        let pending = attestor(&[&ca], X509PopAgentId::Fingerprint)
            .verify_chain(&td(), &pem_of(&[&leaf]), SystemTime::now())
            .unwrap();
        assert_eq!(
            pending.agent_id.as_str(),
            format!("spiffe://example.org/tessera/agent/x509pop/{}", sha256_hex(&leaf))
        );
        let selectors: Vec<String> = pending.selectors.iter().map(ToString::to_string).collect();
        assert!(selectors.contains(&"x509pop:subject:cn:web-1".to_owned()), "{selectors:?}");
        assert!(selectors.contains(&"x509pop:san:dns:web-1.nodes.example.org".to_owned()), "{selectors:?}");
        assert!(selectors.contains(&format!("x509pop:ca:fingerprint:{}", sha256_hex(ca.cert.der()))), "{selectors:?}");
        assert!(selectors.iter().any(|s| s.starts_with("x509pop:serialnumber:")), "{selectors:?}");

        let csr = b"the agent's CSR";
        let signature = sign(&key, &challenge_message(&pending.nonce, csr));
        pending.verify_response(csr, &signature).unwrap();
        // The proof is bound to the nonce and to the CSR.
        assert_eq!(
            pending.verify_response(b"another CSR", &signature).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let other_nonce = sign(&key, &challenge_message(&[0; NONCE_LEN], csr));
        assert_eq!(pending.verify_response(csr, &other_nonce).unwrap_err().code(), tonic::Code::PermissionDenied);
        // A signature by another key does not prove possession.
        let (_, stranger) = node(&ca, "web-2", None);
        let forged = sign(&stranger, &challenge_message(&pending.nonce, csr));
        assert_eq!(pending.verify_response(csr, &forged).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(pending.verify_response(csr, b"").unwrap_err().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn subject_cn_names_the_agent() {
        let ca = ca();
        let (leaf, _) = node(&ca, "db-7", None);
        let pending = attestor(&[&ca], X509PopAgentId::SubjectCn)
            .verify_chain(&td(), &pem_of(&[&leaf]), SystemTime::now())
            .unwrap();
        assert_eq!(pending.agent_id.as_str(), "spiffe://example.org/tessera/agent/x509pop/db-7");
        let (bad, _) = node(&ca, "not/a/segment", None);
        let error = attestor(&[&ca], X509PopAgentId::SubjectCn)
            .verify_chain(&td(), &pem_of(&[&bad]), SystemTime::now())
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    }

    #[test]
    fn untrusted_or_unusable_certificates_are_refused() {
        let (ca, stranger) = (ca(), ca());
        let pop = attestor(&[&ca], X509PopAgentId::Fingerprint);
        let (foreign, _) = node(&stranger, "intruder", None);
        let error = pop.verify_chain(&td(), &pem_of(&[&foreign]), SystemTime::now()).unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");

        let (server_only, _) = node(&ca, "web", Some(ExtendedKeyUsagePurpose::ServerAuth));
        let error = pop.verify_chain(&td(), &pem_of(&[&server_only]), SystemTime::now()).unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");

        let (leaf, _) = node(&ca, "web", None);
        let later = SystemTime::now() + Duration::from_secs(2 * 86400);
        assert_eq!(
            pop.verify_chain(&td(), &pem_of(&[&leaf]), later).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn hostile_payloads_are_invalid_arguments() {
        let ca = ca();
        let pop = attestor(&[&ca], X509PopAgentId::Fingerprint);
        let (leaf, _) = node(&ca, "web", None);
        let too_many = pem_of(&[leaf.as_slice(); MAX_CHAIN_LEN + 1]);
        let key_block = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3])).into_bytes();
        let garbage_cert = pem_of(&[b"not a certificate"]);
        for payload in
            [Vec::new(), b"garbage".to_vec(), vec![b'A'; MAX_PAYLOAD_LEN + 1], too_many, key_block, garbage_cert]
        {
            let error = pop.verify_chain(&td(), &payload, SystemTime::now()).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
        }
    }

    #[test]
    fn an_intermediate_in_the_payload_completes_the_path() {
        let root = ca();
        let intermediate_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "rack CA");
        let root_issuer = rcgen::Issuer::from_ca_cert_der(root.cert.der(), &root.key).unwrap();
        let intermediate =
            Ca { cert: params.signed_by(&intermediate_key, &root_issuer).unwrap(), key: intermediate_key };
        let (leaf, _) = node(&intermediate, "web", None);
        let pop = attestor(&[&root], X509PopAgentId::Fingerprint);
        assert_eq!(
            pop.verify_chain(&td(), &pem_of(&[&leaf]), SystemTime::now()).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let pending = pop.verify_chain(&td(), &pem_of(&[&leaf, intermediate.cert.der()]), SystemTime::now()).unwrap();
        let selectors: Vec<String> = pending.selectors.iter().map(ToString::to_string).collect();
        for ca in [intermediate.cert.der().as_ref(), root.cert.der().as_ref()] {
            assert!(selectors.contains(&format!("x509pop:ca:fingerprint:{}", sha256_hex(ca))), "{selectors:?}");
        }
    }
}
