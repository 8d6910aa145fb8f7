//! Logging set-up shared by both binaries: stderr only (stdout carries command output), at the
//! configured level, as text or JSON, and the one-line report of the error that ends the
//! process.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{LogFormat, LogLevel};

/// Set once JSON logging is installed: from then on a fatal error is reported as a JSON event
/// too, so a log pipeline that expects one JSON object per line never receives a bare text line
/// at exit.
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// Installs the process's log subscriber: stderr, `level` (`RUST_LOG` is not consulted: the
/// configuration file is the one source), text or JSON. `quiet` lists crates kept at `warn`
/// unless the level is `trace` (the protocol crates are chatty at debug level).
///
/// `json` writes one JSON object per line: `timestamp`, `level`, `target`, and the event's
/// structured fields (its message included) under `fields`, plus the enclosing `span`s. Text is
/// coloured only when stderr is a terminal and `NO_COLOR` is unset, so log files and journald
/// never receive escape sequences. When a subscriber is already installed (tests), it is kept.
pub fn init(level: LogLevel, format: LogFormat, quiet: &[&str]) {
    let level = level.as_str();
    let mut directives = level.to_owned();
    if level != "trace" {
        for target in quiet {
            directives.push_str(&format!(",{target}=warn"));
        }
    }
    let filter = tracing_subscriber::EnvFilter::new(directives);
    let builder =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).with_ansi(stderr_wants_colour());
    match format {
        LogFormat::Text => {
            let _ = builder.try_init();
        }
        LogFormat::Json => JSON_LOGS.store(builder.json().try_init().is_ok(), Ordering::Relaxed),
    }
}

/// Whether text logs may carry ANSI colour codes: only on a terminal, and never with `NO_COLOR`
/// set to a non-empty value (<https://no-color.org>).
fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Reports the error that ends the process, as one line on stderr: `<binary>: <reason>`, or,
/// once JSON logging is on, an `ERROR` event whose `error` field holds the reason.
pub fn report_fatal(binary: &str, error: &anyhow::Error) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        tracing::error!(error = %format!("{error:#}"), "{binary} exiting on an error");
    } else {
        eprintln!("{binary}: {error:#}");
    }
}
