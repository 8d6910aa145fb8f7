//! SIGTERM and SIGINT for both binaries' `run`, registered before any socket exists: a signal
//! sent as soon as a socket appears (by a supervisor or a test) must start a graceful drain, not
//! kill a process that has not yet asked to hear about it.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The process's shutdown signals, listened for from [`ShutdownSignals::install`] on.
#[derive(Debug)]
pub struct ShutdownSignals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl ShutdownSignals {
    /// Registers for SIGTERM and SIGINT (inside a tokio runtime). A signal that cannot be
    /// listened for is logged and never resolves [`ShutdownSignals::recv`].
    pub fn install() -> Self {
        let register = |kind: SignalKind, name: &str| {
            signal(kind)
                .inspect_err(
                    |err| tracing::warn!(error = %err, "cannot listen for {name}; it will not stop the process"),
                )
                .ok()
        };
        Self { term: register(SignalKind::terminate(), "SIGTERM"), int: register(SignalKind::interrupt(), "SIGINT") }
    }

    /// Resolves with the name of the next signal received (`"SIGTERM"` or `"SIGINT"`).
    pub async fn recv(&mut self) -> &'static str {
        async fn next(signal: Option<&mut Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(self.term.as_mut()) => "SIGTERM",
            () = next(self.int.as_mut()) => "SIGINT",
        }
    }
}
