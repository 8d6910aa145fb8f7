//! The agent API (`tessera.agent.v1.AgentService`) on `bind_address`, over TLS.
//!
//! # Code map
//!
//! - [`tls`]: the server's own X.509-SVID (`spiffe://<td>/tessera/server`, renewed at half
//!   life) and the TLS acceptor; the peer's certificate chain reaches every request as
//!   connect info.
//! - [`auth`]: every call but `AttestAgent` is authenticated by the agent SVID: chain to the
//!   current bundle, unexpired, node attested and not banned, serial current or the renewal's
//!   (spec: server-agent-flow §3).
//! - [`authz`]: the one computation of the entries an agent is authorized for (§4).
//! - [`attest`]: node attestation (§2): join tokens, [`x509pop`], and the token attestors
//!   `k8s_psat` and `oidc` ([`node_token`]).
//! - [`sync`]: the `SyncEntries` push stream; [`wire`]: its route and message type, which
//!   write each entry from the encoding the store's `Arc` keeps.
//! - this module: the service, `RenewAgent`, `BatchNewX509Svid`, `NewJwtSvid`, `FetchBundle`.
//!
//! # Security rules (spec: server-agent-flow §5, §6)
//!
//! - An SVID is signed only for an entry in the calling agent's authorized set; anything else
//!   is answered per item with `NOT_FOUND` "entry not found or not authorized" (the same
//!   answer for both, so an agent learns nothing about other agents' entries).
//! - The SPIFFE ID, DNS names and TTL come from the entry (TTL 0 = the configured default);
//!   only the public key is taken from a CSR, whose signature must verify. The CA caps every
//!   lifetime at its own notAfter.
//! - Batches hold at most [`MAX_BATCH`] items (`INVALID_ARGUMENT` for the whole call).
//! - Each agent may have `agent_svid_rate_limit` SVIDs signed per second on average
//!   (`RESOURCE_EXHAUSTED` beyond, see [`rate`]). All agents together share
//!   `max_concurrent_attestations` attestation slots and `max_concurrent_signing` signing
//!   slots, with a bounded wait and a bounded queue for each; the excess gets the retryable
//!   `UNAVAILABLE` (see [`overload`]), so an outage's reconnect storm cannot pile up unbounded
//!   work.
//! - Every refusal is logged with the agent ID; a refused call writes nothing.
//!
//! # Authorization cache
//!
//! Signing calls keep one [`authz::AuthorizedSet`] per agent identity ([`AuthorizedCache`])
//! and move it forward with the datastore's change log before each use, so a call costs
//! reading the entries changed since the agent's last call, not every authorized entry (an
//! agent minting entries as they are created one by one made each call recompute the whole
//! set before, O(N) per entry). New node selectors start a new set.
//!
//! With the connection's remembered chain verification and node record (see [`auth`]), a
//! signing call for an unchanged agent reads no node record, and a `NewJwtSvid` signature
//! runs inline (it is shorter than a hop to the blocking pool; the signing permit bounds how
//! many run at once). `BatchNewJwtSvid` signs many tokens per round trip.
//!
//! # Batches on several threads
//!
//! A `BatchNewX509Svid` holds up to [`MAX_BATCH`] CSRs, each a signature check and a
//! signature. Signed one after the other, a call lasted at least that many times one
//! signature, however idle the server. The items are signed on up to one blocking thread per
//! core ([`signing_threads`]; batches of up to three items stay on one thread), each thread
//! taking the next item until none is left, and answered in request order
//! ([`sign_on_threads`]). Every check of the call
//! (authentication, batch size, the agent's rate for the whole batch, the authorized set, the
//! call's signing permit) comes first, once per call, as before; each item is then refused or
//! signed and audited on its own, as before, with the same `now`. Each thread holds a signing
//! permit: the call's own, plus extra ones taken only when free at that moment
//! ([`overload::WorkLimit::try_acquire_free`]), so `max_concurrent_signing` bounds the
//! signing threads, and under load a batch is signed on its one permit's thread.
//!
//! `BatchNewJwtSvid` is split the same way, with a larger share per thread
//! ([`MIN_JWTS_PER_THREAD`]): an ES256 token is about a fifth of the work of an X.509-SVID
//! (no CSR to parse and check), so a hop to another thread pays off only for more of them.

