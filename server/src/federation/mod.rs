//! SPIFFE federation (conformance §6): serving this trust domain's bundle, and fetching the
//! bundles of the trust domains this one federates with.
//!
//! - [`endpoint`]: the bundle endpoint (`[federation.bundle_endpoint]`), profiles `https_web`
//!   and `https_spiffe`.
//! - [`client`]: one fetch of a foreign bundle, with every check on the answer.
//! - This module: relationships and their refresh loops ([`Federation`]).
//!
//! # Relationships
//!
//! A relationship is `(trust domain, endpoint URL, profile [, endpoint SPIFFE ID, bootstrap
//! bundle | CA file])`, read from `[[federation.federates_with]]` at start-up. Each one gets
//! a task that fetches at once, then again after the fetched bundle's `spiffe_refresh_hint`
//! bounded to [[`MIN_REFRESH`], [`MAX_REFRESH`]] ([`DEFAULT_REFRESH`] without a hint). A
//! failed fetch is logged with its reason, keeps the last good bundle untouched, and is retried
//! at the next interval (no aggressive retry, as the spec asks).
//!
//! A good bundle is stored with the datastore's `set_bundle` under its trust domain (only when
//! its authorities changed, so an unchanged bundle does not wake every agent), which is where
//! the agent API sync reads federated bundles for entries that federate with that trust
//! domain.
//!
//! `https_spiffe` authenticates the endpoint with the bundle of the endpoint ID's trust
//! domain: this server's own bundle, else the stored bundle of that trust domain (for a
//! self-serving endpoint, the last one fetched), else `trust_bundle_path` (the bootstrap).
//!
//! # Not built yet
//!
//! Relationships are static: there are no admin RPCs or `tessera-server federation` commands
//! to create or delete them at run time, and removing one from the configuration does not
//! delete the bundle it stored (`tessera-server bundle delete` does). [`FederationHandle`]
//! (`refresh`, `status`) is the seam those commands would call.

pub mod client;
pub(crate) mod endpoint;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::{SpiffeId, TrustDomain};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{BundleEndpointProfile, FederatesWithConfig};
use crate::datastore::{DataStoreError, blocking};
use crate::server::ServerState;
use client::{EndpointAuth, FetchError};

/// Shortest interval between two scheduled fetches, whatever the hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Longest interval between two scheduled fetches.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Interval when the bundle has no refresh hint (the spec's default).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Largest bootstrap or CA file read.
const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Checks a bundle endpoint URL: `https`, a host, no user info, no fragment.
pub fn check_url(value: &str) -> Result<(), String> {
    let url = url::Url::parse(value).map_err(|err| format!("{value:?} is not a URL: {err}"))?;
    if url.scheme() != "https" {
        return Err(format!("{value:?} must be an https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{value:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{value:?} must not contain user info"));
    }
    if url.fragment().is_some() {
        return Err(format!("{value:?} must not have a fragment"));
    }
    Ok(())
}

/// Checks one configured relationship on its own; returns the dotted key to blame.
pub fn check_relationship(config: &FederatesWithConfig) -> Result<(), (&'static str, String)> {
    check_url(&config.bundle_endpoint_url)
        .map_err(|message| ("federation.federates_with.bundle_endpoint_url", message))?;
    match config.profile {
        BundleEndpointProfile::HttpsSpiffe => {
            let Some(id) = &config.endpoint_spiffe_id else {
                return Err((
                    "federation.federates_with.endpoint_spiffe_id",
                    "is required by the https_spiffe profile".into(),
                ));
            };
            SpiffeId::parse(id).map_err(|err| {
                ("federation.federates_with.endpoint_spiffe_id", format!("{id:?} is not a SPIFFE ID: {err}"))
            })?;
            if config.ca_bundle_path.is_some() {
                return Err((
                    "federation.federates_with.ca_bundle_path",
                    "only the https_web profile takes a CA file; https_spiffe uses trust_bundle_path".into(),
                ));
            }
        }
        BundleEndpointProfile::HttpsWeb => {
            if config.endpoint_spiffe_id.is_some() {
                return Err((
                    "federation.federates_with.endpoint_spiffe_id",
                    "only the https_spiffe profile takes it".into(),
                ));
            }
            if config.trust_bundle_path.is_some() {
                return Err((
                    "federation.federates_with.trust_bundle_path",
                    "only the https_spiffe profile takes it; https_web uses ca_bundle_path or the system roots".into(),
                ));
            }
        }
    }
    Ok(())
}

