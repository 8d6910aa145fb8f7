//! Thin entry point: parse the command line, run, report a failure as one line on stderr.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tessera_agent::cli::Cli::parse();
    match tessera_agent::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tessera_agent::report_fatal(&err);
            ExitCode::FAILURE
        }
    }
}
