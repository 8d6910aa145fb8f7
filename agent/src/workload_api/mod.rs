//! The SPIFFE Workload API, served on the agent's Unix socket.
//!
//! # For a newcomer
//!
//! Every call goes through the same steps ([`WorkloadApi`] in `service.rs`):
//!
//! 1. **Security header**: `workload.spiffe.io: true`, exactly, or InvalidArgument
//!    (`security header missing from request`). Request fields are checked next
//!    (InvalidArgument naming the field), before any work is done for the caller.
//! 2. **Attestation**: the kernel's peer credentials of the connection (pid, uid, gid, from
//!    tonic's [`UdsConnectInfo`](tonic::transport::server::UdsConnectInfo)) and the pidfd of
//!    the process that connected (SO_PEERPIDFD, taken once when the connection is accepted,
//!    when the kernel has it) go to the unix attestor, which pins the process and derives its
//!    `unix:` selectors. Failures are Unavailable (`workload attestation failed: ...`), which
//!    clients retry.
//! 3. **Readiness**: before the agent's first sync an empty identity list means "not known yet",
//!    so the call waits (at most [`WorkloadApiLimits::ready_timeout`]) for a ready snapshot, and
//!    for the SVIDs of entries that match but are still being minted; then Unavailable.
//! 4. **Matching**: entries whose selectors are a subset of the caller's. None: PermissionDenied
//!    `no identity issued`, and one log line naming the caller's pid, uid and selectors and, for
//!    the closest entries on the node, the selectors it lacks (see docs/workload-api.md).
//! 5. **Re-check** ([`Attestation::verify_still_same`](crate::attestor::Attestation::verify_still_same)):
//!    right before the (first) answer the pinned process must still be alive and the same
//!    process (credentials, executable; the start time too without a pidfd), otherwise
//!    Unavailable and no answer.
//!
//! Streams (`FetchX509SVID`, `FetchX509Bundles`, `FetchJWTBundles`) send a complete message at
//! once, then hold a [`Cache::subscribe`] receiver and send a new complete message whenever the
//! part of the snapshot *this caller* sees changes (`views.rs`). When the caller loses every
//! identity the stream ends with PermissionDenied. The caller's selectors are those attested
//! when the stream opened; the pinned process is released after the first message (it costs up
//! to four file descriptors), so a stream is bound to its connection, which the kernel closes
//! when the caller exits. Re-attesting means opening a new stream.
//!
//! # Bounded work
//!
//! Nothing here spawns a task per call or per stream: a stream is a state machine polled by
//! the connection that carries it, so when the connection closes (or the client cancels the
//! stream) the stream and its cache subscription are dropped. Limits ([`WorkloadApiLimits`]):
//! connections (further clients wait in the listen backlog), connections per uid (one local
//! user cannot take every slot), a deadline for a new connection's first bytes (silent
//! connections are closed; HTTP/2 keepalive pings reap dead ones), HTTP/2 streams per connection,
//! open streams in total (further streams: Unavailable), and calls between attestation and
//! answer at once (they hold the pinned process's descriptors; further calls wait). On
//! shutdown every stream ends with Unavailable so that connections drain.
//!
//! WIT-SVID RPCs are answered Unimplemented (the optional WIT profile is not supported).
//!
//! Envoy's Secret Discovery Service ([`crate::sds`]) is served on the same socket (see
//! `socket.rs`). It reuses the steps above (without the security header, which Envoy does not
//! send), the stream limit and the shutdown signal, through the `pub(crate)` items re-exported
//! here.

mod caller;
mod service;
mod socket;
mod views;

use std::sync::Arc;
use std::time::Duration;

use tessera_common::audit::AuditLog;
use tessera_common::metrics::GrpcCallMetrics;
use tessera_spiffe::spiffe_id::TrustDomain;
use tokio::sync::{Semaphore, watch};

use crate::attestor::UnixAttestor;
use crate::cache::{Cache, JwtSvidSource};

pub use caller::SECURITY_HEADER;
pub(crate) use caller::log_no_identity;
pub(crate) use service::{Caller, Wait, shutting_down};
pub use socket::{ServeError, bind_socket};
pub(crate) use views::{Visibility, caller_identities};

