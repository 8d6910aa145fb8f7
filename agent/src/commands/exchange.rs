//! `tessera-agent exchange`: the agentless client of the server's token exchange (RFC 8693).
//!
//! A CI job (or any process holding an OIDC token from an issuer the server trusts) trades
//! that token for a Tessera identity without running an agent:
//!
//! - X.509 (the default): an EC P-256 key is generated here, only a CSR is sent, and
//!   `--write DIR` receives `svid.pem` (leaf then intermediates), `svid.key` (PKCS#8, 0600)
//!   and `bundle.pem` (the trust domain's X.509 authorities). The key never leaves this process.
//! - JWT (`--audience A`, repeatable): a JWT-SVID, printed, or written to `DIR/jwt_svid.token`
//!   (0600) with `--write`.
//!
//! The server is authenticated either as a SPIFFE identity (`--trust-bundle FILE`: a PEM
//! bundle of the trust domain; the server must present `spiffe://<td>/tessera/server`, the
//! endpoint's `https_spiffe` profile) or by Web PKI (`--ca-file FILE`, else the system roots:
//! the `https_web` profile). The whole exchange has a deadline.
//!
//! [`exchange`] is the library form the end-to-end tests drive.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_spiffe::tls::{BundleSource, SpiffeServerVerifier};
use zeroize::Zeroizing;

use super::output::{print_line, write_file};
use crate::cli::ExchangeArgs;

/// The grant type of RFC 8693.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The subject token type sent.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The token type of an X.509-SVID chain.
pub const X509_SVID_TOKEN_TYPE: &str = "urn:tessera:params:oauth:token-type:x509-svid";
/// Longest the whole exchange may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_RESPONSE_LEN: usize = 256 * 1024;
/// Largest token file read.
const MAX_TOKEN_FILE_LEN: u64 = 64 * 1024;
/// Largest PEM file (bundle, roots) read.
const MAX_PEM_FILE_LEN: u64 = 1024 * 1024;

/// How the server is authenticated.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// `https_spiffe`: the server's SVID must chain to this bundle and carry this ID.
    Spiffe {
        /// The trust domain's bundle.
        bundle: Bundle,
        /// `spiffe://<td>/tessera/server`.
        server_id: SpiffeId,
    },
    /// `https_web`: Web PKI with these roots.
    Web(Arc<RootCertStore>),
}

/// A successful answer (RFC 8693 §2.2.1, plus Tessera's `spiffe_id` and `bundle`).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    /// The JWT-SVID, or the X.509-SVID chain as PEM.
    pub access_token: String,
    /// What `access_token` is.
    pub issued_token_type: String,
    /// `Bearer` or `N_A`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// The SPIFFE ID issued.
    pub spiffe_id: String,
    /// X.509: the trust domain's X.509 authorities as PEM.
    #[serde(default)]
    pub bundle: Option<String>,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The server answered with an OAuth error.
    #[error("the server refused the exchange: {error} ({description}, HTTP {status})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `error`.
        error: String,
        /// `error_description`.
        description: String,
    },
    /// The server could not be reached or spoke something else.
    #[error("{0}")]
    Transport(String),
}

/// What to ask for.
#[derive(Debug, Clone)]
pub enum Want {
    /// An X.509-SVID for this DER CSR.
    X509 {
        /// DER PKCS#10.
        csr_der: Vec<u8>,
    },
    /// A JWT-SVID for these audiences.
    Jwt {
        /// Audiences.
        audiences: Vec<String>,
    },
}

/// Posts one exchange to `<server>/v1/token` and returns the answer.
pub async fn exchange(
    server: &url::Url,
    trust: &ServerTrust,
    subject_token: &str,
    want: &Want,
) -> Result<TokenResponse, ExchangeError> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", GRANT_TYPE)
        .append_pair("subject_token", subject_token)
        .append_pair("subject_token_type", JWT_TOKEN_TYPE);
    match want {
        Want::X509 { csr_der } => {
            use base64::Engine as _;
            form.append_pair("requested_token_type", X509_SVID_TOKEN_TYPE)
                .append_pair("csr", &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(csr_der));
        }
        Want::Jwt { audiences } => {
            form.append_pair("requested_token_type", JWT_TOKEN_TYPE);
            for audience in audiences {
                form.append_pair("audience", audience);
            }
        }
    }
    let body = form.finish();
    match tokio::time::timeout(EXCHANGE_TIMEOUT, post(server, trust, body)).await {
        Ok(result) => result,
        Err(_) => {
            Err(ExchangeError::Transport(format!("no answer from {server} within {}s", EXCHANGE_TIMEOUT.as_secs())))
        }
    }
}

