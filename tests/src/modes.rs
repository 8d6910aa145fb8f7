//! The measurements behind `tessera-loadgen`'s subcommands. Each starts a real server (and,
//! for the Workload API figures, a real agent) in process, measures its figure over real
//! sockets, measures the matching limit in the same run, and returns the [`Figure`]s.
//!
//! The load generator shares the machine (and the process) with what it measures, so the
//! throughput ratios are conservative: client-side TLS, HTTP/2 and protobuf work is spent on
//! the same cores the limit probe had to itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_agent::attestor::{UnixAttestor, UnixAttestorConfig};
use tessera_agent::cache::{AgentSnapshot, Cache};
use tessera_agent::config::AgentConfig;
use tessera_agent::manager::{self, RunningManager};
use tessera_agent::workload_api::{WorkloadApi, bind_socket};
use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::workload as wl;
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::probe::{self, FloorServer};
use crate::report::{Figure, Target};
use crate::sim::{SimAgent, SimServer, TRUST_DOMAIN, new_csr, workload_entry};
use crate::stats::{Samples, micros, millis};

/// The audience of every JWT-SVID the load generator asks for.
pub const AUDIENCE: &str = "spiffe://loadgen.example/db";

pub(crate) fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Options of the throughput modes (`x509`, `jwt`).
#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    /// Simulated agents, each on its own mTLS connection.
    pub agents: usize,
    /// Entries per agent (= CSRs per `BatchNewX509Svid` batch).
    pub entries_per_agent: usize,
    /// Calls in flight per agent.
    pub in_flight: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time of the limit probe.
    pub probe_duration: Duration,
}

async fn agents_with_entries(
    server: &SimServer,
    mode: &str,
    options: &ThroughputOptions,
) -> anyhow::Result<Vec<(SimAgent, Vec<String>)>> {
    let mut agents = Vec::with_capacity(options.agents);
    for n in 0..options.agents {
        let agent = SimAgent::attest(server, &format!("lg-{mode}-{n}")).await?;
        let entries =
            server.create_entries(&agent.id, &format!("{mode}{n}"), options.entries_per_agent.max(1), uid())?;
        agents.push((agent, entries));
    }
    Ok(agents)
}

/// Runs `call` from `options.in_flight` tasks per agent until the deadline; returns items done,
/// item failures, call latencies and the wall time.
async fn drive<S, F, Fut>(
    agents: &[(SimAgent, S)],
    options: &ThroughputOptions,
    call: F,
) -> anyhow::Result<(u64, u64, Samples, Duration)>
where
    S: Clone + Send + Sync + 'static,
    F: Fn(SimAgent, S, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u64, u64)> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (agent, state) in agents {
        for lane in 0..options.in_flight.max(1) {
            let (agent, state, call) = (agent.clone(), state.clone(), call.clone());
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            tasks.spawn(async move {
                let mut samples = Samples::new();
                let mut n = lane as u64;
                while Instant::now() < deadline {
                    let began = Instant::now();
                    let (ok, bad) = call(agent.clone(), state.clone(), n).await;
                    samples.push(began.elapsed());
                    done.fetch_add(ok, Ordering::Relaxed);
                    failed.fetch_add(bad, Ordering::Relaxed);
                    n += 1;
                }
                samples
            });
        }
    }
    let mut samples = Samples::new();
    while let Some(result) = tasks.join_next().await {
        samples.extend(result.context("load task")?);
    }
    Ok((done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), samples, start.elapsed()))
}

fn print_progress(line: &str) {
    eprintln!("tessera-loadgen: {line}");
}

/// Prints the first failed call of each status code (the figures count them all), so a
/// failure count comes with its cause.
fn report_failure(mode: &str, status: &tonic::Status) {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<i32>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let first = SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(status.code() as i32);
    if first {
        print_progress(&format!("{mode}: call failed with {:?}: {}", status.code(), status.message()));
    }
}

