//! OIDC discovery for JWT-SVIDs: lets a cloud STS (AWS, GCP, Azure) trust tokens this server
//! signs, the same way it trusts any OpenID Connect provider.
//!
//! With `[oidc] bind_address` set (and `jwt_issuer`, which the configuration requires then),
//! the server serves over plain HTTP, under the path of the issuer URL:
//!
//! - `GET <path>/.well-known/openid-configuration`: `issuer` (exactly `jwt_issuer`, which is
//!   also the `iss` of every JWT-SVID), `jwks_uri` (`<issuer>/keys`), `authorization_endpoint`
//!   (`<issuer>/authorize`, required by the discovery schema; Tessera has no interactive flow,
//!   so it answers 404), `response_types_supported: ["id_token"]`,
//!   `subject_types_supported: ["public"]` and `id_token_signing_alg_values_supported` (the
//!   algorithms of the keys currently published).
//! - `GET <path>/keys`: the JWKS. One JWK per JWT authority of the trust bundle, with `kid`,
//!   `alg`, `use: "sig"` and the key parameters, never `x5c` and never the X.509 authorities.
//!
//! When the issuer has a path (`https://example.org/tessera`), the same documents are also
//! served at the root, for proxies that strip the prefix.
//!
//! Both documents are built from the CA's bundle on every request, so a JWT key added by
//! rotation is published as soon as the CA holds it, and a retired key disappears when the CA
//! drops it. Cloud providers require HTTPS on the issuer URL: put a TLS-terminating reverse
//! proxy (or load balancer) at `jwt_issuer` in front of this listener (docs/oidc.md).

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::keys::{EcCurve, Jwk, KeyFamily, PublicKey};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::CertificateAuthority;
use crate::server::ServerError;

/// Path of the discovery document under the issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of the JWKS under the issuer.
pub const JWKS_PATH: &str = "/keys";
/// Path of the (unserved) authorization endpoint under the issuer.
pub const AUTHORIZATION_PATH: &str = "/authorize";

/// Checks that `issuer` can be an OIDC issuer: an absolute `https` (or, for tests and
/// proxies on the same host, `http`) URL with a host, no user info, query or fragment, and a
/// path of plain segments.
pub fn check_issuer(issuer: &str) -> Result<(), String> {
    let url = url::Url::parse(issuer).map_err(|err| format!("{issuer:?} is not a URL: {err}"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(format!("{issuer:?} must be an https:// URL to serve OIDC discovery"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{issuer:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{issuer:?} must not contain user info"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{issuer:?} must not have a query or fragment"));
    }
    let path = issuer_path(&url);
    let plain = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
    if !path.is_empty() && !path.trim_start_matches('/').split('/').all(|s| !s.is_empty() && s.chars().all(plain)) {
        return Err(format!("{issuer:?}: the path must be plain segments of letters, digits, '-', '.', '_' or '~'"));
    }
    if !issuer.trim_end_matches('/').ends_with(url.path().trim_end_matches('/')) {
        return Err(format!("{issuer:?} is not in normalized form"));
    }
    Ok(())
}

/// The issuer's path without its trailing slash (`""` for the root).
fn issuer_path(url: &url::Url) -> String {
    url.path().trim_end_matches('/').to_owned()
}

/// The issuer without a trailing slash, the base of `jwks_uri`.
fn base(issuer: &str) -> &str {
    issuer.trim_end_matches('/')
}

/// The discovery document for `issuer` when the bundle holds `bundle`'s JWT keys.
pub fn discovery_document(issuer: &str, bundle: &Bundle) -> Value {
    let mut algorithms: Vec<&str> = bundle.jwt_authorities().values().filter_map(algorithm).collect();
    algorithms.sort_unstable();
    algorithms.dedup();
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{}{JWKS_PATH}", base(issuer)),
        "authorization_endpoint": format!("{}{AUTHORIZATION_PATH}", base(issuer)),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
    })
}

