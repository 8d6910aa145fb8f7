//! `tessera-loadgen`: whole-system performance figures of Tessera over real sockets and TLS,
//! each printed beside the raw limit measured in the same run. See docs/performance.md.
//!
//! Every subcommand prints progress on stderr and one `FIGURE ...` line per figure on stdout
//! (format in `tessera_tests::report`). Exit status: 0 when the run completed (whether or not
//! targets were met; `--require-targets` makes a missed target exit 3), 1 on an error.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tessera_tests::modes::{self, ThroughputOptions, WorkloadOptions};
use tessera_tests::probe;

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
    println!(
        "MACHINE cpus={} model={:?} build={}",
        probe::cores(),
        cpu_model(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
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
            Command::Workload { clients, calls, min_calls_per_client } => {
                if clients.is_empty() || clients.contains(&0) || *min_calls_per_client == 0 {
                    anyhow::bail!("--clients must list levels of at least 1; --min-calls-per-client at least 1");
                }
                let options = WorkloadOptions {
                    levels: clients.clone(),
                    calls_per_level: *calls,
                    min_calls_per_client: *min_calls_per_client,
                };
                modes::workload(&options).await
            }
            Command::Scale { sizes, million, writers } => {
                let mut sizes = sizes.clone();
                if *million {
                    sizes.push(1_000_000);
                }
                if sizes.is_empty() || sizes.contains(&0) || *writers == 0 {
                    anyhow::bail!("--sizes must list counts of at least 1; --writers at least 1");
                }
                modes::scale(&modes::ScaleOptions { sizes, writers: *writers }).await
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