/// A relationship ready to run: URL parsed, files read.
#[derive(Debug, Clone)]
pub struct Relationship {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint.
    pub url: url::Url,
    /// How the endpoint is authenticated.
    pub profile: Profile,
}

/// The per-profile settings of a [`Relationship`].
#[derive(Debug, Clone)]
pub enum Profile {
    /// `https_web`.
    Web {
        /// Roots to trust.
        roots: Arc<RootCertStore>,
    },
    /// `https_spiffe`.
    Spiffe {
        /// The ID the endpoint must present.
        endpoint_id: SpiffeId,
        /// The operator-supplied bundle of the endpoint's trust domain, for the first fetch.
        bootstrap: Option<Bundle>,
    },
}

impl Relationship {
    /// Resolves a configured relationship (blocking: reads files).
    pub fn from_config(config: &FederatesWithConfig) -> Result<Self, String> {
        check_relationship(config).map_err(|(key, message)| format!("{key}: {message}"))?;
        let url = url::Url::parse(&config.bundle_endpoint_url).map_err(|err| err.to_string())?;
        let profile = match config.profile {
            BundleEndpointProfile::HttpsWeb => {
                let roots = match &config.ca_bundle_path {
                    Some(path) => read_roots(path)?,
                    None => system_roots()?,
                };
                Profile::Web { roots: Arc::new(roots) }
            }
            BundleEndpointProfile::HttpsSpiffe => {
                let id = config.endpoint_spiffe_id.as_deref().unwrap_or_default();
                let endpoint_id = SpiffeId::parse(id).map_err(|err| format!("endpoint_spiffe_id {id:?}: {err}"))?;
                let bootstrap = match &config.trust_bundle_path {
                    Some(path) => Some(read_bundle(path, &endpoint_id.trust_domain())?),
                    None => None,
                };
                Profile::Spiffe { endpoint_id, bootstrap }
            }
        };
        Ok(Self { trust_domain: config.trust_domain.clone(), url, profile })
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut data).map_err(|err| format!("{}: {err}", path.display()))?;
    if data.len() as u64 > MAX_FILE_LEN {
        return Err(format!("{}: larger than {MAX_FILE_LEN} bytes", path.display()));
    }
    Ok(data)
}

/// A bootstrap bundle: SPIFFE bundle JSON, or PEM X.509 roots.
fn read_bundle(path: &Path, trust_domain: &TrustDomain) -> Result<Bundle, String> {
    let data = read_limited(path)?;
    let bundle = if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        Bundle::from_json(trust_domain.clone(), &data)
    } else {
        Bundle::from_x509_authorities_pem(trust_domain.clone(), &data)
    }
    .map_err(|err| format!("trust_bundle_path {}: {err}", path.display()))?;
    if bundle.x509_authorities().len() == 0 {
        return Err(format!("trust_bundle_path {}: holds no X.509 authority", path.display()));
    }
    Ok(bundle)
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let data = read_limited(path)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&data) {
        let cert = cert.map_err(|err| format!("ca_bundle_path {}: {err}", path.display()))?;
        roots.add(cert).map_err(|err| format!("ca_bundle_path {}: {err}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("ca_bundle_path {}: no PEM certificate in it", path.display()));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        return Err(format!("no system root certificate could be loaded ({})", errors.join("; ")));
    }
    Ok(roots)
}

/// What is known about one relationship, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationshipStatus {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint.
    pub url: String,
    /// When the last fetch succeeded.
    pub last_success: Option<SystemTime>,
    /// Why the last fetch failed, if it did.
    pub last_error: Option<String>,
    /// When the next scheduled fetch happens.
    pub next_refresh: Option<SystemTime>,
}