/// `x509`: X.509-SVIDs/s through `BatchNewX509Svid` (see the [module docs](self)) against
/// "parse CSR + verify + sign" on all cores.
pub async fn x509(options: &ThroughputOptions) -> anyhow::Result<Vec<Figure>> {
    let server = SimServer::start_for_throughput().await?;
    let agents = agents_with_entries(&server, "x509", options).await?;
    // The CSRs are made before the clock starts; each batch asks for every entry of its agent.
    let mut batches = Vec::new();
    for (agent, entries) in agents {
        let params = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|entry_id| Ok(pb::NewX509SvidParams { entry_id, csr: new_csr()?.1 }))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        batches.push((agent, Arc::new(pb::BatchNewX509SvidRequest { params })));
    }
    let call = |agent: SimAgent, batch: Arc<pb::BatchNewX509SvidRequest>, _n: u64| async move {
        let items = batch.params.len() as u64;
        match agent.client.clone().batch_new_x509_svid((*batch).clone()).await {
            Ok(response) => {
                let ok = response
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| matches!(r.result, Some(pb::new_x509_svid_result::Result::Svid(_))))
                    .count() as u64;
                (ok, items - ok)
            }
            Err(status) => {
                report_failure("x509", &status);
                (0, items)
            }
        }
    };
    // Warm-up: one batch per agent, untimed.
    for (agent, batch) in &batches {
        let (_, bad) = call(agent.clone(), Arc::clone(batch), 0).await;
        if bad > 0 {
            bail!("warm-up batch of {} failed for {bad} items", agent.id);
        }
    }
    print_progress("x509: measuring BatchNewX509Svid");
    let (done, failed, mut latency, elapsed) = drive(&batches, options, call).await?;
    server.shutdown().await?;
    print_progress("x509: measuring the limit (parse CSR + verify + sign on all cores)");
    let cores = probe::cores();
    let probe_duration = options.probe_duration;
    let limit =
        tokio::task::spawn_blocking(move || probe::rate_on_all_cores(cores, probe_duration, probe::csr_sign_op))
            .await??;
    let rate = done as f64 / elapsed.as_secs_f64();
    Ok(vec![
        Figure::new("x509.svids_per_sec", rate, "/s", Target::RatioAtLeast(0.5))
            .against(limit, format!("rcgen_csr_verify_sign_x{cores}_threads")),
        Figure::new("x509.batch_p50_ms", millis(latency.percentile(50.0)), "ms", Target::None),
        Figure::new("x509.batch_p99_ms", millis(latency.percentile(99.0)), "ms", Target::None),
        Figure::new("x509.item_failures", failed as f64, "count", Target::Zero),
    ])
}