pub(crate) mod attest;
mod audit;
pub(crate) mod auth;
pub(crate) mod authz;
mod convert;
pub(crate) mod feed;
pub(crate) mod node_token;
pub(crate) mod overload;
mod rate;
pub(crate) mod sync;
pub(crate) mod tls;
pub mod wire;
pub(crate) mod x509pop;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tessera_spiffe::SpiffeId;
use tessera_wire::google::rpc;
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::tessera::agent::v1::agent_service_server::AgentService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use self::auth::{AuthenticatedAgent, authenticate};
use self::authz::{AgentIdentity, AuthorizedSet};
use self::convert::{bundle_document, unix_seconds};
use crate::ca::CaError;
use crate::datastore::{DataStore, DataStoreError, SharedEntry, blocking};
use crate::server::ServerState;

/// Most items in one `BatchNewX509Svid` call.
pub const MAX_BATCH: usize = 500;
/// Most audiences in one `NewJwtSvid` call.
pub const MAX_AUDIENCES: usize = 32;
/// Longest audience value, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 1024;
/// The message every unauthorized or unknown entry gets.
pub const NOT_AUTHORIZED: &str = "entry not found or not authorized";

/// Most agents whose authorized set is cached at once (the cache is cleared when full).
const AUTHORIZED_CACHE_AGENTS: usize = 1024;

/// One agent's authorized set, shared by its concurrent calls.
type SharedSet = Arc<Mutex<Option<AuthorizedSet>>>;

/// The authorized set of each agent that signed recently (see the [module docs](self)).
#[derive(Debug, Default)]
struct AuthorizedCache(Mutex<HashMap<SpiffeId, SharedSet>>);

impl AuthorizedCache {
    /// The slot of `agent_id`, created empty when missing.
    fn slot(&self, agent_id: &SpiffeId) -> SharedSet {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= AUTHORIZED_CACHE_AGENTS && !map.contains_key(agent_id) {
            map.clear();
        }
        Arc::clone(map.entry(agent_id.clone()).or_default())
    }

    /// Runs `read` on the agent's set brought to the store's current revision (computed when
    /// missing or for other node selectors).
    fn with_current<T>(
        &self,
        store: &dyn DataStore,
        server_id: &SpiffeId,
        identity: &AgentIdentity,
        now: u64,
        read: impl FnOnce(&AuthorizedSet) -> T,
    ) -> Result<T, DataStoreError> {
        let slot = self.slot(&identity.agent_id);
        let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
        // Taken out while it moves: after an error the slot is empty and the next call
        // computes the set from scratch.
        let set = match held.take() {
            Some(mut set) if set.identity() == identity => {
                set.advance(store, server_id, now)?;
                set
            }
            _ => AuthorizedSet::compute(store, server_id, identity, now)?,
        };
        let value = read(&set);
        *held = Some(set);
        Ok(value)
    }
}

/// The agent API service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    state: Arc<ServerState>,
    authorized_cache: Arc<AuthorizedCache>,
    /// The entry change log as read once for every sync stream.
    feed: Arc<feed::ChangeFeed>,
    limits: Arc<overload::Limits>,
    rate: Arc<rate::SigningRateLimit>,
    stopped: watch::Receiver<bool>,
    /// The CPUs the process may use (`std::thread::available_parallelism`, read once): the
    /// most threads one X.509-SVID batch is signed on.
    cores: usize,
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn datastore_status(err: DataStoreError) -> Status {
    Status::unavailable(format!("datastore: {err}"))
}

fn now_secs() -> u64 {
    u64::try_from(unix_seconds(SystemTime::now())).unwrap_or(0)
}

impl AgentApi {
    /// The service over `state`; streams end when `stopped` turns true.
    pub fn new(state: Arc<ServerState>, stopped: watch::Receiver<bool>) -> Self {
        Self {
            rate: Arc::new(rate::SigningRateLimit::new(state.config().agent_svid_rate_limit)),
            limits: Arc::new(overload::Limits::from_config(state.config())),
            state,
            authorized_cache: Arc::default(),
            feed: Arc::default(),
            stopped,
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        }
    }

