//! The agent's server side: attestation, agent SVID renewal, the entry sync stream, workload
//! X.509-SVID minting and rotation, and JWT-SVIDs. The manager is the only writer of the
//! [`Cache`]: each change publishes a new snapshot.
//!
//! # Life cycle
//!
//! [`start`]:
//! 1. opens `data_dir` ([`Storage`]) and loads the persisted agent SVID and bundle;
//! 2. if the persisted SVID is still valid it is used as is (a join token is single-use, so
//!    an agent must be able to restart without one); otherwise the agent attests with its
//!    join token, node certificate (`x509pop`) or token file (`k8s_psat`, `oidc`) ([`attest`]). A refused token ends `start` with
//!    [`ManagerError::AttestationRefused`] carrying the server's reason; an unreachable server
//!    is retried with backoff;
//! 3. spawns three tasks that run until [`RunningManager::shutdown`]:
//!    - [`sync`]: holds one `SyncEntries` stream, applies its events to the [`State`],
//!      reconnects with the last applied revision after any failure (exponential backoff with
//!      jitter, capped at 30 s) while the cache keeps serving what it has;
//!    - [`mint`]: one scheduler for every workload SVID: mints for new or changed entries
//!      (a few milliseconds after the change, in batches of [`mint::BATCH_SIZE`]) and renews
//!      each SVID at half its lifetime ± 10%;
//!    - [`renew`]: renews the agent SVID at half its lifetime ± 10% with a new key, persists
//!      it, and switches the connection to it.
//!
//! Forced rotation: the sync stream's `bundles` event also names the server's tainted
//! authorities. Workload SVIDs and the agent SVID signed by a tainted X.509 CA are renewed
//! early, at a point spread over [`state::TAINT_SPREAD`] (by entry or agent ID) so a fleet does
//! not re-mint in one burst; cached JWT-SVIDs signed by a tainted key are fetched again.
//!
//! JWT-SVIDs are fetched on demand through [`jwt::JwtSvids`], the [`JwtSvidSource`] handed
//! to the Workload API.
//!
//! Trust: the server's certificate is verified against the trust store (see
//! [`crate::client::tls`]); it starts as the cached bundle, else `trust_bundle_path`, else
//! (with `insecure_bootstrap`) trust on first use, and follows the bundles the sync stream
//! delivers.

pub mod attest;
pub mod jwt;
pub mod keys;
pub mod mint;
pub mod node_token;
pub mod renew;
pub mod state;
pub mod sync;
pub mod x509pop;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::cache::{Cache, JwtSvidSource};
use crate::client::ServerClient;
use crate::client::tls::{ServerVerifier, TrustState, TrustStore};
use crate::config::AgentConfig;
use crate::storage::{AgentCredential, Storage, StorageError};
use state::State;

/// Why the manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Reading or writing `data_dir` failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The server refused attestation; retrying cannot help.
    #[error("the server refused attestation: {0}")]
    AttestationRefused(String),
    /// There is no valid agent SVID and no join token to attest with.
    #[error(
        "no valid agent SVID in {data_dir} and no join token: pass --join-token (or set join_token) to attest this agent"
    )]
    NoJoinToken {
        /// The data directory searched.
        data_dir: String,
    },
    /// No way to authenticate the server on first contact.
    #[error(
        "cannot authenticate the server: no cached bundle in {data_dir}; set trust_bundle_path (or insecure_bootstrap \
         for tests)"
    )]
    NoTrustAnchor {
        /// The data directory searched.
        data_dir: String,
    },
    /// `trust_bundle_path` could not be used.
    #[error("trust_bundle_path {path}: {message}")]
    TrustBundle {
        /// The configured path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Anything else that prevents start-up.
    #[error("{0}")]
    Other(String),
}

/// What the agent reports about its connection to the server (for `healthcheck` and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// The agent has a valid agent SVID.
    pub attested: bool,
    /// The agent's SPIFFE ID.
    pub agent_id: Option<SpiffeId>,
    /// notAfter of the agent SVID.
    pub agent_svid_expires_at: Option<SystemTime>,
    /// The sync stream is currently open.
    pub connected: bool,
    /// When the sync stream last reported `synced` (or applied a change after that).
    pub last_sync: Option<SystemTime>,
    /// Last applied datastore revision.
    pub revision: u64,
}

impl AgentStatus {
    /// Attested and synced at least once: what `healthcheck` requires of the manager.
    pub fn is_healthy(&self) -> bool {
        self.attested && self.last_sync.is_some()
    }
}

