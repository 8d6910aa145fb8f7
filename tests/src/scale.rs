//! `tessera-loadgen scale`: entries in the sled datastore at several sizes (10k, 100k, 1M),
//! and what they cost the server.
//!
//! For each size the mode writes the entries into a fresh datastore (an in-process server,
//! `--writers` threads, durable writes), measures the single-writer fsync rate of the same
//! disk, stops the in-process server and starts the real `tessera-server` binary on the same
//! data directory, as an operator's restart would. It reports:
//!
//! - the write rate beside the fsync limit;
//! - the start-up time: from spawning the process to the first agent API connection that
//!   completes mutual TLS with the restarted server;
//! - the server process's resident memory at that point and after a full sync of every entry
//!   to one agent, each as growth per entry over the same measurement on an empty datastore
//!   (taken first), so the fixed cost of a server is not counted per entry;
//! - the datastore's size on disk per entry;
//! - the full sync's time, the entries it delivered and whether it failed (a message-size
//!   failure would show here).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_spiffe::{SelectorSet, SpiffeId};
use tokio::io::AsyncReadExt;

use crate::agent_memory::rss_of;
use crate::harness::free_port;
use crate::modes::{full_sync, uid};
use crate::probe;
use crate::report::{Figure, Target};
use crate::sim::{SimAgent, SimServer, TRUST_DOMAIN, connect, join_entry_writers};
use crate::stats::millis;

/// Longest wait for the restarted server to accept an agent connection.
const STARTUP_DEADLINE: Duration = Duration::from_secs(600);

/// Options of the `scale` mode.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Entry counts, each measured on a fresh datastore.
    pub sizes: Vec<usize>,
    /// Threads creating entries at once.
    pub writers: usize,
    /// The `tessera-server` binary started on the written data.
    pub server_bin: PathBuf,
}

/// The `tessera-server` next to the running load generator (same build profile).
pub fn default_server_bin() -> PathBuf {
    crate::harness::sibling_binary("tessera-server")
}

fn progress(line: &str) {
    eprintln!("tessera-loadgen: scale: {line}");
}

/// Creates `count` entries under `parent` from `writers` threads, all for this process's
/// uid; returns the wall time.
pub async fn populate(server: &SimServer, parent: &SpiffeId, count: usize, writers: usize) -> anyhow::Result<Duration> {
    let selectors = SelectorSet::parse_all(&[format!("unix:uid:{}", uid()).as_str()])?;
    let start = Instant::now();
    join_entry_writers(&mut server.spawn_entry_writers(parent, "s", count, writers, move |_| Ok(selectors.clone())))
        .await?;
    Ok(start.elapsed())
}