type RefreshReply = oneshot::Sender<Result<Bundle, String>>;

#[derive(Debug)]
struct Running {
    refresh: mpsc::Sender<RefreshReply>,
    status: Arc<Mutex<RelationshipStatus>>,
}

/// Control of the running relationships.
#[derive(Debug, Clone, Default)]
pub struct FederationHandle {
    running: Arc<Mutex<BTreeMap<TrustDomain, Running>>>,
}

impl FederationHandle {
    /// Fetches `trust_domain`'s bundle now and returns it as stored, or why it was not.
    pub async fn refresh(&self, trust_domain: &TrustDomain) -> Result<Bundle, String> {
        let sender = {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            let entry =
                running.get(trust_domain).ok_or_else(|| format!("no federation relationship with {trust_domain}"))?;
            entry.refresh.clone()
        };
        let (reply, answer) = oneshot::channel();
        sender.send(reply).await.map_err(|_| "the relationship's task has stopped".to_owned())?;
        answer.await.map_err(|_| "the relationship's task has stopped".to_owned())?
    }

    /// The status of every relationship, by trust domain.
    pub fn status(&self) -> Vec<RelationshipStatus> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.values().map(|r| r.status.lock().unwrap_or_else(PoisonError::into_inner).clone()).collect()
    }

    /// Starts the refresh task of `relationship` (replacing a previous one of its trust
    /// domain, which stops).
    pub(crate) fn start(&self, state: Arc<ServerState>, relationship: Relationship, stopped: watch::Receiver<bool>) {
        let (refresh, requests) = mpsc::channel(4);
        let status = Arc::new(Mutex::new(RelationshipStatus {
            trust_domain: relationship.trust_domain.clone(),
            url: relationship.url.to_string(),
            last_success: None,
            last_error: None,
            next_refresh: None,
        }));
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(relationship.trust_domain.clone(), Running { refresh, status: Arc::clone(&status) });
        tokio::spawn(refresh_loop(state, relationship, status, requests, stopped));
    }
}

