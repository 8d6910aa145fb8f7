//! `mint-scale`: how the cost of minting grows when entries are created one by one while a
//! real agent is connected and syncing (issue 7, "how cost grows with scale").
//!
//! For each size N, on a fresh server and agent:
//!
//! 1. the server runs on a tokio runtime of its own and the agent (its manager and its
//!    Workload API on a Unix socket) on another ([`TrackedRuntime`]), so the CPU time of each
//!    is read apart from the other's and from the load generator's;
//! 2. one entry matches the load generator (`unix:uid:<uid>`); a `FetchX509SVID` stream is
//!    opened and stays open for the whole run (a reader of every snapshot the agent publishes,
//!    as a deployed workload is);
//! 3. N entries for N other workloads (`unix:uid:<3000000 + n>`) are created one at a time
//!    (each its own durable datastore write and revision, as `entry create` does), by
//!    `writers` threads;
//! 4. the agent's published snapshot is polled until it holds an SVID for every entry. The
//!    CPU time of both runtimes is read each time another tenth of the entries is minted, so
//!    the CPU per entry of the last tenth can be set against the first: a cost per entry that
//!    grows with the number of entries already held shows as a ratio well above 1.
//!
//! The server's `agent_svid_rate_limit` is its default unless `rate_limit` says otherwise
//! (0 = unlimited, to measure the system's own cost rather than the limit).

use std::path::PathBuf;
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
use tessera_wire::workload as wl;
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::oneshot;

use crate::cpu::TrackedRuntime;
use crate::probe;
use crate::report::{Figure, Target};
use crate::sim::{SimServer, TRUST_DOMAIN, uid_selectors, workload_entry};

/// Options of the `mint-scale` mode.
#[derive(Debug, Clone)]
pub struct MintScaleOptions {
    /// Entry counts, each on a fresh server and agent.
    pub sizes: Vec<usize>,
    /// Threads creating entries at once (each entry is still its own write).
    pub writers: usize,
    /// The server's `agent_svid_rate_limit`; `None` keeps the server's default.
    pub rate_limit: Option<u32>,
    /// Longest wait for one size to be minted.
    pub timeout: Duration,
}

fn progress(line: &str) {
    eprintln!("tessera-loadgen: mint-scale: {line}");
}

/// An agent (manager + Workload API) running on its own runtime.
pub(crate) struct Agent {
    pub(crate) manager: RunningManager,
    pub(crate) cache: Arc<Cache>,
    pub(crate) socket: PathBuf,
    stop_api: oneshot::Sender<()>,
    api_task: tokio::task::JoinHandle<Result<(), tessera_agent::workload_api::ServeError>>,
}

/// Starts an agent with join token `token` against the server at `server_addr`; its data
/// directory and Workload API socket are in `dir`, which holds the bootstrap bundle
/// (`bootstrap.pem`). Run it on the runtime that should carry the agent's work.
pub(crate) async fn start_agent(server_addr: String, dir: PathBuf, token: String) -> anyhow::Result<Agent> {
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let cache = Arc::new(Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(trust_domain)))));
    start_agent_with(server_addr, dir, token, cache).await
}

/// [`start_agent`] publishing to `cache` (subscribe to it first to see every snapshot).
pub(crate) async fn start_agent_with(
    server_addr: String,
    dir: PathBuf,
    token: String,
    cache: Arc<Cache>,
) -> anyhow::Result<Agent> {
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let config = AgentConfig {
        trust_domain: trust_domain.clone(),
        server_address: server_addr,
        data_dir: dir.join("agent"),
        trust_bundle_path: Some(dir.join("bootstrap.pem")),
        ..AgentConfig::default()
    };
    let manager =
        tokio::time::timeout(Duration::from_secs(60), manager::start(&config, Some(token), Arc::clone(&cache)))
            .await
            .map_err(|_| anyhow!("the agent did not start within 60 s"))?
            .context("starting the agent")?;
    let attestor = Arc::new(UnixAttestor::new(&UnixAttestorConfig::default()));
    let api = WorkloadApi::new(Arc::clone(&cache), attestor, manager.jwt_source(), trust_domain);
    let socket = dir.join("api.sock");
    let listener = bind_socket(&socket).context("binding the Workload API socket")?;
    let (stop_api, stopped) = oneshot::channel::<()>();
    let api_task = tokio::spawn(api.serve_listener(listener, async {
        let _ = stopped.await;
    }));
    Ok(Agent { manager, cache, socket, stop_api, api_task })
}

/// Stops the Workload API and the manager of `agent`.
pub(crate) async fn stop_agent(agent: Agent) {
    let _ = agent.stop_api.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.api_task).await;
    agent.manager.shutdown().await;
}

/// What one size measured.
#[derive(Debug)]
struct Run {
    write: Duration,
    all_minted: Duration,
    server_cpu: Duration,
    agent_cpu: Duration,
    /// CPU (server + agent) spent while each tenth of the entries was minted.
    tenth_cpu: Vec<Duration>,
    /// Wall time each tenth took.
    tenth_wall: Vec<Duration>,
    stream_messages: u64,
}

