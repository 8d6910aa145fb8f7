//! The running server: its shared state, its listeners and its lifecycle.
//!
//! [`start`] opens the datastore, loads the CA, signs the agent API's TLS certificate, binds the
//! agent API (`bind_address`, TLS), the admin socket (and the health endpoints when
//! configured) and spawns their tasks; [`RunningServer::shutdown`] stops them gracefully and
//! removes the socket file. [`run`] is `start` + wait for SIGINT/SIGTERM + `shutdown`, what
//! `tessera-server run` does. Tests call `start` and `shutdown` directly.
//!
//! # Extending the state
//!
//! [`ServerState`] is what every API handler holds (behind an `Arc`): the configuration, the
//! datastore and the CA ([`crate::ca::CertificateAuthority`], loaded or created at start, before
//! any socket accepts). [`ServerState::readiness`] checks both the datastore and that the CA
//! can sign. The agent API ([`crate::agent_api`]) is served next to the admin one from [`start_with`].
//!
//! # Admin socket authorization
//!
//! The socket's directory is 0700, and on top of that every accepted connection is checked
//! by its peer credentials (`SO_PEERCRED`, through tokio): only the server's own effective
//! uid and root are served; any other connection is logged and closed before a byte of
//! HTTP/2 is read.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tessera_spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;

use tessera_spiffe::tls::{BundleSource, SpiffeClientVerifier};