/// State shared by the manager's tasks.
pub(crate) struct Shared {
    pub(crate) trust_domain: TrustDomain,
    pub(crate) cache: Arc<Cache>,
    pub(crate) client: ServerClient,
    pub(crate) trust: TrustStore,
    pub(crate) storage: Storage,
    pub(crate) state: Mutex<State>,
    pub(crate) credential: Mutex<AgentCredential>,
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) mint_wakeup: Notify,
    /// Wakes the agent SVID renewal (an authority was tainted).
    pub(crate) renew_wakeup: Notify,
    pub(crate) rng: SystemRandom,
    /// Evidence to attest again with when the server no longer accepts the agent SVID
    /// (evicted, expired); `None` for join tokens, which attest once.
    pub(crate) reattest: Option<attest::Evidence>,
    /// Failed calls and broken streams to the server (a metric).
    pub(crate) server_errors: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn credential(&self) -> AgentCredential {
        self.credential.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Switches to a new agent SVID (renewed or re-attested): persists it (a failure is logged:
    /// the server already considers it current), then uses it for every call from now on.
    pub(crate) async fn install_credential(&self, credential: AgentCredential) -> Result<(), String> {
        let storage = self.storage.clone();
        let to_save = credential.clone();
        match tokio::task::spawn_blocking(move || storage.save_agent_credential(&to_save)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!("cannot persist the new agent SVID: {error}"),
            Err(error) => tracing::error!("cannot persist the new agent SVID: {error}"),
        }
        *self.credential.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = credential.clone();
        self.client.set_credential(&credential)?;
        self.status.send_modify(|status| {
            status.attested = true;
            status.agent_id = Some(credential.spiffe_id.clone());
            status.agent_svid_expires_at = Some(credential.expires_at);
        });
        Ok(())
    }

    /// Publishes the state as a new snapshot.
    pub(crate) fn publish(&self, state: &mut State) {
        self.cache.publish(state.snapshot(SystemTime::now()));
    }

    /// A jitter value in [-1, 1] for renewal points.
    pub(crate) fn jitter(&self) -> f64 {
        jitter(&self.rng)
    }
}

pub(crate) fn jitter(rng: &dyn SecureRandom) -> f64 {
    let mut bytes = [0u8; 8];
    if rng.fill(&mut bytes).is_err() {
        return 0.0;
    }
    tessera_spiffe::ttl::jitter_from_bytes(bytes)
}

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... capped at [`Backoff::CAP`], each
/// delay drawn uniformly from its upper half so a fleet does not retry in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(crate) const BASE: Duration = Duration::from_millis(500);
    pub(crate) const CAP: Duration = Duration::from_secs(30);

    pub(crate) fn new() -> Self {
        Self { attempt: 0 }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn next_delay(&mut self, rng: &dyn SecureRandom) -> Duration {
        let ceiling = Self::BASE.saturating_mul(1u32 << self.attempt.min(16)).min(Self::CAP);
        self.attempt = self.attempt.saturating_add(1);
        // jitter in [-1, 1] -> factor in [0.5, 1.0]
        let factor = 0.75 + jitter(rng) * 0.25;
        ceiling.mul_f64(factor)
    }
}

/// When to renew a credential issued (per its certificate) at `not_before` and expiring at
/// `expires_at`. The server back-dates notBefore by [`tessera_spiffe::ttl::NOT_BEFORE_SKEW`],
/// which is added back so the lifetime is the one requested.
pub(crate) fn renew_at(not_before: SystemTime, expires_at: SystemTime, jitter: f64) -> SystemTime {
    let issued = (not_before + tessera_spiffe::ttl::NOT_BEFORE_SKEW).min(expires_at);
    tessera_spiffe::ttl::renewal_point(issued, expires_at, jitter)
}

/// notBefore of a DER certificate.
pub(crate) fn not_before(der: &[u8]) -> Option<SystemTime> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let seconds = certificate.validity().not_before.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// A running manager; dropping it does not stop the tasks, call [`RunningManager::shutdown`].
#[derive(Debug)]
pub struct RunningManager {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    jwt: Arc<jwt::JwtSvids>,
}

impl RunningManager {
    /// The current status.
    pub fn status(&self) -> AgentStatus {
        self.shared.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn status_watch(&self) -> watch::Receiver<AgentStatus> {
        self.shared.status.subscribe()
    }

    /// The JWT-SVID source for the Workload API.
    pub fn jwt_source(&self) -> Arc<dyn JwtSvidSource> {
        self.jwt.clone()
    }

    /// The JWT-SVID cache itself (statistics for tests and metrics).
    pub fn jwt_svids(&self) -> &Arc<jwt::JwtSvids> {
        &self.jwt
    }

    /// The count of failed calls and broken streams to the server (shared with the metric).
    pub fn server_errors(&self) -> prometheus_client::metrics::counter::Counter {
        self.shared.server_errors.clone()
    }

    /// The cache the manager publishes to.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.shared.cache
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Loads or obtains the agent SVID and starts the tasks. `join_token` (from `--join-token`)
/// overrides the configuration's.
pub async fn start(
    config: &AgentConfig,
    join_token: Option<String>,
    cache: Arc<Cache>,
) -> Result<RunningManager, ManagerError> {
    let trust_domain = config.trust_domain.clone();
    let storage = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || Storage::open(&dir))
            .await
            .map_err(|error| ManagerError::Other(error.to_string()))??
    };
    let data_dir = storage.dir().display().to_string();
    let evidence = evidence_from(config, join_token, &trust_domain)?;
    let cached_bundle = storage.load_bundle(&trust_domain)?;
    let persisted = storage.load_agent_credential()?;
    let now = SystemTime::now();

    let trust_state = match (&cached_bundle, &config.trust_bundle_path) {
        (Some(bundle), _) => TrustState { bundle: Some(bundle.clone()), insecure_first_use: false },
        (None, Some(path)) => {
            TrustState { bundle: Some(read_trust_bundle(&trust_domain, path)?), insecure_first_use: false }
        }
        (None, None) => TrustState { bundle: None, insecure_first_use: config.insecure_bootstrap },
    };
    if trust_state.bundle.is_none() && !trust_state.insecure_first_use {
        return Err(ManagerError::NoTrustAnchor { data_dir });
    }
    let trust = crate::client::trust_store(trust_state);
    let verifier =
        Arc::new(ServerVerifier::new(trust_domain.clone(), Arc::clone(&trust)).map_err(ManagerError::Other)?);

    let credential = match persisted {
        Some(credential) if credential.is_valid_at(now) && credential.spiffe_id.is_member_of(&trust_domain) => {
            tracing::info!(agent_id = %credential.spiffe_id, "using the persisted agent SVID; no attestation needed");
            credential
        }
        other => {
            if let Some(stale) = other {
                tracing::warn!(agent_id = %stale.spiffe_id, "the persisted agent SVID is expired or for another trust domain; attesting again");
            }
            let evidence = evidence.clone().ok_or(ManagerError::NoJoinToken { data_dir: data_dir.clone() })?;
            if config.insecure_bootstrap && cached_bundle.is_none() {
                tracing::warn!(
                    "insecure_bootstrap is set: the server will be trusted on first use without authentication; \
                     for tests and demos only"
                );
            }
            let outcome =
                attest::attest_with_retry(&config.server_address, &verifier, &trust_domain, &evidence).await?;
            // From now on the server is authenticated with the bundle it returned.
            if let Ok(mut state) = trust.write() {
                *state = TrustState { bundle: Some(outcome.bundle.clone()), insecure_first_use: false };
            }
            storage.save_bundle(&outcome.bundle)?;
            storage.save_agent_credential(&outcome.credential)?;
            tracing::info!(agent_id = %outcome.credential.spiffe_id, "attested; agent SVID persisted");
            outcome.credential
        }
    };

    let client = ServerClient::new(&config.server_address, verifier, Some(&credential)).map_err(ManagerError::Other)?;
    let bundle = trust.read().ok().and_then(|state| state.bundle.clone());
    let mut state = State::new(trust_domain.clone(), bundle);
    cache.publish(state.snapshot(now));
    let status = AgentStatus {
        attested: true,
        agent_id: Some(credential.spiffe_id.clone()),
        agent_svid_expires_at: Some(credential.expires_at),
        ..AgentStatus::default()
    };
    let shared = Arc::new(Shared {
        trust_domain,
        cache,
        client,
        trust,
        storage,
        state: Mutex::new(state),
        credential: Mutex::new(credential),
        status: watch::channel(status).0,
        mint_wakeup: Notify::new(),
        renew_wakeup: Notify::new(),
        rng: SystemRandom::new(),
        reattest: evidence.filter(attest::Evidence::can_reattest),
        server_errors: prometheus_client::metrics::counter::Counter::default(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(sync::run(Arc::clone(&shared), stop_rx.clone()));
    tasks.spawn(mint::run(Arc::clone(&shared), stop_rx.clone()));
    tasks.spawn(renew::run(Arc::clone(&shared), stop_rx));
    let jwt = Arc::new(jwt::JwtSvids::new(Arc::clone(&shared)));
    Ok(RunningManager { shared, stop, tasks, jwt })
}

/// What the agent attests with: its `[node_attestor]` table or a join token (`--join-token`
/// over `join_token`). A configured node credential or token file is read now, so a wrong path
/// fails start-up rather than the first attestation.
fn evidence_from(
    config: &AgentConfig,
    join_token: Option<String>,
    trust_domain: &TrustDomain,
) -> Result<Option<attest::Evidence>, ManagerError> {
    let join_token = join_token.or_else(|| config.join_token.clone());
    let attestors = &config.node_attestor;
    if let (Some(_), [attestor, ..]) = (&join_token, attestors.configured().as_slice()) {
        return Err(ManagerError::Other(format!(
            "--join-token cannot be used with [node_attestor.{attestor}]: the agent attests one way"
        )));
    }
    if let Some(x509pop) = &attestors.x509pop {
        x509pop::NodeCredential::load(x509pop).map_err(ManagerError::Other)?;
        return Ok(Some(attest::Evidence::X509Pop(x509pop.clone())));
    }
    let token_file = match (&attestors.k8s_psat, &attestors.oidc) {
        (Some(k8s_psat), _) => Some(node_token::TokenFile::k8s_psat(k8s_psat)),
        (None, Some(oidc)) => Some(node_token::TokenFile::oidc(oidc)),
        (None, None) => None,
    };
    if let Some(token_file) = token_file {
        token_file.read().map_err(ManagerError::Other)?;
        return Ok(Some(attest::Evidence::Token(token_file)));
    }
    match join_token {
        Some(token) => {
            crate::config::validate_join_token(trust_domain, &token).map_err(ManagerError::Other)?;
            Ok(Some(attest::Evidence::JoinToken(token)))
        }
        None => Ok(None),
    }
}

fn read_trust_bundle(trust_domain: &TrustDomain, path: &Path) -> Result<Bundle, ManagerError> {
    let error = |message: String| ManagerError::TrustBundle { path: path.display().to_string(), message };
    let pem = std::fs::read(path).map_err(|e| error(crate::config::io_message(&e)))?;
    let bundle = Bundle::from_x509_authorities_pem(trust_domain.clone(), &pem).map_err(|e| error(e.to_string()))?;
    if bundle.x509_authorities().len() == 0 {
        return Err(error("holds no CERTIFICATE block".to_owned()));
    }
    Ok(bundle)
}

/// Waits for `duration` or until `stop` turns true; returns true when stopping.
pub(crate) async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(duration) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// How long from now until `at` (zero when past).
pub(crate) fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let rng = SystemRandom::new();
        let mut backoff = Backoff::new();
        let first = backoff.next_delay(&rng);
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500), "{first:?}");
        for _ in 0..20 {
            let delay = backoff.next_delay(&rng);
            assert!(delay <= Backoff::CAP, "{delay:?}");
        }
        let late = backoff.next_delay(&rng);
        assert!(late >= Backoff::CAP / 2, "{late:?}");
        backoff.reset();
        assert!(backoff.next_delay(&rng) <= Duration::from_millis(500));
    }

    #[test]
    fn renewal_is_at_half_life_of_the_requested_lifetime() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let not_before = issued - tessera_spiffe::ttl::NOT_BEFORE_SKEW;
        let expires = issued + Duration::from_secs(4);
        assert_eq!(renew_at(not_before, expires, 0.0), issued + Duration::from_secs(2));
        let early = renew_at(not_before, expires, -1.0);
        let late = renew_at(not_before, expires, 1.0);
        assert_eq!(early, issued + Duration::from_millis(1_600));
        assert_eq!(late, issued + Duration::from_millis(2_400));
        // A capped lifetime (notAfter close to notBefore) never renews before notBefore.
        assert!(renew_at(not_before, not_before + Duration::from_secs(2), 0.0) >= not_before);
    }

    #[test]
    fn status_health_needs_attestation_and_a_sync() {
        let mut status = AgentStatus { attested: true, ..AgentStatus::default() };
        assert!(!status.is_healthy());
        status.last_sync = Some(SystemTime::now());
        assert!(status.is_healthy());
    }
}