async fn post(server: &url::Url, trust: &ServerTrust, body: String) -> Result<TokenResponse, ExchangeError> {
    let transport = |what: &str| {
        let server = server.to_string();
        let what = what.to_owned();
        move |err: &dyn std::fmt::Display| ExchangeError::Transport(format!("{what} {server}: {err}"))
    };
    let host = server.host_str().ok_or_else(|| ExchangeError::Transport(format!("{server} has no host")))?;
    let port = server.port_or_known_default().unwrap_or(443);
    let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|e| transport("cannot connect to")(&e))?;
    let _ = tcp.set_nodelay(true);
    let tls = client_config(trust).map_err(|e| transport("TLS configuration for")(&e))?;
    let name = ServerName::try_from(bare_host.clone()).map_err(|e| transport("bad host in")(&e))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| transport("TLS handshake with")(&e))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| transport("HTTP with")(&e))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let path = format!("{}/v1/token", server.path().trim_end_matches('/'));
    let host_header = match server.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "tessera-agent-exchange")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| transport("cannot build the request to")(&e))?;
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| transport("HTTP with")(&e))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_LEN)
            .collect()
            .await
            .map_err(|e| transport("reading the answer of")(&e))?
            .to_bytes();
        Ok::<_, ExchangeError>((status, body))
    }
    .await;
    driver.abort();
    let (status, body) = result?;
    if status == 200 {
        return serde_json::from_slice(&body)
            .map_err(|err| ExchangeError::Transport(format!("{server} answered an unexpected document: {err}")));
    }
    #[derive(Deserialize)]
    struct OauthError {
        error: String,
        #[serde(default)]
        error_description: String,
    }
    match serde_json::from_slice::<OauthError>(&body) {
        Ok(refused) => {
            Err(ExchangeError::Refused { status, error: refused.error, description: refused.error_description })
        }
        Err(_) => Err(ExchangeError::Transport(format!("{server} answered HTTP {status} without an OAuth error"))),
    }
}

fn client_config(trust: &ServerTrust) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let mut config = match trust {
        ServerTrust::Web(roots) => builder.with_root_certificates(Arc::clone(roots)).with_no_client_auth(),
        ServerTrust::Spiffe { bundle, server_id } => {
            let verifier = SpiffeServerVerifier::new(BundleSource::fixed(bundle.clone()), server_id.clone());
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `--trust-bundle FILE`: the bundle and the server ID of its trust domain (named by the CA
/// certificates' `spiffe://` URI SAN).
pub fn spiffe_trust(path: &Path) -> anyhow::Result<ServerTrust> {
    let data = read_small(path, "--trust-bundle")?;
    let trust_domain = CertificateDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .find_map(|der| ca_trust_domain(der.as_ref()))
        .ok_or_else(|| {
            anyhow!(
                "--trust-bundle {}: no CA certificate in it names its trust domain (a spiffe:// URI SAN)",
                path.display()
            )
        })?;
    let bundle = Bundle::from_x509_authorities_pem(trust_domain.clone(), &data)
        .map_err(|err| anyhow!("--trust-bundle {}: {err}", path.display()))?;
    let server_id = trust_domain
        .id_from_segments(&["tessera", "server"])
        .map_err(|err| anyhow!("--trust-bundle {}: {err}", path.display()))?;
    Ok(ServerTrust::Spiffe { bundle, server_id })
}

fn ca_trust_domain(der: &[u8]) -> Option<TrustDomain> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => SpiffeId::parse(uri).ok().map(|id| id.trust_domain()),
        _ => None,
    })
}

