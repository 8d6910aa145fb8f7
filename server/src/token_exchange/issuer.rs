//! A trusted issuer at run time: its settings and its signing keys, cached.
//!
//! Keys come from the inline `jwks` (never fetched), from `jwks_uri`, or from the `jwks_uri`
//! of the issuer's OIDC discovery document (`<issuer>/.well-known/openid-configuration`, whose
//! `issuer` must equal the configured one exactly). Fetches use the server's HTTPS client
//! (`crate::federation::client::https_get`, the bundle fetch's), with the system roots or the
//! issuer's `ca_bundle_path`, a size cap and [`FETCH_TIMEOUT`].
//!
//! The cache is filled on first use and refreshed when a token names a `kid` it does not hold
//! or when it is older than [`KEYS_MAX_AGE`], but never more often than once per
//! [`MIN_REFRESH_INTERVAL`] per issuer, whatever tokens arrive: a flood of tokens with made-up
//! key IDs costs at most one fetch per interval. A failed fetch keeps the previous keys.
//! Only tokens whose `iss` is a configured issuer get here, so an unknown issuer never causes
//! a fetch.
//!
//! [`IssuerSet`] is one list of trusted issuers (the exchange's, each k8s_psat cluster's, the
//! oidc node attestor's) and [`IssuerSet::verify`] the sequence of checks every token goes
//! through before anything specific to its use: known issuer, key, signature, `aud`, time
//! claims, lifetime, remaining life.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use serde_json::Value;

use super::jwks::{IssuerKey, KeySet, MAX_JWKS_LEN, parse_jwks};
use super::policy::{IssuerKeys, IssuerSettings};
use super::validate::{self, FailedCheck, Unverified, Verified};
use crate::federation::client::{EndpointAuth, client_config, https_get};

/// Shortest interval between two fetches of one issuer's keys.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Age after which cached keys are refreshed on the next token.
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);
/// Longest one refresh (discovery and JWKS) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document read.
const MAX_DISCOVERY_LEN: usize = 64 * 1024;
/// Where OIDC discovery lives under the issuer URL.
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// The cached keys and when they were last fetched.
#[derive(Debug, Default)]
struct Cached {
    keys: Arc<KeySet>,
    fetched_at: Option<Instant>,
}

/// A trusted issuer: settings plus keys.
#[derive(Debug)]
pub struct TrustedIssuer {
    /// The validation settings.
    pub settings: IssuerSettings,
    roots: Option<Arc<RootCertStore>>,
    cached: RwLock<Cached>,
    /// Held while fetching, so concurrent tokens wait for one fetch instead of each starting one.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
}

impl TrustedIssuer {
    /// An issuer whose fetches trust `roots` (`None` for an inline JWKS).
    pub fn new(settings: IssuerSettings, roots: Option<Arc<RootCertStore>>) -> Self {
        let keys = settings.inline_keys.clone().map(Arc::new).unwrap_or_default();
        Self {
            settings,
            roots,
            cached: RwLock::new(Cached { keys, fetched_at: None }),
            refresh: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        }
    }

    /// How many key fetches were attempted (for tests and logs).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn cached(&self) -> (Arc<KeySet>, Option<Instant>) {
        let cached = self.cached.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (Arc::clone(&cached.keys), cached.fetched_at)
    }

    /// The key with `kid`, refreshing the cache first when allowed and needed.
    pub async fn key(&self, kid: &str) -> Option<IssuerKey> {
        let (keys, fetched_at) = self.cached();
        if self.settings.inline_keys.is_some() {
            return keys.get(kid).cloned();
        }
        let stale = fetched_at.is_none_or(|at| at.elapsed() >= KEYS_MAX_AGE);
        if !stale && let Some(key) = keys.get(kid) {
            return Some(key.clone());
        }
        let mut last_attempt = self.refresh.lock().await;
        // Another request may have refreshed while this one waited.
        let (keys, fetched_at) = self.cached();
        let fresh = fetched_at.is_some_and(|at| at.elapsed() < KEYS_MAX_AGE);
        if let Some(key) = keys.get(kid)
            && fresh
        {
            return Some(key.clone());
        }
        if last_attempt.is_none_or(|at| at.elapsed() >= MIN_REFRESH_INTERVAL) {
            *last_attempt = Some(Instant::now());
            self.fetches.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
                Ok(Ok(fetched)) => {
                    tracing::info!(issuer = %self.settings.issuer, keys = fetched.len(), "token exchange: issuer keys fetched");
                    let mut cached = self.cached.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                    cached.keys = Arc::new(fetched);
                    cached.fetched_at = Some(Instant::now());
                }
                Ok(Err(reason)) => {
                    tracing::warn!(issuer = %self.settings.issuer, %reason, "token exchange: cannot fetch issuer keys; keeping the previous ones");
                }
                Err(_) => {
                    tracing::warn!(issuer = %self.settings.issuer, "token exchange: fetching issuer keys timed out; keeping the previous ones");
                }
            }
        }
        drop(last_attempt);
        self.cached().0.get(kid).cloned()
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let roots = self.roots.clone().ok_or("no roots to authenticate the issuer with")?;
        let tls = || {
            client_config(&EndpointAuth::Web { roots: Arc::clone(&roots) })
                .map_err(|err| format!("TLS configuration: {err}"))
        };
        let jwks_uri = match &self.settings.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let url = format!("{}{DISCOVERY_PATH}", self.settings.issuer.trim_end_matches('/'));
                let url = url::Url::parse(&url).map_err(|err| format!("discovery URL {url:?}: {err}"))?;
                let (body, _) = https_get(&url, tls()?, "application/json", MAX_DISCOVERY_LEN)
                    .await
                    .map_err(|err| format!("discovery {url}: {err}"))?;
                let document: Value =
                    serde_json::from_slice(&body).map_err(|err| format!("discovery {url}: not JSON: {err}"))?;
                if document.get("issuer").and_then(Value::as_str) != Some(self.settings.issuer.as_str()) {
                    return Err(format!("discovery {url}: its \"issuer\" is not {:?}", self.settings.issuer));
                }
                let uri =
                    document.get("jwks_uri").and_then(Value::as_str).ok_or(format!("discovery {url}: no jwks_uri"))?;
                crate::federation::check_url(uri).map_err(|err| format!("discovery {url}: jwks_uri: {err}"))?;
                url::Url::parse(uri).map_err(|err| format!("discovery {url}: jwks_uri: {err}"))?
            }
        };
        let (body, _) = https_get(&jwks_uri, tls()?, "application/json", MAX_JWKS_LEN)
            .await
            .map_err(|err| format!("JWKS {jwks_uri}: {err}"))?;
        parse_jwks(&body).map_err(|err| format!("JWKS {jwks_uri}: {err}"))
    }
}