/// `jwt`: JWT-SVIDs/s through `BatchNewJwtSvid` (one token per entry of the agent per call,
/// as agents batch their misses) against the raw ES256 mint rate on all cores; then, for
/// comparison, the same through the unary `NewJwtSvid` (one round trip per token).
pub async fn jwt(options: &ThroughputOptions) -> anyhow::Result<Vec<Figure>> {
    let server = SimServer::start_for_throughput().await?;
    let agents: Vec<(SimAgent, Arc<Vec<String>>)> = agents_with_entries(&server, "jwt", options)
        .await?
        .into_iter()
        .map(|(agent, entries)| (agent, Arc::new(entries)))
        .collect();
    let batch_call = |agent: SimAgent, entries: Arc<Vec<String>>, _n: u64| async move {
        let params: Vec<pb::NewJwtSvidRequest> = entries
            .iter()
            .map(|entry_id| pb::NewJwtSvidRequest { entry_id: entry_id.clone(), audiences: vec![AUDIENCE.to_owned()] })
            .collect();
        let items = params.len() as u64;
        match agent.client.clone().batch_new_jwt_svid(pb::BatchNewJwtSvidRequest { params }).await {
            Ok(response) => {
                let ok = response
                    .into_inner()
                    .results
                    .iter()
                    .filter(
                        |r| matches!(&r.result, Some(pb::new_jwt_svid_result::Result::Svid(s)) if !s.token.is_empty()),
                    )
                    .count() as u64;
                (ok, items - ok)
            }
            Err(status) => {
                report_failure("jwt", &status);
                (0, items)
            }
        }
    };
    let unary_call = |agent: SimAgent, entries: Arc<Vec<String>>, n: u64| async move {
        let entry_id = entries[(n as usize) % entries.len()].clone();
        let request = pb::NewJwtSvidRequest { entry_id, audiences: vec![AUDIENCE.to_owned()] };
        match agent.client.clone().new_jwt_svid(request).await {
            Ok(response) if !response.get_ref().token.is_empty() => (1, 0),
            Ok(_) => (0, 1),
            Err(status) => {
                report_failure("jwt unary", &status);
                (0, 1)
            }
        }
    };
    for (agent, entries) in &agents {
        if batch_call(agent.clone(), Arc::clone(entries), 0).await.1 > 0 {
            bail!("warm-up BatchNewJwtSvid failed for {}", agent.id);
        }
        if unary_call(agent.clone(), Arc::clone(entries), 0).await.1 > 0 {
            bail!("warm-up NewJwtSvid failed for {}", agent.id);
        }
    }
    print_progress("jwt: measuring BatchNewJwtSvid");
    let (done, failed, mut latency, elapsed) = drive(&agents, options, batch_call).await?;
    print_progress("jwt: measuring NewJwtSvid (unary)");
    let (unary_done, unary_failed, mut unary_latency, unary_elapsed) = drive(&agents, options, unary_call).await?;
    server.shutdown().await?;
    print_progress("jwt: measuring the limit (ES256 mint on all cores)");
    let cores = probe::cores();
    let probe_duration = options.probe_duration;
    let limit =
        tokio::task::spawn_blocking(move || probe::rate_on_all_cores(cores, probe_duration, probe::es256_mint_op))
            .await??;
    let rate = done as f64 / elapsed.as_secs_f64();
    let unary_rate = unary_done as f64 / unary_elapsed.as_secs_f64();
    let limit_name = format!("ring_es256_mint_x{cores}_threads");
    Ok(vec![
        Figure::new("jwt.svids_per_sec", rate, "/s", Target::RatioAtLeast(0.5)).against(limit, limit_name.clone()),
        Figure::new("jwt.batch_p50_ms", millis(latency.percentile(50.0)), "ms", Target::None),
        Figure::new("jwt.batch_p99_ms", millis(latency.percentile(99.0)), "ms", Target::None),
        Figure::new("jwt.failures", failed as f64, "count", Target::Zero),
        Figure::new("jwt.unary_svids_per_sec", unary_rate, "/s", Target::None).against(limit, limit_name),
        Figure::new("jwt.unary_call_p50_us", micros(unary_latency.percentile(50.0)), "us", Target::None),
        Figure::new("jwt.unary_call_p99_us", micros(unary_latency.percentile(99.0)), "us", Target::None),
        Figure::new("jwt.unary_failures", unary_failed as f64, "count", Target::Zero),
    ])
}

/// A server and a real agent (manager + Workload API on a Unix socket) in one process.
pub struct Deployment {
    /// The server.
    pub server: SimServer,
    /// The agent's manager.
    pub manager: RunningManager,
    /// The agent's ID.
    pub agent_id: SpiffeId,
    /// The Workload API socket.
    pub socket: PathBuf,
    stop_api: Option<oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<Result<(), tessera_agent::workload_api::ServeError>>>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment").field("agent_id", &self.agent_id).field("socket", &self.socket).finish()
    }
}

