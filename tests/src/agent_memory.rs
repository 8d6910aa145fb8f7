//! `agent-memory`: resident memory of a real `tessera-agent` process per cached X.509-SVID.
//!
//! The server runs in the load generator's process (entries are written straight into its
//! datastore); the agent is the real binary in a process of its own, so its resident set is
//! its own. For each size N, on a fresh server and agent:
//!
//! 1. one entry matches the load generator (`unix:uid:<uid>`); once the agent serves its SVID
//!    on the Workload API the agent is attested, synced and minting, and that SVID gives the
//!    leaf and key sizes;
//! 2. the agent's RSS is read (`VmRSS` of `/proc/<pid>/status`): the baseline;
//! 3. N entries for N other workloads (`unix:uid:<2000000 + n>`) are created; the agent syncs
//!    them and mints an SVID for each. Its debug log line `X.509-SVID minted` is counted until
//!    all N + 1 are minted, then the RSS is read again after a short settling time.
//!
//! The figure is (RSS after − baseline) / N, beside the limit 2 × (leaf DER + PKCS#8 key DER)
//! of the suite (A7): what the agent holds per SVID beyond the certificate and key themselves
//! (the entry, its selectors, indexes) must not exceed their size again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tessera_spiffe::{SelectorSet, SpiffeId};
use tessera_wire::workload as wl;
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::io::AsyncBufReadExt;

use crate::probe;
use crate::report::{Figure, Target};
use crate::sim::{SimServer, TRUST_DOMAIN, join_entry_writers, uid_selectors, workload_entry};
use crate::stats::millis;

/// Options of the `agent-memory` mode.
#[derive(Debug, Clone)]
pub struct AgentMemoryOptions {
    /// Cached SVID counts, each on a fresh server and agent.
    pub sizes: Vec<usize>,
    /// The `tessera-agent` binary.
    pub agent_bin: PathBuf,
    /// Threads writing entries at once.
    pub writers: usize,
    /// Longest wait for the agent to mint everything.
    pub timeout: Duration,
    /// The server's `agent_svid_rate_limit`; `None` keeps the server's default (100 SVIDs per
    /// second: 100,000 SVIDs take 17 minutes by the limit alone).
    pub rate_limit: Option<u32>,
}

/// The `tessera-agent` next to the running load generator (same build profile).
pub fn default_agent_bin() -> PathBuf {
    crate::harness::sibling_binary("tessera-agent")
}

fn progress(line: &str) {
    eprintln!("tessera-loadgen: agent-memory: {line}");
}

/// Resident set of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    probe::rss_in(&format!("/proc/{pid}/status"))
}

/// A real agent process, its log lines counted as they arrive.
struct AgentProcess {
    child: tokio::process::Child,
    pid: u32,
    minted: Arc<AtomicU64>,
    tail: Arc<std::sync::Mutex<Vec<String>>>,
}

