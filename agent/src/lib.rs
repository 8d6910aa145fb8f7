//! `tessera-agent`: the node agent. It attests to the server, attests local workloads from
//! their socket peer credentials and serves the SPIFFE Workload API.
//!
//! `run` attests to the server (or reuses the persisted agent SVID), keeps the snapshot cache
//! current ([`manager`]) and serves the Workload API ([`workload_api`]) and Envoy SDS ([`sds`])
//! on `socket_path`.
//! `api` and `healthcheck` ([`commands`]) are Workload API clients; `exchange`
//! ([`commands::exchange`]) trades an OIDC token for an SVID at the server, without an agent.

pub mod admin;
pub mod attestor;
pub mod cache;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod manager;
pub mod metrics;
pub mod sds;
pub mod storage;
pub mod workload_api;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use cli::{Cli, Command};
use config::AgentConfig;
use futures_util::FutureExt as _;

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, join_token } => run_agent(config.as_deref(), join_token),
        Command::Healthcheck(socket) => commands::healthcheck(&socket),
        Command::Api(command) => commands::api(command),
        Command::Diagnose(args) => commands::diagnose(&args),
        Command::Show { admin, output } => commands::show(&admin, output),
        Command::Exchange(args) => commands::exchange::run(args),
    }
}

/// `tessera-agent run`: load the configuration, attest (or reuse the persisted agent SVID),
/// keep the cache current and serve the Workload API, the admin socket and, when configured,
/// the `[health]` and `[metrics]` endpoints until SIGTERM or SIGINT, then shut down (the
/// Workload API first, so open streams end cleanly, then the manager). The audit log is opened
/// before anything else: a file that cannot be opened stops the start-up.
fn run_agent(file: Option<&Path>, join_token: Option<String>) -> anyhow::Result<()> {
    let config = config::load(file)?;
    init_logging(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(token) = &join_token {
        config::validate_join_token(&config.trust_domain, token)
            .map_err(|error| anyhow::anyhow!("--join-token: {error}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tessera-agent")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, join_token))
}

async fn serve(config: AgentConfig, join_token: Option<String>) -> anyhow::Result<()> {
    // Before any socket exists, so a SIGTERM sent as soon as one appears drains the agent.
    let mut signals = tessera_common::shutdown::ShutdownSignals::install();
    let audit = {
        let target = config.audit_target();
        tokio::task::spawn_blocking(move || tessera_common::audit::AuditLog::open(target))
            .await
            .context("the audit log could not be opened")??
    };
    // Bind the operator endpoints before attesting, so a port in use fails at once.
    let health_listener = match config.health.bind_address {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("health.bind_address {addr}"))?)
        }
        None => None,
    };
    let metrics_listener = match config.metrics.bind_address {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics.bind_address {addr}"))?)
        }
        None => None,
    };
    let admin_listener = admin::bind_admin_socket(&config.admin_socket)?;
    let cache = Arc::new(cache::Cache::new(cache::AgentSnapshot::empty(tessera_spiffe::bundle::BundleSet::new(
        tessera_spiffe::bundle::Bundle::new(config.trust_domain.clone()),
    ))));
    let manager = tokio::select! {
        started = manager::start(&config, join_token, Arc::clone(&cache)) => started?,
        signal = signals.recv() => {
            tracing::info!(signal, "stopping before start-up completed");
            return Ok(());
        }
    };
    let attestor = Arc::new(attestor::UnixAttestor::new(&attestor::UnixAttestorConfig {
        max_sha256_file_size: config.max_sha256_file_size,
        ..attestor::UnixAttestorConfig::default()
    }));
    let metrics = metrics::AgentMetrics::new(Arc::clone(&cache), manager.status_watch(), manager.server_errors());
    let api = workload_api::WorkloadApi::new(
        Arc::clone(&cache),
        Arc::clone(&attestor),
        manager.jwt_source(),
        config.trust_domain.clone(),
    )
    .with_audit(audit.clone())
    .with_metrics(metrics.workload_api());
    // Bound before "agent running" is logged, so the socket exists once the log says so.
    let listener = match workload_api::bind_socket(&config.socket_path) {
        Ok(listener) => listener,
        Err(error) => {
            manager.shutdown().await;
            return Err(anyhow::Error::new(error));
        }
    };
    let (stop_ops, ops_stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stopped = ops_stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let mut ops = tokio::task::JoinSet::new();
    let admin_api =
        admin::AgentAdmin::new(Arc::clone(&cache), attestor, manager.status_watch(), config.trust_domain.to_string());
    ops.spawn(admin::serve(admin_api, admin_listener, config.admin_socket.clone(), stopped()).map(|served| {
        if let Err(error) = served {
            tracing::error!("the admin socket failed: {error}");
        }
    }));
    if let Some(listener) = health_listener {
        let status = manager.status_watch();
        ops.spawn(serve_health(listener, status, stopped()));
    }
    if let Some(listener) = metrics_listener {
        ops.spawn(tessera_common::metrics::serve(listener, metrics.registry(), None, stopped()).map(|served| {
            if let Err(error) = served {
                tracing::error!("the metrics endpoint failed: {error}");
            }
        }));
    }
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let socket_path = config.socket_path.clone();
    let mut api_task = tokio::spawn(async move {
        api.serve_bound(listener, &socket_path, async move {
            let _ = api_stopped.await;
        })
        .await
    });
    tracing::info!(
        server = %config.server_address,
        socket = %config.socket_path.display(),
        admin_socket = %config.admin_socket.display(),
        health = ?config.health.bind_address,
        metrics = ?config.metrics.bind_address,
        audit = %tessera_common::audit::describe(audit.target()),
        "agent running"
    );
    tokio::select! {
        signal = signals.recv() => {
            tracing::info!(signal, "shutdown signal received");
        }
        served = &mut api_task => {
            // The Workload API only ends by itself when it fails (e.g. the socket is in use).
            stop_ops.send_replace(true);
            while ops.join_next().await.is_some() {}
            manager.shutdown().await;
            return match served {
                Ok(Ok(())) => Err(anyhow::anyhow!("the Workload API stopped unexpectedly")),
                Ok(Err(error)) => Err(anyhow::Error::new(error)),
                Err(error) => Err(anyhow::anyhow!("the Workload API task failed: {error}")),
            };
        }
    };
    tracing::info!("shutting down");
    let _ = stop_api.send(());
    match api_task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!("the Workload API ended with an error: {error}"),
        Err(error) => tracing::warn!("the Workload API task failed: {error}"),
    }
    stop_ops.send_replace(true);
    while ops.join_next().await.is_some() {}
    manager.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    Ok(())
}

