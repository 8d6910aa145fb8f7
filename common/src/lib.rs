//! Code the Tessera server and agent share: configuration-file parsing helpers and the
//! operations plumbing (metrics endpoint, audit log) that both binaries serve.

pub mod audit;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod node_token;
pub mod shutdown;
pub mod x509pop;