/// Bounds on the work the Workload API accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadApiLimits {
    /// Connections served at once; more wait in the socket's listen backlog.
    pub max_connections: usize,
    /// Connections one uid may hold at once; more are closed at once, so that one local user
    /// cannot take every connection slot.
    pub max_connections_per_uid: usize,
    /// How long a new connection may stay silent before its first bytes (the HTTP/2 preface);
    /// silent connections are closed so they do not hold a slot.
    pub handshake_timeout: Duration,
    /// HTTP/2 streams (calls) a single connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Streaming calls open at once over all connections; more are refused with Unavailable.
    pub max_open_streams: usize,
    /// Calls between attestation and answer at once; more wait for a slot.
    pub max_attesting_calls: usize,
    /// How long a call waits for the agent's first sync (or a matching entry's SVID).
    pub ready_timeout: Duration,
    /// How long `FetchJWTSVID` waits for the JWT-SVIDs it needs.
    pub jwt_timeout: Duration,
    /// How long shutdown waits for connections to close.
    pub drain_timeout: Duration,
}

impl Default for WorkloadApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_uid: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 256,
            max_open_streams: 32_768,
            max_attesting_calls: 256,
            ready_timeout: Duration::from_secs(5),
            jwt_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// The Workload API service: cheap to clone, clones share state.
#[derive(Clone)]
pub struct WorkloadApi {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Arc<Cache>,
    attestor: Arc<UnixAttestor>,
    jwt_source: Arc<dyn JwtSvidSource>,
    trust_domain: TrustDomain,
    limits: WorkloadApiLimits,
    /// One permit per open stream.
    streams: Arc<Semaphore>,
    /// One permit per call between attestation and answer.
    attesting: Arc<Semaphore>,
    /// Set to true at shutdown: every open stream ends.
    closing: watch::Sender<bool>,
    /// Where denials are recorded.
    audit: AuditLog,
    /// Calls by method and status.
    metrics: Arc<GrpcCallMetrics>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("trust_domain", &self.inner.trust_domain)
            .field("limits", &self.inner.limits)
            .field("open_streams", &self.open_streams())
            .finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// The Workload API of the agent of `trust_domain`, with default limits.
    pub fn new(
        cache: Arc<Cache>,
        attestor: Arc<UnixAttestor>,
        jwt_source: Arc<dyn JwtSvidSource>,
        trust_domain: TrustDomain,
    ) -> Self {
        Self::with_limits(cache, attestor, jwt_source, trust_domain, WorkloadApiLimits::default())
    }

    /// The Workload API with explicit limits (each at least 1).
    pub fn with_limits(
        cache: Arc<Cache>,
        attestor: Arc<UnixAttestor>,
        jwt_source: Arc<dyn JwtSvidSource>,
        trust_domain: TrustDomain,
        limits: WorkloadApiLimits,
    ) -> Self {
        let streams = Arc::new(Semaphore::new(limits.max_open_streams.clamp(1, Semaphore::MAX_PERMITS)));
        let attesting = Arc::new(Semaphore::new(limits.max_attesting_calls.clamp(1, Semaphore::MAX_PERMITS)));
        let (closing, _) = watch::channel(false);
        // Until `with_metrics`, calls are counted in a registry nobody serves.
        let metrics = GrpcCallMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
            "calls",
            "call_seconds",
            crate::metrics::WORKLOAD_API_METHODS,
        );
        let audit = AuditLog::disabled();
        Self {
            inner: Arc::new(Inner {
                cache,
                attestor,
                jwt_source,
                trust_domain,
                limits,
                streams,
                attesting,
                closing,
                audit,
                metrics,
            }),
        }
    }

    /// Records denials in `audit`. Call before the service is cloned or served (later, it has
    /// no effect).
    #[must_use]
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.audit = audit;
        }
        self
    }

    /// Counts calls in `metrics`. Call before the service is cloned or served.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<GrpcCallMetrics>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = metrics;
        }
        self
    }

    /// The audit log denials go to.
    pub(crate) fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// How many streams are open now (Workload API and SDS streams share the limit).
    pub fn open_streams(&self) -> usize {
        let max = self.inner.limits.max_open_streams.clamp(1, Semaphore::MAX_PERMITS);
        max.saturating_sub(self.inner.streams.available_permits())
    }

    /// The agent's trust domain.
    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// Becomes true at shutdown, when every open stream (Workload API or SDS) must end.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }
}