impl Deployment {
    /// Starts a server, attests an agent with a join token and serves its Workload API.
    pub async fn start() -> anyhow::Result<Self> {
        let server = SimServer::start().await?;
        server.new_join_token("lg-agent")?;
        let dir = server.dir().to_owned();
        let pem = dir.join("bootstrap.pem");
        std::fs::write(&pem, server.bundle().x509_authorities_pem()).context("writing the bootstrap bundle")?;
        let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
        let config = AgentConfig {
            trust_domain: trust_domain.clone(),
            server_address: server.addr().to_string(),
            data_dir: dir.join("agent"),
            trust_bundle_path: Some(pem),
            ..AgentConfig::default()
        };
        let cache = Arc::new(Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(trust_domain.clone())))));
        let manager = tokio::time::timeout(
            Duration::from_secs(60),
            manager::start(&config, Some("lg-agent".to_owned()), Arc::clone(&cache)),
        )
        .await
        .map_err(|_| anyhow!("the agent did not start within 60 s"))?
        .context("starting the agent")?;
        let agent_id = manager.status().agent_id.ok_or_else(|| anyhow!("the agent has no ID after start"))?;
        let attestor = Arc::new(UnixAttestor::new(&UnixAttestorConfig::default()));
        let api = WorkloadApi::new(cache, attestor, manager.jwt_source(), trust_domain);
        let socket = dir.join("api.sock");
        let listener = bind_socket(&socket).context("binding the Workload API socket")?;
        let (stop_api, stopped) = oneshot::channel::<()>();
        let api_task = tokio::spawn(api.serve_listener(listener, async {
            let _ = stopped.await;
        }));
        Ok(Self { server, manager, agent_id, socket, stop_api: Some(stop_api), api_task: Some(api_task) })
    }

    /// Creates a workload entry for this process's uid under the agent (through the server's
    /// datastore, as `entry create` does); returns its SPIFFE ID.
    pub async fn create_entry(&self, entry_id: &str) -> anyhow::Result<String> {
        let selectors = SelectorSet::parse_all(&[format!("unix:uid:{}", uid()).as_str()])?;
        let entry = workload_entry(entry_id, &self.agent_id, selectors)?;
        let store = self.server.store();
        let created = tokio::task::spawn_blocking(move || store.create_entry(&entry)).await??;
        Ok(created.spiffe_id.to_string())
    }

    /// Stops the Workload API, the agent and the server.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop_api.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.api_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.manager.shutdown().await;
        self.server.shutdown().await
    }
}

/// `message` as a Workload API request, with the security header every SPIFFE client sends.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    request
}

fn has_svid(response: &wl::X509svidResponse, spiffe_id: &str) -> bool {
    response.svids.iter().any(|svid| svid.spiffe_id == spiffe_id)
}

/// Reads `stream` until a message carries `spiffe_id`, within `limit`.
async fn wait_for_svid(
    stream: &mut tonic::Streaming<wl::X509svidResponse>,
    spiffe_id: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => bail!("no SVID for {spiffe_id} within {limit:?}"),
            Ok(Err(status)) => bail!("workload stream failed: {status}"),
            Ok(Ok(None)) => bail!("workload stream ended"),
            Ok(Ok(Some(message))) if has_svid(&message, spiffe_id) => return Ok(()),
            Ok(Ok(Some(_))) => {}
        }
    }
}

/// `propagation`: from an entry's creation returning to its SVID on an open
/// `FetchX509SVID` stream of a real agent; `entries` entries, one after the other.
pub async fn propagation(entries: usize) -> anyhow::Result<Vec<Figure>> {
    let deployment = Deployment::start().await?;
    let first = deployment.create_entry("prop-seed").await?;
    let mut client = SpiffeWorkloadApiClient::new(probe::uds_channel(&deployment.socket).await?)
        .max_decoding_message_size(64 * 1024 * 1024);
    let mut stream = client.fetch_x509svid(with_header(wl::X509svidRequest {})).await?.into_inner();
    wait_for_svid(&mut stream, &first, Duration::from_secs(60)).await?;
    print_progress(&format!("propagation: creating {entries} entries one at a time"));
    let mut samples = Samples::new();
    let mut failures = 0u64;
    for n in 0..entries {
        let spiffe_id = deployment.create_entry(&format!("prop-{n}")).await?;
        let created = Instant::now();
        match wait_for_svid(&mut stream, &spiffe_id, Duration::from_secs(30)).await {
            Ok(()) => samples.push(created.elapsed()),
            Err(error) => {
                print_progress(&format!("propagation: {error}"));
                failures += 1;
                break;
            }
        }
    }
    drop(stream);
    deployment.shutdown().await?;
    Ok(vec![
        Figure::new("propagation.p50_ms", millis(samples.percentile(50.0)), "ms", Target::None),
        Figure::new("propagation.p99_ms", millis(samples.percentile(99.0)), "ms", Target::Below(500.0)),
        Figure::new("propagation.max_ms", millis(samples.max()), "ms", Target::None),
        Figure::new("propagation.failures", failures as f64, "count", Target::Zero),
    ])
}

