//! `fleet`: many simulated agents attesting and syncing against one server, the server's time,
//! CPU and memory per agent.
//!
//! The server runs in the load generator's process; the simulated agents run in worker
//! processes (`tessera-loadgen fleet-worker`, this same binary), so that the parent's CPU time
//! and resident set are the server's alone, and so that 10,000 mTLS connections do not need
//! 20,000 descriptors in one process. For each fleet size N, on a fresh server:
//!
//! 1. N join tokens and, per agent, `entries` workload entries parented to the agent ID the
//!    token will give (`spiffe://<td>/tessera/agent/join_token/<token>`) are written;
//! 2. the workers attest their share of the agents (join token over TLS, then mTLS with the
//!    agent SVID), `concurrency` at a time each, and open a `SyncEntries` stream from revision
//!    0 per agent, read until `synced`, and keep it open, as connected agents do;
//! 3. once every worker reported, the parent reads its CPU time and RSS.
//!
//! Figures: wall time and agents per second (beside the durable single-writer commit rate:
//! each attestation consumes a token and records a node, both durable), server CPU per agent,
//! server RSS per connected agent, failures and missing entries, and how many times the
//! workers retried a step the server refused as overloaded (`UNAVAILABLE`, its attestation
//! bounds), with backoff, as agents do.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_server::datastore::JoinToken;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::agent::v1 as pb;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;

use crate::cpu::process_cpu;
use crate::probe;
use crate::report::{Figure, Target};
use crate::sim::{SimAgent, SimServer, TRUST_DOMAIN, workload_entry};
use crate::stats::millis;

/// Options of the `fleet` mode.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Fleet sizes, each on a fresh server.
    pub sizes: Vec<usize>,
    /// Entries per agent.
    pub entries_per_agent: usize,
    /// Worker processes.
    pub workers: usize,
    /// Attestations in flight per worker.
    pub concurrency: usize,
    /// Longest wait for a fleet to be attested and synced.
    pub timeout: Duration,
}

/// What a worker is asked to do (its command line).
#[derive(Debug, Clone)]
pub struct WorkerJob {
    /// The agent API.
    pub addr: std::net::SocketAddr,
    /// PEM file of the server's X.509 authorities.
    pub bundle: PathBuf,
    /// Join tokens `<prefix><n>` for n in `from..to`.
    pub prefix: String,
    /// First agent.
    pub from: usize,
    /// One past the last agent.
    pub to: usize,
    /// Entries each agent must receive.
    pub entries_per_agent: usize,
    /// Attestations in flight.
    pub concurrency: usize,
}

fn progress(line: &str) {
    eprintln!("tessera-loadgen: fleet: {line}");
}

fn token(prefix: &str, n: usize) -> String {
    format!("{prefix}{n}")
}

/// Attempts per agent step when the server answers `UNAVAILABLE` (its overload bounds): about
/// two minutes of backoff at most, as agents keep retrying.
const OVERLOAD_ATTEMPTS: u32 = 64;
/// First backoff after an overload refusal; it doubles per attempt up to [`OVERLOAD_BACKOFF_MAX`].
const OVERLOAD_BACKOFF: Duration = Duration::from_millis(20);
/// Longest backoff after an overload refusal.
const OVERLOAD_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Whether `error` is the server refusing a call because it is overloaded (`UNAVAILABLE`):
/// retryable, as the real agent treats it.
fn is_overload(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<tonic::Status>())
        .any(|status| status.code() == tonic::Code::Unavailable)
}

/// The backoff before attempt `attempt + 1`: exponential with full jitter, so the refused
/// agents of one burst do not all come back together.
fn overload_backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let ceiling = OVERLOAD_BACKOFF.saturating_mul(1 << attempt.min(16)).min(OVERLOAD_BACKOFF_MAX);
    let random = RandomState::new().hash_one(attempt);
    ceiling.mul_f64((random % 1_000 + 1) as f64 / 1_000.0)
}

