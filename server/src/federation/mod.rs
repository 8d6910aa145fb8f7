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
//! bundle | CA bundle])` ([`RelationshipSpec`]). It comes from `[[federation.federates_with]]`
//! (source `config`, files read at start-up) or from the admin API (source `api`, stored in
//! the datastore as JSON with the file contents inlined, see `crate::admin` and
//! `DataStore::put_federation_relationship`). At start every one gets a task; when a trust
//! domain is in both, the configuration file wins (logged).
//!
//! Each task fetches at once, then again after the fetched bundle's `spiffe_refresh_hint`
//! bounded to [[`MIN_REFRESH`], [`MAX_REFRESH`]] ([`DEFAULT_REFRESH`] without a hint). A
//! failed fetch is logged with its reason, keeps the last good bundle untouched, and is retried
//! at the next interval (no aggressive retry, as the spec asks). [`FederationHandle::refresh`]
//! fetches now (the admin `RefreshFederationRelationship`, and tests).
//!
//! A good bundle is stored with the datastore's `set_bundle` under its trust domain (only when
//! its authorities changed, so an unchanged bundle does not wake every agent), which is where
//! the agent API sync reads federated bundles for entries that federate with that trust
//! domain. Deleting a relationship through the API stops its task (a fetch in flight cannot
//! store afterwards: see `Removed`) and then deletes the bundle, so agents drop it.
//!
//! `https_spiffe` authenticates the endpoint with the bundle of the endpoint ID's trust
//! domain: this server's own bundle, else the stored bundle of that trust domain (for a
//! self-serving endpoint, the last one fetched), else the bootstrap bundle.
//!
//! # Known limits
//!
//! - Removing a relationship from the configuration file does not delete the bundle it stored
//!   (`tessera-server bundle delete` does); API relationships delete theirs.
//! - Redirects are reported, not followed.
//! - A stored relationship that no longer resolves at start (e.g. unreadable JSON) is logged
//!   and not listed until `federation update` replaces it.

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

/// Where a relationship comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `[[federation.federates_with]]` in the configuration file (read-only through the API).
    Config,
    /// Created through the admin API and persisted in the datastore.
    Api,
}

impl Source {
    /// `config` or `api`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Api => "api",
        }
    }
}

/// A relationship as the operator specified it, with file contents inlined: the form stored
/// in the datastore (JSON) and shown by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelationshipSpec {
    /// The foreign trust domain name.
    pub trust_domain: String,
    /// Its bundle endpoint URL.
    pub bundle_endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// `https_spiffe`: the endpoint's SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_spiffe_id: Option<String>,
    /// `https_spiffe`: bootstrap bundle (SPIFFE JSON or PEM) of the endpoint ID's trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<String>,
    /// `https_web`: PEM roots instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
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
    /// As specified.
    pub spec: RelationshipSpec,
    /// Where it comes from.
    pub source: Source,
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
        let read = |path: &Option<std::path::PathBuf>, what: &str| -> Result<Option<String>, String> {
            match path {
                None => Ok(None),
                Some(path) => {
                    let data = read_limited(path)?;
                    String::from_utf8(data).map(Some).map_err(|_| format!("{what} {}: not UTF-8 text", path.display()))
                }
            }
        };
        let spec = RelationshipSpec {
            trust_domain: config.trust_domain.name().to_owned(),
            bundle_endpoint_url: config.bundle_endpoint_url.clone(),
            profile: config.profile.as_str().to_owned(),
            endpoint_spiffe_id: config.endpoint_spiffe_id.clone(),
            trust_bundle: read(&config.trust_bundle_path, "trust_bundle_path")?,
            ca_bundle: read(&config.ca_bundle_path, "ca_bundle_path")?,
        };
        Self::from_spec(spec, Source::Config).map_err(|(field, message)| format!("{field}: {message}"))
    }

    /// Checks and resolves a specification; errors name the field at fault.
    pub fn from_spec(spec: RelationshipSpec, source: Source) -> Result<Self, (&'static str, String)> {
        let trust_domain = TrustDomain::new(&spec.trust_domain)
            .map_err(|err| ("trust_domain", format!("{:?} is not a valid trust domain: {err}", spec.trust_domain)))?;
        check_url(&spec.bundle_endpoint_url).map_err(|message| ("bundle_endpoint_url", message))?;
        let url = url::Url::parse(&spec.bundle_endpoint_url).map_err(|err| ("bundle_endpoint_url", err.to_string()))?;
        let profile_kind: BundleEndpointProfile = spec.profile.parse().map_err(|message| ("profile", message))?;
        let profile = match profile_kind {
            BundleEndpointProfile::HttpsWeb => {
                if spec.endpoint_spiffe_id.is_some() || spec.trust_bundle.is_some() {
                    return Err((
                        "profile",
                        "https_web takes neither an endpoint SPIFFE ID nor a trust bundle (only a CA bundle)".into(),
                    ));
                }
                let roots = match &spec.ca_bundle {
                    Some(pem) => read_roots(pem.as_bytes()).map_err(|message| ("ca_bundle", message))?,
                    None => system_roots().map_err(|message| ("ca_bundle", message))?,
                };
                Profile::Web { roots: Arc::new(roots) }
            }
            BundleEndpointProfile::HttpsSpiffe => {
                if spec.ca_bundle.is_some() {
                    return Err(("ca_bundle", "only the https_web profile takes a CA bundle".into()));
                }
                let id = spec
                    .endpoint_spiffe_id
                    .as_deref()
                    .ok_or(("endpoint_spiffe_id", "is required by the https_spiffe profile".to_owned()))?;
                let endpoint_id = SpiffeId::parse(id)
                    .map_err(|err| ("endpoint_spiffe_id", format!("{id:?} is not a SPIFFE ID: {err}")))?;
                let bootstrap = match &spec.trust_bundle {
                    Some(text) => Some(
                        parse_bootstrap(text.as_bytes(), &endpoint_id.trust_domain())
                            .map_err(|message| ("trust_bundle", message))?,
                    ),
                    None => None,
                };
                Profile::Spiffe { endpoint_id, bootstrap }
            }
        };
        Ok(Self { trust_domain, url, profile, spec, source })
    }
}