/// The JWKS of `bundle`'s JWT authorities: `kid`, `alg`, `use: "sig"`, key parameters. A key
/// whose algorithm cannot be named (none today) is left out rather than published without
/// `alg`.
pub fn jwks(bundle: &Bundle) -> Value {
    let keys: Vec<Value> = bundle
        .jwt_authorities()
        .iter()
        .filter_map(|(kid, key)| {
            let alg = algorithm(key)?;
            let mut object = Map::new();
            match key.to_jwk() {
                Jwk::Ec { crv, x, y } => {
                    object.insert("kty".into(), "EC".into());
                    object.insert("crv".into(), crv.into());
                    object.insert("x".into(), x.into());
                    object.insert("y".into(), y.into());
                }
                Jwk::Rsa { n, e } => {
                    object.insert("kty".into(), "RSA".into());
                    object.insert("n".into(), n.into());
                    object.insert("e".into(), e.into());
                }
            }
            object.insert("kid".into(), kid.as_str().into());
            object.insert("alg".into(), alg.into());
            object.insert("use".into(), "sig".into());
            Some(Value::Object(object))
        })
        .collect();
    json!({ "keys": keys })
}

/// The JWS algorithm a JWT authority signs with: the CA signs EC keys with their curve's
/// algorithm and RSA keys with RS256.
fn algorithm(key: &PublicKey) -> Option<&'static str> {
    match key.family() {
        KeyFamily::Ec(EcCurve::P256) => Some("ES256"),
        KeyFamily::Ec(EcCurve::P384) => Some("ES384"),
        KeyFamily::Ec(EcCurve::P521) => Some("ES512"),
        KeyFamily::Rsa => Some("RS256"),
    }
}

#[derive(Debug, Clone)]
struct OidcState {
    issuer: Arc<str>,
    ca: Arc<CertificateAuthority>,
}

/// The discovery routes for `issuer`, answering from `ca`'s current bundle.
pub fn router(issuer: &str, ca: Arc<CertificateAuthority>) -> Result<Router, String> {
    check_issuer(issuer)?;
    let url = url::Url::parse(issuer).map_err(|err| err.to_string())?;
    let path = issuer_path(&url);
    let state = OidcState { issuer: Arc::from(issuer), ca };
    let mut router = Router::new();
    let mut prefixes = vec![path.clone()];
    if !path.is_empty() {
        prefixes.push(String::new());
    }
    for prefix in prefixes {
        router = router
            .route(&format!("{prefix}{DISCOVERY_PATH}"), get(discovery))
            .route(&format!("{prefix}{JWKS_PATH}"), get(keys));
    }
    Ok(router.with_state(state))
}

fn json_response(value: &Value) -> Response {
    let mut response = (StatusCode::OK, value.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Short: relying parties must see a rotated key soon after the CA publishes it.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    response
}

async fn discovery(axum::extract::State(state): axum::extract::State<OidcState>) -> Response {
    json_response(&discovery_document(&state.issuer, &state.ca.bundle()))
}

async fn keys(axum::extract::State(state): axum::extract::State<OidcState>) -> Response {
    json_response(&jwks(&state.ca.bundle()))
}

/// Serves discovery on `listener` until `stopped`.
pub(crate) async fn serve(
    router: Router,
    listener: TcpListener,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(crate::server::stop_requested(stopped))
        .await
        .map_err(|err| ServerError::Serve { listener: "OIDC discovery endpoint", reason: err.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers() {
        check_issuer("https://oidc.example.org").unwrap();
        check_issuer("https://oidc.example.org/").unwrap();
        check_issuer("https://example.org/tessera/prod").unwrap();
        check_issuer("http://127.0.0.1:8443").unwrap();
        assert!(check_issuer("oidc.example.org").unwrap_err().contains("not a URL"));
        assert!(check_issuer("ftp://example.org").unwrap_err().contains("https://"));
        assert!(check_issuer("https://u:p@example.org").unwrap_err().contains("user info"));
        assert!(check_issuer("https://example.org/?a=b").unwrap_err().contains("query"));
        assert!(check_issuer("https://example.org/a//b").unwrap_err().contains("plain segments"));
        assert!(check_issuer("https://example.org/{x}").unwrap_err().contains("plain segments"));
    }

    #[test]
    fn discovery_names_the_issuer_and_keys() {
        let bundle = Bundle::new(tessera_spiffe::TrustDomain::new("example.org").unwrap());
        let doc = discovery_document("https://oidc.example.org/", &bundle);
        assert_eq!(doc["issuer"], "https://oidc.example.org/");
        assert_eq!(doc["jwks_uri"], "https://oidc.example.org/keys");
        assert_eq!(doc["response_types_supported"], json!(["id_token"]));
        assert_eq!(jwks(&bundle), json!({"keys": []}));
    }
}