/// Options of the `workload` mode.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Concurrency levels (clients, each on its own connection).
    pub levels: Vec<usize>,
    /// Calls per level, split over the clients (at least `min_calls_per_client` each).
    pub calls_per_level: usize,
    /// Least calls per client.
    pub min_calls_per_client: usize,
    /// Open-loop load (a fixed arrival schedule) in place of closed-loop clients.
    pub open_loop: Option<OpenLoop>,
}

/// An open-loop load: `rate` calls per second in total, spread evenly over the clients on a
/// fixed schedule, for `duration` per measurement.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    /// Calls per second over all clients.
    pub rate: f64,
    /// How long each measurement runs.
    pub duration: Duration,
}

/// What an open-loop run measured.
#[derive(Debug, Default)]
struct OpenLoopRun {
    /// Latency of each successful call (see [`run_open_loop`] for where it starts).
    latency: Samples,
    /// How late the generator itself sent calls it was free to send (timer resolution and
    /// scheduling of the load generator, not the system under test).
    send_lag: Samples,
    failures: u64,
    /// Calls completed per second.
    achieved_rate: f64,
}

/// A Workload API client on one connection.
pub type WlClient = SpiffeWorkloadApiClient<Channel>;

async fn connect_clients(socket: &Path, count: usize) -> anyhow::Result<Vec<WlClient>> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(SpiffeWorkloadApiClient::new(probe::uds_channel(socket).await?));
    }
    Ok(clients)
}

/// Runs `calls` calls on each client at once (all clients concurrently, each sequentially);
/// returns the latency samples and the failure count.
async fn run_clients<F, Fut>(clients: &[WlClient], calls: usize, call: F) -> anyhow::Result<(Samples, u64)>
where
    F: Fn(WlClient) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, call, start) = (client.clone(), call.clone(), Arc::clone(&start));
        tasks.spawn(async move {
            start.wait().await;
            let mut samples = Samples::new();
            let mut failures = 0u64;
            for _ in 0..calls {
                let began = Instant::now();
                if call(client.clone()).await {
                    samples.push(began.elapsed());
                } else {
                    failures += 1;
                }
            }
            (samples, failures)
        });
    }
    let (mut samples, mut failures) = (Samples::new(), 0);
    while let Some(result) = tasks.join_next().await {
        let (s, f) = result.context("client task")?;
        samples.extend(s);
        failures += f;
    }
    Ok((samples, failures))
}

/// Drives `clients` open-loop: client `i` of `n` sends its `k`-th call at
/// `start + (i + k n) / rate`, whatever happened to earlier calls, until `duration` is over.
///
/// Latency is counted from the scheduled send time whenever the client was still busy with its
/// previous call at that time, so a stall of the system under test is charged to every call it
/// delayed (no coordinated omission). When the client was idle, latency starts at the actual
/// send: the generator's own timer lateness (tokio's timer has millisecond resolution) is
/// reported apart, as `send_lag`, rather than charged to the system.
async fn run_open_loop<F, Fut>(clients: &[WlClient], load: OpenLoop, call: F) -> anyhow::Result<OpenLoopRun>
where
    F: Fn(WlClient) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let n = clients.len().max(1);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = start + load.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let (client, call) = (client.clone(), call.clone());
        tasks.spawn(async move {
            let mut run = OpenLoopRun::default();
            let mut previous_done = start;
            for k in 0u64.. {
                let scheduled = start + Duration::from_secs_f64((i as f64 + (k as f64) * n as f64) / load.rate);
                if scheduled >= end {
                    break;
                }
                let began = if previous_done > scheduled {
                    scheduled
                } else {
                    tokio::time::sleep_until(scheduled).await;
                    let now = tokio::time::Instant::now();
                    run.send_lag.push(now - scheduled);
                    now
                };
                let ok = call(client.clone()).await;
                previous_done = tokio::time::Instant::now();
                if ok {
                    run.latency.push(previous_done - began);
                } else {
                    run.failures += 1;
                }
            }
            run
        });
    }
    let mut total = OpenLoopRun::default();
    while let Some(result) = tasks.join_next().await {
        let run = result.context("client task")?;
        total.latency.extend(run.latency);
        total.send_lag.extend(run.send_lag);
        total.failures += run.failures;
    }
    let elapsed = tokio::time::Instant::now().saturating_duration_since(start).max(Duration::from_millis(1));
    total.achieved_rate = total.latency.len() as f64 / elapsed.as_secs_f64();
    Ok(total)
}

