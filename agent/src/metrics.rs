//! The agent's Prometheus metrics (served on `[metrics] bind_address`; the list and the
//! alerts worth setting are in docs/operations.md).
//!
//! Workload API and SDS calls are counted by a tower layer on the socket
//! ([`GrpcCallMetrics`]: atomics only on the call path). Everything else is read when
//! Prometheus scrapes, from the published cache snapshot and the manager's status, so it costs
//! the Workload API nothing: cache size, the SVID expiry horizon (seconds until the soonest
//! cached SVID expires), the sync state and its age.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tessera_common::metrics::GrpcCallMetrics;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::manager::AgentStatus;

/// The Workload API's and SDS's methods, as (gRPC path, `method` label).
pub const WORKLOAD_API_METHODS: &[(&str, &str)] = &[
    ("/SpiffeWorkloadAPI/FetchX509SVID", "FetchX509SVID"),
    ("/SpiffeWorkloadAPI/FetchX509Bundles", "FetchX509Bundles"),
    ("/SpiffeWorkloadAPI/FetchJWTSVID", "FetchJWTSVID"),
    ("/SpiffeWorkloadAPI/FetchJWTBundles", "FetchJWTBundles"),
    ("/SpiffeWorkloadAPI/ValidateJWTSVID", "ValidateJWTSVID"),
    ("/SpiffeWorkloadAPI/FetchWITSVID", "FetchWITSVID"),
    ("/SpiffeWorkloadAPI/FetchWITBundles", "FetchWITBundles"),
    ("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets", "StreamSecrets"),
    ("/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets", "DeltaSecrets"),
    ("/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets", "FetchSecrets"),
];

/// Every metric the agent serves.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    workload_api: Arc<GrpcCallMetrics>,
}

impl AgentMetrics {
    /// Registers every metric: the Workload API's calls, `server_errors` (the manager's count of
    /// failed calls to the server), and the scrape-time view of `cache` and `status`.
    pub fn new(cache: Arc<Cache>, status: watch::Receiver<AgentStatus>, server_errors: Counter) -> Self {
        let mut registry = Registry::with_prefix("tessera_agent");
        let workload_api = GrpcCallMetrics::register(
            &mut registry,
            "workload_api_calls",
            "workload_api_call_seconds",
            WORKLOAD_API_METHODS,
        );
        registry.register(
            "server_connection_errors",
            "Failed calls and broken streams to the server (sync, minting, renewal)",
            server_errors,
        );
        registry.register_collector(Box::new(StateCollector { cache, status }));
        Self { registry: Arc::new(registry), workload_api }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// The Workload API's call metrics (for its tower layer).
    pub fn workload_api(&self) -> Arc<GrpcCallMetrics> {
        Arc::clone(&self.workload_api)
    }
}

/// Reads the cache and the manager's status at scrape time.
#[derive(Debug)]
struct StateCollector {
    cache: Arc<Cache>,
    status: watch::Receiver<AgentStatus>,
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    gauge.encode(metric)
}

fn seconds_between(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.cache.current();
        let status = self.status.borrow().clone();
        let now = SystemTime::now();
        gauge(
            &mut encoder,
            "cache_entries",
            "Registration entries synced to this agent",
            snapshot.entry_count() as i64,
        )?;
        gauge(
            &mut encoder,
            "cache_svids",
            "X.509-SVIDs the agent holds for its entries",
            snapshot.identity_count() as i64,
        )?;
        if let Some(soonest) = snapshot.identities().map(|identity| identity.svid.expires_at()).min() {
            gauge(
                &mut encoder,
                "svid_expiry_horizon_seconds",
                "Seconds until the soonest-expiring cached X.509-SVID expires (absent when none is cached)",
                seconds_between(soonest, now),
            )?;
        }
        if let Some(expires_at) = status.agent_svid_expires_at {
            gauge(
                &mut encoder,
                "agent_svid_expiry_seconds",
                "Seconds until the agent's own SVID expires",
                seconds_between(expires_at, now),
            )?;
        }
        gauge(
            &mut encoder,
            "attested",
            "1 when the agent holds an agent SVID the server accepts",
            i64::from(status.attested),
        )?;
        gauge(
            &mut encoder,
            "sync_connected",
            "1 while the entry sync stream to the server is open",
            i64::from(status.connected),
        )?;
        gauge(
            &mut encoder,
            "sync_revision",
            "The last entry revision applied from the server",
            i64::try_from(status.revision).unwrap_or(i64::MAX),
        )?;
        // While the stream is open, changes arrive as they happen; once it is down the view is
        // at most this old (an upper bound: the last sync or applied change).
        let lag = match (status.connected, status.last_sync) {
            (true, Some(_)) => Some(0.0),
            (false, Some(last)) => Some(seconds_between(now, last)),
            (_, None) => None,
        };
        if let Some(lag) = lag {
            gauge(
                &mut encoder,
                "sync_lag_seconds",
                "0 while the sync stream is open; else seconds since the last sync (absent before the first)",
                lag,
            )?;
        }
        Ok(())
    }
}