use crate::admin::AdminApi;
use crate::agent_api::AgentApi;
use crate::agent_api::tls::ServerSvid;
use crate::ca::{CaError, CertificateAuthority};
use crate::config::ServerConfig;
use crate::datastore::{DataStore, DataStoreError, DataStoreOptions, SledDataStore, blocking};
use crate::metrics::ServerMetrics;
use tessera_common::audit::AuditLog;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("cannot create data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The datastore could not be opened.
    #[error(transparent)]
    Datastore(#[from] DataStoreError),
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A well-known SPIFFE ID of the trust domain could not be built.
    #[error("trust domain {trust_domain}: {source}")]
    WellKnownId {
        /// The configured trust domain.
        trust_domain: String,
        /// Why.
        source: SpiffeIdError,
    },
    /// A node attestor's configuration cannot be used.
    #[error("{key}: {reason}")]
    NodeAttestor {
        /// The configuration key concerned.
        key: &'static str,
        /// What is wrong (names the file).
        reason: String,
    },
    /// The admin socket could not be prepared or bound.
    #[error("admin socket {}: {reason}", path.display())]
    AdminSocket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The agent API address could not be bound.
    #[error("bind_address {addr}: {source}")]
    AgentBind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The agent API's TLS identity could not be set up.
    #[error("agent API TLS: {0}")]
    AgentTls(String),
    /// The audit log could not be opened (names `audit.path` and the file).
    #[error(transparent)]
    Audit(#[from] tessera_common::audit::AuditError),
    /// The metrics endpoint address could not be bound.
    #[error("metrics.bind_address {addr}: {source}")]
    MetricsBind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The health endpoint address could not be bound.
    #[error("health.bind_address {addr}: {source}")]
    HealthBind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// An OIDC or federation listener could not be set up (issue 6).
    #[error("{key}: {reason}")]
    Federation {
        /// The configuration key concerned.
        key: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A listener failed while serving.
    #[error("{listener} failed: {reason}")]
    Serve {
        /// Which listener.
        listener: &'static str,
        /// Why.
        reason: String,
    },
}

/// What every API handler of one server shares.
#[derive(Debug)]
pub struct ServerState {
    config: ServerConfig,
    server_id: SpiffeId,
    datastore: Arc<dyn DataStore>,
    ca: Arc<CertificateAuthority>,
    federation: crate::federation::FederationHandle,
    x509pop: Option<crate::agent_api::x509pop::X509Pop>,
    node_tokens: crate::agent_api::node_token::NodeTokenAttestors,
    metrics: Arc<ServerMetrics>,
    audit: AuditLog,
}

impl ServerState {
    /// The state of a server with this configuration and datastore.
    pub fn new(
        config: ServerConfig,
        datastore: Arc<dyn DataStore>,
        ca: Arc<CertificateAuthority>,
    ) -> Result<Self, ServerError> {
        let server_id = config.trust_domain.id_from_segments(&["tessera", "server"]).map_err(|source| {
            ServerError::WellKnownId { trust_domain: config.trust_domain.name().to_owned(), source }
        })?;
        let x509pop =
            config
                .node_attestor
                .x509pop
                .as_ref()
                .map(crate::agent_api::x509pop::X509Pop::load)
                .transpose()
                .map_err(|reason| ServerError::NodeAttestor { key: "node_attestor.x509pop.ca_bundle_path", reason })?;
        let node_tokens = crate::agent_api::node_token::NodeTokenAttestors::load(&config)
            .map_err(|(key, reason)| ServerError::NodeAttestor { key, reason })?;
        let metrics = Arc::new(ServerMetrics::new(ca.signing_metrics()));
        Ok(Self {
            config,
            server_id,
            datastore,
            ca,
            federation: crate::federation::FederationHandle::default(),
            metrics,
            audit: AuditLog::disabled(),
            x509pop,
            node_tokens,
        })
    }

    /// The `k8s_psat` and `oidc` node attestors (each may be unconfigured).
    pub(crate) fn node_tokens(&self) -> &crate::agent_api::node_token::NodeTokenAttestors {
        &self.node_tokens
    }

    /// The x509pop node attestor, when configured.
    pub(crate) fn x509pop(&self) -> Option<&crate::agent_api::x509pop::X509Pop> {
        self.x509pop.as_ref()
    }

    /// The same state writing security events to `audit`.
    #[must_use]
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// The audit log (see docs/audit-log.md).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// The federation relationships (issue 6).
    pub fn federation(&self) -> &crate::federation::FederationHandle {
        &self.federation
    }

    /// The certificate authority of the trust domain.
    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The trust domain the server is the CA of.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// `spiffe://<td>/tessera/server`.
    pub fn server_id(&self) -> &SpiffeId {
        &self.server_id
    }

    /// The datastore.
    pub fn datastore(&self) -> &Arc<dyn DataStore> {
        &self.datastore
    }

    /// The agent ID a join token attests: `spiffe://<td>/tessera/agent/join_token/<token>`.
    pub fn join_token_agent_id(&self, token: &str) -> Result<SpiffeId, SpiffeIdError> {
        self.config.trust_domain.id_from_segments(&["tessera", "agent", "join_token", token])
    }

    /// `Ok` when the server can serve: the datastore answers and the CA can sign (a throwaway
    /// X.509-SVID and JWT-SVID are signed and verified). The error is a one-line reason.
    pub async fn readiness(&self) -> Result<(), String> {
        blocking(&self.datastore, |store| store.current_revision())
            .await
            .map_err(|err| format!("datastore not answering: {err}"))?;
        let ca = Arc::clone(&self.ca);
        tokio::task::spawn_blocking(move || ca.can_sign(SystemTime::now()))
            .await
            .map_err(|err| format!("CA check did not finish: {err}"))?
            .map_err(|err| format!("CA cannot sign: {err}"))
    }
}

/// A started server; see the [module documentation](self).
#[derive(Debug)]
pub struct RunningServer {
    state: Arc<ServerState>,
    admin_socket: PathBuf,
    agent_api_addr: SocketAddr,
    health_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    oidc_addr: Option<SocketAddr>,
    bundle_endpoint_addr: Option<SocketAddr>,
    token_exchange_addr: Option<SocketAddr>,
    agent_tls: Arc<rustls::ServerConfig>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<(), ServerError>>,
}

impl RunningServer {
    /// The shared state.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Where the admin API listens.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// Where the agent API listens (the bound address, so port 0 is resolved).
    pub fn agent_api_addr(&self) -> SocketAddr {
        self.agent_api_addr
    }

    /// Where the health endpoints listen (the bound address, so port 0 is resolved).
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Where `GET /metrics` listens (the bound address, so port 0 is resolved).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where OIDC discovery listens, when configured (bound address).
    pub fn oidc_addr(&self) -> Option<SocketAddr> {
        self.oidc_addr
    }

    /// Where the federation bundle endpoint listens, when configured (bound address).
    pub fn bundle_endpoint_addr(&self) -> Option<SocketAddr> {
        self.bundle_endpoint_addr
    }

    /// Where the token exchange endpoint listens, when configured (bound address).
    pub fn token_exchange_addr(&self) -> Option<SocketAddr> {
        self.token_exchange_addr
    }

    /// The TLS configuration the agent API accepts connections with (its certificate follows
    /// renewals), for benchmarks of the handshake.
    pub fn agent_api_tls_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.agent_tls)
    }

    /// The running federation relationships.
    pub fn federation(&self) -> &crate::federation::FederationHandle {
        self.state.federation()
    }

    /// Stops accepting, lets in-flight calls finish, removes the admin socket file, and waits
    /// (at most [`SHUTDOWN_RELEASE_WAIT`]) for the tasks spawned per call (sync streams,
    /// connections) to let go of the server's state, so the datastore is closed when this
    /// returns and the same data directory can be opened again at once.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop.send_replace(true);
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined.map_err(|err| ServerError::Serve { listener: "server task", reason: err.to_string() });
            if let Err(err) = outcome.and_then(|inner| inner)
                && result.is_ok()
            {
                result = Err(err);
            }
        }
        remove_socket_file(&self.admin_socket);
        let audit = self.state.audit().clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        let released = tokio::time::Instant::now() + SHUTDOWN_RELEASE_WAIT;
        while Arc::strong_count(&self.state) > 1 && tokio::time::Instant::now() < released {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&self.state) > 1 {
            tracing::debug!("server state still referenced after shutdown; the datastore closes when it is released");
        }
        result
    }

    /// Waits until one of the server's tasks ends by itself (which is a failure: they only
    /// end when told to).
    async fn failed(&mut self) -> ServerError {
        match self.tasks.join_next().await {
            Some(Ok(Err(err))) => err,
            Some(Ok(Ok(()))) => ServerError::Serve { listener: "a listener", reason: "stopped unexpectedly".into() },
            Some(Err(err)) => ServerError::Serve { listener: "server task", reason: err.to_string() },
            None => std::future::pending().await,
        }
    }
}

