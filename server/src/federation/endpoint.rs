//! The bundle endpoint: this trust domain's full SPIFFE bundle over HTTPS (conformance §6).
//!
//! `GET /` answers the CA's current bundle as SPIFFE bundle JSON (X.509 and JWT authorities,
//! `spiffe_sequence`, `spiffe_refresh_hint` = `federation.bundle_endpoint.refresh_hint`),
//! `application/json`. Other paths are 404, other methods 405. No client authentication is
//! asked for (the spec forbids it).
//!
//! TLS per profile:
//! - `https_spiffe`: the server's own X.509-SVID `spiffe://<td>/tessera/server`, the same
//!   certificate (and renewal) as the agent API (`crate::agent_api::tls::ServerSvid`).
//!   Federating servers configure that SPIFFE ID as `endpoint_spiffe_id`.
//! - `https_web`: the operator's certificate chain and key (`cert_path`, `key_path`), read at
//!   start-up; a renewed certificate needs a restart.
//!
//! Handshakes run concurrently with a deadline (`crate::agent_api::tls::incoming`).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent_api::tls::AgentTlsStream;
use crate::ca::CertificateAuthority;
use crate::config::{BundleEndpointConfig, BundleEndpointProfile};
use crate::server::ServerError;
use tessera_spiffe::tls::SvidResolver;

/// ALPN of the endpoint: axum serves HTTP/1.1.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Builds the endpoint's TLS configuration for its profile. `server_svid` is the server's own
/// SVID resolver (used by `https_spiffe`).
pub(crate) fn tls_config(
    config: &BundleEndpointConfig,
    server_svid: Arc<SvidResolver>,
) -> Result<rustls::ServerConfig, String> {
    https_tls_config(config.profile, config.cert_path.as_deref(), config.key_path.as_deref(), server_svid)
}

/// The TLS configuration of an HTTPS listener of the server (the bundle endpoint, the token
/// exchange endpoint): `https_spiffe` presents the server's own SVID, `https_web` the
/// operator's certificate chain and key read now (a renewed certificate needs a restart).
pub(crate) fn https_tls_config(
    profile: BundleEndpointProfile,
    cert_path: Option<&Path>,
    key_path: Option<&Path>,
    server_svid: Arc<SvidResolver>,
) -> Result<rustls::ServerConfig, String> {
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| err.to_string())?
        .with_no_client_auth();
    let mut tls = match profile {
        BundleEndpointProfile::HttpsSpiffe => builder.with_cert_resolver(server_svid),
        BundleEndpointProfile::HttpsWeb => {
            let (Some(cert_path), Some(key_path)) = (cert_path, key_path) else {
                return Err("the https_web profile needs cert_path and key_path".into());
            };
            let (chain, key) = load_web_identity(cert_path, key_path)?;
            builder.with_single_cert(chain, key).map_err(|err| {
                format!("{} and {} do not form a usable TLS identity: {err}", cert_path.display(), key_path.display())
            })?
        }
    };
    tls.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(tls)
}

fn load_web_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("cert_path {}: {err}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("cert_path {}: no PEM certificate in it", cert_path.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|err| format!("key_path {}: {err}", key_path.display()))?;
    Ok((chain, key))
}

#[derive(Debug, Clone)]
struct EndpointState {
    ca: Arc<CertificateAuthority>,
    refresh_hint: Duration,
}

/// The endpoint's routes.
pub(crate) fn router(ca: Arc<CertificateAuthority>, refresh_hint: Duration) -> Router {
    Router::new().route("/", get(bundle)).with_state(EndpointState { ca, refresh_hint })
}

async fn bundle(State(state): State<EndpointState>) -> Response {
    let mut bundle = state.ca.bundle();
    bundle.set_refresh_hint(Some(state.refresh_hint));
    let mut response = (StatusCode::OK, bundle.to_json()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Handshaken TLS connections as an axum listener.
struct TlsListener {
    incoming: ReceiverStream<Result<AgentTlsStream, io::Error>>,
    local_addr: SocketAddr,
    name: &'static str,
}

impl axum::serve::Listener for TlsListener {
    type Io = AgentTlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let addr = stream.remote_addr().unwrap_or(self.local_addr);
                    return (stream, addr);
                }
                // `incoming` only yields connections; keep waiting.
                Some(Err(err)) => tracing::warn!(error = %err, "{} accept failed", self.name),
                // Stopped: graceful shutdown takes over from here.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Serves the bundle endpoint on `listener` until `stopped`.
pub(crate) async fn serve(
    router: Router,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    serve_https(router, listener, tls, stopped, "bundle endpoint").await
}

/// Serves `router` over TLS on `listener` until `stopped`; `name` names the listener in logs and
/// errors. Handshakes run concurrently, each with a deadline.
pub(crate) async fn serve_https(
    router: Router,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    stopped: watch::Receiver<bool>,
    name: &'static str,
) -> Result<(), ServerError> {
    let local_addr =
        listener.local_addr().map_err(|err| ServerError::Serve { listener: name, reason: err.to_string() })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let incoming = crate::agent_api::tls::incoming_named(listener, acceptor, stopped.clone(), name);
    axum::serve(TlsListener { incoming, local_addr, name }, router)
        .with_graceful_shutdown(crate::server::stop_requested(stopped))
        .await
        .map_err(|err| ServerError::Serve { listener: name, reason: err.to_string() })
}
