//! The Workload API of a real agent under two client patterns the warm-connection benches do
//! not show:
//!
//! - `wl-throughput` (suite item A6, [`wl_throughput`]): many workloads at once, each fetch on a
//!   new connection (`FetchX509SVID`, first message), as one-shot clients and short-lived
//!   processes do. The agent (manager and Workload API) runs on a runtime of its own
//!   ([`TrackedRuntime`]), so the figure is fetches per second of the agent's CPU time, held
//!   to `1/(L_attest + L_newconn/2)`: the `/proc` reads of attestation plus the server's half
//!   of a new connection and a unary call (both measured in the same run; `L_newconn` is a
//!   tonic unary call on a new Unix-socket connection to a server that does nothing else).
//!   Figure and limit are both CPU time ([`NewconnLimits`]): the machine is shared, and wall
//!   time per probe call grows with other processes' load where CPU time does not.
//! - `stream-hygiene` (suite item A9, [`stream_hygiene`]): many `FetchX509SVID` streams, one
//!   after the other on ONE connection, each cancelled by the client after its first message
//!   (what a one-shot client on a kept connection does). HTTP/2 servers limit resets per
//!   connection; hitting a limit shows as failed calls or a new connection (the connector counts
//!   them). Latency is held to the A3 goal against the unary + `/proc` floor on a connection of
//!   its own, run in blocks alternating with the streams' so both see the machine in the same
//!   state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tessera_agent::cache::Cache;
use tessera_spiffe::{SelectorSet, SpiffeId};
use tessera_wire::workload as wl;
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cpu::TrackedRuntime;
use crate::mint_scale::{Agent, start_agent_with, stop_agent};
use crate::modes::{Deployment, WlClient, fetch_jwt, with_header};
use crate::probe::{self, FloorServer};
use crate::report::{Figure, Target};
use crate::sim::{SimServer, TRUST_DOMAIN, workload_entry};
use crate::stats::{Samples, micros, millis};

fn progress(mode: &str, line: &str) {
    eprintln!("tessera-loadgen: {mode}: {line}");
}

/// A server and a real agent, each on a tokio runtime of its own, so the CPU time of each is
/// read apart from the other's and from the clients'.
pub(crate) struct Stage {
    pub(crate) server_rt: TrackedRuntime,
    pub(crate) agent_rt: TrackedRuntime,
    pub(crate) server: SimServer,
    pub(crate) agent_id: SpiffeId,
    token: String,
}

impl Stage {
    /// Starts the server (without the per-agent signing rate limit when `unlimited`) and
    /// registers a join token for the agent; the agent is started by [`Stage::start_agent`].
    pub(crate) async fn server(name: &str, unlimited: bool) -> anyhow::Result<Self> {
        let server_rt = TrackedRuntime::new("lg-server", probe::cores())?;
        let agent_rt = TrackedRuntime::new("lg-agent", probe::cores())?;
        let dir = tempfile::Builder::new().prefix("tlst").tempdir_in("/tmp").context("temporary directory")?;
        let server = server_rt
            .run(SimServer::start_configured(dir, move |config| {
                if unlimited {
                    config.agent_svid_rate_limit = 0;
                }
            }))
            .await??;
        let token = format!("lg-{name}");
        server.new_join_token(&token)?;
        let agent_id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{token}"))?;
        std::fs::write(server.dir().join("bootstrap.pem"), server.bundle().x509_authorities_pem())
            .context("writing the bootstrap bundle")?;
        Ok(Self { server_rt, agent_rt, server, agent_id, token })
    }

    /// An entry `entry_id` under the agent for this process (`unix:uid:<our uid>`).
    pub(crate) fn own_entry(&self, entry_id: &str) -> anyhow::Result<String> {
        let uid = rustix::process::getuid().as_raw();
        let selectors = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()])?;
        let created = self.server.store().create_entry(&workload_entry(entry_id, &self.agent_id, selectors)?)?;
        Ok(created.spiffe_id.to_string())
    }

    /// Starts the agent (manager and Workload API) on its runtime, publishing to `cache`.
    pub(crate) async fn start_agent(&self, cache: Arc<Cache>) -> anyhow::Result<Agent> {
        let (addr, dir, token) = (self.server.addr().to_string(), self.server.dir().to_owned(), self.token.clone());
        self.agent_rt.run(start_agent_with(addr, dir, token, cache)).await?
    }

    /// Stops the agent, then the server, then both runtimes.
    pub(crate) async fn stop(self, agent: Agent) -> anyhow::Result<()> {
        self.agent_rt.run(stop_agent(agent)).await?;
        self.server_rt.run(self.server.shutdown()).await??;
        self.server_rt.shutdown();
        self.agent_rt.shutdown();
        Ok(())
    }
}

