//! `rotation`: what it costs the server when a whole fleet's X.509-SVIDs reach half-life
//! together, with the agents' renewal jitter and without it.
//!
//! A fleet of simulated agents (join-token attestation, real mTLS) mints one X.509-SVID per
//! entry at the same moment, as a fleet does after a deploy or a server restart. Each agent
//! then renews each SVID at the point the real agent uses
//! ([`tessera_spiffe::ttl::renewal_point`]: half the lifetime from `notBefore`, moved by up to
//! ±10% of the lifetime by a jitter in [-1, 1]), in `BatchNewX509Svid` calls of at most
//! [`tessera_agent::manager::mint::BATCH_SIZE`] fresh CSRs, after the agent's batching window.
//! With jitter off every agent uses 0; with jitter on each SVID draws its own value, as the
//! agent does.
//!
//! The server runs on its own runtime ([`TrackedRuntime`]), so its CPU time is measured apart
//! from the simulated agents'. Reported per run: SVIDs renewed, the peak signing rate over any
//! one-second window (beside the server's raw CSR signing rate on all cores, measured in the
//! same run), how long the renewals took from first to last, the server's CPU time and CPU
//! per SVID over the rotation, the p99 of a renewal call, and failures.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use ring::rand::{SecureRandom, SystemRandom};
use tessera_agent::manager::mint::{BATCH_SIZE, BATCH_WINDOW};
use tessera_wire::tessera::agent::v1 as pb;

use crate::cpu::TrackedRuntime;
use crate::probe;
use crate::report::{Figure, Target};
use crate::sim::{SimAgent, SimServer, new_csr, workload_entry};
use crate::stats::{Samples, millis};

/// Options of the `rotation` mode.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Simulated agents.
    pub agents: usize,
    /// Entries (SVIDs) per agent.
    pub entries_per_agent: usize,
    /// The entries' X.509-SVID TTL. `notBefore` is back-dated 10 s, so renewal comes about
    /// TTL/2 - 5 s after minting (more than 10 s gives a real wait).
    pub ttl: Duration,
    /// Time of the limit probe.
    pub probe_duration: Duration,
}

fn progress(line: &str) {
    eprintln!("tessera-loadgen: rotation: {line}");
}

/// One SVID of a simulated agent: its entry and when the agent renews it.
struct Held {
    entry_id: String,
    renew_at: SystemTime,
}

/// Responses of renewal calls: when each completed and how many SVIDs it carried.
#[derive(Default)]
struct Timeline {
    events: Vec<(Instant, u64)>,
    latency: Samples,
    failures: u64,
}

/// `notBefore` and `notAfter` of a DER certificate.
fn validity(der: &[u8]) -> anyhow::Result<(SystemTime, SystemTime)> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|e| anyhow!("leaf: {e}"))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((at(certificate.validity().not_before.timestamp()), at(certificate.validity().not_after.timestamp())))
}

fn jitter(rng: &SystemRandom, on: bool) -> f64 {
    let mut bytes = [0u8; 8];
    if !on || rng.fill(&mut bytes).is_err() {
        return 0.0;
    }
    tessera_spiffe::ttl::jitter_from_bytes(bytes)
}

/// Sends `entries` with one fresh CSR each, in calls of at most [`BATCH_SIZE`]; returns the
/// signed leaf of each entry (`None` where the server refused).
async fn mint(
    agent: &SimAgent,
    entries: &[String],
    csrs: &mut Vec<Vec<u8>>,
    timeline: &Mutex<Timeline>,
) -> Vec<Option<Vec<u8>>> {
    let mut leaves = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(BATCH_SIZE) {
        let params = chunk
            .iter()
            .map(|entry_id| pb::NewX509SvidParams { entry_id: entry_id.clone(), csr: csrs.pop().unwrap_or_default() })
            .collect();
        let began = Instant::now();
        let result = agent.client.clone().batch_new_x509_svid(pb::BatchNewX509SvidRequest { params }).await;
        let done = Instant::now();
        let mut timeline = timeline.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(response) => {
                let mut ok = 0;
                for item in response.into_inner().results {
                    match item.result {
                        Some(pb::new_x509_svid_result::Result::Svid(svid)) => {
                            ok += 1;
                            leaves.push(svid.cert_chain.into_iter().next());
                        }
                        _ => {
                            timeline.failures += 1;
                            leaves.push(None);
                        }
                    }
                }
                timeline.events.push((done, ok));
                timeline.latency.push(done - began);
            }
            Err(status) => {
                progress(&format!("a BatchNewX509Svid call failed: {status}"));
                timeline.failures += chunk.len() as u64;
                leaves.extend(chunk.iter().map(|_| None));
            }
        }
    }
    leaves
}