async fn refresh_loop(
    state: Arc<ServerState>,
    relationship: Relationship,
    status: Arc<Mutex<RelationshipStatus>>,
    mut requests: mpsc::Receiver<RefreshReply>,
    stopped: watch::Receiver<bool>,
) {
    let td = relationship.trust_domain.clone();
    let mut interval = DEFAULT_REFRESH;
    let mut wait = Duration::ZERO;
    loop {
        let reply = tokio::select! {
            () = crate::server::stop_requested(stopped.clone()) => return,
            () = tokio::time::sleep(wait) => None,
            request = requests.recv() => match request {
                Some(reply) => Some(reply),
                None => return,
            },
        };
        let outcome = tokio::select! {
            () = crate::server::stop_requested(stopped.clone()) => return,
            outcome = refresh_once(&state, &relationship) => outcome,
        };
        let now = SystemTime::now();
        {
            let mut status = status.lock().unwrap_or_else(PoisonError::into_inner);
            match &outcome {
                Ok(bundle) => {
                    interval = bundle.refresh_hint().unwrap_or(DEFAULT_REFRESH).clamp(MIN_REFRESH, MAX_REFRESH);
                    status.last_success = Some(now);
                    status.last_error = None;
                }
                Err(err) => {
                    tracing::warn!(
                        trust_domain = %td,
                        url = %relationship.url,
                        error = %err,
                        retry_in = ?interval,
                        "federated bundle fetch failed; keeping the last good bundle"
                    );
                    status.last_error = Some(err.clone());
                }
            }
            status.next_refresh = Some(now + interval);
        }
        wait = interval;
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
}

/// One fetch; on success the bundle is stored (if it changed) and returned as stored.
async fn refresh_once(state: &Arc<ServerState>, relationship: &Relationship) -> Result<Bundle, String> {
    let auth = match &relationship.profile {
        Profile::Web { roots } => EndpointAuth::Web { roots: Arc::clone(roots) },
        Profile::Spiffe { endpoint_id, bootstrap } => {
            let bundle = endpoint_bundle(state, &endpoint_id.trust_domain(), bootstrap.as_ref()).await?;
            EndpointAuth::Spiffe { endpoint_id: endpoint_id.clone(), bundle }
        }
    };
    let fetched = client::fetch(&relationship.url, &relationship.trust_domain, &auth)
        .await
        .map_err(|err: FetchError| err.to_string())?;
    store(state, &relationship.trust_domain, fetched).await
}

/// The bundle that authenticates an endpoint of `trust_domain`.
async fn endpoint_bundle(
    state: &Arc<ServerState>,
    trust_domain: &TrustDomain,
    bootstrap: Option<&Bundle>,
) -> Result<Bundle, String> {
    if trust_domain == state.trust_domain() {
        return Ok(state.ca().bundle());
    }
    if let Some(stored) = stored_bundle(state, trust_domain).await? {
        return Ok(stored);
    }
    bootstrap.cloned().ok_or_else(|| {
        format!(
            "no bundle of {trust_domain} is known to authenticate the endpoint: set trust_bundle_path \
             (or `tessera-server bundle set --id spiffe://<td>`) for the first fetch"
        )
    })
}

async fn stored_bundle(state: &Arc<ServerState>, trust_domain: &TrustDomain) -> Result<Option<Bundle>, String> {
    let lookup = trust_domain.clone();
    let record = blocking(state.datastore(), move |store| store.get_bundle(&lookup))
        .await
        .map_err(|err| format!("datastore: {err}"))?;
    match record {
        None => Ok(None),
        Some(record) => {
            let mut bundle = Bundle::from_json(trust_domain.clone(), &record.data)
                .map_err(|err| format!("the stored bundle of {trust_domain} is unreadable: {err}"))?;
            bundle.set_sequence(record.sequence);
            Ok(Some(bundle))
        }
    }
}

fn same_authorities(a: &Bundle, b: &Bundle) -> bool {
    let mut left: Vec<&[u8]> = a.x509_authorities().collect();
    let mut right: Vec<&[u8]> = b.x509_authorities().collect();
    left.sort_unstable();
    right.sort_unstable();
    left == right && a.jwt_authorities() == b.jwt_authorities()
}

/// Stores `fetched` as the bundle of `trust_domain` unless the stored one has the same
/// authorities; returns the bundle as stored (datastore sequence).
async fn store(state: &Arc<ServerState>, trust_domain: &TrustDomain, mut fetched: Bundle) -> Result<Bundle, String> {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let current = stored_bundle(state, trust_domain).await?;
        if let Some(current) = &current
            && same_authorities(current, &fetched)
        {
            let mut unchanged = current.clone();
            unchanged.set_refresh_hint(fetched.refresh_hint());
            return Ok(unchanged);
        }
        let expected = current.as_ref().map_or(0, Bundle::sequence);
        fetched.set_sequence(expected.saturating_add(1));
        let (td, json) = (trust_domain.clone(), fetched.to_json());
        match blocking(state.datastore(), move |store| store.set_bundle(&td, json.as_bytes(), Some(expected))).await {
            Ok(stored) => {
                fetched.set_sequence(stored.sequence);
                tracing::info!(trust_domain = %trust_domain, sequence = stored.sequence, "federated bundle updated");
                return Ok(fetched);
            }
            Err(DataStoreError::Conflict { .. }) => continue,
            Err(err) => return Err(format!("datastore: {err}")),
        }
    }
    Err(format!("the bundle of {trust_domain} kept changing while it was stored"))
}