/// Trusted issuers by their exact `iss`.
#[derive(Debug, Default)]
pub struct IssuerSet {
    issuers: HashMap<String, Arc<TrustedIssuer>>,
}

/// A token that passed [`IssuerSet::verify`].
#[derive(Debug, Clone)]
pub struct Checked {
    /// The issuer that signed it.
    pub issuer: Arc<TrustedIssuer>,
    /// The verified token.
    pub token: Verified,
    /// How long it stays valid (at least one second).
    pub remaining: Duration,
}

impl IssuerSet {
    /// Builds the set from compiled settings and, for each, its `ca_bundle_path`. Blocking:
    /// reads the CA files (or the system roots, once, for issuers fetched without one). Errors
    /// name the key of `keys` and the file.
    pub fn load<'a>(
        settings: Vec<IssuerSettings>,
        ca_bundle_paths: impl IntoIterator<Item = Option<&'a Path>>,
        keys: &IssuerKeys,
    ) -> Result<Self, (&'static str, String)> {
        let key = keys.ca_bundle_path;
        let mut issuers = HashMap::new();
        let system_roots = std::sync::OnceLock::new();
        for (settings, ca_bundle_path) in settings.into_iter().zip(ca_bundle_paths) {
            let roots = if settings.inline_keys.is_some() {
                None
            } else if let Some(path) = ca_bundle_path {
                let data = crate::federation::read_limited(path).map_err(|message| (key, message))?;
                let roots = crate::federation::read_roots(&data)
                    .map_err(|message| (key, format!("{}: {message}", path.display())))?;
                Some(Arc::new(roots))
            } else {
                let roots = system_roots.get_or_init(|| crate::federation::system_roots().map(Arc::new));
                Some(Arc::clone(roots.as_ref().map_err(|message| (key, message.clone()))?))
            };
            issuers.insert(settings.issuer.clone(), Arc::new(TrustedIssuer::new(settings, roots)));
        }
        Ok(Self { issuers })
    }

    /// The trusted issuer with this exact `iss`.
    pub fn get(&self, iss: &str) -> Option<&Arc<TrustedIssuer>> {
        self.issuers.get(iss)
    }

    /// The checks every token passes, in the contract's order: known issuer (an unknown one
    /// is refused before any network access), key by `kid` (fetched at a bounded rate),
    /// [`validate::verify`] (algorithm, signature, `aud`, time claims with the leeway,
    /// lifetime, `jti` shape), and at least one second of life left.
    pub async fn verify(&self, token: &Unverified) -> Result<Checked, FailedCheck> {
        let issuer = self.issuers.get(&token.issuer).ok_or(FailedCheck::UnknownIssuer)?;
        let key = issuer.key(&token.key_id).await.ok_or(FailedCheck::UnknownKey)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
        let verified = validate::verify(&issuer.settings, token, &key, now)?;
        // Too little life left is as good as expired.
        let remaining = Duration::from_secs(verified.expires_at.saturating_sub(now));
        if remaining < Duration::from_secs(1) {
            return Err(FailedCheck::Expired);
        }
        Ok(Checked { issuer: Arc::clone(issuer), token: verified, remaining })
    }
}
