//! A test OIDC issuer served over real HTTPS: its own CA and TLS certificate (for
//! `127.0.0.1`), signing keys, and whatever discovery documents and key sets a test asks for.
//! Tokens are minted with `jsonwebtoken`, an implementation independent of Tessera's own.
//!
//! The server runs on a thread of its own (with its own tokio runtime), so synchronous and
//! asynchronous tests alike can use it; it stops when the [`TestIssuer`] is dropped. Every
//! request path is recorded, so a test can check what the server under test fetched.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use tessera_spiffe::keys::{KeyType, SigningKey};

/// One ES256 signing key of a test issuer.
#[derive(Debug)]
pub struct IssuerKey {
    /// Its key ID.
    pub kid: String,
    /// The key.
    pub key: SigningKey,
}

impl IssuerKey {
    /// A fresh EC P-256 key with this key ID.
    pub fn new(kid: &str) -> anyhow::Result<Self> {
        let key = SigningKey::generate(KeyType::EcP256, &ring::rand::SystemRandom::new())?;
        Ok(Self { kid: kid.to_owned(), key })
    }

    /// The public key as a JWK (`kid`, `alg: ES256`, `use: sig`).
    pub fn jwk(&self) -> anyhow::Result<Value> {
        let mut jwk = serde_json::to_value(self.key.public_key().to_jwk())?;
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!("ES256");
        jwk["use"] = json!("sig");
        Ok(jwk)
    }

    /// A JWKS holding only this key.
    pub fn jwks(&self) -> anyhow::Result<Value> {
        Ok(json!({"keys": [self.jwk()?]}))
    }

    /// An ES256 token over `claims`, with `kid` in its header.
    pub fn mint_with_kid(&self, kid: &str, claims: &Value) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(self.key.pkcs8_der()))?)
    }

    /// An ES256 token over `claims`, under this key's ID.
    pub fn mint(&self, claims: &Value) -> anyhow::Result<String> {
        self.mint_with_kid(&self.kid, claims)
    }
}

/// An HTTPS server answering `GET <path>` with the JSON document registered for the path (404
/// otherwise), recording every request path.
#[derive(Debug)]
pub struct TestIssuer {
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    /// PEM of the CA that signed the server's certificate (a `ca_bundle_path` for it).
    pub ca_pem: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestIssuer {
    /// Starts serving the documents `documents` returns for the server's base URL (which is
    /// only known once the port is bound): request path -> JSON.
    pub fn start(documents: impl FnOnce(&str) -> anyhow::Result<BTreeMap<String, Value>>) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&leaf_key, &ca)?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())?,
            )?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let base = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let documents = Arc::new(documents(&base)?);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let router = Router::new().fallback(get(move |uri: axum::http::Uri| {
            let (documents, seen) = (Arc::clone(&documents), Arc::clone(&seen));
            async move {
                seen.lock().unwrap_or_else(PoisonError::into_inner).push(uri.path().to_owned());
                match documents.get(uri.path()) {
                    Some(document) => (axum::http::StatusCode::OK, document.to_string()),
                    None => (axum::http::StatusCode::NOT_FOUND, String::new()),
                }
            }
        }));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let thread = std::thread::Builder::new()
            .name("test-oidc-issuer".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                    let serve = axum::serve(TlsAccept { listener, acceptor }, router);
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime ends every connection still open.
            })
            .context("cannot start the test issuer's thread")?;
        Ok(Self { base, ca_pem: ca_cert.pem(), requests, stop: Some(stop), thread: Some(thread) })
    }

    /// A discovery document for `issuer` whose keys are at `<issuer>/jwks`.
    pub fn discovery(issuer: &str) -> Value {
        json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/jwks"),
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// The paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// TLS over a TCP listener, for `axum::serve`; a handshake that fails or stalls is dropped.
struct TlsAccept {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsAccept {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.listener.accept().await else { continue };
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
