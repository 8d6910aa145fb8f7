//! `POST /v1/token`: the RFC 8693 token exchange over HTTPS.
//!
//! Request (`application/x-www-form-urlencoded`, at most [`MAX_BODY_LEN`] bytes, every
//! parameter at most once except `audience`; unknown parameters are ignored as RFC 6749 §3.2
//! asks):
//!
//! | parameter | value |
//! | --- | --- |
//! | `grant_type` | `urn:ietf:params:oauth:grant-type:token-exchange` |
//! | `subject_token` | the external token (compact JWS) |
//! | `subject_token_type` | `urn:ietf:params:oauth:token-type:jwt` or `...:id_token` |
//! | `requested_token_type` | [`X509_SVID_TOKEN_TYPE`] (default with a `csr`) or `urn:ietf:params:oauth:token-type:jwt` (a JWT-SVID) |
//! | `csr` | PKCS#10, PEM or base64url DER, for an X.509-SVID |
//! | `audience` | the JWT-SVID's audiences (repeatable) |
//!
//! Success (RFC 8693 §2.2.1): `access_token` (the JWT-SVID, or the X.509-SVID chain as PEM),
//! `issued_token_type`, `token_type` (`Bearer` for a JWT-SVID, `N_A` for an X.509-SVID),
//! `expires_in`, plus `spiffe_id` and, for X.509, `bundle` (PEM of the trust domain's X.509
//! authorities). Errors (RFC 6749 §5.2 / RFC 8693 §2.2.2): `unsupported_grant_type`,
//! `invalid_request` (a malformed request, and every refused subject token, with one and the
//! same description whatever check refused it), `invalid_target` (an unacceptable audience or a
//! `resource`), `temporarily_unavailable` (503: too many requests in flight, or the request
//! took longer than `request_timeout`), `server_error` (500). Every answer carries
//! `Cache-Control: no-store`.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};
use tessera_spiffe::bundle::encode_pem_certificates;
use tokio::sync::Semaphore;

use super::validate::FailedCheck;
use super::{Issued, Refused, Requested, TokenExchange};

/// Largest request body read.
pub const MAX_BODY_LEN: usize = 64 * 1024;
/// The grant type of RFC 8693.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Subject token type: a JWT.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Subject token type: an OpenID Connect ID token.
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Requested / issued token type of an X.509-SVID chain (PEM). No registered URI exists.
pub const X509_SVID_TOKEN_TYPE: &str = "urn:tessera:params:oauth:token-type:x509-svid";
/// Longest CSR accepted (PEM or base64url), in bytes.
const MAX_CSR_LEN: usize = 16 * 1024;
/// Most audiences of one JWT-SVID, and the longest one.
const MAX_AUDIENCES: usize = 8;
const MAX_AUDIENCE_LEN: usize = 256;
/// What every refused subject token is told, whatever check refused it.
const REFUSED_DESCRIPTION: &str = "the subject token was not accepted";

#[derive(Debug, Clone)]
struct EndpointState {
    exchange: Arc<TokenExchange>,
    in_flight: Arc<Semaphore>,
    timeout: std::time::Duration,
}

/// The endpoint's routes.
pub fn router(exchange: Arc<TokenExchange>) -> Router {
    let config = exchange.state().config();
    let concurrency = usize::try_from(config.token_exchange.max_concurrent_requests).unwrap_or(1).max(1);
    let timeout = config.token_exchange.request_timeout;
    let state = EndpointState { exchange, in_flight: Arc::new(Semaphore::new(concurrency)), timeout };
    Router::new().route("/v1/token", post(token)).with_state(state)
}

/// An OAuth error response.
fn error(status: StatusCode, code: &str, description: &str) -> Response {
    with_no_store((status, json!({"error": code, "error_description": description}).to_string()).into_response())
}

fn with_no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn invalid_request(description: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// A request refused before its subject token is looked at: a 400 with this OAuth error code.
#[derive(Debug)]
struct FormError {
    code: &'static str,
    description: String,
}

impl FormError {
    fn request(description: impl Into<String>) -> Self {
        Self { code: "invalid_request", description: description.into() }
    }

    fn target(description: impl Into<String>) -> Self {
        Self { code: "invalid_target", description: description.into() }
    }

    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, self.code, &self.description)
    }
}

async fn token(State(state): State<EndpointState>, request: Request<Body>) -> Response {
    let Ok(_permit) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "too many requests in flight");
    };
    match tokio::time::timeout(state.timeout, handle(&state.exchange, request)).await {
        Ok(response) => response,
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the request took too long"),
    }
}

/// A parsed request: what the form said, before the subject token is looked at.
#[derive(Debug)]
struct ExchangeRequest {
    subject_token: String,
    requested: Requested,
}