/// Bytes of every file under `dir`.
fn disk_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += disk_bytes(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// The real server process on a data directory written by a [`SimServer`].
struct ServerProcess {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `bin` on `dir` (as [`crate::sim::config`] lays it out) listening on `addr`.
    fn start(bin: &Path, dir: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        if !bin.is_file() {
            bail!(
                "no server binary at {} (build it with `cargo build [--release] -p tessera-server`, or pass --server-bin)",
                bin.display()
            );
        }
        let d = dir.display();
        let config = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{d}/data\"\nbind_address = \"{addr}\"\n\
             admin_socket = \"{d}/adm.sock\"\n"
        );
        let config_path = dir.join("server.toml");
        std::fs::write(&config_path, config).context("writing the server configuration")?;
        let log = dir.join("server.log");
        let log_file = std::fs::File::create(&log).context("creating the server log")?;
        let child = tokio::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("the server exited at once"))?;
        Ok(Self { child, pid, log })
    }

    /// The tail of the server's log.
    async fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = tokio::fs::File::open(&self.log).await {
            let _ = file.read_to_string(&mut text).await;
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Connects `agent` as soon as the server completes a mutual TLS handshake; returns the
    /// time since `spawned`.
    async fn wait_ready(
        &mut self,
        agent: &mut SimAgent,
        server: &Restart,
        spawned: Instant,
    ) -> anyhow::Result<Duration> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("the server exited ({status}); its log:\n{}", self.log_tail().await);
            }
            let attempt =
                connect(server.addr, server.bundle.clone(), server.server_id.clone(), Some((&agent.chain, &agent.key)));
            if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
                agent.client = client;
                return Ok(spawned.elapsed());
            }
            if spawned.elapsed() > STARTUP_DEADLINE {
                bail!(
                    "the server did not accept an agent within {STARTUP_DEADLINE:?}; its log:\n{}",
                    self.log_tail().await
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// What a restarted server is reached by.
struct Restart {
    addr: SocketAddr,
    bundle: tessera_spiffe::bundle::Bundle,
    server_id: SpiffeId,
}

/// One size's measurements.
struct Measured {
    written: Duration,
    fsync_per_sec: f64,
    disk_bytes: u64,
    startup: Duration,
    rss_ready: u64,
    rss_synced: u64,
    received: usize,
    sync_time: Duration,
    error: Option<String>,
}

async fn measure(options: &ScaleOptions, size: usize) -> anyhow::Result<Measured> {
    let server = SimServer::start().await?;
    let mut agent = SimAgent::attest(&server, "lg-scale").await?;
    if size > 0 {
        progress(&format!("writing {size} entries"));
    }
    let written = populate(&server, &agent.id, size, options.writers).await?;
    let dir = server.dir().to_owned();
    let fsync_dir = dir.clone();
    let fsync_per_sec =
        tokio::task::spawn_blocking(move || probe::fsync_rate(&fsync_dir, Duration::from_secs(1))).await??;
    let (bundle, server_id) = (server.bundle(), server.server_id());
    let data = server.stop_keeping_data().await?;
    let disk_bytes = disk_bytes(&data.path().join("data"))?;

    progress(&format!("restarting the server binary on {size} entries"));
    let restart = Restart { addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)), bundle, server_id };
    let spawned = Instant::now();
    let mut process = ServerProcess::start(&options.server_bin, data.path(), restart.addr)?;
    let startup = process.wait_ready(&mut agent, &restart, spawned).await?;
    let rss_ready = rss_of(process.pid)?;
    progress(&format!("full sync of {size} entries"));
    let (received, sync_time, error) = full_sync(&agent).await;
    if let Some(error) = &error {
        progress(&format!("the sync of {size} entries failed: {error}"));
    }
    let rss_synced = rss_of(process.pid)?;
    process.stop().await;
    drop(data);
    Ok(Measured { written, fsync_per_sec, disk_bytes, startup, rss_ready, rss_synced, received, sync_time, error })
}

/// Runs the mode: an empty datastore first (the baseline), then every size.
pub async fn scale(options: &ScaleOptions) -> anyhow::Result<Vec<Figure>> {
    progress("measuring a server on an empty datastore (the baseline)");
    let empty = measure(options, 0).await?;
    let per_entry = |bytes: u64, base: u64, size: usize| bytes.saturating_sub(base) as f64 / size.max(1) as f64;
    let mut figures = vec![
        Figure::new("scale.n0.startup_ms", millis(empty.startup), "ms", Target::None),
        Figure::new("scale.n0.rss_bytes", empty.rss_ready as f64, "B", Target::None),
    ];
    for &size in &options.sizes {
        let m = measure(options, size).await?;
        let tag = format!("scale.n{size}");
        figures.push(
            Figure::new(
                format!("{tag}.entry_writes_per_sec"),
                size as f64 / m.written.as_secs_f64(),
                "/s",
                Target::None,
            )
            .against(m.fsync_per_sec, "fsync_4k_single_writer_per_sec"),
        );
        figures.push(Figure::new(
            format!("{tag}.disk_bytes_per_entry"),
            per_entry(m.disk_bytes, empty.disk_bytes, size),
            "B",
            Target::None,
        ));
        figures.push(Figure::new(format!("{tag}.startup_ms"), millis(m.startup), "ms", Target::None));
        figures.push(Figure::new(
            format!("{tag}.startup_rss_bytes_per_entry"),
            per_entry(m.rss_ready, empty.rss_ready, size),
            "B",
            Target::None,
        ));
        figures.push(Figure::new(
            format!("{tag}.synced_rss_bytes_per_entry"),
            per_entry(m.rss_synced, empty.rss_synced, size),
            "B",
            Target::None,
        ));
        figures.push(Figure::new(format!("{tag}.sync_ms"), millis(m.sync_time), "ms", Target::None));
        figures.push(Figure::new(
            format!("{tag}.sync_missing_entries"),
            size.saturating_sub(m.received) as f64,
            "count",
            Target::Zero,
        ));
        figures.push(Figure::new(
            format!("{tag}.sync_failures"),
            f64::from(u8::from(m.error.is_some())),
            "count",
            Target::Zero,
        ));
    }
    Ok(figures)
}
