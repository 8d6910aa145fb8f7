//! The server's Prometheus metrics (served on `[metrics] bind_address`, see
//! docs/operations.md for the list and the alerts worth setting).
//!
//! Counters and histograms on hot paths are created once here and only touched through
//! atomics: signing ([`SigningMetrics`], owned by the CA), attestation results, the agent
//! API's calls per method and status ([`GrpcCallMetrics`], a tower layer), open sync streams
//! and how long a change takes to reach an open stream. Gauges that cost I/O (entries, agents,
//! the datastore revision) are refreshed from the datastore when Prometheus scrapes, and the
//! time to the next CA and JWT-key rotation step is read from the CA's journal at the same
//! moment.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tessera_common::metrics::{GrpcCallMetrics, Histogram};

use crate::ca::CertificateAuthority;
use crate::ca::storage::SlotKind;
use crate::datastore::{DataStore, NodeFilter, PageRequest, blocking};

/// The agent API's methods, as (gRPC path, `method` label).
pub const AGENT_API_METHODS: &[(&str, &str)] = &[
    ("/tessera.agent.v1.AgentService/AttestAgent", "AttestAgent"),
    ("/tessera.agent.v1.AgentService/RenewAgent", "RenewAgent"),
    ("/tessera.agent.v1.AgentService/SyncEntries", "SyncEntries"),
    ("/tessera.agent.v1.AgentService/BatchNewX509Svid", "BatchNewX509Svid"),
    ("/tessera.agent.v1.AgentService/NewJwtSvid", "NewJwtSvid"),
    ("/tessera.agent.v1.AgentService/BatchNewJwtSvid", "BatchNewJwtSvid"),
    ("/tessera.agent.v1.AgentService/FetchBundle", "FetchBundle"),
];

type SvidLabels = [(&'static str, &'static str); 2];
type KindLabel = [(&'static str, &'static str); 1];

/// Counts and latency of one kind of signing, by outcome (handles into the families of
/// [`SigningMetrics`]).
#[derive(Debug, Clone)]
pub struct SigningOutcome {
    success: Counter,
    failure: Counter,
    latency: Histogram,
}

impl SigningOutcome {
    /// Records one signing that started at `start`.
    pub fn record(&self, ok: bool, start: Instant) {
        if ok { &self.success } else { &self.failure }.inc();
        self.latency.observe_since(start);
    }

    /// Successful signings so far.
    pub fn successes(&self) -> u64 {
        self.success.get()
    }
}

/// The CA's signing counters: X.509-SVIDs (workloads and admin mints), agent X.509-SVIDs and
/// JWT-SVIDs. Created with the CA; [`ServerMetrics`] registers its families, which share the
/// counts.
#[derive(Debug, Clone)]
pub struct SigningMetrics {
    svids: Family<SvidLabels, Counter>,
    latency: Family<KindLabel, Histogram, fn() -> Histogram>,
    /// Workload X.509-SVIDs.
    pub x509: SigningOutcome,
    /// Agent X.509-SVIDs (attestation and renewal).
    pub agent_x509: SigningOutcome,
    /// JWT-SVIDs.
    pub jwt: SigningOutcome,
}

impl Default for SigningMetrics {
    fn default() -> Self {
        let svids = Family::<SvidLabels, Counter>::default();
        let latency = Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(Histogram::default);
        let outcome = |kind: &'static str| SigningOutcome {
            success: svids.get_or_create_owned(&[("type", kind), ("outcome", "success")]),
            failure: svids.get_or_create_owned(&[("type", kind), ("outcome", "failure")]),
            latency: latency.get_or_create_owned(&[("type", kind)]),
        };
        let (x509, agent_x509, jwt) = (outcome("x509"), outcome("agent_x509"), outcome("jwt"));
        Self { svids, latency, x509, agent_x509, jwt }
    }
}

/// Every metric the server serves.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Arc<Registry>,
    attested: Counter,
    attestation_refused: Counter,
    entries: Gauge,
    agents: Gauge,
    revision: Gauge,
    sync_streams: Gauge,
    sync_delivery: Histogram,
    agent_api: Arc<GrpcCallMetrics>,
    next_rotation: Family<KindLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

/// Decrements the open sync stream gauge when the stream ends.
#[derive(Debug)]
pub struct OpenSyncStream(Gauge);