/// Runs the server until SIGINT or SIGTERM, then shuts it down gracefully.
pub async fn run(config: ServerConfig) -> Result<(), ServerError> {
    // Listen for signals before any socket exists: a SIGTERM sent as soon as the admin socket
    // appears (a supervisor, a test) must drain, not kill the process mid start-up.
    let mut signals = tessera_common::shutdown::ShutdownSignals::install();
    let mut server = start(config).await?;
    tracing::info!(
        trust_domain = %server.state.trust_domain(),
        admin_socket = %server.admin_socket.display(),
        agent_api = %server.agent_api_addr,
        health = ?server.health_addr,
        metrics = ?server.metrics_addr,
        audit = %tessera_common::audit::describe(server.state.audit().target()),
        "tessera-server started"
    );
    tokio::select! {
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down");
            server.shutdown().await?;
            tracing::info!("tessera-server stopped");
            Ok(())
        }
        err = server.failed() => {
            tracing::error!(error = %err, "shutting down after a failure");
            let _ = server.shutdown().await;
            Err(err)
        }
    }
}

/// Longest [`RunningServer::shutdown`] waits for per-call tasks to release the server's state.
pub const SHUTDOWN_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Opens the datastore, binds the listeners and spawns them.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    create_private_dir(&config.data_dir)
        .map_err(|source| ServerError::DataDir { path: config.data_dir.clone(), source })?;
    let path = config.datastore_path();
    let datastore = tokio::task::spawn_blocking(move || SledDataStore::open(path, DataStoreOptions::default()))
        .await
        .map_err(|err| DataStoreError::Open { path: config.datastore_path(), source: Box::new(err) })??;
    let datastore: Arc<dyn DataStore> = Arc::new(datastore);
    start_with(config, datastore).await
}