    /// The tonic service: the generated server behind the `SyncEntries` route of [`wire`].
    pub fn into_service(self) -> wire::AgentRoutes {
        wire::AgentRoutes::new(self)
    }

    /// `SyncEntries`: authenticates the agent and starts its stream task (both routes).
    pub(crate) async fn open_sync(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<BoxStream<wire::SyncMessage>>, Status> {
        let agent = authenticate(&self.state, &request, "SyncEntries").await?;
        let from_revision = request.into_inner().revision;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(sync::run(
            Arc::clone(&self.state),
            Arc::clone(&self.feed),
            agent,
            from_revision,
            tx,
            self.stopped.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// `read` applied to the agent's authorized set at the store's current revision.
    async fn authorized<T: Send + 'static>(
        &self,
        agent: &AuthenticatedAgent,
        read: impl FnOnce(&AuthorizedSet) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let (server_id, identity) = (self.state.server_id().clone(), agent.identity.clone());
        let cache = Arc::clone(&self.authorized_cache);
        blocking(self.state.datastore(), move |store| {
            cache.with_current(store, &server_id, &identity, now_secs(), read)
        })
        .await
        .map_err(datastore_status)
    }

    /// The authorized entries among `ids`, by ID.
    async fn authorized_entries_among(
        &self,
        agent: &AuthenticatedAgent,
        ids: Vec<String>,
    ) -> Result<HashMap<String, Arc<SharedEntry>>, Status> {
        self.authorized(agent, move |set| {
            ids.into_iter().filter_map(|id| set.entries().get(&id).map(|entry| (id, Arc::clone(entry)))).collect()
        })
        .await
    }

    async fn signing_permit(&self, agent: &AuthenticatedAgent) -> Result<overload::WorkPermit, Status> {
        self.limits.signing.acquire().await.inspect_err(|_| {
            tracing::debug!(agent = %agent.id(), "signing call refused: the server is overloaded");
        })
    }
}

/// The audiences of a JWT-SVID request: 1 to [`MAX_AUDIENCES`], each 1 to
/// [`MAX_AUDIENCE_LEN`] bytes.
fn check_audiences(audiences: &[String]) -> Result<(), String> {
    if audiences.is_empty() {
        return Err("audiences: at least one audience is required".to_owned());
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(format!("audiences: at most {MAX_AUDIENCES}"));
    }
    if audiences.iter().any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN) {
        return Err(format!("audiences: each must be 1 to {MAX_AUDIENCE_LEN} bytes"));
    }
    Ok(())
}

/// The per-item status of a signing failure.
fn sign_error_status(err: &CaError) -> rpc::Status {
    let code = match err {
        CaError::X509Svid { .. } => Code::InvalidArgument,
        _ => Code::Internal,
    };
    let message = match err {
        CaError::X509Svid { source, .. } => format!("csr: {source}"),
        other => other.to_string(),
    };
    rpc::Status { code: code as i32, message, details: Vec::new() }
}

/// Items per thread below which an X.509-SVID batch is not split further: a hop to the
/// blocking pool costs a fraction of one signature, so even two items per thread pay off, and
/// batches of up to three items stay on one thread.
const MIN_ITEMS_PER_THREAD: usize = 2;

/// Tokens per thread below which a JWT-SVID batch is not split further: one ES256 signature
/// takes about as long as a hop to the blocking pool and back, so a thread must have several.
const MIN_JWTS_PER_THREAD: usize = 8;

/// The threads a batch of `items` X.509-SVIDs is signed on, with `cores` CPUs: one per core,
/// each with at least [`MIN_ITEMS_PER_THREAD`] items, and at least one.
fn signing_threads(items: usize, cores: usize) -> usize {
    threads_for(items, MIN_ITEMS_PER_THREAD, cores)
}

/// One thread per core, each with at least `min_per_thread` of the `items`, and at least one.
fn threads_for(items: usize, min_per_thread: usize, cores: usize) -> usize {
    (items / min_per_thread.max(1)).clamp(1, cores.max(1))
}

/// `work` applied to every item, on `permits.len()` blocking threads (at least one, at most
/// one per item), each holding one of the permits until it is done, with the results in the
/// order of `items`. The threads take the next item from a shared counter, so a thread that
/// keeps its core takes over the items of one that was preempted (fixed chunks would make the
/// call wait for its slowest thread's whole share). Every thread is awaited, also when one
/// fails, so no result is dropped while another thread still works; a thread that panicked
/// fails the whole call (`INTERNAL`), as a single thread's panic did.
async fn sign_on_threads<I, O, P, F>(items: Vec<I>, permits: Vec<P>, work: F) -> Result<Vec<O>, Status>
where
    I: Send + 'static,
    O: Send + 'static,
    P: Send + 'static,
    F: Fn(I) -> O + Send + Sync + 'static,
{
    let total = items.len();
    let threads = permits.len().clamp(1, total.max(1));
    let queue: Vec<Mutex<Option<I>>> = items.into_iter().map(|item| Mutex::new(Some(item))).collect();
    let shared = Arc::new((queue, std::sync::atomic::AtomicUsize::new(0), work));
    let mut permits = permits.into_iter();
    let mut handles = Vec::with_capacity(threads);
    for _ in 0..threads {
        let permit = permits.next();
        let shared = Arc::clone(&shared);
        handles.push(tokio::task::spawn_blocking(move || {
            let (queue, next, work) = &*shared;
            let mut done = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(slot) = queue.get(index) else { break };
                if let Some(item) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    done.push((index, work(item)));
                }
            }
            drop(permit);
            done
        }));
    }
    // Permits beyond the threads used (more permits than items) are given back at once.
    drop(permits);
    let mut results: Vec<Option<O>> = std::iter::repeat_with(|| None).take(total).collect();
    let mut failed = None;
    for handle in handles {
        match handle.await {
            Ok(done) => {
                for (index, result) in done {
                    results[index] = Some(result);
                }
            }
            Err(err) => failed = Some(Status::internal(format!("signing task: {err}"))),
        }
    }
    match failed {
        Some(status) => Err(status),
        None => results
            .into_iter()
            .collect::<Option<Vec<O>>>()
            .ok_or_else(|| Status::internal("signing task: an item was not signed")),
    }
}

