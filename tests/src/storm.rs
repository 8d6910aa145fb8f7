//! `rotation-storm` (suite item A8): N X.509-SVIDs due at once at a real agent, and how long
//! the agent takes to hold a new SVID for every one: key generation and CSR per SVID, batched
//! `BatchNewX509Svid` calls, the check of each returned SVID, the cache swap and the push to
//! open Workload API streams.
//!
//! # How N SVIDs come due at once
//!
//! The agent spreads renewals on purpose: each SVID renews at half its lifetime moved by a
//! random ±10% of the lifetime (`tessera_spiffe::ttl::renewal_point`), and a forced rotation
//! spreads re-minting over `TAINT_SPREAD` (10 s). N SVIDs minted together with a short TTL
//! therefore come due over a fifth of the TTL, not at once (the `rotation` mode measures
//! that spread), and the agent has no switch to turn the jitter off. The case where every
//! SVID is due at the same instant is an agent that holds none: workload SVIDs live in the
//! agent's memory only, so an agent (re)start on a node with N registered workloads must mint
//! all N at once. That is what this mode sets up, without any hook into the agent:
//!
//! 1. a server (per-agent signing rate limit off: the default of 100 SVIDs/s would make the
//!    figure the limit's) with N entries under one agent for N other workloads
//!    (`unix:uid:<3000000 + n>`), and one for this process, named to sort last so it is among
//!    the last minted;
//! 2. the agent starts (manager and Workload API, on a runtime of its own, its CPU time read
//!    apart from the server's, which has a runtime of its own too); `subscribers` streams of
//!    this process call `FetchX509SVID` at once and wait for their first message;
//! 3. every snapshot the agent publishes is watched: the storm starts when a snapshot holds
//!    all N + 1 entries (the sync's last page applied: every entry is due, none has an SVID)
//!    and ends when one holds N + 1 identities.
//!
//! The limit (suite): `max(N x t(keygen + CSR) / agent cores, N / S2 server rate)`, with
//! `t(keygen + CSR)` the rcgen P-256 key and CSR probe and the S2 rate `cores / (t_sign +
//! t_verify)` (ring P-256), all measured in the same run, single-threaded, as wall time (the
//! figure is wall time). Agent and server share this machine's cores here, so the bound where
//! both sides' crypto runs on the same cores, `N x (t(keygen + CSR) + t_sign + t_verify) /
//! cores`, is reported beside it. The agent's and the server's CPU time per SVID are set
//! against the CPU time of the same probes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

use crate::agent_load::{Stage, empty_cache};
use crate::probe;
use crate::report::{Figure, Target};
use crate::sim::{join_entry_writers, uid_selectors};
use crate::stats::{micros, millis};

/// Options of `rotation-storm`.
#[derive(Debug, Clone)]
pub struct StormOptions {
    /// SVIDs due at once.
    pub svids: usize,
    /// Workload API streams open during the storm.
    pub subscribers: usize,
    /// Threads creating the entries beforehand.
    pub writers: usize,
    /// Time of each limit probe.
    pub probe_duration: Duration,
    /// Longest wait for the storm.
    pub timeout: Duration,
}

fn progress(line: &str) {
    eprintln!("tessera-loadgen: rotation-storm: {line}");
}

/// What the snapshot watcher saw: when the storm started and ended, and CPU at both points.
#[derive(Debug, Default, Clone, Copy)]
struct Marks {
    due: Option<(Instant, Duration, Duration)>,
    done: Option<(Instant, Duration, Duration)>,
    publishes: u64,
}