/// An empty cache for an agent of the simulated trust domain.
pub(crate) fn empty_cache() -> anyhow::Result<Arc<Cache>> {
    use tessera_agent::cache::AgentSnapshot;
    use tessera_spiffe::bundle::{Bundle, BundleSet};
    let trust_domain = tessera_spiffe::TrustDomain::new(TRUST_DOMAIN)?;
    Ok(Arc::new(Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(trust_domain))))))
}

/// Opens `FetchX509SVID` and reads its first message, then drops the stream (the client
/// cancels it); `Err` names why it failed.
pub async fn fetch_x509_once(mut client: WlClient) -> Result<(), String> {
    let mut stream =
        client.fetch_x509svid(with_header(wl::X509svidRequest {})).await.map_err(status_text)?.into_inner();
    match stream.message().await {
        Ok(Some(message)) if !message.svids.is_empty() => Ok(()),
        Ok(Some(_)) => Err("a first message without SVIDs".to_owned()),
        Ok(None) => Err("the stream ended before its first message".to_owned()),
        Err(status) => Err(status_text(status)),
    }
}

fn status_text(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The same on a new connection to `socket`, dropped afterwards.
pub async fn fetch_x509_new_connection(socket: &Path) -> Result<(), String> {
    let channel = probe::uds_channel(socket).await.map_err(|e| format!("{e:#}"))?;
    fetch_x509_once(SpiffeWorkloadApiClient::new(channel)).await
}

/// Waits until the Workload API at `socket` serves this process an SVID.
async fn wait_until_served(socket: &Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match fetch_x509_new_connection(socket).await {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => bail!("the agent served no SVID within {limit:?}: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The median of `op`'s time per call, run one after the other for `duration`.
async fn median_of<F, Fut>(duration: Duration, mut op: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut samples = Samples::new();
    let start = Instant::now();
    while start.elapsed() < duration || samples.len() < 10 {
        let began = Instant::now();
        op().await?;
        samples.push(began.elapsed());
    }
    Ok(samples.percentile(50.0))
}

/// The limits of a fetch on a new connection, each as wall time (median, one call after the
/// other) and as CPU time per call (which a busy machine does not inflate).
#[derive(Debug, Clone, Copy)]
pub struct NewconnLimits {
    /// `L_attest`: the `/proc` reads of attesting a child process, median wall time.
    pub attest: Duration,
    /// The same, CPU time of the reading thread per call.
    pub attest_cpu: Duration,
    /// `L_newconn`: a new Unix-socket connection and a tonic unary call to a server that does
    /// nothing else, median wall time.
    pub newconn: Duration,
    /// The same, CPU time of this process (client and server together) per call.
    pub newconn_cpu: Duration,
}

/// Measures [`NewconnLimits`], each probe for `duration`.
pub async fn newconn_limits(duration: Duration) -> anyhow::Result<NewconnLimits> {
    let mut child = std::process::Command::new("sleep").arg("3600").spawn().context("starting a child")?;
    let pid = child.id();
    let attest = tokio::task::spawn_blocking(move || {
        let mut samples = Samples::new();
        let start = Instant::now();
        while start.elapsed() < duration || samples.len() < 10 {
            let began = Instant::now();
            probe::proc_attest(pid)?;
            samples.push(began.elapsed());
        }
        let cpu = probe::cpu_per_op(duration, || Ok(move || probe::proc_attest(pid)))?;
        anyhow::Ok((samples.percentile(50.0), cpu))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (attest, attest_cpu) = attest.context("probe task")??;
    let dir = tempfile::Builder::new().prefix("tlnc").tempdir_in("/tmp")?;
    let bare = FloorServer::start_without_attestation(&dir.path().join("bare.sock"))?;
    let socket = bare.socket().to_owned();
    let calls = AtomicU64::new(0);
    let cpu_before = crate::cpu::process_cpu(std::process::id())?;
    let newconn = median_of(duration, || {
        let socket = socket.clone();
        calls.fetch_add(1, Ordering::Relaxed);
        async move {
            let channel = probe::uds_channel(&socket).await?;
            if !fetch_jwt(SpiffeWorkloadApiClient::new(channel)).await {
                bail!("the bare floor call failed");
            }
            Ok(())
        }
    })
    .await;
    let cpu = crate::cpu::process_cpu(std::process::id())?.saturating_sub(cpu_before);
    bare.stop().await;
    let newconn_cpu = cpu / u32::try_from(calls.load(Ordering::Relaxed).max(1)).unwrap_or(u32::MAX);
    Ok(NewconnLimits { attest, attest_cpu, newconn: newconn?, newconn_cpu })
}

/// Options of `wl-throughput`.
#[derive(Debug, Clone)]
pub struct WlThroughputOptions {
    /// Concurrent one-shot clients, one measurement each.
    pub levels: Vec<usize>,
    /// Measured time per level.
    pub duration: Duration,
    /// Time of each limit probe.
    pub probe_duration: Duration,
}

/// What one level measured.
struct LevelRun {
    done: u64,
    failed: u64,
    latency: Samples,
    elapsed: Duration,
}

/// `clients` tasks, each fetching on a new connection, one after the other, until `duration`
/// is over.
async fn one_shot_clients(socket: &Path, clients: usize, duration: Duration) -> anyhow::Result<LevelRun> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let socket: PathBuf = socket.to_owned();
        let (done, failed, first_error) = (Arc::clone(&done), Arc::clone(&failed), Arc::clone(&first_error));
        tasks.spawn(async move {
            let mut latency = Samples::new();
            while Instant::now() < deadline {
                let began = Instant::now();
                match fetch_x509_new_connection(&socket).await {
                    Ok(()) => {
                        latency.push(began.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(error);
                    }
                }
            }
            latency
        });
    }
    let mut latency = Samples::new();
    while let Some(joined) = tasks.join_next().await {
        latency.extend(joined.context("client task")?);
    }
    let elapsed = start.elapsed();
    if let Some(error) = first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        progress("wl-throughput", &format!("{clients} clients: first failure: {error}"));
    }
    Ok(LevelRun { done: done.load(Ordering::Relaxed), failed: failed.load(Ordering::Relaxed), latency, elapsed })
}

/// `wl-throughput`: see the [module docs](self).
pub async fn wl_throughput(options: &WlThroughputOptions) -> anyhow::Result<Vec<Figure>> {
    probe::raise_open_file_limit();
    let stage = Stage::server("wlt", false).await?;
    stage.own_entry("wlt-0")?;
    let agent = stage.start_agent(empty_cache()?).await?;
    wait_until_served(&agent.socket, Duration::from_secs(60)).await?;
    progress("wl-throughput", "measuring the limits (/proc reads; new connection + unary call)");
    let limits = newconn_limits(options.probe_duration).await?;
    // The figure is fetches per second of the agent's CPU time, so its limit is in CPU time too.
    let limit = 1.0 / (limits.attest_cpu.as_secs_f64() + limits.newconn_cpu.as_secs_f64() / 2.0);
    let mut figures = vec![
        Figure::new("wl_throughput.limit_attest_us", micros(limits.attest), "us", Target::None),
        Figure::new("wl_throughput.limit_attest_cpu_us", micros(limits.attest_cpu), "us", Target::None),
        Figure::new("wl_throughput.limit_newconn_us", micros(limits.newconn), "us", Target::None),
        Figure::new("wl_throughput.limit_newconn_cpu_us", micros(limits.newconn_cpu), "us", Target::None),
    ];
    for &clients in &options.levels {
        progress("wl-throughput", &format!("{clients} clients, a new connection per fetch, {:?}", options.duration));
        let cpu_before = stage.agent_rt.cpu_time();
        let mut run = one_shot_clients(&agent.socket, clients, options.duration).await?;
        let agent_cpu = stage.agent_rt.cpu_time().saturating_sub(cpu_before).as_secs_f64();
        let tag = format!("wl_throughput.c{clients}");
        let rate = run.done as f64 / run.elapsed.as_secs_f64();
        figures.push(Figure::new(format!("{tag}.fetches_per_sec"), rate, "/s", Target::None));
        figures.push(
            Figure::new(
                format!("{tag}.fetches_per_agent_cpu_sec"),
                run.done as f64 / agent_cpu.max(1e-9),
                "/s",
                Target::RatioAtLeast(0.5),
            )
            .against(limit, "1/(L_attest+L_newconn/2)_cpu"),
        );
        figures.push(Figure::new(
            format!("{tag}.agent_cores_busy"),
            agent_cpu / run.elapsed.as_secs_f64(),
            "count",
            Target::None,
        ));
        figures.push(Figure::new(
            format!("{tag}.fetch_p50_ms"),
            millis(run.latency.percentile(50.0)),
            "ms",
            Target::None,
        ));
        figures.push(Figure::new(
            format!("{tag}.fetch_p99_ms"),
            millis(run.latency.percentile(99.0)),
            "ms",
            Target::None,
        ));
        figures.push(Figure::new(format!("{tag}.failures"), run.failed as f64, "count", Target::Zero));
    }
    stage.stop(agent).await?;
    Ok(figures)
}

/// One HTTP/2 connection over the Unix socket at `socket`, counting every connection the
/// channel opens in `connects` (a channel reconnects by itself after a GOAWAY or an error).
async fn counting_channel(socket: &Path, connects: Arc<AtomicUsize>) -> anyhow::Result<Channel> {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (path, connects) = (path.clone(), Arc::clone(&connects));
            async move {
                let stream = UnixStream::connect(path).await?;
                connects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

/// Calls per block of `stream-hygiene` (floor and streams alternate by blocks).
const HYGIENE_BLOCK: usize = 100;

/// `stream-hygiene`: see the [module docs](self).
pub async fn stream_hygiene(streams: usize) -> anyhow::Result<Vec<Figure>> {
    const MODE: &str = "stream-hygiene";
    let deployment = Deployment::start().await?;
    deployment.create_entry("hyg-0").await?;
    wait_until_served(&deployment.socket, Duration::from_secs(60)).await?;
    let connects = Arc::new(AtomicUsize::new(0));
    let client = SpiffeWorkloadApiClient::new(counting_channel(&deployment.socket, Arc::clone(&connects)).await?);
    fetch_x509_once(client.clone()).await.map_err(|e| anyhow::anyhow!("first fetch: {e}"))?;
    let opened = connects.load(Ordering::SeqCst);

    // The floor under the same pattern and at the same moments: unary calls with the /proc
    // reads on a connection of their own, in blocks of [`HYGIENE_BLOCK`] alternating with the
    // streams' blocks. The machine is shared: a burst of someone else's work lasts seconds and
    // hits both alike, while each side still runs back to back as a hot loop would.
    let dir = tempfile::Builder::new().prefix("tlsh").tempdir_in("/tmp")?;
    let floor = FloorServer::start(&dir.path().join("floor.sock"))?;
    let floor_client = SpiffeWorkloadApiClient::new(probe::uds_channel(floor.socket()).await?);
    progress(
        MODE,
        &format!(
            "{streams} FetchX509SVID streams cancelled after the first message on one connection, in blocks of \
             {HYGIENE_BLOCK} alternating with floor calls"
        ),
    );
    let mut floor_latency = Samples::new();
    let mut latency = Samples::new();
    let mut failures = 0u64;
    let mut first_failure = None;
    for block in (0..streams).step_by(HYGIENE_BLOCK) {
        let calls = block..(block + HYGIENE_BLOCK).min(streams);
        for _ in calls.clone() {
            let began = Instant::now();
            if !fetch_jwt(floor_client.clone()).await {
                bail!("the floor call failed");
            }
            floor_latency.push(began.elapsed());
        }
        for n in calls {
            let began = Instant::now();
            match fetch_x509_once(client.clone()).await {
                Ok(()) => latency.push(began.elapsed()),
                Err(error) => {
                    failures += 1;
                    first_failure.get_or_insert((n, error));
                }
            }
        }
    }
    drop(floor_client);
    floor.stop().await;
    let reconnects = connects.load(Ordering::SeqCst).saturating_sub(opened);
    if let Some((n, error)) = first_failure {
        progress(MODE, &format!("first failure at stream {n}: {error}"));
    }
    drop(client);
    deployment.shutdown().await?;
    let (floor_p50, floor_p99) = (micros(floor_latency.percentile(50.0)), micros(floor_latency.percentile(99.0)));
    Ok(vec![
        Figure::new("stream_hygiene.streams", latency.len() as f64, "count", Target::None),
        Figure::new("stream_hygiene.failures", failures as f64, "count", Target::Zero),
        Figure::new("stream_hygiene.reconnects", reconnects as f64, "count", Target::Zero),
        Figure::new("stream_hygiene.p50_us", micros(latency.percentile(50.0)), "us", Target::RatioAtMost(1.3))
            .against(floor_p50, "tonic_uds_unary_plus_proc_attest_p50_one_connection"),
        Figure::new("stream_hygiene.p99_us", micros(latency.percentile(99.0)), "us", Target::RatioAtMost(2.0))
            .against(floor_p99, "tonic_uds_unary_plus_proc_attest_p99_one_connection"),
        Figure::new("stream_hygiene.max_ms", millis(latency.max()), "ms", Target::None),
    ])
}
