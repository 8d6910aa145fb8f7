//! `tessera-agent`: the node agent. It attests to the server, attests local workloads from
//! their socket peer credentials and serves the SPIFFE Workload API.
//!
//! Status: `run` attests, syncs entries and keeps workload SVIDs current in the snapshot
//! cache ([`manager`]). The Workload API server, `healthcheck` and the `api` clients are built
//! on another branch; until they are merged, `run` serves no socket (see [`run_agent`]) and
//! the other subcommands report that they are not available yet.

pub mod attestor;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod manager;
pub mod storage;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use cli::{Cli, Command};
use config::{AgentConfig, LogFormat};

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let name = match cli.command {
        Command::Run { config, join_token } => return run_agent(config.as_deref(), join_token),
        Command::Healthcheck(_) => "healthcheck",
        Command::Api(_) => "api",
    };
    anyhow::bail!("`tessera-agent {name}` is not available in this build yet")
}

/// `tessera-agent run`: load the configuration, attest (or reuse the persisted agent SVID),
/// keep the cache current until SIGTERM or SIGINT, then shut down.
///
/// TODO(workload-api): start the Workload API server on `socket_path` with the cache, the
/// unix attestor and `manager.jwt_source()` once the `workload-api` branch is merged. Until
/// then the agent keeps its identities current but serves no socket.
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
    tracing::info!(server = %config.server_address, "agent running");
    shutdown_signal().await?;
    tracing::info!("shutting down");
    manager.shutdown().await;
    Ok(())
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

/// Logs go to stderr at `log_level`, as text or JSON.
fn init_logging(config: &AgentConfig) {
    let level = config.log_level.as_str();
    let quiet = if level == "trace" { "" } else { ",h2=warn,hyper=warn,hyper_util=warn,tower=warn,rustls=warn" };
    let filter = tracing_subscriber::EnvFilter::new(format!("{level}{quiet}"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    let _ = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
