//! `tessera-agent`: the node agent. It attests to the server, attests local workloads from
//! their socket peer credentials and serves the SPIFFE Workload API.
//!
//! Status: the command line is defined (the interface contract); the agent itself is built
//! under issue 4. Every subcommand currently reports that it is not available yet and exits
//! non-zero.

pub mod attestor;
pub mod cache;
pub mod cli;
pub mod config;

use cli::{Cli, Command};

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let name = match cli.command {
        Command::Run { .. } => "run",
        Command::Healthcheck(_) => "healthcheck",
        Command::Api(_) => "api",
    };
    anyhow::bail!("`tessera-agent {name}` is not available in this build yet")
}