/// `rotation-storm`: see the [module docs](self).
pub async fn rotation_storm(options: &StormOptions) -> anyhow::Result<Vec<Figure>> {
    let n = options.svids;
    let cores = probe::cores();
    progress("measuring the limits (keygen + CSR, P-256 sign, P-256 verify; wall and CPU time, one thread)");
    let probe_duration = options.probe_duration;
    let (keygen_csr, sign, verify, cpu) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((
            probe::time_per_op(probe_duration, probe::keygen_csr_op)?,
            probe::time_per_op(probe_duration, probe::p256_sign_op)?,
            probe::time_per_op(probe_duration, probe::p256_verify_op)?,
            (
                probe::cpu_per_op(probe_duration, probe::keygen_csr_op)?,
                probe::cpu_per_op(probe_duration, probe::p256_sign_op)?
                    + probe::cpu_per_op(probe_duration, probe::p256_verify_op)?,
            ),
        ))
    })
    .await??;
    let (keygen_csr_cpu, sign_verify_cpu) = cpu;

    let stage = Arc::new(Stage::server("storm", true).await?);
    progress(&format!("creating {n} entries under the agent ({} writers)", options.writers));
    join_entry_writers(&mut stage.server.spawn_entry_writers(
        &stage.agent_id,
        "storm",
        n,
        options.writers,
        uid_selectors(3_000_000),
    ))
    .await?;
    stage.own_entry("zz-subscriber")?;
    let want = n + 1;

    // Every published snapshot is looked at from a thread of its own (not a runtime the storm
    // keeps busy), so the marks are taken when the snapshot is published.
    let cache = empty_cache()?;
    let mut snapshots = cache.subscribe();
    let marks = Arc::new(std::sync::Mutex::new(Marks::default()));
    let watcher = {
        let (marks, stage) = (Arc::clone(&marks), Arc::clone(&stage));
        std::thread::spawn(move || {
            let watch = async {
                while snapshots.changed().await.is_ok() {
                    let snapshot = Arc::clone(&snapshots.borrow_and_update());
                    let at = (Instant::now(), stage.agent_rt.cpu_time(), stage.server_rt.cpu_time());
                    let mut marks = marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    marks.publishes += 1;
                    if marks.due.is_none() && snapshot.entry_count() >= want {
                        marks.due = Some(at);
                    }
                    if snapshot.identity_count() >= want {
                        marks.done = Some(at);
                        return;
                    }
                }
            };
            tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| rt.block_on(watch))
        })
    };

    progress(&format!("starting the agent: {n} SVIDs to mint at once, {} subscribers", options.subscribers));
    let started = Instant::now();
    let agent = stage.start_agent(cache).await?;
    // The subscribers: streams that wait for this process's SVID and stay open through the storm.
    let pushed = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let received = Arc::new(AtomicU64::new(0));
    let mut subscribers = tokio::task::JoinSet::new();
    for _ in 0..options.subscribers {
        let (socket, pushed, received) = (agent.socket.clone(), Arc::clone(&pushed), Arc::clone(&received));
        let deadline = started + options.timeout;
        subscribers.spawn(async move {
            // Calls answered Unavailable (the agent's readiness wait ran out) are made again.
            loop {
                let retry = || async { tokio::time::sleep(Duration::from_millis(10)).await };
                let channel = match probe::uds_channel(&socket).await {
                    Ok(channel) => channel,
                    Err(_) if Instant::now() < deadline => {
                        retry().await;
                        continue;
                    }
                    Err(error) => return Err(format!("{error:#}")),
                };
                let mut client = SpiffeWorkloadApiClient::new(channel);
                let request = crate::modes::with_header(tessera_wire::workload::X509svidRequest {});
                let opened = client.fetch_x509svid(request).await;
                let mut stream = match opened {
                    Ok(response) => response.into_inner(),
                    Err(_) if Instant::now() < deadline => {
                        retry().await;
                        continue;
                    }
                    Err(status) => return Err(status.to_string()),
                };
                match stream.message().await {
                    Ok(Some(message)) if !message.svids.is_empty() => {
                        pushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Instant::now());
                        // Held open, reading whatever else is pushed, until the run drops it.
                        while let Ok(Some(_)) = stream.message().await {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(());
                    }
                    _ if Instant::now() < deadline => retry().await,
                    other => return Err(format!("no first message: {other:?}")),
                }
            }
        });
    }

    let deadline = started + options.timeout;
    let marks = loop {
        let current = *marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let subscribed = pushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        if current.done.is_some() && subscribed >= options.subscribers {
            break current;
        }
        if Instant::now() > deadline {
            let minted = agent.cache.current().identity_count();
            bail!(
                "within {:?} the agent minted {minted} of {want} SVIDs and {subscribed} of {} subscribers got theirs",
                options.timeout,
                options.subscribers
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let pushes = pushed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    subscribers.abort_all();
    while subscribers.join_next().await.is_some() {}
    let _ = watcher.join();
    let stage = Arc::into_inner(stage).context("the watcher still holds the stage")?;
    stage.stop(agent).await?;

    let (Some((due, agent_due, server_due)), Some((done, agent_done, server_done))) = (marks.due, marks.done) else {
        bail!("the storm was not observed: {marks:?}");
    };
    let wall = done.saturating_duration_since(due);
    let last_push = pushes.iter().max().map_or(Duration::ZERO, |at| at.saturating_duration_since(due));
    let agent_cpu = agent_done.saturating_sub(agent_due);
    let server_cpu = server_done.saturating_sub(server_due);
    let per_svid = |d: Duration| d.as_secs_f64() * 1e6 / want as f64;
    let (t_kc, t_s2) = (keygen_csr.as_secs_f64(), (sign + verify).as_secs_f64());
    let limit = (want as f64 * t_kc / cores as f64).max(want as f64 * t_s2 / cores as f64);
    let shared = want as f64 * (t_kc + t_s2) / cores as f64;
    progress(&format!(
        "storm: {want} SVIDs in {wall:?} ({} publishes); agent CPU {agent_cpu:?}, server CPU {server_cpu:?}; \
         subscribers' last first message {last_push:?} after the start",
        marks.publishes
    ));
    let tag = format!("rotation_storm.n{n}");
    Ok(vec![
        Figure::new(format!("{tag}.wall_ms"), millis(wall), "ms", Target::RatioAtMost(1.5))
            .against(limit * 1e3, format!("max(N*t_keygen_csr,N*t_s2)/{cores}_cores")),
        Figure::new(format!("{tag}.wall_vs_shared_cores_ms"), millis(wall), "ms", Target::None)
            .against(shared * 1e3, format!("N*(t_keygen_csr+t_s2)/{cores}_cores")),
        Figure::new(format!("{tag}.subscribers_last_first_message_ms"), millis(last_push), "ms", Target::None),
        Figure::new(format!("{tag}.agent_cpu_us_per_svid"), per_svid(agent_cpu), "us", Target::None)
            .against(micros(keygen_csr_cpu), "t_keygen_csr_cpu_us"),
        Figure::new(format!("{tag}.server_cpu_us_per_svid"), per_svid(server_cpu), "us", Target::None)
            .against(micros(sign_verify_cpu), "t_sign_plus_verify_cpu_us"),
        Figure::new(format!("{tag}.publishes"), marks.publishes as f64, "count", Target::None),
        Figure::new(format!("{tag}.subscribers"), pushes.len() as f64, "count", Target::None),
        Figure::new(
            format!("{tag}.subscriber_messages_after_first"),
            received.load(Ordering::Relaxed) as f64,
            "count",
            Target::None,
        ),
        Figure::new(format!("{tag}.limit_keygen_csr_us"), micros(keygen_csr), "us", Target::None),
    ])
}
