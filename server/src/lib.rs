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
pub mod metrics;
pub mod oidc;
pub mod server;
pub mod token_exchange;

use std::path::Path;

use anyhow::Context as _;
use cli::{Cli, Command};
use config::ServerConfig;

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

/// Logs go to stderr at `log_level`, as text or JSON; see [`tessera_common::logging::init`].
fn init_logging(config: &ServerConfig) {
    tessera_common::logging::init(config.log_level, config.log_format, &["h2", "hyper", "hyper_util", "tower", "sled"]);
}

/// Reports the error that ends the process, as one line on stderr: `tessera-server: <reason>`, or,
/// once JSON logging is on, an `ERROR` event whose `error` field holds the reason.
pub fn report_fatal(error: &anyhow::Error) {
    tessera_common::logging::report_fatal("tessera-server", error);
}
