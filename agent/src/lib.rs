//! `tessera-agent`: the node agent. It attests to the server, attests local workloads from
//! their socket peer credentials and serves the SPIFFE Workload API.
//!
//! Status: the command line is defined (the interface contract). The Workload API
//! ([`workload_api`]) and its command-line clients (`api`, `healthcheck`: [`commands`]) are
//! built; `run` is wired by the agent manager and reports that it is not available yet.

pub mod attestor;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod config;
pub mod workload_api;

use cli::{Cli, Command};

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { .. } => anyhow::bail!("`tessera-agent run` is not available in this build yet"),
        Command::Healthcheck(socket) => commands::healthcheck(&socket),
        Command::Api(command) => commands::api(command),
    }
}