fn item_error(code: Code, message: impl Into<String>) -> rpc::Status {
    rpc::Status { code: code as i32, message: message.into(), details: Vec::new() }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type AttestAgentStream = BoxStream<pb::AttestAgentResponse>;

    async fn attest_agent(
        &self,
        request: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let peer = auth::conn_info(&request).and_then(|i| i.remote_addr).map(|a| a.to_string()).unwrap_or_default();
        let limit = &self.limits.attestation;
        let responses = attest::attest(&self.state, limit, request.into_inner(), peer.clone()).await.inspect_err(|status| {
            // Overload refusals are counted and logged by the limit itself, not one line each.
            if !overload::is_overload(status) {
                tracing::warn!(peer = %peer, code = ?status.code(), reason = %status.message(), "agent attestation refused");
            }
        })?;
        Ok(Response::new(responses))
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let agent = authenticate(&self.state, &request, "RenewAgent").await?;
        let csr = request.into_inner().csr;
        let refuse = |status: Status| {
            tracing::warn!(agent = %agent.id(), reason = %status.message(), "agent renewal refused");
            status
        };
        if csr.len() > attest::MAX_CSR_LEN {
            return Err(refuse(Status::invalid_argument(format!("csr: larger than {} bytes", attest::MAX_CSR_LEN))));
        }
        self.rate.take(agent.id(), 1, std::time::Instant::now())?;
        let permit = self.signing_permit(&agent).await?;
        let (state, id) = (Arc::clone(&self.state), agent.id().clone());
        let ttl = self.state.config().agent_ttl;
        let signed = tokio::task::spawn_blocking(move || state.ca().sign_agent_svid(&id, ttl, &csr, SystemTime::now()))
            .await
            .map_err(|err| Status::internal(format!("signing task: {err}")))?;
        drop(permit);
        let svid = signed.map_err(|err| match err {
            CaError::X509Svid { source, .. } => refuse(Status::invalid_argument(format!("csr: {source}"))),
            other => Status::internal(format!("cannot sign the agent SVID: {other}")),
        })?;
        let leaf = svid.chain.first().ok_or_else(|| Status::internal("empty agent SVID chain"))?;
        let new_serial = tessera_spiffe::tls::certificate_serial_hex(leaf)
            .map_err(|err| Status::internal(format!("agent SVID serial: {err}")))?;
        let (id, current) = (agent.id().clone(), agent.node.clone());
        let serials = crate::datastore::NodeSerials {
            serial: current.serial.clone(),
            new_serial: Some(new_serial),
            expires_at: current.expires_at,
        };
        blocking(self.state.datastore(), move |store| {
            store.update_attested_node_serials(&id, &current.serial, &serials)
        })
        .await
        .map_err(|err| match err {
            DataStoreError::Conflict { .. } => Status::aborted("agent serial changed concurrently; retry"),
            DataStoreError::NodeBanned { .. } => refuse(Status::permission_denied("agent is banned")),
            DataStoreError::NotFound { .. } => refuse(Status::unauthenticated("agent is not attested")),
            other => datastore_status(other),
        })?;
        tracing::info!(agent = %agent.id(), expires_at = ?svid.expires_at, "agent SVID renewed");
        Ok(Response::new(pb::RenewAgentResponse {
            svid: Some(attest::agent_svid(agent.id(), svid.chain, svid.expires_at)),
        }))
    }

    type SyncEntriesStream = BoxStream<pb::SyncEntriesResponse>;

    /// Served by [`wire::AgentRoutes`] in front of the generated server; this generated form
    /// (each entry converted anew) answers only where the generated server is used alone.
    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let stream = self.open_sync(request).await?.into_inner();
        Ok(Response::new(Box::pin(stream.map(|item| item.map(wire::SyncMessage::into_proto)))))
    }

    async fn batch_new_x509_svid(
        &self,
        request: Request<pb::BatchNewX509SvidRequest>,
    ) -> Result<Response<pb::BatchNewX509SvidResponse>, Status> {
        let agent = authenticate(&self.state, &request, "BatchNewX509Svid").await?;
        let params = request.into_inner().params;
        if params.len() > MAX_BATCH {
            tracing::warn!(agent = %agent.id(), items = params.len(), "X.509-SVID batch refused: too large");
            return Err(Status::invalid_argument(format!(
                "params: {} items; at most {MAX_BATCH} per call",
                params.len()
            )));
        }
        if params.is_empty() {
            return Ok(Response::new(pb::BatchNewX509SvidResponse { results: Vec::new() }));
        }
        self.rate.take(agent.id(), params.len(), std::time::Instant::now())?;
        let authorized =
            self.authorized_entries_among(&agent, params.iter().map(|item| item.entry_id.clone()).collect()).await?;
        let permit = self.signing_permit(&agent).await?;
        // More threads only from slots free right now: under load a batch is signed on one.
        let extra = signing_threads(params.len(), self.cores).saturating_sub(1);
        let mut permits = vec![permit];
        permits.extend(self.limits.signing.try_acquire_free(extra));
        let state = Arc::clone(&self.state);
        let default_ttl = self.state.config().default_x509_svid_ttl;
        let agent_id = agent.id().clone();
        let audit_log = self.state.audit().clone();
        let now = SystemTime::now();
        let sign = move |item: pb::NewX509SvidParams| {
            let result = match authorized.get(&item.entry_id) {
                None => {
                    tracing::warn!(agent = %agent_id, entry = %item.entry_id, "X.509-SVID refused: entry not found or not authorized");
                    Err(item_error(Code::NotFound, NOT_AUTHORIZED))
                }
                Some(_) if item.csr.len() > attest::MAX_CSR_LEN => {
                    Err(item_error(Code::InvalidArgument, format!("csr: larger than {} bytes", attest::MAX_CSR_LEN)))
                }
                Some(entry) => {
                    let ttl = entry.x509_svid_ttl.unwrap_or(default_ttl);
                    state.ca().sign_x509_svid_from_csr(&entry.spiffe_id, &entry.dns_names, ttl, &item.csr, now).map_err(
                        |err| {
                            tracing::warn!(agent = %agent_id, entry = %item.entry_id, error = %err, "X.509-SVID refused");
                            sign_error_status(&err)
                        },
                    )
                }
            };
            if let (Ok(svid), Some(entry)) = (&result, authorized.get(&item.entry_id)) {
                audit_log.emit(audit::x509_issued(svid, entry, &agent_id));
            }
            pb::NewX509SvidResult {
                entry_id: item.entry_id,
                result: Some(match result {
                    Ok(svid) => pb::new_x509_svid_result::Result::Svid(pb::X509Svid {
                        cert_chain: svid.chain,
                        expires_at: unix_seconds(svid.expires_at),
                    }),
                    Err(status) => pb::new_x509_svid_result::Result::Error(status),
                }),
            }
        };
        let results = sign_on_threads(params, permits, sign).await?;
        Ok(Response::new(pb::BatchNewX509SvidResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        request: Request<pb::NewJwtSvidRequest>,
    ) -> Result<Response<pb::NewJwtSvidResponse>, Status> {
        let agent = authenticate(&self.state, &request, "NewJwtSvid").await?;
        let request = request.into_inner();
        let refuse = |status: Status| {
            tracing::warn!(agent = %agent.id(), entry = %request.entry_id, reason = %status.message(), "JWT-SVID refused");
            status
        };
        check_audiences(&request.audiences).map_err(|message| refuse(Status::invalid_argument(message)))?;
        let mut authorized = self.authorized_entries_among(&agent, vec![request.entry_id.clone()]).await?;
        let Some(entry) = authorized.remove(&request.entry_id) else {
            return Err(refuse(Status::not_found(NOT_AUTHORIZED)));
        };
        self.rate.take(agent.id(), 1, std::time::Instant::now())?;
        let permit = self.signing_permit(&agent).await?;
        let ttl = entry.jwt_svid_ttl.unwrap_or(self.state.config().default_jwt_svid_ttl);
        // Inline: one ES256 signature (tens of microseconds) costs less than a hop to the
        // blocking pool and back, and the signing permit bounds how many run at once.
        let (token, expires_at) = self
            .state
            .ca()
            .sign_jwt_svid(&entry.spiffe_id, &request.audiences, ttl, SystemTime::now())
            .map_err(|err| Status::internal(format!("cannot sign the JWT-SVID: {err}")))?;
        drop(permit);
        self.state.audit().emit(audit::jwt_issued(&token, &entry.spiffe_id, &request, agent.id(), expires_at));
        Ok(Response::new(pb::NewJwtSvidResponse { token, expires_at: unix_seconds(expires_at) }))
    }

    async fn batch_new_jwt_svid(
        &self,
        request: Request<pb::BatchNewJwtSvidRequest>,
    ) -> Result<Response<pb::BatchNewJwtSvidResponse>, Status> {
        let agent = authenticate(&self.state, &request, "BatchNewJwtSvid").await?;
        let params = request.into_inner().params;
        if params.len() > MAX_BATCH {
            tracing::warn!(agent = %agent.id(), items = params.len(), "JWT-SVID batch refused: too large");
            return Err(Status::invalid_argument(format!(
                "params: {} items; at most {MAX_BATCH} per call",
                params.len()
            )));
        }
        if params.is_empty() {
            return Ok(Response::new(pb::BatchNewJwtSvidResponse { results: Vec::new() }));
        }
        self.rate.take(agent.id(), params.len(), std::time::Instant::now())?;
        let authorized =
            self.authorized_entries_among(&agent, params.iter().map(|item| item.entry_id.clone()).collect()).await?;
        let permit = self.signing_permit(&agent).await?;
        // More threads only from slots free right now: under load a batch is signed on one.
        let extra = threads_for(params.len(), MIN_JWTS_PER_THREAD, self.cores).saturating_sub(1);
        let mut permits = vec![permit];
        permits.extend(self.limits.signing.try_acquire_free(extra));
        let state = Arc::clone(&self.state);
        let default_ttl = self.state.config().default_jwt_svid_ttl;
        let agent_id = agent.id().clone();
        let now = SystemTime::now();
        let sign = move |item: pb::NewJwtSvidRequest| {
            let signed = match (check_audiences(&item.audiences), authorized.get(&item.entry_id)) {
                (Err(message), _) => Err(item_error(Code::InvalidArgument, message)),
                (Ok(()), None) => Err(item_error(Code::NotFound, NOT_AUTHORIZED)),
                (Ok(()), Some(entry)) => {
                    let ttl = entry.jwt_svid_ttl.unwrap_or(default_ttl);
                    match state.ca().sign_jwt_svid(&entry.spiffe_id, &item.audiences, ttl, now) {
                        Ok((token, expires_at)) => {
                            state.audit().emit(audit::jwt_issued(
                                &token,
                                &entry.spiffe_id,
                                &item,
                                &agent_id,
                                expires_at,
                            ));
                            Ok(pb::NewJwtSvidResponse { token, expires_at: unix_seconds(expires_at) })
                        }
                        Err(err) => Err(sign_error_status(&err)),
                    }
                }
            };
            if let Err(status) = &signed {
                tracing::warn!(agent = %agent_id, entry = %item.entry_id, reason = %status.message, "JWT-SVID refused");
            }
            pb::NewJwtSvidResult {
                entry_id: item.entry_id,
                result: Some(match signed {
                    Ok(svid) => pb::new_jwt_svid_result::Result::Svid(svid),
                    Err(status) => pb::new_jwt_svid_result::Result::Error(status),
                }),
            }
        };
        let results = sign_on_threads(params, permits, sign).await?;
        Ok(Response::new(pb::BatchNewJwtSvidResponse { results }))
    }

    async fn fetch_bundle(
        &self,
        request: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::FetchBundleResponse>, Status> {
        let agent = authenticate(&self.state, &request, "FetchBundle").await?;
        let own = self.state.trust_domain().clone();
        let domains = self.authorized(&agent, move |set| set.federated_domains(&own)).await?;
        let (own, federated) = sync::load_bundles(&self.state, domains).await?;
        Ok(Response::new(pb::FetchBundleResponse {
            bundle: Some(bundle_document(&own)),
            federated_bundles: federated.iter().map(bundle_document).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::RegistrationEntry;

    /// Batches of up to three items stay on one thread; larger ones get one thread per core,
    /// each with at least two items.
    #[test]
    fn a_batch_is_split_over_the_cores_only_when_large_enough() {
        for items in 0..=3 {
            assert_eq!(signing_threads(items, 8), 1, "{items} items");
        }
        assert_eq!(signing_threads(4, 8), 2);
        assert_eq!(signing_threads(50, 2), 2);
        assert_eq!(signing_threads(50, 8), 8);
        assert_eq!(signing_threads(500, 1), 1);
        assert_eq!(signing_threads(50, 0), 1, "no core reported: one thread");
        // JWT-SVID batches need a larger share per thread.
        assert_eq!(threads_for(15, MIN_JWTS_PER_THREAD, 8), 1);
        assert_eq!(threads_for(16, MIN_JWTS_PER_THREAD, 8), 2);
        assert_eq!(threads_for(100, MIN_JWTS_PER_THREAD, 2), 2);
        assert_eq!(threads_for(100, 0, 2), 2, "a zero share is taken as one");
    }

    /// Every item comes back once, in request order, whatever the number of threads (also more
    /// permits than items, and none); each thread holds one permit until it is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signing_on_threads_keeps_request_order_and_holds_one_permit_per_thread() {
        for (items, threads) in [(0, 1), (1, 1), (7, 3), (50, 2), (50, 4), (5, 9), (9, 0)] {
            let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
            let permits: Vec<_> = (0..threads).map(|_| Arc::clone(&semaphore).try_acquire_owned().unwrap()).collect();
            let thread_ids = Arc::new(Mutex::new(Vec::new()));
            let seen = Arc::clone(&thread_ids);
            let held = Arc::clone(&semaphore);
            let results = sign_on_threads((0..items).collect(), permits, move |item: usize| {
                seen.lock().unwrap().push(std::thread::current().id());
                (item, 16 - held.available_permits())
            })
            .await
            .unwrap();
            assert_eq!(results.iter().map(|r| r.0).collect::<Vec<_>>(), (0..items).collect::<Vec<_>>());
            let used = threads.clamp(1, items.max(1));
            if items > 0 && threads > 0 {
                // Each item runs while its thread holds a permit; never more than were given.
                assert!(results.iter().all(|r| r.1 >= 1 && r.1 <= threads), "{items}/{threads}: {results:?}");
            }
            let mut distinct = thread_ids.lock().unwrap().clone();
            distinct.sort_by_key(|id| format!("{id:?}"));
            distinct.dedup();
            assert!(distinct.len() <= used, "{items} items on {} threads for {threads} permits", distinct.len());
            assert_eq!(semaphore.available_permits(), 16, "every permit is back after the call");
        }
    }

    /// A thread that panics fails the call with `INTERNAL` once the other threads are done, and
    /// they sign every other item.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_thread_fails_the_call_after_the_others_finish() {
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&done);
        let status = sign_on_threads((0..10).collect(), vec![(), ()], move |item: usize| {
            assert!(item != 0, "item 0 fails");
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().starts_with("signing task:"), "{}", status.message());
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 9, "every other item was signed");
    }

    /// The signing calls' cache follows entry changes and new node selectors.
    #[test]
    fn the_authorized_cache_follows_changes_and_node_selectors() {
        let store = crate::datastore::MemoryDataStore::default();
        let server_id = SpiffeId::parse("spiffe://example.org/tessera/server").unwrap();
        let agent_id = SpiffeId::parse("spiffe://example.org/tessera/agent/join_token/c").unwrap();
        let identity = AgentIdentity { agent_id: agent_id.clone(), node_selectors: SelectorSet::default() };
        let create = |id: &str, parent: &SpiffeId, selectors: &[&str]| {
            let spiffe_id = SpiffeId::parse(&format!("spiffe://example.org/{id}")).unwrap();
            let entry =
                RegistrationEntry::new(id, spiffe_id, parent.clone(), SelectorSet::parse_all(selectors).unwrap());
            store.create_entry(&entry).unwrap();
        };
        let cache = AuthorizedCache::default();
        let ids = |identity: &AgentIdentity| {
            cache
                .with_current(&store, &server_id, identity, 0, |set| {
                    set.entries().sorted().iter().map(|e| e.id.clone()).collect::<Vec<_>>()
                })
                .unwrap()
        };
        assert!(ids(&identity).is_empty());
        create("w1", &agent_id, &["unix:uid:1"]);
        assert_eq!(ids(&identity), ["w1"], "an entry created since the last call");
        create("alias", &server_id, &["k8s:ns:x"]);
        create("w2", &SpiffeId::parse("spiffe://example.org/alias").unwrap(), &["unix:uid:2"]);
        assert_eq!(ids(&identity), ["w1"], "an alias the agent does not match");
        let mut aliased = identity.clone();
        aliased.node_selectors = SelectorSet::parse_all(&["k8s:ns:x"]).unwrap();
        assert_eq!(ids(&aliased), ["w1", "w2"], "new node selectors start a new set");
        store.delete_entry("w1").unwrap();
        assert_eq!(ids(&aliased), ["w2"]);
    }
    use crate::datastore::{AttestedNode, DataStore};
    use tessera_spiffe::SelectorSet;

    /// Overload: when every signing permit is taken, a signing call gets a retryable
    /// UNAVAILABLE instead of queueing without bound.
    #[tokio::test]
    async fn signing_overload_answers_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let (state, _store) = auth::test_state(dir.path(), |config| {
            config.max_concurrent_signing = 2;
            config.overload_wait = std::time::Duration::from_millis(50);
        });
        let (_stop, stopped) = watch::channel(false);
        let api = AgentApi::new(state, stopped);
        let agent_id = tessera_spiffe::SpiffeId::parse("spiffe://example.org/tessera/agent/join_token/t").unwrap();
        let agent = AuthenticatedAgent {
            identity: authz::AgentIdentity { agent_id: agent_id.clone(), node_selectors: SelectorSet::new() },
            serial: "01".into(),
            svid_expires_at: SystemTime::now(),
            node: AttestedNode {
                spiffe_id: agent_id,
                attestation_type: "join_token".into(),
                serial: "01".into(),
                new_serial: None,
                expires_at: 0,
                banned: false,
                selectors: SelectorSet::new(),
                can_reattest: false,
            },
        };
        let held = (api.signing_permit(&agent).await.unwrap(), api.signing_permit(&agent).await.unwrap());
        let status = api.signing_permit(&agent).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("max_concurrent_signing = 2"), "{}", status.message());
        drop(held);
        assert!(api.signing_permit(&agent).await.is_ok());
    }
}