impl AgentProcess {
    async fn start(server: &SimServer, bin: &Path, dir: &Path, token: &str) -> anyhow::Result<Self> {
        if !bin.is_file() {
            bail!(
                "no agent binary at {} (build it with `cargo build [--release] -p tessera-agent`, or pass --agent-bin)",
                bin.display()
            );
        }
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, server.bundle().x509_authorities_pem()).context("writing the bootstrap bundle")?;
        let d = dir.display();
        let config = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"{addr}\"\ndata_dir = \"{d}/agent\"\n\
             socket_path = \"{d}/pub/api.sock\"\nadmin_socket = \"{d}/priv/admin.sock\"\n\
             trust_bundle_path = \"{d}/bundle.pem\"\nlog_level = \"debug\"\nlog_format = \"json\"\n",
            addr = server.addr()
        );
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config).context("writing the agent configuration")?;
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--join-token")
            .arg(token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("the agent exited at once"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no agent stderr"))?;
        let minted = Arc::new(AtomicU64::new(0));
        let tail = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, keep) = (Arc::clone(&minted), Arc::clone(&tail));
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("X.509-SVID minted") {
                    count.fetch_add(1, Ordering::Relaxed);
                } else if !line.contains("\"DEBUG\"") {
                    let mut keep = keep.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if keep.len() >= 20 {
                        keep.remove(0);
                    }
                    keep.push(line);
                }
            }
        });
        Ok(Self { child, pid, minted, tail })
    }

    fn log_tail(&self) -> String {
        self.tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n")
    }

    /// Fails with the agent's last log lines when it has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("the agent exited ({status}); its last log lines:\n{}", self.log_tail());
        }
        Ok(())
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Leaf DER and key DER sizes of the first SVID served on `socket`, once it is served.
async fn first_svid_sizes(
    agent: &mut AgentProcess,
    socket: &Path,
    timeout: Duration,
) -> anyhow::Result<(usize, usize)> {
    let deadline = Instant::now() + timeout;
    loop {
        agent.check_alive()?;
        if socket.exists()
            && let Ok(channel) = probe::uds_channel(socket).await
        {
            let mut request = tonic::Request::new(wl::X509svidRequest {});
            request.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
            if let Ok(response) = SpiffeWorkloadApiClient::new(channel).fetch_x509svid(request).await
                && let Ok(Some(message)) = response.into_inner().message().await
                && let Some(svid) = message.svids.first()
            {
                // The chain is the leaf alone under a self-signed CA; count the leaf only.
                let leaf = leaf_len(&svid.x509_svid).unwrap_or(svid.x509_svid.len());
                return Ok((leaf, svid.x509_svid_key.len()));
            }
        }
        if Instant::now() > deadline {
            bail!("the agent served no SVID within {timeout:?}; its last log lines:\n{}", agent.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Length of the first DER element (SEQUENCE with a definite length) of `der`.
fn leaf_len(der: &[u8]) -> Option<usize> {
    match *der.get(1)? {
        n if n < 0x80 => Some(2 + usize::from(n)),
        0x81 => Some(3 + usize::from(*der.get(2)?)),
        0x82 => Some(4 + (usize::from(*der.get(2)?) << 8 | usize::from(*der.get(3)?))),
        _ => None,
    }
}

/// `agent-memory`: see the [module docs](self).
pub async fn agent_memory(options: &AgentMemoryOptions) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let uid = rustix::process::getuid().as_raw();
    for &size in &options.sizes {
        let dir = tempfile::Builder::new().prefix("tlg").tempdir_in("/tmp").context("temporary directory")?;
        let rate_limit = options.rate_limit;
        let server = SimServer::start_configured(dir, |config| {
            if let Some(rate) = rate_limit {
                config.agent_svid_rate_limit = rate;
            }
        })
        .await?;
        let token = format!("lg-mem-{size}");
        server.new_join_token(&token)?;
        let agent_id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{token}"))?;
        let own = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()])?;
        server.store().create_entry(&workload_entry("mem-probe", &agent_id, own)?)?;
        let dir = tempfile::Builder::new().prefix("tlm").tempdir_in("/tmp")?;
        let mut agent = AgentProcess::start(&server, &options.agent_bin, dir.path(), &token).await?;
        let socket = dir.path().join("pub/api.sock");
        let (leaf, key) = first_svid_sizes(&mut agent, &socket, options.timeout).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let baseline = rss_of(agent.pid)?;
        progress(&format!("{size} SVIDs: agent RSS {baseline} B before; creating the entries"));
        let started = Instant::now();
        join_entry_writers(&mut server.spawn_entry_writers(
            &agent_id,
            "mem",
            size,
            options.writers,
            uid_selectors(2_000_000),
        ))
        .await?;
        let want = size as u64 + 1;
        let deadline = started + options.timeout;
        while agent.minted.load(Ordering::Relaxed) < want {
            agent.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent minted {} of {want} SVIDs within {:?}; its last log lines:\n{}",
                    agent.minted.load(Ordering::Relaxed),
                    options.timeout,
                    agent.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all_minted = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_of(agent.pid)?;
        progress(&format!("{size} SVIDs: agent RSS {after} B after, all minted in {all_minted:?}"));
        agent.stop().await;
        server.shutdown().await?;
        let tag = format!("agent_memory.n{size}");
        let per_svid = after.saturating_sub(baseline) as f64 / size.max(1) as f64;
        figures.push(
            Figure::new(format!("{tag}.rss_bytes_per_svid"), per_svid, "B", Target::RatioAtMost(2.0))
                .against((leaf + key) as f64, "leaf_der_plus_pkcs8_key_der_bytes"),
        );
        figures.push(Figure::new(format!("{tag}.rss_after_bytes"), after as f64, "B", Target::None));
        figures.push(Figure::new(format!("{tag}.entries_to_all_minted_ms"), millis(all_minted), "ms", Target::None));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::leaf_len;

    #[test]
    fn first_der_element_length() {
        assert_eq!(leaf_len(&[0x30, 0x03, 1, 2, 3, 0x30]), Some(5));
        assert_eq!(leaf_len(&[0x30, 0x81, 0x80]), Some(131));
        assert_eq!(leaf_len(&[0x30, 0x82, 0x01, 0xf4]), Some(504));
        assert_eq!(leaf_len(&[0x30]), None);
        assert_eq!(leaf_len(&[0x30, 0x84, 0, 0, 0, 0]), None);
    }
}