/// The figures of one open-loop level: each API beside the floor under the same schedule.
async fn open_loop_level(
    deployment: &Deployment,
    floor: &FloorServer,
    level: usize,
    load: OpenLoop,
) -> anyhow::Result<Vec<Figure>> {
    print_progress(&format!("workload: open loop, {level} clients, {} calls/s for {:?}", load.rate, load.duration));
    let floor_clients = connect_clients(floor.socket(), level).await?;
    let mut floor_run = run_open_loop(&floor_clients, load, fetch_jwt).await?;
    drop(floor_clients);
    if floor_run.failures > 0 {
        bail!("the floor probe failed {} calls at {level} clients", floor_run.failures);
    }
    let clients = connect_clients(&deployment.socket, level).await?;
    let x509 = run_open_loop(&clients, load, fetch_x509_first).await?;
    let jwt = run_open_loop(&clients, load, fetch_jwt).await?;
    drop(clients);
    let floor_p50 = micros(floor_run.latency.percentile(50.0));
    let floor_p99 = micros(floor_run.latency.percentile(99.0));
    let tag = format!("workload.open.c{level}");
    let p99_target = if level == 100 { Target::Below(1000.0) } else { Target::None };
    let mut figures = vec![
        Figure::new(format!("{tag}.offered_rate"), load.rate, "/s", Target::None),
        Figure::new(format!("{tag}.floor_p50_us"), floor_p50, "us", Target::None),
        Figure::new(format!("{tag}.floor_p99_us"), floor_p99, "us", Target::None),
    ];
    for (name, mut run) in [("x509", x509), ("jwt", jwt)] {
        figures.push(
            Figure::new(
                format!("{tag}.{name}_p50_us"),
                micros(run.latency.percentile(50.0)),
                "us",
                Target::RatioAtMost(2.0),
            )
            .against(floor_p50, "tonic_uds_unary_plus_proc_attest_p50_same_load"),
        );
        figures.push(
            Figure::new(format!("{tag}.{name}_p99_us"), micros(run.latency.percentile(99.0)), "us", p99_target)
                .against(floor_p99, "tonic_uds_unary_plus_proc_attest_p99_same_load"),
        );
        figures.push(Figure::new(format!("{tag}.{name}_rate"), run.achieved_rate, "/s", Target::None));
        figures.push(Figure::new(
            format!("{tag}.{name}_send_lag_p99_us"),
            micros(run.send_lag.percentile(99.0)),
            "us",
            Target::None,
        ));
        figures.push(Figure::new(format!("{tag}.{name}_failures"), run.failures as f64, "count", Target::Zero));
    }
    Ok(figures)
}

/// One cached `FetchJWTSVID` (audience [`AUDIENCE`]); true when it returned a token.
pub async fn fetch_jwt(mut client: WlClient) -> bool {
    let request = with_header(wl::JwtsvidRequest { audience: vec![AUDIENCE.to_owned()], spiffe_id: String::new() });
    matches!(client.fetch_jwtsvid(request).await, Ok(response) if !response.get_ref().svids.is_empty())
}

/// Opens `FetchX509SVID` and reads its first message; true when it held an SVID.
pub async fn fetch_x509_first(mut client: WlClient) -> bool {
    match client.fetch_x509svid(with_header(wl::X509svidRequest {})).await {
        Ok(response) => matches!(response.into_inner().message().await, Ok(Some(m)) if !m.svids.is_empty()),
        Err(_) => false,
    }
}

