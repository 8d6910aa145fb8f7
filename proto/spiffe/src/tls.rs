//! SPIFFE mutual TLS on rustls: certificate verifiers that authenticate X.509-SVIDs against a
//! trust bundle, a swappable certificate holder for SVIDs that renew, and config builders.
//!
//! General-purpose TLS verification (webpki) checks DNS names against a pooled root store;
//! SPIFFE peers are identified by the URI SAN of their X.509-SVID and trusted through the
//! bundle of *their* trust domain. The verifiers here therefore run the crate's own X.509-SVID
//! validator ([`crate::x509::verify_x509_svid`]) on the presented chain, with the time rustls
//! passes in (this module reads no clock), and leave the handshake signature checks to rustls'
//! ring provider.
//!
//! - [`SpiffeServerVerifier`] (client side, e.g. the agent): the server's chain must verify
//!   against the bundle *and* its SPIFFE ID must equal one expected ID (Tessera agents expect
//!   `spiffe://<td>/tessera/server`). The DNS name the client dialled is ignored: it is only
//!   used for SNI.
//! - [`SpiffeClientVerifier`] (server side): a presented client chain must verify against the
//!   current bundle. Client certificates can be optional ([`SpiffeClientVerifier::allow_anonymous`])
//!   so an unauthenticated call (agent attestation) can share the listener; every handler that
//!   needs an identity then authenticates the peer chain itself with [`verify_peer_svid`].
//! - [`BundleSource`]: where the trust bundle comes from; a closure, so CA rotation (a new
//!   bundle) applies to the next handshake without rebuilding the TLS config.
//! - [`SvidResolver`]: the certificate and key this side presents, replaceable at any time
//!   (renewal), usable as both a client and a server certificate resolver.
//!
//! Both TLS 1.3 and TLS 1.2 are offered; ALPN is `h2` (gRPC).

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, ResolvesClientCert};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::Bundle;
use crate::spiffe_id::SpiffeId;
use crate::x509::{X509SvidError, verify_x509_svid};

/// ALPN protocol of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer was not accepted, beyond what [`X509SvidError`] says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer's X.509-SVID did not verify.
    #[error("peer X.509-SVID is invalid: {0}")]
    Svid(#[source] X509SvidError),
    /// The peer authenticated as another SPIFFE ID than the one required.
    #[error("peer SPIFFE ID is \"{actual}\", expected \"{expected}\"")]
    UnexpectedId {
        /// The ID the peer presented.
        actual: SpiffeId,
        /// The ID that was required.
        expected: SpiffeId,
    },
}

/// The trust bundle to verify peers against, looked up at every handshake.
#[derive(Clone)]
pub struct BundleSource(Arc<dyn Fn() -> Arc<Bundle> + Send + Sync>);

impl BundleSource {
    /// A bundle that never changes.
    pub fn fixed(bundle: Bundle) -> Self {
        let bundle = Arc::new(bundle);
        Self(Arc::new(move || Arc::clone(&bundle)))
    }

    /// A bundle read from `current` at every handshake (e.g. the CA's current bundle, or the
    /// agent's cached bundle that follows rotations).
    pub fn from_fn(current: impl Fn() -> Arc<Bundle> + Send + Sync + 'static) -> Self {
        Self(Arc::new(current))
    }

    /// The bundle now.
    pub fn current(&self) -> Arc<Bundle> {
        (self.0)()
    }
}

impl fmt::Debug for BundleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleSource").field("trust_domain", self.current().trust_domain()).finish_non_exhaustive()
    }
}

/// A peer X.509-SVID that verified: its SPIFFE ID, its leaf serial and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSvid {
    /// The authenticated SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's serial number, lower-case hex of its big-endian bytes without leading zero
    /// bytes (the form [`certificate_serial_hex`] returns).
    pub serial_hex: String,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

/// Authenticates a peer chain (leaf first, DER) against `bundle` at `now`: the SPIFFE
/// X.509-SVID rules of [`verify_x509_svid`], then the leaf serial is read.
pub fn verify_peer_svid<C: AsRef<[u8]>>(chain: &[C], bundle: &Bundle, now: SystemTime) -> Result<PeerSvid, PeerError> {
    let ders: Vec<&[u8]> = chain.iter().map(AsRef::as_ref).collect();
    let verified = verify_x509_svid(&ders, bundle, now).map_err(PeerError::Svid)?;
    let serial_hex = certificate_serial_hex(verified.leaf_der()).map_err(PeerError::Svid)?;
    Ok(PeerSvid { spiffe_id: verified.spiffe_id().clone(), serial_hex, not_after: verified.not_after() })
}