/// Runs `step` until it succeeds, fails with anything but an overload refusal, or has been
/// refused `attempts` times; counts the retries in `retries`.
async fn with_overload_retry<T, F, Fut>(attempts: u32, retries: &AtomicU64, mut step: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match step().await {
            Err(error) if is_overload(&error) && attempt + 1 < attempts => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(overload_backoff(attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Attests agent `n` and syncs it; returns the open sync stream (to keep the agent connected)
/// and how many entries it received. A step the server refuses as overloaded is retried with
/// backoff, as agents do: the attestation (a refused one consumed no token) and the sync.
async fn attest_and_sync(
    job: &WorkerJob,
    bundle: Bundle,
    server_id: SpiffeId,
    n: usize,
    retries: &AtomicU64,
) -> anyhow::Result<(SimAgent, tonic::Streaming<pb::SyncEntriesResponse>, usize)> {
    use pb::sync_entries_response::Event;
    let token = token(&job.prefix, n);
    let agent = with_overload_retry(OVERLOAD_ATTEMPTS, retries, || {
        SimAgent::attest_to(job.addr, bundle.clone(), server_id.clone(), &token)
    })
    .await?;
    let (mut stream, mut pending) = with_overload_retry(OVERLOAD_ATTEMPTS, retries, || async {
        let mut stream = agent.client.clone().sync_entries(pb::SyncEntriesRequest { revision: 0 }).await?.into_inner();
        // An overloaded server may refuse on the stream's first message rather than the call.
        let first = stream.message().await?;
        Ok((stream, Some(first)))
    })
    .await?;
    let mut received = 0;
    loop {
        let next = match pending.take() {
            Some(first) => Ok(Ok(first)),
            None => tokio::time::timeout(Duration::from_secs(120), stream.message()).await,
        };
        match next {
            Err(_) => bail!("no sync message within 120 s"),
            Ok(Err(status)) => bail!("sync failed: {status}"),
            Ok(Ok(None)) => bail!("the sync stream ended before synced"),
            Ok(Ok(Some(message))) => match message.event {
                Some(Event::SnapshotPage(page)) => received += page.entries.len(),
                Some(Event::Synced(_)) => return Ok((agent, stream, received)),
                _ => {}
            },
        }
    }
}

/// `fleet-worker`: attests and syncs `job`'s agents, prints
/// `READY <ok> <failed> <missing> <overload retries>` on stdout, then keeps every agent connected until stdin closes.
pub async fn worker(job: WorkerJob) -> anyhow::Result<()> {
    let pem = std::fs::read(&job.bundle).with_context(|| format!("reading {}", job.bundle.display()))?;
    let trust_domain = TrustDomain::new(TRUST_DOMAIN)?;
    let bundle = Bundle::from_x509_authorities_pem(trust_domain.clone(), &pem)?;
    let server_id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/tessera/server"))?;
    let permits = Arc::new(Semaphore::new(job.concurrency.max(1)));
    let job = Arc::new(job);
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for n in job.from..job.to {
        let (job, bundle, server_id, permits, retries) =
            (Arc::clone(&job), bundle.clone(), server_id.clone(), Arc::clone(&permits), Arc::clone(&retries));
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            attest_and_sync(&job, bundle, server_id, n, &retries).await
        });
    }
    let (mut ok, mut failed, mut missing) = (0usize, 0usize, 0usize);
    let mut connected = Vec::new();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(|e| anyhow!("agent task: {e}")).and_then(|r| r) {
            Ok((agent, stream, received)) => {
                ok += 1;
                missing += job.entries_per_agent.saturating_sub(received);
                connected.push((agent, stream));
            }
            Err(error) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    if let Some(error) = first_error {
        eprintln!("tessera-loadgen: fleet-worker: {failed} agents failed; the first: {error}");
    }
    println!("READY {ok} {failed} {missing} {}", retries.load(Ordering::Relaxed));
    // Hold the connections until the parent closes stdin.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = stdin.next_line().await {}
    drop(connected);
    Ok(())
}

/// Writes the tokens and entries of `size` agents, `writers` threads at once.
async fn provision(server: &SimServer, prefix: &str, size: usize, entries: usize) -> anyhow::Result<()> {
    let writers = 16usize.min(size.max(1));
    let uid = rustix::process::getuid().as_raw();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (store, prefix) = (server.store(), prefix.to_owned());
        tasks.spawn_blocking(move || -> anyhow::Result<()> {
            let selectors = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()])?;
            for n in (w..size).step_by(writers) {
                let token = token(&prefix, n);
                store.create_join_token(&JoinToken {
                    token: token.clone(),
                    expires_at: now + 3600,
                    alias_spiffe_id: None,
                })?;
                let parent = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{token}"))?;
                for e in 0..entries {
                    store.create_entry(&workload_entry(&format!("f{n}-{e}"), &parent, selectors.clone())?)?;
                }
            }
            Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("provisioning task")??;
    }
    Ok(())
}

/// `fleet`: see the [module docs](self).
pub async fn fleet(options: &FleetOptions) -> anyhow::Result<Vec<Figure>> {
    let exe = std::env::current_exe().context("locating tessera-loadgen")?;
    let mut figures = Vec::new();
    for &size in &options.sizes {
        let server = SimServer::start().await?;
        let prefix = format!("lg-fleet-{size}-");
        progress(&format!("{size} agents: writing tokens and {} entries each", options.entries_per_agent));
        provision(&server, &prefix, size, options.entries_per_agent).await?;
        let dir = server.dir().to_owned();
        let fsync = tokio::task::spawn_blocking(move || probe::fsync_rate(&dir, Duration::from_secs(1))).await??;
        let bundle = server.dir().join("fleet-bundle.pem");
        std::fs::write(&bundle, server.bundle().x509_authorities_pem()).context("writing the bundle")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss_before, cpu_before) = (probe::rss_bytes()?, process_cpu(std::process::id())?);
        progress(&format!("{size} agents: attesting and syncing from {} worker processes", options.workers));
        let started = Instant::now();
        let workers = options.workers.clamp(1, size.max(1));
        let mut children = Vec::new();
        for w in 0..workers {
            let (from, to) = (size * w / workers, size * (w + 1) / workers);
            let mut child = tokio::process::Command::new(&exe)
                .arg("fleet-worker")
                .args(["--addr", &server.addr().to_string()])
                .arg("--bundle")
                .arg(&bundle)
                .args(["--prefix", &prefix, "--from", &from.to_string(), "--to", &to.to_string()])
                .args(["--entries", &options.entries_per_agent.to_string()])
                .args(["--concurrency", &options.concurrency.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} fleet-worker", exe.display()))?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("no worker stdout"))?;
            children.push((child, tokio::io::BufReader::new(stdout).lines()));
        }
        let (mut ok, mut failed, mut missing, mut retries) = (0u64, 0u64, 0u64, 0u64);
        for (_, lines) in &mut children {
            let line = tokio::time::timeout(options.timeout, lines.next_line())
                .await
                .map_err(|_| anyhow!("a fleet worker did not finish within {:?}", options.timeout))?
                .context("reading a fleet worker")?
                .ok_or_else(|| anyhow!("a fleet worker exited before reporting"))?;
            let counts: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            let [a, b, c, d] = counts[..] else { bail!("a fleet worker reported {line:?}") };
            (ok, failed, missing, retries) = (ok + a, failed + b, missing + c, retries + d);
        }
        let elapsed = started.elapsed();
        let cpu = process_cpu(std::process::id())?.saturating_sub(cpu_before);
        let rss_after = probe::rss_bytes()?;
        progress(&format!(
            "{size} agents: {ok} connected and synced in {elapsed:?}, {failed} failed, {retries} overload retries"
        ));
        for (mut child, _) in children {
            drop(child.stdin.take());
            if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err() {
                let _ = child.start_kill();
            }
        }
        server.shutdown().await?;
        let tag = format!("fleet.n{size}");
        let n = size.max(1) as f64;
        figures.push(Figure::new(format!("{tag}.attest_and_sync_ms"), millis(elapsed), "ms", Target::None));
        figures.push(
            Figure::new(format!("{tag}.agents_per_sec"), ok as f64 / elapsed.as_secs_f64(), "/s", Target::None)
                .against(fsync, "fsync_4k_single_writer_per_sec"),
        );
        figures.push(Figure::new(
            format!("{tag}.server_cpu_ms_per_agent"),
            cpu.as_secs_f64() * 1e3 / n,
            "ms",
            Target::None,
        ));
        figures.push(Figure::new(
            format!("{tag}.server_rss_bytes_per_agent"),
            rss_after.saturating_sub(rss_before) as f64 / n,
            "B",
            Target::None,
        ));
        figures.push(Figure::new(format!("{tag}.failures"), failed as f64, "count", Target::Zero));
        figures.push(Figure::new(format!("{tag}.overload_retries"), retries as f64, "count", Target::None));
        figures.push(Figure::new(format!("{tag}.missing_entries"), missing as f64, "count", Target::Zero));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: tonic::Code) -> anyhow::Error {
        anyhow::Error::new(tonic::Status::new(code, "server overloaded")).context("attesting")
    }

    #[tokio::test]
    async fn overload_refusals_are_retried_and_counted_until_the_step_succeeds() {
        let (retries, calls) = (AtomicU64::new(0), AtomicU64::new(0));
        let result = with_overload_retry(OVERLOAD_ATTEMPTS, &retries, || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0 | 1 => Err(refusal(tonic::Code::Unavailable)),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(result.unwrap(), 2);
        assert_eq!(retries.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn other_errors_are_not_retried_and_refusals_stop_after_the_attempts() {
        let (retries, calls) = (AtomicU64::new(0), AtomicU64::new(0));
        let denied = with_overload_retry(OVERLOAD_ATTEMPTS, &retries, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(refusal(tonic::Code::PermissionDenied))
        })
        .await;
        assert!(!is_overload(&denied.unwrap_err()));
        assert_eq!((calls.load(Ordering::Relaxed), retries.load(Ordering::Relaxed)), (1, 0));

        calls.store(0, Ordering::Relaxed);
        let refused = with_overload_retry(3, &retries, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(refusal(tonic::Code::Unavailable))
        })
        .await;
        assert!(is_overload(&refused.unwrap_err()));
        assert_eq!((calls.load(Ordering::Relaxed), retries.load(Ordering::Relaxed)), (3, 2));
    }

    #[test]
    fn backoff_grows_to_its_ceiling_and_never_exceeds_it() {
        for attempt in 0..40 {
            let ceiling = OVERLOAD_BACKOFF.saturating_mul(1 << attempt.min(16)).min(OVERLOAD_BACKOFF_MAX);
            let wait = overload_backoff(attempt);
            assert!(wait > Duration::ZERO && wait <= ceiling, "attempt {attempt}: {wait:?} > {ceiling:?}");
        }
    }
}