/// One agent's renewals: sleeps until the next renewal point, waits the batching window,
/// renews everything due by then.
async fn renew_all(agent: SimAgent, mut held: Vec<Held>, mut csrs: Vec<Vec<u8>>, timeline: Arc<Mutex<Timeline>>) {
    held.sort_by_key(|h| std::cmp::Reverse(h.renew_at));
    while let Some(next) = held.last() {
        let wait = next.renew_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait + BATCH_WINDOW).await;
        let now = SystemTime::now();
        let mut due = Vec::new();
        while held.last().is_some_and(|h| h.renew_at <= now) {
            if let Some(h) = held.pop() {
                due.push(h.entry_id);
            }
        }
        mint(&agent, &due, &mut csrs, &timeline).await;
    }
}

/// The most SVIDs signed within any one second of `events` (sorted by time).
fn peak_per_second(events: &[(Instant, u64)]) -> u64 {
    let (mut best, mut sum, mut tail) = (0, 0, 0);
    for (head, (at, n)) in events.iter().enumerate() {
        sum += n;
        while tail < head && at.duration_since(events[tail].0) >= Duration::from_secs(1) {
            sum -= events[tail].1;
            tail += 1;
        }
        best = best.max(sum);
    }
    best
}

/// SVIDs signed in each second from the first event, for the progress log.
fn per_second(events: &[(Instant, u64)]) -> Vec<u64> {
    let Some(first) = events.first().map(|e| e.0) else { return Vec::new() };
    let mut seconds = Vec::new();
    for (at, n) in events {
        let s = at.duration_since(first).as_secs() as usize;
        if seconds.len() <= s {
            seconds.resize(s + 1, 0);
        }
        seconds[s] += n;
    }
    seconds
}