/// Like [`start`] with a datastore the caller opened (tests pass the in-memory one).
pub async fn start_with(config: ServerConfig, datastore: Arc<dyn DataStore>) -> Result<RunningServer, ServerError> {
    let admin_socket = config.admin_socket.clone();
    let health_bind = config.health.bind_address;
    let metrics_bind = config.metrics.bind_address;
    // The audit log first: a file that cannot be opened stops the start-up, naming the key.
    let audit = {
        let target = config.audit_target();
        tokio::task::spawn_blocking(move || AuditLog::open(target))
            .await
            .map_err(|err| ServerError::Serve { listener: "audit log", reason: err.to_string() })??
    };
    let ca = {
        let (config, datastore) = (config.clone(), Arc::clone(&datastore));
        tokio::task::spawn_blocking(move || {
            CertificateAuthority::load_or_create(
                &config.data_dir,
                &config,
                datastore.as_ref(),
                SystemTime::now(),
                &ring::rand::SystemRandom::new(),
            )
        })
        .await
        .map_err(|err| ServerError::Serve { listener: "CA start-up", reason: err.to_string() })??
    };
    let state = Arc::new(ServerState::new(config, datastore, Arc::new(ca))?.with_audit(audit));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();

    // The agent API's own certificate, signed by the CA before anything listens.
    let server_svid = {
        let state = Arc::clone(&state);
        tokio::task::spawn_blocking(move || ServerSvid::issue(&state))
            .await
            .map_err(|err| ServerError::AgentTls(err.to_string()))?
            .map_err(ServerError::AgentTls)?
    };
    let tls_config = {
        // The CA only (not the whole state): live TLS connections hold this closure.
        let ca = Arc::clone(state.ca());
        let bundle = BundleSource::from_fn(move || Arc::new(ca.bundle()));
        let clients = Arc::new(SpiffeClientVerifier::new(bundle).allow_anonymous());
        let mut config = tessera_spiffe::tls::server_config(clients, server_svid.resolver())
            .map_err(|err| ServerError::AgentTls(err.to_string()))?;
        no_session_resumption(&mut config);
        Arc::new(config)
    };

    // Bind everything before spawning anything, so a bind failure leaves nothing running.
    let agent_bind = state.config().bind_address;
    let agent_listener =
        TcpListener::bind(agent_bind).await.map_err(|source| ServerError::AgentBind { addr: agent_bind, source })?;
    let agent_api_addr =
        agent_listener.local_addr().map_err(|source| ServerError::AgentBind { addr: agent_bind, source })?;
    let admin_listener = bind_admin_socket(&admin_socket)?;
    let health_listener = match health_bind {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServerError::HealthBind { addr, source })?),
        None => None,
    };
    let health_addr = match &health_listener {
        Some(listener) => Some(listener.local_addr().map_err(|source| ServerError::HealthBind {
            addr: health_bind.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })?),
        None => None,
    };

    let metrics_listener = match metrics_bind {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServerError::MetricsBind { addr, source })?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr().map_err(|source| ServerError::MetricsBind {
            addr: metrics_bind.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })?),
        None => None,
    };

    let server_svid_resolver = server_svid.resolver();
    tasks.spawn(serve_admin(Arc::clone(&state), admin_listener, stopped.clone()));
    tasks.spawn(serve_agent_api(Arc::clone(&state), agent_listener, Arc::clone(&tls_config), stopped.clone()));
    {
        let (state, stopped) = (Arc::clone(&state), stopped.clone());
        tasks.spawn(async move {
            server_svid.renew_loop(state, stopped).await;
            Ok(())
        });
    }
    tasks.spawn({
        let (ca, store) = (Arc::clone(state.ca()), Arc::clone(state.datastore()));
        let stopped = stopped.clone();
        let audit = state.audit().clone();
        async move {
            crate::ca::rotation::run(ca, store, audit, stopped).await;
            Ok(())
        }
    });
    if let Some(listener) = health_listener {
        tasks.spawn(serve_health(Arc::clone(&state), listener, stopped.clone()));
    }
    if let Some(listener) = metrics_listener {
        tasks.spawn(serve_metrics(Arc::clone(&state), listener, stopped.clone()));
    }
    let extra = start_federation(&state, &server_svid_resolver, &mut tasks, &stopped).await;
    let extra = match extra {
        Ok((oidc_addr, bundle_endpoint_addr)) => {
            start_token_exchange(&state, &server_svid_resolver, &mut tasks, &stopped)
                .await
                .map(|token_exchange_addr| (oidc_addr, bundle_endpoint_addr, token_exchange_addr))
        }
        Err(err) => Err(err),
    };
    let (oidc_addr, bundle_endpoint_addr, token_exchange_addr) = match extra {
        Ok(extra) => extra,
        Err(err) => {
            stop.send_replace(true);
            while tasks.join_next().await.is_some() {}
            remove_socket_file(&admin_socket);
            return Err(err);
        }
    };
    Ok(RunningServer {
        state,
        admin_socket,
        agent_api_addr,
        health_addr,
        metrics_addr,
        oidc_addr,
        bundle_endpoint_addr,
        token_exchange_addr,
        agent_tls: tls_config,
        stop,
        tasks,
    })
}

