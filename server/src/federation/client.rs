//! Fetching one foreign bundle from its bundle endpoint (conformance §6), hostile-input safe.
//!
//! One fetch is: TCP connect to the URL's host and port, TLS verified per profile, one
//! HTTP/1.1 `GET`, status 200, a body of at most [`MAX_BUNDLE_JSON_LEN`] bytes, SPIFFE bundle
//! JSON parsed with tessera-spiffe, all under [`FETCH_TIMEOUT`] (an endless or trickling
//! response fails at the deadline). Then the bundle is checked:
//!
//! - it must hold at least one authority;
//! - every X.509 authority that names a trust domain (URI SAN `spiffe://<td>`) must name the
//!   relationship's trust domain;
//! - `https_spiffe` with a self-serving endpoint (endpoint ID in the bundle's trust domain):
//!   the new bundle must itself authenticate the SVID the endpoint just presented, otherwise
//!   it is for another trust domain (or would lock the next fetch out).
//!
//! Redirects are not followed: a 3xx is a failed fetch naming the location.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tessera_spiffe::bundle::{Bundle, MAX_BUNDLE_JSON_LEN};
use tessera_spiffe::tls::{BundleSource, SpiffeServerVerifier, verify_peer_svid};
use tessera_spiffe::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;

/// Longest one fetch may take, from connect to the last body byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How a relationship authenticates its endpoint.
#[derive(Debug, Clone)]
pub enum EndpointAuth {
    /// `https_web`: Web PKI roots, host name check.
    Web {
        /// The roots (the system's, or `ca_bundle_path`).
        roots: Arc<RootCertStore>,
    },
    /// `https_spiffe`: the endpoint's SVID must chain to `bundle` and carry `endpoint_id`.
    Spiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_id: SpiffeId,
        /// The bundle of `endpoint_id`'s trust domain to verify it with.
        bundle: Bundle,
    },
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL could not be used.
    #[error("bundle endpoint URL: {0}")]
    Url(String),
    /// TCP connect failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// host:port.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong identity, untrusted certificate, ...).
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        /// host:port.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The answer was not 200.
    #[error("bundle endpoint answered HTTP {status}{location}")]
    Status {
        /// The status code.
        status: u16,
        /// ` (redirect to ...)` for a redirect.
        location: String,
    },
    /// The body was larger than allowed (the limit in bytes).
    #[error("response is larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not a valid SPIFFE bundle.
    #[error("response is not a valid SPIFFE bundle: {0}")]
    Bundle(String),
    /// The bundle is valid but not acceptable for this relationship.
    #[error("bundle refused: {0}")]
    Refused(String),
    /// The whole fetch took longer than [`FETCH_TIMEOUT`].
    #[error("no complete answer within {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
}

/// Fetches and checks the bundle of `trust_domain` from `url`.
pub async fn fetch(url: &url::Url, trust_domain: &TrustDomain, auth: &EndpointAuth) -> Result<Bundle, FetchError> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(url, trust_domain, auth)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout),
    }
}

async fn fetch_inner(url: &url::Url, trust_domain: &TrustDomain, auth: &EndpointAuth) -> Result<Bundle, FetchError> {
    let tls = client_config(auth).map_err(|err| FetchError::Http(format!("TLS configuration: {err}")))?;
    let (body, peer_chain) = https_get(url, tls, "application/json", MAX_BUNDLE_JSON_LEN).await?;
    let bundle = Bundle::from_json(trust_domain.clone(), &body).map_err(|err| FetchError::Bundle(err.to_string()))?;
    check_bundle(&bundle, trust_domain)?;
    if let EndpointAuth::Spiffe { endpoint_id, .. } = auth
        && &endpoint_id.trust_domain() == trust_domain
        && let Err(err) = verify_peer_svid(&peer_chain, &bundle, SystemTime::now())
    {
        return Err(FetchError::Refused(format!(
            "it does not authenticate the endpoint's own SVID ({err}): it is not the bundle of {trust_domain}"
        )));
    }
    Ok(bundle)
}