/// `GET /live` (200 while the process serves) and `GET /ready` (200 once the agent is attested
/// and has synced with the server at least once, 503 with the reason otherwise).
async fn serve_health(
    listener: tokio::net::TcpListener,
    status: tokio::sync::watch::Receiver<manager::AgentStatus>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::http::StatusCode;
    let router = axum::Router::new().route("/live", axum::routing::get(|| async { (StatusCode::OK, "live\n") })).route(
        "/ready",
        axum::routing::get(move || {
            let status = status.borrow().clone();
            async move {
                if status.is_healthy() {
                    (StatusCode::OK, "ready\n".to_owned())
                } else if !status.attested {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready: the agent is not attested\n".to_owned())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready: no sync with the server yet\n".to_owned())
                }
            }
        }),
    );
    if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(stopped).await {
        tracing::error!("the health endpoint failed: {error}");
    }
}

/// Logs go to stderr at `log_level`, as text or JSON; see [`tessera_common::logging::init`].
fn init_logging(config: &AgentConfig) {
    tessera_common::logging::init(
        config.log_level,
        config.log_format,
        &["h2", "hyper", "hyper_util", "tower", "rustls"],
    );
}

/// Reports the error that ends the process, as one line on stderr: `tessera-agent: <reason>`, or,
/// once JSON logging is on, an `ERROR` event whose `error` field holds the reason.
pub fn report_fatal(error: &anyhow::Error) {
    tessera_common::logging::report_fatal("tessera-agent", error);
}
