//! Thin entry point: parse the command line, run, print one-line errors.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tessera_server::cli::Cli::parse();
    match tessera_server::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tessera-server: {err:#}");
            ExitCode::FAILURE
        }
    }
}
