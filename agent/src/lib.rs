//! `tessera-agent`: the node agent. It attests to the server, attests local workloads from
//! their socket peer credentials and serves the SPIFFE Workload API.
//!
//! `run` attests to the server (or reuses the persisted agent SVID), keeps the snapshot cache
//! current ([`manager`]) and serves the Workload API ([`workload_api`]) and Envoy SDS ([`sds`])
//! on `socket_path`.
//! `api` and `healthcheck` ([`commands`]) are Workload API clients; `exchange`
//! ([`commands::exchange`]) trades an OIDC token for an SVID at the server, without an agent.

pub mod attestor;
pub mod cache;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod manager;
pub mod sds;
pub mod storage;
pub mod workload_api;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use cli::{Cli, Command};
use config::{AgentConfig, LogFormat};

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, join_token } => run_agent(config.as_deref(), join_token),
        Command::Healthcheck(socket) => commands::healthcheck(&socket),
        Command::Api(command) => commands::api(command),
        Command::Exchange(args) => commands::exchange::run(args),
    }
}

/// `tessera-agent run`: load the configuration, attest (or reuse the persisted agent SVID),
/// keep the cache current and serve the Workload API until SIGTERM or SIGINT, then shut down
/// (the Workload API first, so open streams end cleanly, then the manager).
///
/// Not served yet: the agent's `admin_socket` and the `[health]`/`[metrics]` endpoints.
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
    let cache = Arc::new(cache::Cache::new(cache::AgentSnapshot::empty(tessera_spiffe::bundle::BundleSet::new(
        tessera_spiffe::bundle::Bundle::new(config.trust_domain.clone()),
    ))));
    let manager = tokio::select! {
        started = manager::start(&config, join_token, Arc::clone(&cache)) => started?,
        signal = shutdown_signal() => {
            signal?;
            tracing::info!("stopping before start-up completed");
            return Ok(());
        }
    };
    let attestor = Arc::new(attestor::UnixAttestor::new(&attestor::UnixAttestorConfig {
        max_sha256_file_size: config.max_sha256_file_size,
        ..attestor::UnixAttestorConfig::default()
    }));
    let api =
        workload_api::WorkloadApi::new(Arc::clone(&cache), attestor, manager.jwt_source(), config.trust_domain.clone());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let socket_path = config.socket_path.clone();
    let mut api_task = tokio::spawn(async move {
        api.serve(&socket_path, async move {
            let _ = api_stopped.await;
        })
        .await
    });
    tracing::info!(server = %config.server_address, socket = %config.socket_path.display(), "agent running");
    let outcome = tokio::select! {
        signal = shutdown_signal() => signal,
        served = &mut api_task => {
            // The Workload API only ends by itself when it fails (e.g. the socket is in use).
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
    manager.shutdown().await;
    outcome
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Logs go to stderr at `log_level`, as text or JSON (`RUST_LOG` is not consulted).
///
/// `json` writes one JSON object per line: `timestamp`, `level`, `target`, and the event's
/// structured fields (its message included) under `fields`, plus the enclosing `span`s.
/// Text is coloured only when stderr is a terminal and `NO_COLOR` is unset, so log files and
/// journald never receive escape sequences.
fn init_logging(config: &AgentConfig) {
    let level = config.log_level.as_str();
    let quiet = if level == "trace" { "" } else { ",h2=warn,hyper=warn,hyper_util=warn,tower=warn,rustls=warn" };
    let filter = tracing_subscriber::EnvFilter::new(format!("{level}{quiet}"));
    let builder =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).with_ansi(stderr_wants_colour());
    match config.log_format {
        LogFormat::Text => {
            let _ = builder.try_init();
        }
        LogFormat::Json => JSON_LOGS.store(builder.json().try_init().is_ok(), std::sync::atomic::Ordering::Relaxed),
    }
}

/// Whether text logs may carry ANSI colour codes: only on a terminal, and never with `NO_COLOR`
/// set to a non-empty value (<https://no-color.org>).
fn stderr_wants_colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Set once `run` has installed JSON logging: from then on a fatal error is reported as a JSON
/// event too, so a log pipeline that expects one JSON object per line never receives a bare
/// text line at exit.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports the error that ends the process, as one line on stderr: `tessera-agent: <reason>`, or,
/// once JSON logging is on, an `ERROR` event whose `error` field holds the reason.
pub fn report_fatal(error: &anyhow::Error) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::error!(error = %format!("{error:#}"), "tessera-agent exiting on an error");
    } else {
        eprintln!("tessera-agent: {error:#}");
    }
}