async fn run_size(options: &MintScaleOptions, size: usize) -> anyhow::Result<Run> {
    let server_rt = TrackedRuntime::new("lg-server", probe::cores())?;
    let agent_rt = TrackedRuntime::new("lg-agent", probe::cores())?;
    let dir = tempfile::Builder::new().prefix("tlms").tempdir_in("/tmp").context("temporary directory")?;
    let rate_limit = options.rate_limit;
    let server = server_rt
        .run(SimServer::start_configured(dir, move |config| {
            if let Some(rate) = rate_limit {
                config.agent_svid_rate_limit = rate;
            }
        }))
        .await??;
    let token = format!("lg-ms-{size}");
    server.new_join_token(&token)?;
    let agent_id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{token}"))?;
    let uid = rustix::process::getuid().as_raw();
    let own = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()])?;
    server.store().create_entry(&workload_entry("ms-probe", &agent_id, own)?)?;
    let dir = server.dir().to_owned();
    std::fs::write(dir.join("bootstrap.pem"), server.bundle().x509_authorities_pem())
        .context("writing the bootstrap bundle")?;
    let agent = agent_rt.run(start_agent(server.addr().to_string(), dir, token)).await??;

    // The open stream: a reader of every publish, for the whole run.
    let mut client = SpiffeWorkloadApiClient::new(probe::uds_channel(&agent.socket).await?)
        .max_decoding_message_size(64 * 1024 * 1024);
    let mut request = tonic::Request::new(wl::X509svidRequest {});
    request.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    let mut stream = client.fetch_x509svid(request).await?.into_inner();
    match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
        Ok(Ok(Some(message))) if !message.svids.is_empty() => {}
        other => bail!("the agent served no SVID to the probe workload: {other:?}"),
    }
    let messages = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&messages);
    let reader = tokio::spawn(async move {
        while let Ok(Some(_)) = stream.message().await {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });

    let want = size + 1;
    let cpu = || server_rt.cpu_time() + agent_rt.cpu_time();
    let (server_before, agent_before) = (server_rt.cpu_time(), agent_rt.cpu_time());
    progress(&format!("{size} entries: creating them one at a time ({} writers)", options.writers));
    let started = Instant::now();
    let mut tasks = server.spawn_entry_writers(&agent_id, "ms", size, options.writers, uid_selectors(3_000_000));
    let mut write = None;
    let mut tenth_cpu = Vec::with_capacity(10);
    let mut tenth_wall = Vec::with_capacity(10);
    let (mut mark_cpu, mut mark_at) = (cpu(), Instant::now());
    let deadline = started + options.timeout;
    loop {
        while let Some(joined) = tasks.try_join_next() {
            joined.context("writer task")??;
        }
        if write.is_none() && tasks.is_empty() {
            write = Some(started.elapsed());
        }
        // Identities minted, the probe's excepted.
        let minted = agent.cache.current().identity_count().saturating_sub(1);
        while tenth_cpu.len() < 10 && minted >= size * (tenth_cpu.len() + 1) / 10 {
            let (now_cpu, now) = (cpu(), Instant::now());
            tenth_cpu.push(now_cpu.saturating_sub(mark_cpu));
            tenth_wall.push(now - mark_at);
            (mark_cpu, mark_at) = (now_cpu, now);
        }
        if minted + 1 >= want && write.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent minted {minted} of {size} SVIDs within {:?}", options.timeout);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_minted = started.elapsed();
    let (server_cpu, agent_cpu) =
        (server_rt.cpu_time().saturating_sub(server_before), agent_rt.cpu_time().saturating_sub(agent_before));
    reader.abort();
    let stream_messages = messages.load(Ordering::Relaxed);
    agent_rt.run(stop_agent(agent)).await?;
    server_rt.run(server.shutdown()).await??;
    server_rt.shutdown();
    agent_rt.shutdown();
    Ok(Run {
        write: write.unwrap_or(all_minted),
        all_minted,
        server_cpu,
        agent_cpu,
        tenth_cpu,
        tenth_wall,
        stream_messages,
    })
}

/// `mint-scale`: see the [module docs](self).
pub async fn mint_scale(options: &MintScaleOptions) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &size in &options.sizes {
        let run = run_size(options, size).await?;
        let n = size.max(1) as f64;
        let per_entry = |d: Duration| d.as_secs_f64() * 1e6 / n;
        let tenth = size.div_ceil(10).max(1) as f64;
        let tenth_us = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6 / tenth);
        let (first, last) = (tenth_us(run.tenth_cpu.first()), tenth_us(run.tenth_cpu.last()));
        progress(&format!(
            "{size} entries: written in {:?}, all minted in {:?}; server CPU {:?}, agent CPU {:?}; CPU per tenth {:?}; \
             wall per tenth {:?}; {} workload stream messages",
            run.write,
            run.all_minted,
            run.server_cpu,
            run.agent_cpu,
            run.tenth_cpu,
            run.tenth_wall,
            run.stream_messages
        ));
        let tag = format!("mint_scale.n{size}");
        figures.push(Figure::new(format!("{tag}.all_minted_s"), run.all_minted.as_secs_f64(), "s", Target::None));
        figures.push(Figure::new(format!("{tag}.write_s"), run.write.as_secs_f64(), "s", Target::None));
        figures.push(Figure::new(format!("{tag}.wall_per_entry_us"), per_entry(run.all_minted), "us", Target::None));
        figures.push(Figure::new(
            format!("{tag}.server_cpu_per_entry_us"),
            per_entry(run.server_cpu),
            "us",
            Target::None,
        ));
        figures.push(Figure::new(
            format!("{tag}.agent_cpu_per_entry_us"),
            per_entry(run.agent_cpu),
            "us",
            Target::None,
        ));
        figures.push(Figure::new(format!("{tag}.cpu_per_entry_first_tenth_us"), first, "us", Target::None));
        figures.push(
            Figure::new(format!("{tag}.cpu_per_entry_last_tenth_us"), last, "us", Target::None)
                .against(first, "cpu_per_entry_first_tenth_us"),
        );
        figures.push(Figure::new(
            format!("{tag}.workload_stream_messages"),
            run.stream_messages as f64,
            "count",
            Target::None,
        ));
    }
    Ok(figures)
}
