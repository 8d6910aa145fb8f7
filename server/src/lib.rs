//! `tessera-server`: the CA and control plane of one SPIFFE trust domain.
//!
//! # Code map
//!
//! - [`cli`]: the command line of the interface contract.
//! - [`config`]: the TOML configuration, loaded and checked before anything opens.
//! - [`server`]: `tessera-server run`: the shared [`server::ServerState`], the admin socket
//!   (peer-credential authorization), the health endpoints, graceful shutdown.
//! - [`agent_api`]: the server<->agent API (`tessera.agent.v1`) over TLS on `bind_address`.
//! - [`admin`]: the operator API (`tessera.admin.v1`); protobuf types stop there.
//! - `commands`: the client side of every management subcommand.
//! - [`datastore`]: everything persisted, behind the `DataStore` trait.
//! - [`ca`]: the X.509 CA and JWT signing key, persisted under `<data_dir>/ca`.
//! - [`oidc`]: OIDC discovery (`/.well-known/openid-configuration`, JWKS) for JWT-SVIDs.
//! - [`federation`]: the SPIFFE bundle endpoint and federation relationships.
//! - [`token_exchange`]: RFC 8693 token exchange: external OIDC tokens traded for SVIDs.

pub mod admin;
pub mod agent_api;
pub mod ca;
pub mod cli;
mod commands;
pub mod config;
pub mod datastore;
pub mod federation;
pub mod oidc;
pub mod server;
pub mod token_exchange;

use std::path::Path;

use anyhow::Context as _;
use cli::{Cli, Command};
use config::{LogFormat, ServerConfig};

/// Runs the parsed command line. An error is printed by `main` as one line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => run_server(config.as_deref()),
        command => commands::run(command),
    }
}

/// `tessera-server run`: the configuration is checked before a runtime, a log line or a
/// socket exists.
fn run_server(file: Option<&Path>) -> anyhow::Result<()> {
    let config = config::load(file)?;
    init_logging(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tessera-server")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(server::run(config))?;
    Ok(())
}

/// Logs go to stderr (stdout only carries command output), at `log_level`, as text or JSON.
/// `RUST_LOG` is not consulted: the configuration file is the one source.
///
/// `json` writes one JSON object per line: `timestamp`, `level`, `target`, and the event's
/// structured fields (its message included) under `fields`, plus the enclosing `span`s.
/// Text is coloured only when stderr is a terminal and `NO_COLOR` is unset, so log files and
/// journald never receive escape sequences.
fn init_logging(config: &ServerConfig) {
    let level = config.log_level.as_str();
    // The protocol crates are chatty at debug level; keep them at warn unless tracing.
    let quiet = if level == "trace" { "" } else { ",h2=warn,hyper=warn,hyper_util=warn,tower=warn,sled=warn" };
    let filter = tracing_subscriber::EnvFilter::new(format!("{level}{quiet}"));
    let builder =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).with_ansi(stderr_wants_colour());
    // `try_init` fails only when a subscriber is already set (tests): keep that one.
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

/// Reports the error that ends the process, as one line on stderr: `tessera-server: <reason>`, or,
/// once JSON logging is on, an `ERROR` event whose `error` field holds the reason.
pub fn report_fatal(error: &anyhow::Error) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::error!(error = %format!("{error:#}"), "tessera-server exiting on an error");
    } else {
        eprintln!("tessera-server: {error:#}");
    }
}