/// OIDC discovery, the bundle endpoint and the federation relationships (issue 6), when
/// configured. Returns the bound addresses and the relationships' handle.
async fn start_federation(
    state: &Arc<ServerState>,
    server_svid: &Arc<tessera_spiffe::tls::SvidResolver>,
    tasks: &mut JoinSet<Result<(), ServerError>>,
    stopped: &watch::Receiver<bool>,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>), ServerError> {
    let config = state.config();
    let mut oidc_addr = None;
    if let (Some(addr), Some(issuer)) = (config.oidc.bind_address, config.jwt_issuer.as_deref()) {
        let fail = |reason: String| ServerError::Federation { key: "oidc.bind_address", reason };
        let router = crate::oidc::router(issuer, Arc::clone(state.ca())).map_err(fail)?;
        let listener = TcpListener::bind(addr).await.map_err(|err| fail(format!("{addr}: {err}")))?;
        oidc_addr = Some(listener.local_addr().map_err(|err| fail(err.to_string()))?);
        tasks.spawn(crate::oidc::serve(router, listener, stopped.clone()));
    }
    let endpoint = &config.federation.bundle_endpoint;
    let mut bundle_endpoint_addr = None;
    if let Some(addr) = endpoint.bind_address {
        let fail = |reason: String| ServerError::Federation { key: "federation.bundle_endpoint", reason };
        let tls = crate::federation::endpoint::tls_config(endpoint, Arc::clone(server_svid)).map_err(fail)?;
        let listener = TcpListener::bind(addr).await.map_err(|err| fail(format!("{addr}: {err}")))?;
        bundle_endpoint_addr = Some(listener.local_addr().map_err(|err| fail(err.to_string()))?);
        let router = crate::federation::endpoint::router(Arc::clone(state.ca()), endpoint.refresh_hint);
        tasks.spawn(crate::federation::endpoint::serve(router, listener, tls, stopped.clone()));
    }
    let relationships = config.federation.federates_with.clone();
    let relationships = tokio::task::spawn_blocking(move || {
        relationships.iter().map(crate::federation::Relationship::from_config).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|err| ServerError::Federation { key: "federation.federates_with", reason: err.to_string() })?
    .map_err(|reason| ServerError::Federation { key: "federation.federates_with", reason })?;
    state.federation().attach(stopped.clone());
    crate::federation::start_all(state, relationships)
        .await
        .map_err(|reason| ServerError::Federation { key: "federation.federates_with", reason })?;
    Ok((oidc_addr, bundle_endpoint_addr))
}

/// The token exchange endpoint (issue 9) when configured, and the replay-cache pruning when it
/// or a token node attestor is.
async fn start_token_exchange(
    state: &Arc<ServerState>,
    server_svid: &Arc<tessera_spiffe::tls::SvidResolver>,
    tasks: &mut JoinSet<Result<(), ServerError>>,
    stopped: &watch::Receiver<bool>,
) -> Result<Option<SocketAddr>, ServerError> {
    let config = &state.config().token_exchange;
    // The replay cache holds the exchange's and the token node attestors' `jti`s.
    if config.bind_address.is_some() || state.node_tokens().any() {
        let (state, stopped) = (Arc::clone(state), stopped.clone());
        tasks.spawn(async move {
            crate::token_exchange::prune_loop(state, stopped).await;
            Ok(())
        });
    }
    let Some(addr) = config.bind_address else {
        return Ok(None);
    };
    let fail = |key: &'static str| move |reason: String| ServerError::Federation { key, reason };
    let exchange = {
        let state = Arc::clone(state);
        tokio::task::spawn_blocking(move || crate::token_exchange::TokenExchange::new(state))
            .await
            .map_err(|err| fail("token_exchange")(err.to_string()))?
            .map_err(|(key, reason)| fail(key)(reason))?
    };
    let tls = crate::federation::endpoint::https_tls_config(
        config.profile,
        config.cert_path.as_deref(),
        config.key_path.as_deref(),
        Arc::clone(server_svid),
    )
    .map_err(fail("token_exchange"))?;
    let listener =
        TcpListener::bind(addr).await.map_err(|err| fail("token_exchange.bind_address")(format!("{addr}: {err}")))?;
    let bound = listener.local_addr().map_err(|err| fail("token_exchange.bind_address")(err.to_string()))?;
    let router = crate::token_exchange::endpoint::router(Arc::new(exchange));
    tasks.spawn(crate::federation::endpoint::serve_https(
        router,
        listener,
        tls,
        stopped.clone(),
        "token exchange endpoint",
    ));
    tracing::info!(address = %bound, "token exchange endpoint listening");
    Ok(Some(bound))
}

/// Resolves when the stop flag is raised (or its sender is gone).
pub(crate) async fn stop_requested(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

// ---- Admin socket ------------------------------------------------------------------------------

/// Turns session resumption off on the agent API's TLS configuration: no TLS 1.3 session
/// tickets are sent and no TLS 1.2 session is cached.
///
/// rustls sends two TLS 1.3 tickets after every full handshake by default, each stored in a
/// server-side cache of 256 sessions; that is work on every accept (suite item S7) that only
/// pays when an agent resumes. Agents keep one long-lived connection (HTTP/2 keepalive) and
/// reconnect when the server restarts (the cache is in memory: nothing to resume), when their
/// SVID is renewed (a new client configuration with an empty session store) or after a network
/// failure, when a fleet of more than about a hundred agents reconnecting at once has pushed
/// most of their sessions out of the cache. A full handshake also re-verifies the agent's
/// chain at the TLS layer, which a resumed one would not.
fn no_session_resumption(config: &mut rustls::ServerConfig) {
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Prepares the socket's directory (0700), removes a stale socket file nobody listens on,
/// and binds.
fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let fail = |reason: String| ServerError::AdminSocket { path: path.to_path_buf(), reason };
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    create_private_dir(parent).map_err(|err| fail(format!("cannot create directory {}: {err}", parent.display())))?;
    let meta = fs::metadata(parent).map_err(|err| fail(format!("cannot inspect {}: {err}", parent.display())))?;
    if meta.mode() & 0o1000 != 0 {
        // A shared sticky directory such as /tmp: never chmod it; the peer credential check
        // still protects the API.
        tracing::warn!(
            directory = %parent.display(),
            "the admin socket's directory is shared; put the socket in a private directory"
        );
    } else if meta.mode() & 0o777 != 0o700 {
        fs::set_permissions(parent, Permissions::from_mode(0o700))
            .map_err(|err| fail(format!("cannot make {} private (0700): {err}", parent.display())))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(fail("exists and is not a socket; refusing to remove it".into()));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail("another server is listening on it".into()));
            }
            tracing::info!(socket = %path.display(), "removing stale admin socket");
            fs::remove_file(path).map_err(|err| fail(format!("cannot remove the stale socket: {err}")))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(fail(format!("cannot inspect: {err}"))),
    }
    UnixListener::bind(path).map_err(|err| fail(format!("cannot bind: {err}")))
}