async fn handle(exchange: &TokenExchange, request: Request<Body>) -> Response {
    let form_type = request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).map(|value| {
        value.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/x-www-form-urlencoded")
    });
    if form_type != Some(true) {
        return refuse_request(exchange, invalid_request("the body must be application/x-www-form-urlencoded"));
    }
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_LEN).await {
        Ok(body) => body,
        Err(_) => {
            return refuse_request(
                exchange,
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    &format!("the body is larger than {MAX_BODY_LEN} bytes or could not be read"),
                ),
            );
        }
    };
    let parsed = match parse_form(&body) {
        Ok(parsed) => parsed,
        Err(refused) => return refuse_request(exchange, refused.into_response()),
    };
    match exchange.exchange(&parsed.subject_token, parsed.requested).await {
        Ok(issued) => success(exchange, issued),
        Err(Refused(FailedCheck::Internal)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the server could not complete the exchange")
        }
        Err(Refused(_)) => invalid_request(REFUSED_DESCRIPTION),
    }
}

/// A request refused before its token was looked at is audited too.
fn refuse_request(exchange: &TokenExchange, response: Response) -> Response {
    super::audit_exchange(
        exchange.audit_log(),
        &super::ExchangeAudit { failed_check: Some(FailedCheck::Request), ..Default::default() },
    );
    response
}

fn parse_form(body: &[u8]) -> Result<ExchangeRequest, FormError> {
    let mut single: Vec<(String, String)> = Vec::new();
    let mut audiences: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(body) {
        if name == "audience" {
            audiences.push(value.into_owned());
            continue;
        }
        if single.iter().any(|(known, _)| *known == name) {
            return Err(FormError::request(format!("parameter {name} is repeated")));
        }
        single.push((name.into_owned(), value.into_owned()));
    }
    let get = |name: &str| single.iter().find(|(known, _)| known == name).map(|(_, value)| value.as_str());
    match get("grant_type") {
        None => return Err(FormError::request("grant_type is missing")),
        Some(GRANT_TYPE) => {}
        Some(_) => {
            return Err(FormError {
                code: "unsupported_grant_type",
                description: format!("only {GRANT_TYPE} is supported"),
            });
        }
    }
    let subject_token = get("subject_token")
        .filter(|token| !token.is_empty())
        .ok_or_else(|| FormError::request("subject_token is missing"))?;
    if subject_token.len() > tessera_spiffe::jwt::MAX_TOKEN_LEN {
        return Err(FormError::request("subject_token is too long"));
    }
    match get("subject_token_type") {
        Some(JWT_TOKEN_TYPE | ID_TOKEN_TYPE) => {}
        Some(_) => {
            return Err(FormError::request(format!("subject_token_type must be {JWT_TOKEN_TYPE} or {ID_TOKEN_TYPE}")));
        }
        None => return Err(FormError::request("subject_token_type is missing")),
    }
    if get("actor_token").is_some() || get("actor_token_type").is_some() {
        return Err(FormError::request("delegation (actor_token) is not supported"));
    }
    if get("resource").is_some() {
        return Err(FormError::target("resource is not supported; use audience"));
    }
    let csr = get("csr");
    let requested = match (get("requested_token_type"), csr) {
        (Some(X509_SVID_TOKEN_TYPE) | None, Some(csr)) => {
            if !audiences.is_empty() {
                return Err(FormError::target("an X.509-SVID takes no audience"));
            }
            Requested::X509 { csr_der: parse_csr(csr).map_err(FormError::request)? }
        }
        (Some(X509_SVID_TOKEN_TYPE), None) => return Err(FormError::request("an X.509-SVID needs a csr")),
        (Some(JWT_TOKEN_TYPE) | None, None) => {
            if audiences.is_empty() {
                return Err(FormError::request("a JWT-SVID needs an audience (or send a csr for an X.509-SVID)"));
            }
            if audiences.len() > MAX_AUDIENCES
                || audiences.iter().any(|audience| audience.is_empty() || audience.len() > MAX_AUDIENCE_LEN)
            {
                return Err(FormError::target(format!(
                    "at most {MAX_AUDIENCES} audiences of 1 to {MAX_AUDIENCE_LEN} bytes"
                )));
            }
            Requested::Jwt { audiences }
        }
        (Some(JWT_TOKEN_TYPE), Some(_)) => return Err(FormError::request("a JWT-SVID takes no csr")),
        (Some(_), _) => {
            return Err(FormError::request(format!(
                "requested_token_type must be {X509_SVID_TOKEN_TYPE} or {JWT_TOKEN_TYPE}"
            )));
        }
    };
    Ok(ExchangeRequest { subject_token: subject_token.to_owned(), requested })
}

