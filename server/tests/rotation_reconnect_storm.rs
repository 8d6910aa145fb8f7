//! Reconnect storm (issue 5): a few hundred simulated agents (this process, real mTLS) attest,
//! then all reconnect at once and ask for an X.509-SVID. Every agent is served within a bounded
//! time, any answer other than an SVID is a retryable status (retried with jittered backoff, as
//! agents do; on a fast machine the bounded signing queue absorbs the storm and none occurs),
//! and the process's resident memory grows by less than a stated bound. Forced overload
//! answers are covered by `rotation_signing_limits.rs` and the agent API's unit tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use tessera_wire::tessera::agent::v1 as pb;
use tonic::Code;

/// Simulated agents.
const AGENTS: usize = 200;
/// All of them must be served within this.
const SERVED_WITHIN: Duration = Duration::from_secs(120);
/// Resident memory growth allowed during the storm (server and clients together).
const RSS_BOUND_KIB: u64 = 512 * 1024;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_agents_reconnecting_at_once_are_all_served() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let server = common::start_memory(dir.path()).await;
    let store = common::store(&server);
    let bundle = common::bundle(&server);

    // Attest every agent (sequentially: this is the set-up, not the storm) and give each an entry.
    let mut agents = Vec::with_capacity(AGENTS);
    for i in 0..AGENTS {
        let agent = common::attest(&server, &format!("storm-{i}")).await;
        common::entry(&store, &format!("e{i}"), &format!("/storm/{i}"), &agent.id, &["unix:uid:1"]);
        agents.push((agent.chain, agent.key));
    }

    let before = rss_kib();
    let started = Instant::now();
    let addr = server.agent_api_addr();
    let tasks: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, (chain, key))| {
            let bundle = bundle.clone();
            tokio::spawn(async move {
                let mut retried = 0u32;
                let mut delay = Duration::from_millis(100);
                loop {
                    assert!(started.elapsed() < SERVED_WITHIN, "agent {i} not served within {SERVED_WITHIN:?}");
                    let mut client = match common::try_connect(addr, bundle.clone(), Some((&chain, &key))).await {
                        Ok(client) => client,
                        Err(_) => {
                            retried += 1;
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    };
                    let (_, csr) = common::key_and_csr();
                    let request = pb::BatchNewX509SvidRequest {
                        params: vec![pb::NewX509SvidParams { entry_id: format!("e{i}"), csr }],
                    };
                    match client.batch_new_x509_svid(request).await {
                        Ok(response) => {
                            let results = response.into_inner().results;
                            assert_eq!(results.len(), 1);
                            assert!(
                                matches!(results[0].result, Some(pb::new_x509_svid_result::Result::Svid(_))),
                                "agent {i}: {:?}",
                                results[0].result
                            );
                            return retried;
                        }
                        Err(status)
                            if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted | Code::Aborted) =>
                        {
                            retried += 1;
                            // Jittered backoff, as agents do.
                            let jitter = Duration::from_millis((i as u64 * 37) % 100);
                            tokio::time::sleep(delay + jitter).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        Err(status) => panic!("agent {i}: non-retryable answer {status:?}"),
                    }
                }
            })
        })
        .collect();
    let mut retries = 0;
    for task in tasks {
        retries += task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let growth = rss_kib().saturating_sub(before);
    eprintln!("storm: {AGENTS} agents served in {elapsed:?} with {retries} retries; RSS growth {growth} KiB");
    assert!(growth < RSS_BOUND_KIB, "resident memory grew by {growth} KiB during the storm");
    server.shutdown().await.unwrap();
}