fn remove_socket_file(path: &Path) {
    if let Err(err) = fs::remove_file(path)
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %err, "cannot remove the admin socket");
    }
}

/// Whether a connection with these peer credentials may use the admin API.
fn peer_allowed(peer_uid: u32, server_uid: u32) -> bool {
    peer_uid == server_uid || peer_uid == 0
}

/// Admits the connection if its peer may use the admin API; logs and drops (closes) it
/// otherwise.
fn admit(stream: UnixStream, server_uid: u32) -> Option<UnixStream> {
    match stream.peer_cred() {
        Ok(cred) if peer_allowed(cred.uid(), server_uid) => Some(stream),
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin connection refused: only the server's uid and root may connect");
            None
        }
        Err(err) => {
            tracing::warn!(error = %err, "admin connection refused: cannot read its peer credentials");
            None
        }
    }
}

async fn serve_admin(
    state: Arc<ServerState>,
    listener: UnixListener,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let server_uid = rustix::process::geteuid().as_raw();
    let incoming = UnixListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Ok(stream) => admit(stream, server_uid).map(Ok),
        Err(err) => Some(Err(err)),
    });
    tonic::transport::Server::builder()
        .add_service(AdminApi::new(state).into_service())
        .serve_with_incoming_shutdown(incoming, stop_requested(stopped))
        .await
        .map_err(|err| ServerError::Serve { listener: "admin API", reason: err.to_string() })
}

