//! TLS for the agent's connection to the server (rustls, ring provider).
//!
//! The server is authenticated as a SPIFFE identity, not a DNS name: its certificate chain
//! must verify against the X.509 authorities of the trust domain's bundle
//! ([`tessera_spiffe::tls::SpiffeServerVerifier`]), and the leaf's SPIFFE ID must be exactly
//! `spiffe://<trust domain>/tessera/server`. The host name in `server_address` is only used
//! for SNI.
//!
//! The bundle is read from a shared [`TrustStore`] on every handshake, so bundle updates from
//! the sync stream (CA rotation) take effect on the next connection without rebuilding
//! anything. With `insecure_bootstrap` and no bundle yet, any server certificate is accepted
//! (the handshake signature is still checked): a loud warning is logged, and the store is
//! switched to the received bundle right after attestation.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_spiffe::tls::{BundleSource, SpiffeServerVerifier};

use crate::storage::AgentCredential;

/// What the agent trusts to authenticate the server.
#[derive(Debug, Clone, Default)]
pub struct TrustState {
    /// The trust domain's bundle (cached, from `trust_bundle_path`, or from the server).
    pub bundle: Option<Bundle>,
    /// Accept any server certificate while there is no bundle (`insecure_bootstrap`).
    pub insecure_first_use: bool,
}

/// The shared, updatable trust state.
pub type TrustStore = Arc<RwLock<TrustState>>;

/// The SPIFFE ID the server's certificate must carry.
pub fn server_spiffe_id(trust_domain: &TrustDomain) -> Result<SpiffeId, String> {
    trust_domain.id_from_segments(&["tessera", "server"]).map_err(|error| error.to_string())
}

/// Verifies the server's certificate against the bundle in a [`TrustStore`]: the shared
/// [`SpiffeServerVerifier`] of tessera-spiffe, plus trust on first use while the store has
/// no bundle and `insecure_first_use` is set.
#[derive(Debug)]
pub struct ServerVerifier {
    trust: TrustStore,
    inner: SpiffeServerVerifier,
}

impl ServerVerifier {
    /// A verifier expecting `spiffe://<trust_domain>/tessera/server`.
    pub fn new(trust_domain: TrustDomain, trust: TrustStore) -> Result<Self, String> {
        let expected = server_spiffe_id(&trust_domain)?;
        let source = {
            let trust = Arc::clone(&trust);
            // No bundle yet: an empty one, which trusts nothing.
            BundleSource::from_fn(move || {
                let bundle = trust.read().ok().and_then(|state| state.bundle.clone());
                Arc::new(bundle.unwrap_or_else(|| Bundle::new(trust_domain.clone())))
            })
        };
        Ok(Self { trust, inner: SpiffeServerVerifier::new(source, expected) })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), String> {
        let insecure =
            self.trust.read().map(|state| state.bundle.is_none() && state.insecure_first_use).unwrap_or(false);
        if insecure {
            tracing::warn!(
                "insecure_bootstrap: accepting the server's certificate WITHOUT authenticating it; \
                 use trust_bundle_path outside tests and demos"
            );
            return Ok(());
        }
        let mut chain: Vec<&[u8]> = vec![end_entity.as_ref()];
        chain.extend(intermediates.iter().map(|der| der.as_ref()));
        self.inner
            .verify(&chain, now)
            .map(|_| ())
            .map_err(|error| format!("the server's certificate was refused: {error}"))
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        self.check(end_entity, intermediates, now).map_err(|reason| {
            tracing::warn!("refusing the server: {reason}");
            rustls::Error::General(reason)
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A client configuration: server verified by `verifier`, client certificate = the agent
/// SVID when there is one (every call but `AttestAgent`), ALPN `h2`.
pub fn client_config(
    verifier: Arc<ServerVerifier>,
    credential: Option<&AgentCredential>,
) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS configuration: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match credential {
        Some(credential) => {
            let chain = credential.cert_chain.iter().map(|der| CertificateDer::from(der.clone())).collect();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credential.private_key_pkcs8.to_vec()));
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| format!("agent SVID as client certificate: {error}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::keys::{test_issuer, test_svid};

    fn verifier(bundle: Option<Bundle>, insecure: bool) -> ServerVerifier {
        let td = TrustDomain::new("example.org").unwrap();
        let trust = Arc::new(RwLock::new(TrustState { bundle, insecure_first_use: insecure }));
        ServerVerifier::new(td, trust).unwrap()
    }

    #[test]
    fn server_identity_is_checked_against_the_bundle() {
        let issuer = test_issuer("example.org");
        let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
        bundle.add_x509_authority(issuer.certificate_der()).unwrap();
        let now = SystemTime::now();

        let (server, _) = test_svid(&issuer, "spiffe://example.org/tessera/server");
        let leaf = CertificateDer::from(server[0].clone());
        verifier(Some(bundle.clone()), false).check(&leaf, &[], now).unwrap();

        let (impostor, _) = test_svid(&issuer, "spiffe://example.org/web");
        let error = verifier(Some(bundle.clone()), false)
            .check(&CertificateDer::from(impostor[0].clone()), &[], now)
            .unwrap_err();
        assert!(error.contains("expected \"spiffe://example.org/tessera/server\""), "{error}");

        let other = test_issuer("example.org");
        let (foreign, _) = test_svid(&other, "spiffe://example.org/tessera/server");
        let error =
            verifier(Some(bundle), true).check(&CertificateDer::from(foreign[0].clone()), &[], now).unwrap_err();
        assert!(error.contains("was refused"), "{error}");
    }

    #[test]
    fn no_bundle_refuses_unless_insecure_bootstrap() {
        let issuer = test_issuer("example.org");
        let (server, _) = test_svid(&issuer, "spiffe://example.org/tessera/server");
        let leaf = CertificateDer::from(server[0].clone());
        assert!(verifier(None, false).check(&leaf, &[], SystemTime::now()).is_err());
        verifier(None, true).check(&leaf, &[], SystemTime::now()).unwrap();
    }
}