pub(crate) fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
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
fn parse_bootstrap(data: &[u8], trust_domain: &TrustDomain) -> Result<Bundle, String> {
    if data.len() as u64 > MAX_FILE_LEN {
        return Err(format!("larger than {MAX_FILE_LEN} bytes"));
    }
    let bundle = if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        Bundle::from_json(trust_domain.clone(), data)
    } else {
        Bundle::from_x509_authorities_pem(trust_domain.clone(), data)
    }
    .map_err(|err| err.to_string())?;
    if bundle.x509_authorities().len() == 0 {
        return Err("holds no X.509 authority".into());
    }
    Ok(bundle)
}

pub(crate) fn read_roots(data: &[u8]) -> Result<RootCertStore, String> {
    if data.len() as u64 > MAX_FILE_LEN {
        return Err(format!("larger than {MAX_FILE_LEN} bytes"));
    }
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(data) {
        let cert = cert.map_err(|err| err.to_string())?;
        roots.add(cert).map_err(|err| err.to_string())?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(roots)
}

pub(crate) fn system_roots() -> Result<RootCertStore, String> {
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

/// Set once a relationship is removed; held across "check, then store" so a fetch that was
/// in flight cannot store a bundle after the removal deleted it.
type Removed = Arc<tokio::sync::Mutex<bool>>;

#[derive(Debug)]
struct Running {
    relationship: Relationship,
    refresh: mpsc::Sender<RefreshReply>,
    status: Arc<Mutex<RelationshipStatus>>,
    removed: Removed,
}

/// Control of the running relationships (one per server, in its `ServerState`).
#[derive(Debug, Default)]
pub struct FederationHandle {
    running: Mutex<BTreeMap<TrustDomain, Running>>,
    stopped: Mutex<Option<watch::Receiver<bool>>>,
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

    /// Every relationship with its status, by trust domain.
    pub fn list(&self) -> Vec<(Relationship, RelationshipStatus)> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running
            .values()
            .map(|r| (r.relationship.clone(), r.status.lock().unwrap_or_else(PoisonError::into_inner).clone()))
            .collect()
    }

    /// One relationship with its status.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<(Relationship, RelationshipStatus)> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running
            .get(trust_domain)
            .map(|r| (r.relationship.clone(), r.status.lock().unwrap_or_else(PoisonError::into_inner).clone()))
    }

    /// Remembers the server's stop signal, for relationships started later.
    pub(crate) fn attach(&self, stopped: watch::Receiver<bool>) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = Some(stopped);
    }

    /// Starts the refresh task of `relationship`, replacing (stopping) a previous one of its
    /// trust domain. Does nothing before [`Self::attach`] (the server is not running).
    pub(crate) async fn start(&self, state: Arc<ServerState>, relationship: Relationship) {
        let Some(stopped) = self.stopped.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return;
        };
        let _ = self.stop(&relationship.trust_domain).await;
        let (refresh, requests) = mpsc::channel(4);
        let status = Arc::new(Mutex::new(RelationshipStatus {
            trust_domain: relationship.trust_domain.clone(),
            url: relationship.url.to_string(),
            last_success: None,
            last_error: None,
            next_refresh: None,
        }));
        let removed: Removed = Arc::default();
        self.running.lock().unwrap_or_else(PoisonError::into_inner).insert(
            relationship.trust_domain.clone(),
            Running {
                relationship: relationship.clone(),
                refresh,
                status: Arc::clone(&status),
                removed: Arc::clone(&removed),
            },
        );
        tokio::spawn(refresh_loop(state, relationship, status, removed, requests, stopped));
    }

    /// Stops the relationship's task; once this returns, it will store nothing more.
    /// Returns whether there was one.
    pub(crate) async fn stop(&self, trust_domain: &TrustDomain) -> bool {
        let removed = self.running.lock().unwrap_or_else(PoisonError::into_inner).remove(trust_domain);
        match removed {
            Some(running) => {
                // Dropping `running.refresh` ends the task's loop; the flag stops a fetch in flight.
                *running.removed.lock().await = true;
                true
            }
            None => false,
        }
    }
}