/// A CSR as PEM (`CERTIFICATE REQUEST`) or base64url DER, whose self-signature verifies.
fn parse_csr(text: &str) -> Result<Vec<u8>, String> {
    if text.len() > MAX_CSR_LEN {
        return Err("csr is too long".into());
    }
    let der = if text.trim_start().starts_with("-----BEGIN") {
        let block = pem::parse(text).map_err(|err| format!("csr is not valid PEM: {err}"))?;
        if block.tag() != "CERTIFICATE REQUEST" && block.tag() != "NEW CERTIFICATE REQUEST" {
            return Err(format!("csr is a PEM {:?}, not a CERTIFICATE REQUEST", block.tag()));
        }
        block.into_contents()
    } else {
        let trimmed = text.trim().trim_end_matches('=');
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(trimmed)
            .map_err(|_| "csr is neither PEM nor base64url DER".to_owned())?
    };
    tessera_spiffe::x509::verify_csr(&der).map_err(|err| format!("csr: {err}"))?;
    Ok(der)
}

fn expires_in(expires_at: std::time::SystemTime) -> u64 {
    let now = std::time::SystemTime::now();
    expires_at.duration_since(now).map_or(0, |left| left.as_secs())
}

fn success(exchange: &TokenExchange, issued: Issued) -> Response {
    let body: Value = match issued {
        Issued::X509 { spiffe_id, chain, expires_at } => {
            let bundle = exchange.state().ca().bundle();
            json!({
                "access_token": encode_pem_certificates(chain.iter().map(Vec::as_slice)),
                "issued_token_type": X509_SVID_TOKEN_TYPE,
                "token_type": "N_A",
                "expires_in": expires_in(expires_at),
                "expires_at": expires_at.duration_since(UNIX_EPOCH).map_or(0, |at| at.as_secs()),
                "spiffe_id": spiffe_id.as_str(),
                "bundle": encode_pem_certificates(bundle.x509_authorities()),
            })
        }
        Issued::Jwt { spiffe_id, token, expires_at } => json!({
            "access_token": token,
            "issued_token_type": JWT_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": expires_in(expires_at),
            "expires_at": expires_at.duration_since(UNIX_EPOCH).map_or(0, |at| at.as_secs()),
            "spiffe_id": spiffe_id.as_str(),
        }),
    };
    with_no_store((StatusCode::OK, body.to_string()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish().into_bytes()
    }

    async fn code(response: Response) -> (StatusCode, String) {
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        (status, value["error"].as_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn request_errors_are_named_with_their_oauth_codes() {
        let base = [("grant_type", GRANT_TYPE), ("subject_token", "a.b.c"), ("subject_token_type", JWT_TOKEN_TYPE)];
        type Case<'a> = (Vec<(&'a str, &'a str)>, StatusCode, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (vec![("grant_type", "client_credentials")], StatusCode::BAD_REQUEST, "unsupported_grant_type"),
            (vec![("grant_type", GRANT_TYPE)], StatusCode::BAD_REQUEST, "invalid_request"),
            (base.to_vec(), StatusCode::BAD_REQUEST, "invalid_request"),
            ([&base[..], &[("grant_type", GRANT_TYPE)]].concat(), StatusCode::BAD_REQUEST, "invalid_request"),
            ([&base[..2], &[("subject_token_type", "urn:x")]].concat(), StatusCode::BAD_REQUEST, "invalid_request"),
            ([&base[..], &[("resource", "https://x")]].concat(), StatusCode::BAD_REQUEST, "invalid_target"),
            ([&base[..], &[("csr", "not a csr")]].concat(), StatusCode::BAD_REQUEST, "invalid_request"),
            ([&base[..], &[("audience", "")]].concat(), StatusCode::BAD_REQUEST, "invalid_target"),
            (
                [&base[..], &[("requested_token_type", "urn:x"), ("audience", "a")]].concat(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
        ];
        for (pairs, status, expected) in cases {
            let response = parse_form(&form(&pairs)).map(|_| ()).unwrap_err().into_response();
            assert_eq!(code(response).await, (status, expected.to_owned()), "{pairs:?}");
        }
        let ok = parse_form(&form(&[&base[..], &[("audience", "a"), ("audience", "b")]].concat())).unwrap();
        assert!(matches!(ok.requested, Requested::Jwt { ref audiences } if audiences == &["a", "b"]));
    }

    #[test]
    fn csr_in_pem_and_base64url() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        let der = csr.der().to_vec();
        assert_eq!(parse_csr(&csr.pem().unwrap()).unwrap(), der);
        assert_eq!(parse_csr(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der)).unwrap(), der);
        let mut tampered = der.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(parse_csr(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tampered)).is_err());
        assert!(parse_csr("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());
    }
}
