//! Thin entry point: parse the command line, run, report a failure as one line on stderr.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tessera_server::cli::Cli::parse();
    match tessera_server::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tessera_server::report_fatal(&err);
            ExitCode::FAILURE
        }
    }
}