impl Drop for OpenSyncStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ServerMetrics {
    /// Registers every metric, including the CA's `signing` counters.
    pub fn new(signing: &SigningMetrics) -> Self {
        let mut registry = Registry::with_prefix("tessera_server");
        // The CA's own families: clones share the counts the CA increments.
        registry.register(
            "svids_signed",
            "SVIDs signed, by type (x509, agent_x509, jwt) and outcome",
            signing.svids.clone(),
        );
        registry.register("svid_signing_seconds", "Seconds spent signing one SVID, by type", signing.latency.clone());

        let attestations = Family::<KindLabel, Counter>::default();
        let attested = attestations.get_or_create_owned(&[("result", "success")]);
        let attestation_refused = attestations.get_or_create_owned(&[("result", "refused")]);
        registry.register("agent_attestations", "Agent attestations, by result", attestations);

        let entries = Gauge::default();
        registry.register("entries", "Registration entries in the datastore (read at scrape time)", entries.clone());
        let agents = Gauge::default();
        registry.register("agents", "Attested agents in the datastore, banned ones included", agents.clone());
        let revision = Gauge::default();
        registry.register("entries_revision", "The datastore's current entry revision", revision.clone());
        let sync_streams = Gauge::default();
        registry.register(
            "sync_streams",
            "Open SyncEntries streams (about one per connected agent)",
            sync_streams.clone(),
        );
        let sync_delivery = Histogram::default();
        registry.register(
            "sync_delivery_seconds",
            "Seconds from an entry change to its delivery on an open sync stream (the sync lag)",
            sync_delivery.clone(),
        );
        let next_rotation = Family::default();
        registry.register(
            "ca_next_rotation_seconds",
            "Seconds until the next rotation step (prepare, activate or drop) of the X.509 CA or JWT key, by kind",
            next_rotation.clone(),
        );
        let agent_api = GrpcCallMetrics::register_with_refusals(
            &mut registry,
            "agent_api_calls",
            "agent_api_call_seconds",
            "agent_api_refusals",
            AGENT_API_METHODS,
        );
        Self {
            registry: Arc::new(registry),
            attested,
            attestation_refused,
            entries,
            agents,
            revision,
            sync_streams,
            sync_delivery,
            agent_api,
            next_rotation,
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// The agent API's call metrics (for its tower layer).
    pub fn agent_api(&self) -> Arc<GrpcCallMetrics> {
        Arc::clone(&self.agent_api)
    }

    /// Records an attestation's result.
    pub fn attestation(&self, success: bool) {
        if success { &self.attested } else { &self.attestation_refused }.inc();
    }

    /// Counts an open sync stream until the returned guard is dropped.
    pub fn sync_stream_opened(&self) -> OpenSyncStream {
        self.sync_streams.inc();
        OpenSyncStream(self.sync_streams.clone())
    }

    /// Records how long a change took to reach a stream.
    pub fn sync_delivered(&self, since: Instant) {
        self.sync_delivery.observe_since(since);
    }

    /// Reads the gauges that cost I/O (at scrape time).
    pub async fn refresh(&self, datastore: &Arc<dyn DataStore>, ca: &CertificateAuthority) {
        let counted = blocking(datastore, |store| {
            let entries = store.count_entries()?;
            let revision = store.current_revision()?;
            let mut agents = 0u64;
            let mut token = None;
            loop {
                let page = store.list_attested_nodes(&NodeFilter::default(), &PageRequest { token, size: 1000 })?;
                agents = agents.saturating_add(page.items.len() as u64);
                match page.next_page_token {
                    Some(next) => token = Some(next),
                    None => break,
                }
            }
            Ok((entries, agents, revision))
        })
        .await;
        match counted {
            Ok((entries, agents, revision)) => {
                self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
                self.agents.set(i64::try_from(agents).unwrap_or(i64::MAX));
                self.revision.set(i64::try_from(revision).unwrap_or(i64::MAX));
            }
            Err(err) => tracing::warn!(error = %err, "metrics: cannot read counts from the datastore"),
        }
        let now = SystemTime::now();
        for (kind, label) in [(SlotKind::X509, "x509"), (SlotKind::Jwt, "jwt")] {
            let seconds = ca.next_step_at(kind).duration_since(now).unwrap_or(Duration::ZERO).as_secs_f64();
            self.next_rotation.get_or_create(&[("kind", label)]).set(seconds);
        }
    }
}
