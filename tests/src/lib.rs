//! Tessera's cross-crate and end-to-end tests live in this crate's `tests/` directory; this
//! library holds [`harness`] (running the real binaries from tests), [`oidc_issuer`] (a test
//! OIDC issuer over HTTPS that mints tokens) and the reusable part of the load generator,
//! `tessera-loadgen`:
//!
//! - [`sim`]: an in-process server on a sled datastore, and simulated agents that attest with a
//!   join token and then talk to the agent API over real mTLS;
//! - [`probe`]: the raw limits each figure is held to, measured in the same run (rates on all
//!   cores, the tonic-over-UDS + `/proc` attestation floor);
//! - [`stats`]: percentiles of latency samples;
//! - [`scale`]: entries in sled at 10k-1M: write rate, the real server binary's start-up
//!   time and memory per entry, one agent's full sync;
//! - [`handshake`]: TLS handshakes in memory with the server's side timed alone (S7);
//! - [`agent_load`]: the Workload API under many one-shot clients (A6) and many cancelled
//!   streams on one connection (A9);
//! - [`storm`]: ten thousand X.509-SVIDs due at once at a real agent (A8);
//! - [`mint_scale`]: minting time and CPU per entry for entries created one by one while a
//!   real agent syncs (how the cost grows with the number of entries);
//! - [`modes`]: the measurements themselves (one per `tessera-loadgen` subcommand), each
//!   returning [`report::Figure`]s that print the figure beside its limit and their ratio.
//!
//! The loadgen process is its own workload: Workload API calls are attested as this process
//! (`unix:uid:<our uid>`).

pub mod agent_load;
pub mod agent_memory;
pub mod cpu;
pub mod fleet;
pub mod handshake;
pub mod harness;
pub mod mint_scale;
pub mod modes;
pub mod oidc_issuer;
pub mod probe;
pub mod report;
pub mod rotation;
pub mod scale;
pub mod sim;
pub mod stats;
pub mod storm;