/// `--ca-file FILE`, or the system roots.
pub fn web_trust(path: Option<&Path>) -> anyhow::Result<ServerTrust> {
    let mut roots = RootCertStore::empty();
    match path {
        Some(path) => {
            let data = read_small(path, "--ca-file")?;
            for cert in CertificateDer::pem_slice_iter(&data) {
                let cert = cert.map_err(|err| anyhow!("--ca-file {}: {err}", path.display()))?;
                roots.add(cert).map_err(|err| anyhow!("--ca-file {}: {err}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(anyhow!("--ca-file {}: no PEM certificate in it", path.display()));
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(anyhow!("no system root certificate could be loaded; pass --ca-file or --trust-bundle"));
            }
        }
    }
    Ok(ServerTrust::Web(Arc::new(roots)))
}

fn read_small(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("{flag} {}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_PEM_FILE_LEN + 1).read_to_end(&mut data).with_context(|| format!("{flag} {}", path.display()))?;
    if data.len() as u64 > MAX_PEM_FILE_LEN {
        return Err(anyhow!("{flag} {}: larger than {} bytes", path.display(), MAX_PEM_FILE_LEN));
    }
    Ok(data)
}

/// Reads the subject token from `--token-file` (surrounding whitespace dropped).
fn read_token(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("--token-file {}", path.display()))?;
    let mut data = String::new();
    file.take(MAX_TOKEN_FILE_LEN + 1)
        .read_to_string(&mut data)
        .with_context(|| format!("--token-file {}", path.display()))?;
    if data.len() as u64 > MAX_TOKEN_FILE_LEN {
        return Err(anyhow!("--token-file {}: larger than {MAX_TOKEN_FILE_LEN} bytes", path.display()));
    }
    let token = data.trim();
    if token.is_empty() {
        return Err(anyhow!("--token-file {}: the file is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// `--server URL`: an `https://` URL.
fn server_url(value: &str) -> anyhow::Result<url::Url> {
    let url = url::Url::parse(value).map_err(|err| anyhow!("--server {value:?}: not a URL: {err}"))?;
    if url.scheme() != "https" {
        return Err(anyhow!("--server {value:?}: must be an https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(anyhow!("--server {value:?}: has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(anyhow!("--server {value:?}: must not have user info, a query or a fragment"));
    }
    Ok(url)
}

/// `tessera-agent exchange`.
pub fn run(args: ExchangeArgs) -> anyhow::Result<()> {
    let server = server_url(&args.server)?;
    let token = read_token(&args.token_file)?;
    let trust = match (&args.trust_bundle, &args.ca_file) {
        (Some(bundle), None) => spiffe_trust(bundle)?,
        (None, ca_file) => web_trust(ca_file.as_deref())?,
        (Some(_), Some(_)) => return Err(anyhow!("--trust-bundle and --ca-file exclude each other")),
    };
    if args.audiences.is_empty() && args.write.is_none() {
        return Err(anyhow!("--write DIR is required for an X.509-SVID (or pass --audience for a JWT-SVID)"));
    }
    let (want, key) = if args.audiences.is_empty() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|err| anyhow!("cannot generate the SVID key: {err}"))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|err| anyhow!("cannot create the certificate signing request: {err}"))?;
        (Want::X509 { csr_der: csr.der().to_vec() }, Some(key))
    } else {
        (Want::Jwt { audiences: args.audiences.clone() }, None)
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let response = runtime.block_on(exchange(&server, &trust, &token, &want))?;
    match (key, &args.write) {
        (Some(key), Some(dir)) => {
            let bundle = response.bundle.as_deref().ok_or_else(|| anyhow!("the server answered without the bundle"))?;
            if !response.access_token.contains("-----BEGIN CERTIFICATE-----") {
                return Err(anyhow!("the server answered without a certificate"));
            }
            create_dir(dir)?;
            let key_pem = Zeroizing::new(key.serialize_pem());
            // The key first: a certificate is never left without its key.
            let written = [
                write_file(&dir.join("svid.key"), key_pem.as_bytes(), 0o600)?,
                write_file(&dir.join("svid.pem"), response.access_token.as_bytes(), 0o644)?,
                write_file(&dir.join("bundle.pem"), bundle.as_bytes(), 0o644)?,
            ];
            print_line(&format!("SPIFFE ID: {}", response.spiffe_id))?;
            print_line(&format!("Expires in: {}s", response.expires_in))?;
            for path in written {
                print_line(&format!("Wrote {}", path.display()))?;
            }
            Ok(())
        }
        (None, Some(dir)) => {
            create_dir(dir)?;
            let path = write_file(&dir.join("jwt_svid.token"), response.access_token.as_bytes(), 0o600)?;
            print_line(&format!("SPIFFE ID: {}", response.spiffe_id))?;
            print_line(&format!("Wrote {}", path.display()))
        }
        (None, None) => print_line(&response.access_token),
        (Some(_), None) => Err(anyhow!("--write DIR is required for an X.509-SVID")),
    }
}

fn create_dir(dir: &PathBuf) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        server_url("https://tessera.example.org:8443").unwrap();
        assert!(server_url("http://tessera.example.org").unwrap_err().to_string().contains("https://"));
        assert!(server_url("tessera").is_err());
        assert!(server_url("https://u:p@x").is_err());
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  a.b.c\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "a.b.c");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
        assert!(read_token(&dir.path().join("missing")).unwrap_err().to_string().contains("--token-file"));
    }
}
