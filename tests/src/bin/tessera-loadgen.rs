//! `tessera-loadgen`: whole-system performance figures of Tessera over real sockets and TLS,
//! each printed beside the raw limit measured in the same run. See docs/performance.md.
//!
//! Every subcommand prints progress on stderr and one `FIGURE ...` line per figure on stdout
//! (format in `tessera_tests::report`). Exit status: 0 when the run completed (whether or not
//! targets were met; `--require-targets` makes a missed target exit 3), 1 on an error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tessera_tests::agent_load::{self, WlThroughputOptions};
use tessera_tests::agent_memory::{self, AgentMemoryOptions};
use tessera_tests::fleet::{self, FleetOptions, WorkerJob};
use tessera_tests::mint_scale::{self, MintScaleOptions};
use tessera_tests::modes::{self, OpenLoop, ThroughputOptions, WorkloadOptions};
use tessera_tests::probe;
use tessera_tests::rotation::{self, RotationOptions};
use tessera_tests::scale;
use tessera_tests::storm::{self, StormOptions};

#[derive(Debug, Parser)]
#[command(name = "tessera-loadgen", about = "Tessera's whole-system benchmarks, each beside its measured limit")]
struct Cli {
    /// Exit with status 3 when a figure misses its target.
    #[arg(long, global = true)]
    require_targets: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Throughput {
    /// Simulated agents (one mTLS connection each).
    #[arg(long, default_value_t = 16)]
    agents: usize,
    /// Entries per agent; also the CSRs per BatchNewX509Svid batch (at most 500).
    #[arg(long, default_value_t = 50)]
    entries: usize,
    /// Calls in flight per agent.
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds of the limit probe.
    #[arg(long, default_value_t = 5.0)]
    probe_seconds: f64,
}

impl Throughput {
    fn options(&self) -> anyhow::Result<ThroughputOptions> {
        if !(self.seconds > 0.0 && self.probe_seconds > 0.0) {
            anyhow::bail!("--seconds and --probe-seconds must be positive");
        }
        if self.agents == 0 || self.entries == 0 || self.entries > 500 || self.in_flight == 0 {
            anyhow::bail!("--agents and --in-flight must be at least 1, --entries 1 to 500");
        }
        Ok(ThroughputOptions {
            agents: self.agents,
            entries_per_agent: self.entries,
            in_flight: self.in_flight,
            duration: Duration::from_secs_f64(self.seconds),
            probe_duration: Duration::from_secs_f64(self.probe_seconds),
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// X.509-SVIDs/s through BatchNewX509Svid from many agents vs parse+verify+sign on all cores.
    X509(Throughput),
    /// JWT-SVIDs/s through NewJwtSvid vs ES256 mint on all cores.
    Jwt(Throughput),
    /// Entry creation -> SVID on an open Workload API stream: p50/p99.
    Propagation {
        /// Entries created, one after the other.
        #[arg(long, default_value_t = 200)]
        entries: usize,
    },
    /// Workload API latency at several concurrency levels vs the tonic-over-UDS + /proc floor.
    Workload {
        /// Concurrency levels, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
        clients: Vec<usize>,
        /// Calls per level, split over its clients.
        #[arg(long, default_value_t = 5000)]
        calls: usize,
        /// Least calls per client.
        #[arg(long, default_value_t = 5)]
        min_calls_per_client: usize,
        /// Open loop: this many calls per second in total on a fixed schedule, spread over the
        /// clients (latency from the scheduled send time); without it, clients are closed-loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds of each open-loop measurement (floor, FetchX509SVID, FetchJWTSVID per level).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Entries in sled at several sizes: write rate, start-up time, RSS per entry, full sync.
    Scale {
        /// Entry counts, comma-separated (each on a fresh server).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        sizes: Vec<usize>,
        /// Also measure 1,000,000 entries.
        #[arg(long)]
        million: bool,
        /// Threads writing entries at once.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// The `tessera-server` binary restarted on the entries (default: next to this one).
        #[arg(long)]
        server_bin: Option<PathBuf>,
    },
    /// Resident memory of a real agent process per cached X.509-SVID vs 2 x (leaf + key DER).
    AgentMemory {
        /// Cached SVID counts, comma-separated (each on a fresh server and agent).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        sizes: Vec<usize>,
        /// The tessera-agent binary (default: next to this one).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Threads writing entries at once.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Longest wait, in seconds, for the agent to mint every SVID of one size.
        #[arg(long, default_value_t = 900.0)]
        timeout: f64,
        /// The server's agent_svid_rate_limit (0 = unlimited); the server's default when absent.
        #[arg(long)]
        rate_limit: Option<u32>,
    },
    /// Entries created one by one while a real agent syncs: time and CPU per entry to mint them all.
    MintScale {
        /// Entry counts, comma-separated (each on a fresh server and agent).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        sizes: Vec<usize>,
        /// Threads creating entries at once (each entry is still its own write).
        #[arg(long, default_value_t = 1)]
        writers: usize,
        /// The server's agent_svid_rate_limit (SVIDs per second per agent, 0 = unlimited);
        /// the server's default when absent.
        #[arg(long)]
        rate_limit: Option<u32>,
        /// Longest wait, in seconds, for one size to be minted.
        #[arg(long, default_value_t = 900.0)]
        timeout: f64,
    },
    /// A fleet's X.509-SVIDs reaching half-life together: signing burst and server CPU, jitter off vs on.
    Rotation {
        /// Simulated agents.
        #[arg(long, default_value_t = 20)]
        agents: usize,
        /// Entries (SVIDs) per agent.
        #[arg(long, default_value_t = 250)]
        entries: usize,
        /// X.509-SVID TTL in seconds of the entries (at least 12; notBefore is back-dated 10 s, so
        /// renewal comes about TTL/2 - 5 s after minting).
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// Seconds of the limit probe.
        #[arg(long, default_value_t = 3.0)]
        probe_seconds: f64,
    },
    /// Many simulated agents (in worker processes) attesting and syncing: time, server CPU and RSS per agent.
    Fleet {
        /// Fleet sizes, comma-separated (each on a fresh server).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        agents: Vec<usize>,
        /// Entries per agent.
        #[arg(long, default_value_t = 2)]
        entries: usize,
        /// Worker processes running the simulated agents.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Attestations in flight per worker (the workers retry overload refusals with backoff).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Longest wait, in seconds, for one fleet.
        #[arg(long, default_value_t = 1800.0)]
        timeout: f64,
    },
    /// Many workloads at once, a new connection per FetchX509SVID: fetches per agent CPU second vs 1/(L_attest + L_newconn/2).
    WlThroughput {
        /// Concurrent one-shot clients, comma-separated (one measurement each).
        #[arg(long, value_delimiter = ',', default_value = "64,512")]
        clients: Vec<usize>,
        /// Measured seconds per level.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Seconds of each limit probe.
        #[arg(long, default_value_t = 2.0)]
        probe_seconds: f64,
    },
    /// Many FetchX509SVID streams cancelled after their first message on one connection: failures, reconnects, latency vs the floor.
    StreamHygiene {
        /// Streams, one after the other.
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
    },
    /// N X.509-SVIDs due at once at a real agent (a start with N entries): time to mint all vs the keygen and signing limits.
    RotationStorm {
        /// SVIDs due at once.
        #[arg(long, default_value_t = 10_000)]
        svids: usize,
        /// Workload API streams open through the storm.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Threads creating the entries beforehand.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Seconds of each limit probe.
        #[arg(long, default_value_t = 1.0)]
        probe_seconds: f64,
        /// Longest wait, in seconds, for the storm.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
    },
    /// (internal) One worker process of `fleet`.
    #[command(hide = true)]
    FleetWorker {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        #[arg(long)]
        entries: usize,
        #[arg(long)]
        concurrency: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(all_met) if all_met || !cli.require_targets => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(3),
        Err(error) => {
            eprintln!("tessera-loadgen: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // A fleet worker's stdout is read by its parent: only its READY line goes there.
    if !matches!(cli.command, Command::FleetWorker { .. }) {
        println!(
            "MACHINE cpus={} model={:?} build={} load_average={:?}",
            probe::cores(),
            cpu_model(),
            if cfg!(debug_assertions) { "debug" } else { "release" },
            load_average()
        );
    }
    let figures = runtime.block_on(async {
        match &cli.command {
            Command::X509(args) => modes::x509(&args.options()?).await,
            Command::Jwt(args) => modes::jwt(&args.options()?).await,
            Command::Propagation { entries } => {
                if *entries == 0 {
                    anyhow::bail!("--entries must be at least 1");
                }
                modes::propagation(*entries).await
            }
            Command::Workload { clients, calls, min_calls_per_client, rate, seconds } => {
                if clients.is_empty() || clients.contains(&0) || *min_calls_per_client == 0 {
                    anyhow::bail!("--clients must list levels of at least 1; --min-calls-per-client at least 1");
                }
                let open_loop = match rate {
                    None => None,
                    Some(rate) if rate.is_finite() && *rate > 0.0 && seconds.is_finite() && *seconds > 0.0 => {
                        Some(OpenLoop { rate: *rate, duration: Duration::from_secs_f64(*seconds) })
                    }
                    Some(_) => anyhow::bail!("--rate and --seconds must be positive numbers"),
                };
                let options = WorkloadOptions {
                    levels: clients.clone(),
                    calls_per_level: *calls,
                    min_calls_per_client: *min_calls_per_client,
                    open_loop,
                };
                modes::workload(&options).await
            }
            Command::Scale { sizes, million, writers, server_bin } => {
                let mut sizes = sizes.clone();
                if *million {
                    sizes.push(1_000_000);
                }
                if sizes.is_empty() || sizes.contains(&0) || *writers == 0 {
                    anyhow::bail!("--sizes must list counts of at least 1; --writers at least 1");
                }
                let server_bin = server_bin.clone().unwrap_or_else(scale::default_server_bin);
                scale::scale(&scale::ScaleOptions { sizes, writers: *writers, server_bin }).await
            }
            Command::AgentMemory { sizes, agent_bin, writers, timeout, rate_limit } => {
                if sizes.is_empty() || sizes.contains(&0) || *writers == 0 || !(timeout.is_finite() && *timeout > 0.0) {
                    anyhow::bail!("--sizes must list counts of at least 1; --writers at least 1; --timeout positive");
                }
                let options = AgentMemoryOptions {
                    sizes: sizes.clone(),
                    agent_bin: agent_bin.clone().unwrap_or_else(agent_memory::default_agent_bin),
                    writers: *writers,
                    timeout: Duration::from_secs_f64(*timeout),
                    rate_limit: *rate_limit,
                };
                agent_memory::agent_memory(&options).await
            }
            Command::MintScale { sizes, writers, rate_limit, timeout } => {
                if sizes.is_empty() || sizes.contains(&0) || *writers == 0 || !(timeout.is_finite() && *timeout > 0.0) {
                    anyhow::bail!("--sizes must list counts of at least 1; --writers at least 1; --timeout positive");
                }
                let options = MintScaleOptions {
                    sizes: sizes.clone(),
                    writers: *writers,
                    rate_limit: *rate_limit,
                    timeout: Duration::from_secs_f64(*timeout),
                };
                mint_scale::mint_scale(&options).await
            }
            Command::Rotation { agents, entries, ttl, probe_seconds } => {
                if *agents == 0 || *entries == 0 || *ttl < 12 || !(probe_seconds.is_finite() && *probe_seconds > 0.0) {
                    anyhow::bail!(
                        "--agents and --entries must be at least 1, --ttl at least 12, --probe-seconds positive"
                    );
                }
                let options = RotationOptions {
                    agents: *agents,
                    entries_per_agent: *entries,
                    ttl: Duration::from_secs(*ttl),
                    probe_duration: Duration::from_secs_f64(*probe_seconds),
                };
                rotation::rotation(&options).await
            }
            Command::Fleet { agents, entries, workers, concurrency, timeout } => {
                if agents.is_empty()
                    || agents.contains(&0)
                    || *workers == 0
                    || *concurrency == 0
                    || !(timeout.is_finite() && *timeout > 0.0)
                {
                    anyhow::bail!("--agents must list sizes of at least 1; --workers and --concurrency at least 1");
                }
                let options = FleetOptions {
                    sizes: agents.clone(),
                    entries_per_agent: *entries,
                    workers: *workers,
                    concurrency: *concurrency,
                    timeout: Duration::from_secs_f64(*timeout),
                };
                fleet::fleet(&options).await
            }
            Command::WlThroughput { clients, seconds, probe_seconds } => {
                if clients.is_empty()
                    || clients.contains(&0)
                    || !(seconds.is_finite() && *seconds > 0.0 && probe_seconds.is_finite() && *probe_seconds > 0.0)
                {
                    anyhow::bail!("--clients must list levels of at least 1; --seconds and --probe-seconds positive");
                }
                let options = WlThroughputOptions {
                    levels: clients.clone(),
                    duration: Duration::from_secs_f64(*seconds),
                    probe_duration: Duration::from_secs_f64(*probe_seconds),
                };
                agent_load::wl_throughput(&options).await
            }
            Command::StreamHygiene { streams } => {
                if *streams == 0 {
                    anyhow::bail!("--streams must be at least 1");
                }
                agent_load::stream_hygiene(*streams).await
            }
            Command::RotationStorm { svids, subscribers, writers, probe_seconds, timeout } => {
                if *svids == 0
                    || *writers == 0
                    || !(probe_seconds.is_finite() && *probe_seconds > 0.0 && timeout.is_finite() && *timeout > 0.0)
                {
                    anyhow::bail!("--svids and --writers must be at least 1; --probe-seconds and --timeout positive");
                }
                let options = StormOptions {
                    svids: *svids,
                    subscribers: *subscribers,
                    writers: *writers,
                    probe_duration: Duration::from_secs_f64(*probe_seconds),
                    timeout: Duration::from_secs_f64(*timeout),
                };
                storm::rotation_storm(&options).await
            }
            Command::FleetWorker { addr, bundle, prefix, from, to, entries, concurrency } => {
                let job = WorkerJob {
                    addr: *addr,
                    bundle: bundle.clone(),
                    prefix: prefix.clone(),
                    from: *from,
                    to: *to,
                    entries_per_agent: *entries,
                    concurrency: *concurrency,
                };
                fleet::worker(job).await.map(|()| Vec::new())
            }
        }
    })?;
    let mut all_met = true;
    for figure in &figures {
        println!("{figure}");
        all_met &= figure.met() != Some(false);
    }
    Ok(all_met)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), printed so each run states how
/// busy the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