async fn run(options: &RotationOptions, jitter_on: bool, limit: f64) -> anyhow::Result<Vec<Figure>> {
    let label = if jitter_on { "jitter_on" } else { "jitter_off" };
    let tracked = TrackedRuntime::new("lg-server", probe::cores())?;
    let server = tracked.run(SimServer::start()).await??;
    let store = server.store();
    let rng = SystemRandom::new();
    let uid = rustix::process::getuid().as_raw();
    let selectors = tessera_spiffe::SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()])?;
    progress(&format!(
        "{label}: {} agents x {} entries, TTL {:?}",
        options.agents, options.entries_per_agent, options.ttl
    ));
    let mut fleet = Vec::with_capacity(options.agents);
    for a in 0..options.agents {
        let agent = SimAgent::attest(&server, &format!("lg-rot-{label}-{a}")).await?;
        let mut entries = Vec::with_capacity(options.entries_per_agent);
        for n in 0..options.entries_per_agent {
            let mut entry = workload_entry(&format!("rot-{label}-{a}-{n}"), &agent.id, selectors.clone())?;
            entry.x509_svid_ttl = Some(options.ttl);
            entries.push(entry);
        }
        let store = Arc::clone(&store);
        let count = options.entries_per_agent * 2;
        let (ids, csrs) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let ids = entries.iter().map(|e| Ok(store.create_entry(e)?.id)).collect::<anyhow::Result<Vec<_>>>()?;
            let csrs = (0..count).map(|_| Ok(new_csr()?.1)).collect::<anyhow::Result<Vec<_>>>()?;
            Ok((ids, csrs))
        })
        .await??;
        fleet.push((agent, ids, csrs));
    }
    // The whole fleet mints at once.
    progress(&format!("{label}: minting every SVID at once"));
    let initial = Arc::new(Mutex::new(Timeline::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for (agent, ids, mut csrs) in fleet {
        let initial = Arc::clone(&initial);
        tasks.spawn(async move {
            let leaves = mint(&agent, &ids, &mut csrs, &initial).await;
            (agent, ids, leaves, csrs)
        });
    }
    let mut renewals = Vec::new();
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        let (agent, ids, leaves, csrs) = joined.context("mint task")?;
        let mut held = Vec::with_capacity(ids.len());
        for (entry_id, leaf) in ids.into_iter().zip(leaves) {
            let Some(leaf) = leaf else { bail!("the initial mint of {entry_id} failed") };
            let (not_before, not_after) = validity(&leaf)?;
            let renew_at = tessera_spiffe::ttl::renewal_point(not_before, not_after, jitter(&rng, jitter_on));
            // As the agent does: never in the past, never after expiry.
            let renew_at = renew_at.max(SystemTime::now() + Duration::from_millis(500)).min(not_after);
            held.push(Held { entry_id, renew_at });
        }
        total += held.len() as u64;
        renewals.push((agent, held, csrs));
    }
    let first_due = renewals.iter().flat_map(|(_, held, _)| held.iter().map(|h| h.renew_at)).min();
    progress(&format!(
        "{label}: {total} SVIDs held; renewals start in {:?}",
        first_due.and_then(|t| t.duration_since(SystemTime::now()).ok()).unwrap_or_default()
    ));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let cpu_before = tracked.cpu_time();
    let mut tasks = tokio::task::JoinSet::new();
    for (agent, held, csrs) in renewals {
        tasks.spawn(renew_all(agent, held, csrs, Arc::clone(&timeline)));
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("renewal task")?;
    }
    let server_cpu = tracked.cpu_time().saturating_sub(cpu_before);
    tracked.run(server.shutdown()).await??;
    tracked.shutdown();
    let mut timeline = std::mem::take(&mut *timeline.lock().unwrap_or_else(PoisonError::into_inner));
    timeline.events.sort_by_key(|e| e.0);
    let renewed: u64 = timeline.events.iter().map(|e| e.1).sum();
    let window = match (timeline.events.first(), timeline.events.last()) {
        (Some(first), Some(last)) => last.0.duration_since(first.0),
        _ => Duration::ZERO,
    };
    progress(&format!("{label}: SVIDs renewed per second: {:?}", per_second(&timeline.events)));
    let tag = format!("rotation.{label}");
    Ok(vec![
        Figure::new(format!("{tag}.svids_renewed"), renewed as f64, "count", Target::None),
        Figure::new(format!("{tag}.peak_svids_per_sec"), peak_per_second(&timeline.events) as f64, "/s", Target::None)
            .against(limit, format!("rcgen_csr_verify_sign_x{}_threads", probe::cores())),
        Figure::new(format!("{tag}.renewal_window_s"), window.as_secs_f64(), "s", Target::None),
        Figure::new(format!("{tag}.server_cpu_ms"), millis(server_cpu), "ms", Target::None),
        Figure::new(
            format!("{tag}.server_cpu_us_per_svid"),
            server_cpu.as_secs_f64() * 1e6 / renewed.max(1) as f64,
            "us",
            Target::None,
        ),
        Figure::new(format!("{tag}.call_p99_ms"), millis(timeline.latency.percentile(99.0)), "ms", Target::None),
        Figure::new(format!("{tag}.failures"), timeline.failures as f64, "count", Target::Zero),
    ])
}

/// `rotation`: a fleet's renewal burst without jitter, then with it (fresh servers).
pub async fn rotation(options: &RotationOptions) -> anyhow::Result<Vec<Figure>> {
    progress("measuring the limit (parse CSR + verify + sign on all cores)");
    let cores = probe::cores();
    let probe_duration = options.probe_duration;
    let limit =
        tokio::task::spawn_blocking(move || probe::rate_on_all_cores(cores, probe_duration, probe::csr_sign_op))
            .await??;
    let mut figures = run(options, false, limit).await?;
    figures.extend(run(options, true, limit).await?);
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_busiest_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let events = [(at(0), 10), (at(500), 20), (at(900), 30), (at(1600), 5), (at(3000), 1)];
        // 0..1000 ms holds 60; 500..1500 holds 50; 900..1900 holds 35.
        assert_eq!(peak_per_second(&events), 60);
        assert_eq!(per_second(&events), vec![60, 5, 0, 1]);
        assert_eq!(peak_per_second(&[]), 0);
    }
}