/// One HTTPS `GET` of `url` (checked with [`crate::federation::check_url`]): TCP connect, TLS
/// with `tls`, HTTP/1.1, status 200, a body of at most `limit` bytes. Returns the body and the
/// peer's certificate chain (DER, leaf first). Redirects are not followed. No deadline of its
/// own: callers wrap it in theirs.
///
/// The bundle fetch and the token exchange's OIDC discovery and JWKS fetches share it.
pub(crate) async fn https_get(
    url: &url::Url,
    tls: rustls::ClientConfig,
    accept: &'static str,
    limit: usize,
) -> Result<(Bytes, Vec<Vec<u8>>), FetchError> {
    crate::federation::check_url(url.as_str()).map_err(FetchError::Url)?;
    let host = url.host_str().ok_or_else(|| FetchError::Url("no host".into()))?.to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    // IPv6 literals come bracketed from the URL; connect and SNI want them bare.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let address = format!("{host}:{port}");

    let tcp = TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|source| FetchError::Connect { address: address.clone(), source })?;
    let _ = tcp.set_nodelay(true);
    let server_name =
        ServerName::try_from(bare_host.clone()).map_err(|err| FetchError::Url(format!("host {host:?}: {err}")))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|source| FetchError::Tls { address: address.clone(), source })?;
    let peer_chain: Vec<Vec<u8>> =
        stream.get_ref().1.peer_certificates().unwrap_or_default().iter().map(|c| c.as_ref().to_vec()).collect();

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| FetchError::Http(err.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = async {
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let host_header = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::ACCEPT, accept)
            .header(hyper::header::USER_AGENT, "tessera-server")
            .body(Empty::<Bytes>::new())
            .map_err(|err| FetchError::Http(err.to_string()))?;
        let response = sender.send_request(request).await.map_err(|err| FetchError::Http(err.to_string()))?;
        let status = response.status();
        if status != hyper::StatusCode::OK {
            let location = response
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .filter(|_| status.is_redirection())
                .map(|location| format!(" (redirect to {location:?}, which is not followed)"))
                .unwrap_or_default();
            return Err(FetchError::Status { status: status.as_u16(), location });
        }
        let body = Limited::new(response.into_body(), limit).collect().await.map_err(|err| {
            if err.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge(limit)
            } else {
                FetchError::Http(err.to_string())
            }
        })?;
        Ok(body.to_bytes())
    }
    .await;
    driver.abort();
    Ok((result?, peer_chain))
}

/// Checks a parsed bundle against the relationship's trust domain.
pub fn check_bundle(bundle: &Bundle, trust_domain: &TrustDomain) -> Result<(), FetchError> {
    if bundle.is_empty() {
        return Err(FetchError::Refused("it holds no X.509 or JWT authority".into()));
    }
    for der in bundle.x509_authorities() {
        if let Some(named) = authority_trust_domain(der)
            && named != trust_domain.name()
        {
            return Err(FetchError::Refused(format!(
                "an X.509 authority belongs to trust domain {named:?}, not {trust_domain}"
            )));
        }
    }
    Ok(())
}

/// The trust domain a CA certificate names in a `spiffe://` URI SAN, if any.
fn authority_trust_domain(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            uri.strip_prefix("spiffe://").map(|rest| rest.split('/').next().unwrap_or_default().to_ascii_lowercase())
        }
        _ => None,
    })
}

/// The TLS client configuration of one fetch (HTTP/1.1 ALPN).
pub(crate) fn client_config(auth: &EndpointAuth) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let mut config = match auth {
        EndpointAuth::Web { roots } => builder.with_root_certificates(Arc::clone(roots)).with_no_client_auth(),
        EndpointAuth::Spiffe { endpoint_id, bundle } => {
            let verifier = SpiffeServerVerifier::new(BundleSource::fixed(bundle.clone()), endpoint_id.clone());
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