async fn refresh_loop(
    state: Arc<ServerState>,
    relationship: Relationship,
    status: Arc<Mutex<RelationshipStatus>>,
    removed: Removed,
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
            outcome = refresh_once(&state, &relationship, &removed) => outcome,
        };
        if *removed.lock().await {
            return;
        }
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
async fn refresh_once(
    state: &Arc<ServerState>,
    relationship: &Relationship,
    removed: &Removed,
) -> Result<Bundle, String> {
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
    let removed = removed.lock().await;
    if *removed {
        return Err("the relationship was removed".into());
    }
    store(state, &relationship.trust_domain, fetched).await
}

/// Encodes a specification for the datastore.
pub(crate) fn encode_spec(spec: &RelationshipSpec) -> Result<Vec<u8>, String> {
    serde_json::to_vec(spec).map_err(|err| err.to_string())
}

/// Decodes a specification from the datastore.
pub(crate) fn decode_spec(data: &[u8]) -> Result<RelationshipSpec, String> {
    serde_json::from_slice(data).map_err(|err| err.to_string())
}

/// Starts every relationship: the configured ones, then those stored through the admin API
/// (a stored one whose trust domain is also configured is skipped with a warning: the
/// configuration file wins).
pub(crate) async fn start_all(state: &Arc<ServerState>, configured: Vec<Relationship>) -> Result<(), String> {
    let handle = state.federation();
    let mut names: Vec<TrustDomain> = Vec::new();
    for relationship in configured {
        names.push(relationship.trust_domain.clone());
        handle.start(Arc::clone(state), relationship).await;
    }
    let stored = blocking(state.datastore(), |store| store.list_federation_relationships())
        .await
        .map_err(|err| format!("cannot read the stored federation relationships: {err}"))?;
    for record in stored {
        if names.contains(&record.trust_domain) {
            tracing::warn!(
                trust_domain = %record.trust_domain,
                "a federation relationship stored through the admin API is also in the configuration file; \
                 the configuration file wins"
            );
            continue;
        }
        let relationship = decode_spec(&record.data)
            .map_err(|err| ("data", err))
            .and_then(|spec| Relationship::from_spec(spec, Source::Api));
        match relationship {
            Ok(relationship) => handle.start(Arc::clone(state), relationship).await,
            Err((field, err)) => tracing::error!(
                trust_domain = %record.trust_domain,
                error = %format!("{field}: {err}"),
                "a stored federation relationship is unusable; fix it with `tessera-server federation update`"
            ),
        }
    }
    Ok(())
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
                state.audit().emit(
                    tessera_common::audit::AuditEvent::new("federation.bundle_changed")
                        .field("trust_domain", trust_domain.name())
                        .field("sequence", stored.sequence)
                        .field("x509_authorities", fetched.x509_authorities().count())
                        .field("jwt_authorities", fetched.jwt_authorities().len())
                        .field("source", "bundle_endpoint"),
                );
                return Ok(fetched);
            }
            Err(DataStoreError::Conflict { .. }) => continue,
            Err(err) => return Err(format!("datastore: {err}")),
        }
    }
    Err(format!("the bundle of {trust_domain} kept changing while it was stored"))
}