// ---- Agent API ---------------------------------------------------------------------------------

async fn serve_agent_api(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    let incoming = crate::agent_api::tls::incoming(listener, acceptor, stopped.clone());
    tonic::transport::Server::builder()
        .layer(tessera_common::metrics::GrpcMetricsLayer::new(state.metrics().agent_api()))
        .add_service(AgentApi::new(state, stopped.clone()).into_service())
        .serve_with_incoming_shutdown(incoming, stop_requested(stopped))
        .await
        .map_err(|err| ServerError::Serve { listener: "agent API", reason: err.to_string() })
}

// ---- Health ------------------------------------------------------------------------------------

async fn serve_health(
    state: Arc<ServerState>,
    listener: TcpListener,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let router = Router::new().route("/live", get(live)).route("/ready", get(ready)).with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(stop_requested(stopped))
        .await
        .map_err(|err| ServerError::Serve { listener: "health endpoint", reason: err.to_string() })
}

// ---- Metrics -----------------------------------------------------------------------------------

async fn serve_metrics(
    state: Arc<ServerState>,
    listener: TcpListener,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let registry = state.metrics().registry();
    let refresh: tessera_common::metrics::Refresh = Arc::new(move || {
        let state = Arc::clone(&state);
        Box::pin(async move { state.metrics().refresh(state.datastore(), state.ca()).await })
    });
    tessera_common::metrics::serve(listener, registry, Some(refresh), stop_requested(stopped))
        .await
        .map_err(|err| ServerError::Serve { listener: "metrics endpoint", reason: err.to_string() })
}

async fn live() -> (StatusCode, &'static str) {
    (StatusCode::OK, "live\n")
}

async fn ready(State(state): State<Arc<ServerState>>) -> (StatusCode, String) {
    match state.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_uid_and_root_are_admitted() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(65534, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1000, 0));
    }

    #[test]
    fn stale_socket_is_replaced_and_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private/admin.sock");
        // A stale socket: bound, then its listener dropped.
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let listener = rt.block_on(async { bind_admin_socket(&path) }).unwrap();
        let mode = fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // A live one is not taken over.
        let err = rt.block_on(async { bind_admin_socket(&path) }).unwrap_err();
        assert!(err.to_string().contains("another server is listening"), "{err}");
        drop(listener);
        // A regular file is never removed.
        let file = dir.path().join("private/file");
        fs::write(&file, b"x").unwrap();
        assert!(rt.block_on(async { bind_admin_socket(&file) }).is_err());
        assert!(file.exists());
    }
}
