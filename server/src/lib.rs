//! `tessera-server`: the CA and control plane of one SPIFFE trust domain.
//!
//! Status: the command line is defined (the interface contract); the server itself is built
//! under issue 3. Every subcommand currently reports that it is not available yet and exits
//! non-zero, so no script can mistake this build for a working server.

pub mod cli;
pub mod config;
pub mod datastore;

use cli::{Cli, Command};

/// Run the parsed command line. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let name = match cli.command {
        Command::Run { .. } => "run",
        Command::Healthcheck(_) => "healthcheck",
        Command::Token(_) => "token",
        Command::Entry(_) => "entry",
        Command::Bundle(_) => "bundle",
        Command::Agent(_) => "agent",
        Command::X509(_) => "x509",
        Command::Jwt(_) => "jwt",
    };
    anyhow::bail!("`tessera-server {name}` is not available in this build yet")
}