/// `workload`: `FetchX509SVID` (first message) and `FetchJWTSVID` (cached) latency at each
/// concurrency level, against the tonic-unary-over-UDS + `/proc` floor at the same level.
pub async fn workload(options: &WorkloadOptions) -> anyhow::Result<Vec<Figure>> {
    probe::raise_open_file_limit();
    let deployment = Deployment::start().await?;
    let spiffe_id = deployment.create_entry("wl-0").await?;
    // Ready when the SVID is served; the JWT-SVID is minted once here so later calls hit the cache.
    let warm = SpiffeWorkloadApiClient::new(probe::uds_channel(&deployment.socket).await?);
    let mut stream = warm.clone().fetch_x509svid(with_header(wl::X509svidRequest {})).await?.into_inner();
    wait_for_svid(&mut stream, &spiffe_id, Duration::from_secs(60)).await?;
    drop(stream);
    if !fetch_jwt(warm.clone()).await {
        bail!("warm-up FetchJWTSVID failed");
    }
    drop(warm);
    let floor_dir = tempfile::Builder::new().prefix("tlf").tempdir_in("/tmp")?;
    let floor = FloorServer::start(&floor_dir.path().join("floor.sock"))?;
    let mut figures = Vec::new();
    for &level in &options.levels {
        if let Some(load) = options.open_loop {
            figures.extend(open_loop_level(&deployment, &floor, level, load).await?);
            continue;
        }
        let calls = (options.calls_per_level / level.max(1)).max(options.min_calls_per_client);
        print_progress(&format!("workload: {level} clients x {calls} calls"));
        let floor_clients = connect_clients(floor.socket(), level).await?;
        let (mut floor_samples, floor_failures) = run_clients(&floor_clients, calls, fetch_jwt).await?;
        drop(floor_clients);
        if floor_failures > 0 {
            bail!("the floor probe failed {floor_failures} calls at {level} clients");
        }
        let clients = connect_clients(&deployment.socket, level).await?;
        let (mut x509, x509_failures) = run_clients(&clients, calls, fetch_x509_first).await?;
        let (mut jwt, jwt_failures) = run_clients(&clients, calls, fetch_jwt).await?;
        drop(clients);
        let floor_p50 = micros(floor_samples.percentile(50.0));
        let floor_p99 = micros(floor_samples.percentile(99.0));
        let p99_target = if level == 100 { Target::Below(1000.0) } else { Target::None };
        for (name, samples, failures) in [("x509", &mut x509, x509_failures), ("jwt", &mut jwt, jwt_failures)] {
            figures.push(
                Figure::new(
                    format!("workload.c{level}.{name}_p50_us"),
                    micros(samples.percentile(50.0)),
                    "us",
                    Target::RatioAtMost(2.0),
                )
                .against(floor_p50, "tonic_uds_unary_plus_proc_attest_p50"),
            );
            figures.push(
                Figure::new(
                    format!("workload.c{level}.{name}_p99_us"),
                    micros(samples.percentile(99.0)),
                    "us",
                    p99_target,
                )
                .against(floor_p99, "tonic_uds_unary_plus_proc_attest_p99"),
            );
            figures.push(Figure::new(
                format!("workload.c{level}.{name}_failures"),
                failures as f64,
                "count",
                Target::Zero,
            ));
        }
    }
    floor.stop().await;
    deployment.shutdown().await?;
    Ok(figures)
}

/// A full `SyncEntries` from revision 0: entries received, wall time, and the error that
/// ended it early (a message-size failure would show here).
pub async fn full_sync(agent: &SimAgent) -> (usize, Duration, Option<String>) {
    use pb::sync_entries_response::Event;
    let start = Instant::now();
    let mut received = 0;
    let mut stream = match agent.client.clone().sync_entries(pb::SyncEntriesRequest { revision: 0 }).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (0, start.elapsed(), Some(status.to_string())),
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(300), stream.message()).await {
            Err(_) => return (received, start.elapsed(), Some("no sync message within 300 s".into())),
            Ok(Err(status)) => return (received, start.elapsed(), Some(status.to_string())),
            Ok(Ok(None)) => return (received, start.elapsed(), Some("sync stream ended before synced".into())),
            Ok(Ok(Some(message))) => match message.event {
                Some(Event::SnapshotPage(page)) => received += page.entries.len(),
                Some(Event::Synced(_)) => return (received, start.elapsed(), None),
                _ => {}
            },
        }
    }
}