/// The serial number of a DER certificate as lower-case hex of its big-endian bytes, without
/// leading zero bytes ("00" for a zero serial).
pub fn certificate_serial_hex(der: &[u8]) -> Result<String, X509SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| X509SvidError::Malformed {
        position: crate::x509::ChainPosition::Leaf,
        reason: "not DER X.509",
    })?;
    let bytes = cert.raw_serial();
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let trimmed = &bytes[start..];
    Ok(if trimmed.is_empty() { "00".to_owned() } else { hex::encode(trimmed) })
}

fn system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Maps a validation failure onto the closest rustls certificate error (which becomes the TLS
/// alert the peer sees), keeping the full reason for the local log.
fn to_rustls_error(err: PeerError) -> rustls::Error {
    let certificate_error = match &err {
        PeerError::Svid(X509SvidError::Expired { .. }) => CertificateError::Expired,
        PeerError::Svid(X509SvidError::NotYetValid { .. }) => CertificateError::NotValidYet,
        PeerError::Svid(X509SvidError::UnknownAuthority | X509SvidError::NoBundle { .. }) => {
            CertificateError::UnknownIssuer
        }
        PeerError::Svid(X509SvidError::Malformed { .. } | X509SvidError::EmptyChain) => CertificateError::BadEncoding,
        _ => CertificateError::Other(OtherError(Arc::new(err))),
    };
    rustls::Error::InvalidCertificate(certificate_error)
}

fn chain_of<'a>(end_entity: &'a CertificateDer<'_>, intermediates: &'a [CertificateDer<'_>]) -> Vec<&'a [u8]> {
    std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(AsRef::as_ref)).collect()
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies a TLS server's X.509-SVID against a bundle and requires one exact SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: BundleSource,
    expected_id: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier accepting only servers that authenticate as `expected_id` through `bundle`.
    pub fn new(bundle: BundleSource, expected_id: SpiffeId) -> Self {
        Self { bundle, expected_id, algorithms: ring_provider().signature_verification_algorithms }
    }

    /// The check itself, without rustls types: verify `chain` at `now` and compare the ID.
    pub fn verify(&self, chain: &[&[u8]], now: SystemTime) -> Result<PeerSvid, PeerError> {
        let peer = verify_peer_svid(chain, &self.bundle.current(), now)?;
        if peer.spiffe_id != self.expected_id {
            return Err(PeerError::UnexpectedId { actual: peer.spiffe_id, expected: self.expected_id.clone() });
        }
        Ok(peer)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // spec: a SPIFFE peer is identified by its SPIFFE ID; the dialled DNS name is not checked.
        self.verify(&chain_of(end_entity, intermediates), system_time(now))
            .map(|_| ServerCertVerified::assertion())
            .map_err(to_rustls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies TLS clients' X.509-SVIDs against the current bundle; optionally admits clients
/// without a certificate (they must then be authorized per call).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: BundleSource,
    anonymous: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier that requires a client X.509-SVID chaining to `bundle`.
    pub fn new(bundle: BundleSource) -> Self {
        Self { bundle, anonymous: false, algorithms: ring_provider().signature_verification_algorithms }
    }

    /// Also admit clients that present no certificate at all. A client that presents one must
    /// still present a valid one.
    #[must_use]
    pub fn allow_anonymous(mut self) -> Self {
        self.anonymous = true;
        self
    }

    /// The check itself, without rustls types.
    pub fn verify(&self, chain: &[&[u8]], now: SystemTime) -> Result<PeerSvid, PeerError> {
        verify_peer_svid(chain, &self.bundle.current(), now)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        !self.anonymous
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a SPIFFE client presents its one SVID whatever the server's CA names are.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(&chain_of(end_entity, intermediates), system_time(now))
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Builds the rustls form of an SVID: its chain (leaf first, DER) and its unencrypted PKCS#8
/// private key (EC P-256/P-384, RSA, Ed25519).
pub fn certified_key<C: AsRef<[u8]>>(chain: &[C], private_key_pkcs8_der: &[u8]) -> Result<CertifiedKey, rustls::Error> {
    if chain.is_empty() {
        return Err(rustls::Error::General("an SVID needs at least one certificate".into()));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(private_key_pkcs8_der.to_vec()));
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)?;
    let certs = chain.iter().map(|c| CertificateDer::from(c.as_ref().to_vec())).collect();
    Ok(CertifiedKey::new(certs, signing_key))
}

/// The SVID this side presents, replaceable while connections are made (renewal). Serves as
/// a server certificate resolver and as a client certificate resolver.
#[derive(Debug, Default)]
pub struct SvidResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl SvidResolver {
    /// A resolver presenting `key`.
    pub fn new(key: CertifiedKey) -> Self {
        Self { current: RwLock::new(Some(Arc::new(key))) }
    }

    /// A resolver presenting nothing (a client then connects anonymously) until [`Self::set`].
    pub fn empty() -> Self {
        Self::default()
    }

    /// Presents `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(key));
    }

    /// Stops presenting a certificate.
    pub fn clear(&self) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// What is presented now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// A TLS server config for gRPC (ALPN `h2`, TLS 1.3 and 1.2, ring) presenting the SVID of
/// `certificate` and verifying clients with `clients`.
pub fn server_config(
    clients: Arc<SpiffeClientVerifier>,
    certificate: Arc<SvidResolver>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A TLS client config for gRPC (ALPN `h2`, TLS 1.3 and 1.2, ring) verifying the server with
/// `server` and presenting the SVID of `certificate` when it holds one.
pub fn client_config(
    server: Arc<SpiffeServerVerifier>,
    certificate: Arc<SvidResolver>,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(server)
        .with_client_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use ring::rand::SystemRandom;

    use super::*;
    use crate::TrustDomain;
    use crate::keys::{KeyType, SigningKey};
    use crate::x509::{CaTemplate, X509Issuer, X509SvidTemplate};

    struct Ca {
        issuer: X509Issuer,
        bundle: Bundle,
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn ca(td: &str, at: SystemTime) -> Ca {
        let rng = SystemRandom::new();
        let td = TrustDomain::new(td).unwrap();
        let key = SigningKey::generate(KeyType::EcP256, &rng).unwrap();
        let rc_key = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
        let der =
            CaTemplate::new(td.clone(), Duration::from_secs(86_400)).unwrap().self_signed(&rc_key, at, &rng).unwrap();
        let issuer = X509Issuer::from_pkcs8_der(der.clone(), key.pkcs8_der()).unwrap();
        let mut bundle = Bundle::new(td);
        bundle.add_x509_authority(&der).unwrap();
        Ca { issuer, bundle }
    }

    /// An SVID for `id` signed by `ca` at `at` for `ttl`: (chain, pkcs8 key).
    fn svid(ca: &Ca, id: &str, at: SystemTime, ttl: Duration) -> (Vec<Vec<u8>>, Vec<u8>) {
        let rng = SystemRandom::new();
        let key = SigningKey::generate(KeyType::EcP256, &rng).unwrap();
        let template = X509SvidTemplate::new(SpiffeId::parse(id).unwrap(), ttl).unwrap();
        let leaf = ca.issuer.sign_x509_svid(&template, key.public_key().spki_der(), at, &rng).unwrap();
        (vec![leaf], key.pkcs8_der().to_vec())
    }

    fn refs(chain: &[Vec<u8>]) -> Vec<&[u8]> {
        chain.iter().map(Vec::as_slice).collect()
    }

    const SERVER_ID: &str = "spiffe://example.org/tessera/server";

    #[test]
    fn server_verifier_accepts_the_expected_id_only() {
        let ca = ca("example.org", now());
        let verifier =
            SpiffeServerVerifier::new(BundleSource::fixed(ca.bundle.clone()), SpiffeId::parse(SERVER_ID).unwrap());
        let (good, _) = svid(&ca, SERVER_ID, now(), Duration::from_secs(3600));
        let peer = verifier.verify(&refs(&good), now() + Duration::from_secs(5)).unwrap();
        assert_eq!(peer.spiffe_id.as_str(), SERVER_ID);
        assert_eq!(peer.serial_hex, certificate_serial_hex(&good[0]).unwrap());

        let (other, _) = svid(&ca, "spiffe://example.org/workload", now(), Duration::from_secs(3600));
        let err = verifier.verify(&refs(&other), now()).unwrap_err();
        assert!(matches!(err, PeerError::UnexpectedId { .. }), "{err}");
    }

    #[test]
    fn server_verifier_refuses_wrong_trust_domain_expired_and_unknown_issuer() {
        let ca1 = ca("example.org", now());
        let verifier =
            SpiffeServerVerifier::new(BundleSource::fixed(ca1.bundle.clone()), SpiffeId::parse(SERVER_ID).unwrap());

        // Another trust domain, even with the expected path: there is no bundle for it.
        let foreign = ca("other.org", now());
        let (chain, _) = svid(&foreign, "spiffe://other.org/tessera/server", now(), Duration::from_secs(3600));
        let err = verifier.verify(&refs(&chain), now()).unwrap_err();
        assert!(matches!(err, PeerError::Svid(X509SvidError::NoBundle { .. })), "{err}");

        // Expired.
        let (chain, _) = svid(&ca1, SERVER_ID, now(), Duration::from_secs(60));
        let err = verifier.verify(&refs(&chain), now() + Duration::from_secs(120)).unwrap_err();
        assert!(matches!(err, PeerError::Svid(X509SvidError::Expired { .. })), "{err}");
        assert!(matches!(to_rustls_error(err), rustls::Error::InvalidCertificate(CertificateError::Expired)));

        // Same trust domain, another CA: does not chain to the bundle.
        let rogue = ca("example.org", now());
        let (chain, _) = svid(&rogue, SERVER_ID, now(), Duration::from_secs(3600));
        let err = verifier.verify(&refs(&chain), now()).unwrap_err();
        assert!(matches!(err, PeerError::Svid(X509SvidError::UnknownAuthority)), "{err}");
        assert!(matches!(to_rustls_error(err), rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)));

        // Garbage.
        let err = verifier.verify(&[b"not a certificate"], now()).unwrap_err();
        assert!(matches!(err, PeerError::Svid(X509SvidError::Malformed { .. })), "{err}");
    }

    #[test]
    fn client_verifier_follows_the_bundle_source() {
        let ca1 = ca("example.org", now());
        let ca2 = ca("example.org", now());
        let current = Arc::new(RwLock::new(Arc::new(ca1.bundle.clone())));
        let source = {
            let current = Arc::clone(&current);
            BundleSource::from_fn(move || Arc::clone(&current.read().unwrap()))
        };
        let verifier = SpiffeClientVerifier::new(source);
        assert!(verifier.client_auth_mandatory());
        assert!(
            !SpiffeClientVerifier::new(BundleSource::fixed(ca1.bundle.clone()))
                .allow_anonymous()
                .client_auth_mandatory()
        );

        let agent = "spiffe://example.org/tessera/agent/join_token/abc";
        let (chain1, _) = svid(&ca1, agent, now(), Duration::from_secs(3600));
        let (chain2, _) = svid(&ca2, agent, now(), Duration::from_secs(3600));
        assert_eq!(verifier.verify(&refs(&chain1), now()).unwrap().spiffe_id.as_str(), agent);
        assert!(verifier.verify(&refs(&chain2), now()).is_err());
        // Rotation to the second CA's bundle applies at once.
        *current.write().unwrap() = Arc::new(ca2.bundle.clone());
        assert!(verifier.verify(&refs(&chain1), now()).is_err());
        assert!(verifier.verify(&refs(&chain2), now()).is_ok());
    }

    #[test]
    fn serial_hex_has_no_leading_zero_bytes() {
        let ca = ca("example.org", now());
        for _ in 0..8 {
            let (chain, _) = svid(&ca, SERVER_ID, now(), Duration::from_secs(60));
            let hex = certificate_serial_hex(&chain[0]).unwrap();
            assert!(!hex.starts_with("00"), "{hex}");
            assert_eq!(hex.len() % 2, 0);
        }
        assert!(certificate_serial_hex(b"junk").is_err());
    }

    /// A real mTLS handshake over an in-memory pipe, with the real clock: the client sees the
    /// server's ID, the server sees the client's certificate; a client with a certificate of
    /// another CA is refused, an anonymous client is admitted only when allowed.
    #[test]
    fn handshake_over_rustls() {
        let start = SystemTime::now();
        let ca1 = ca("example.org", start);
        let (server_chain, server_key) = svid(&ca1, SERVER_ID, start, Duration::from_secs(3600));
        let agent_id = "spiffe://example.org/tessera/agent/join_token/t";
        let (client_chain, client_key) = svid(&ca1, agent_id, start, Duration::from_secs(3600));
        let server_cert = Arc::new(SvidResolver::new(certified_key(&server_chain, &server_key).unwrap()));

        let run = |client_cert: Arc<SvidResolver>, anonymous: bool, expected: &str| {
            let mut verifier = SpiffeClientVerifier::new(BundleSource::fixed(ca1.bundle.clone()));
            if anonymous {
                verifier = verifier.allow_anonymous();
            }
            let server_config = server_config(Arc::new(verifier), Arc::clone(&server_cert)).unwrap();
            let client_config = client_config(
                Arc::new(SpiffeServerVerifier::new(
                    BundleSource::fixed(ca1.bundle.clone()),
                    SpiffeId::parse(expected).unwrap(),
                )),
                client_cert,
            )
            .unwrap();
            let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
            let mut client =
                rustls::ClientConnection::new(Arc::new(client_config), ServerName::try_from("tessera-server").unwrap())
                    .unwrap();
            let result = handshake(&mut client, &mut server);
            (result, server.peer_certificates().map(|c| c.len()))
        };

        let with_cert = Arc::new(SvidResolver::new(certified_key(&client_chain, &client_key).unwrap()));
        let (result, peer) = run(Arc::clone(&with_cert), false, SERVER_ID);
        result.unwrap();
        assert_eq!(peer, Some(1));

        // Anonymous client: refused unless allowed.
        assert!(run(Arc::new(SvidResolver::empty()), false, SERVER_ID).0.is_err());
        let (result, peer) = run(Arc::new(SvidResolver::empty()), true, SERVER_ID);
        result.unwrap();
        assert_eq!(peer, None);

        // A client certificate of another CA is refused even when anonymous clients are allowed.
        let rogue = ca("example.org", start);
        let (rogue_chain, rogue_key) = svid(&rogue, agent_id, start, Duration::from_secs(3600));
        let rogue_cert = Arc::new(SvidResolver::new(certified_key(&rogue_chain, &rogue_key).unwrap()));
        assert!(run(rogue_cert, true, SERVER_ID).0.is_err());

        // The client expects another server ID.
        assert!(run(with_cert, false, "spiffe://example.org/somebody-else").0.is_err());
    }

    /// Drives both sides until the handshake completes or one fails.
    fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) -> Result<(), String> {
        for _ in 0..20 {
            if !client.is_handshaking() && !server.is_handshaking() {
                // Push one application byte through, so a late client-certificate rejection
                // (TLS 1.3 verifies it after the client considers itself done) surfaces.
                client.writer().write_all(b"x").map_err(|e| e.to_string())?;
                transfer(client, server)?;
                let mut byte = [0u8; 1];
                server.reader().read_exact(&mut byte).map_err(|e| e.to_string())?;
                return Ok(());
            }
            transfer(client, server)?;
            transfer_back(server, client)?;
        }
        Err("handshake did not finish".into())
    }

    fn transfer(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) -> Result<(), String> {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).map_err(|e| e.to_string())?;
        }
        let mut slice = buf.as_slice();
        while !slice.is_empty() {
            server.read_tls(&mut slice).map_err(|e| e.to_string())?;
        }
        server.process_new_packets().map(|_| ()).map_err(|e| e.to_string())
    }

    fn transfer_back(
        server: &mut rustls::ServerConnection,
        client: &mut rustls::ClientConnection,
    ) -> Result<(), String> {
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).map_err(|e| e.to_string())?;
        }
        let mut slice = buf.as_slice();
        while !slice.is_empty() {
            client.read_tls(&mut slice).map_err(|e| e.to_string())?;
        }
        client.process_new_packets().map(|_| ()).map_err(|e| e.to_string())
    }
}
