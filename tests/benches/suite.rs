//! In-process benchmarks of the performance suite (docs/performance.md), each beside the raw
//! limit it is held to, measured in the same run with the load generator's probes
//! (`tessera_tests::probe`):
//!
//! - `limit/*`: ring P-256 sign and verify, the `/proc` reads of attestation against a child
//!   process, a tonic unary call over a Unix socket whose handler does those reads (the
//!   Workload API floor), a 4 KiB write + `fdatasync` next to the datastore;
//! - S1 `server/mint_x509_keygiven`, S2 `server/mint_x509_csr`, S4 `server/mint_jwt_es256`:
//!   the server's own CA (`CertificateAuthority` of a running server);
//! - S6 `server/agent_sync_{100,1000,10000}`: a full `SyncEntries` from revision 0 over real
//!   mTLS for an agent authorized for N entries;
//! - S8 `server/entry_write_single`, `server/entry_write_64way`: durable entry creation, one
//!   writer and 64 writers at once (time per entry);
//! - S9 `server/load_entries_10000`: reading an agent's 10,000 entries from the datastore, the
//!   work behind its authorized set (the server keeps no index it would hydrate at start-up);
//! - A1 `agent/attest_unix_child`, A2 `agent/attest_unix_child_sha256_hit`: the agent's unix
//!   attestor against a real child process (hashing off; hashing on with the digest cached);
//! - A3 `agent/wl_fetch_x509_warm`, A5 `agent/wl_fetch_jwt_cached`: the agent's Workload API
//!   over a Unix socket on a warm connection (attestation, cache, encoding);
//! - A7 is the `tessera-loadgen agent-memory` mode (it needs a process of its own).
//!
//! Run with `cargo bench -p tessera-tests --bench suite` (append
//! `-- --warm-up-time 0.5 --measurement-time 2` for a quick run). After criterion's report a
//! table sets every figure against its limit from the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group};
use tessera_agent::attestor::{PeerCredentials, UnixAttestor, UnixAttestorConfig};
use tessera_spiffe::{SelectorSet, SpiffeId};
use tessera_tests::modes::{self, Deployment};
use tessera_tests::probe::{self, FloorServer};
use tessera_tests::sim::{SimAgent, SimServer, new_csr, workload_entry};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

fn uid_selectors() -> SelectorSet {
    SelectorSet::parse_all(&[format!("unix:uid:{}", rustix::process::getuid().as_raw()).as_str()]).unwrap()
}

/// A child process to attest, killed when dropped.
struct Child(std::process::Child);

impl Child {
    fn sleep() -> Self {
        Self(std::process::Command::new("sleep").arg("3600").spawn().unwrap())
    }
    fn peer(&self) -> PeerCredentials {
        PeerCredentials {
            pid: self.0.id(),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a probe operation under criterion.
fn bench_op<F: FnMut() -> anyhow::Result<()>>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut op: F,
) {
    group.bench_function(name, |b| b.iter(|| op().unwrap()));
}

fn limits(c: &mut Criterion) {
    let rt = runtime();
    let child = Child::sleep();
    let pid = child.0.id();
    let dir = tempfile::Builder::new().prefix("tbl").tempdir_in("/tmp").unwrap();
    let floor = rt.block_on(async { FloorServer::start(&dir.path().join("floor.sock")) }).unwrap();
    let client = rt.block_on(async {
        tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            probe::uds_channel(floor.socket()).await.unwrap(),
        )
    });
    let mut group = c.benchmark_group("limit");
    bench_op(&mut group, "ring_p256_sign", probe::p256_sign_op().unwrap());
    bench_op(&mut group, "ring_p256_verify", probe::p256_verify_op().unwrap());
    bench_op(&mut group, "proc_attest_child", || probe::proc_attest(pid));
    group.bench_function("tonic_uds_unary_attest", |b| {
        b.iter(|| assert!(rt.block_on(modes::fetch_jwt(client.clone()))));
    });
    // Next to the datastore of the server benches (same filesystem).
    group.bench_function("fsync_4k", |b| {
        use std::io::Write as _;
        let mut file = std::fs::File::create(dir.path().join("fsync")).unwrap();
        let block = [0x5au8; 4096];
        b.iter(|| {
            file.write_all(&block).unwrap();
            file.sync_data().unwrap();
        })
    });
    group.finish();
    rt.block_on(floor.stop());
}

/// Creates `count` entries `<prefix>-<n>` under `parent` from 16 threads.
fn create_entries(server: &SimServer, parent: &SpiffeId, prefix: &str, count: usize) {
    let selectors = uid_selectors();
    std::thread::scope(|scope| {
        for w in 0..16 {
            let (store, selectors) = (server.store(), selectors.clone());
            scope.spawn(move || {
                for n in (w..count).step_by(16) {
                    store
                        .create_entry(&workload_entry(&format!("{prefix}-{n}"), parent, selectors.clone()).unwrap())
                        .unwrap();
                }
            });
        }
    });
}

fn server(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(SimServer::start()).unwrap();
    let ca = server.server().state().ca();
    let spiffe_id = SpiffeId::parse("spiffe://loadgen.example/workload/bench").unwrap();
    let (_, csr) = new_csr().unwrap();
    let spki = tessera_spiffe::x509::verify_csr(&csr).unwrap();
    let ttl = Duration::from_secs(3600);
    let audiences = vec!["spiffe://loadgen.example/db".to_owned()];
    let mut group = c.benchmark_group("server");
    group.bench_function("mint_x509_keygiven", |b| {
        b.iter(|| ca.sign_x509_svid(&spiffe_id, &[], ttl, &spki, SystemTime::now()).unwrap())
    });
    group.bench_function("mint_x509_csr", |b| {
        b.iter(|| ca.sign_x509_svid_from_csr(&spiffe_id, &[], ttl, &csr, SystemTime::now()).unwrap())
    });
    group.bench_function("mint_jwt_es256", |b| {
        b.iter(|| ca.sign_jwt_svid(&spiffe_id, &audiences, ttl, SystemTime::now()).unwrap())
    });
    // S8: durable entry writes.
    let writer = rt.block_on(SimAgent::attest(&server, "bench-writer")).unwrap();
    let next = AtomicU64::new(0);
    let store = server.store();
    let selectors = uid_selectors();
    let write_one = |store: &dyn tessera_server::datastore::DataStore| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        store.create_entry(&workload_entry(&format!("w-{n}"), &writer.id, selectors.clone()).unwrap()).unwrap();
    };
    group.bench_function("entry_write_single", |b| b.iter(|| write_one(&*store)));
    group.bench_function("entry_write_64way", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(64);
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..64 {
                    scope.spawn(|| (0..per_thread).for_each(|_| write_one(&*store)));
                }
            });
            start.elapsed().mul_f64(iters as f64 / (per_thread * 64) as f64)
        })
    });
    group.finish();

    // S6 and S9: agents authorized for N entries.
    let mut group = c.benchmark_group("server");
    group.sample_size(10).warm_up_time(Duration::from_millis(500));
    for n in [100usize, 1000, 10_000] {
        let agent = rt.block_on(SimAgent::attest(&server, &format!("bench-sync-{n}"))).unwrap();
        create_entries(&server, &agent.id, &format!("s{n}"), n);
        group.bench_function(format!("agent_sync_{n}"), |b| {
            b.iter(|| {
                let (received, _, error) = rt.block_on(modes::full_sync(&agent));
                assert!(error.is_none() && received == n, "{received} of {n}: {error:?}");
            })
        });
        if n == 10_000 {
            let parents = [agent.id.clone()];
            group.bench_function("load_entries_10000", |b| {
                b.iter(|| assert_eq!(store.list_entries_by_parents(&parents).unwrap().len(), n))
            });
        }
    }
    group.finish();
    rt.block_on(server.shutdown()).unwrap();
}

fn agent(c: &mut Criterion) {
    let child = Child::sleep();
    let plain = UnixAttestor::new(&UnixAttestorConfig { max_sha256_file_size: 0, ..UnixAttestorConfig::default() });
    let hashing = UnixAttestor::new(&UnixAttestorConfig::default());
    let mut group = c.benchmark_group("agent");
    group.bench_function("attest_unix_child", |b| b.iter(|| plain.attest_blocking(&child.peer()).unwrap()));
    group
        .bench_function("attest_unix_child_sha256_hit", |b| b.iter(|| hashing.attest_blocking(&child.peer()).unwrap()));
    let rt = runtime();
    let deployment = rt.block_on(Deployment::start()).unwrap();
    let client = rt.block_on(async {
        deployment.create_entry("bench-wl").await.unwrap();
        let client = tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            probe::uds_channel(&deployment.socket).await.unwrap(),
        );
        // Ready once the SVID is served; the JWT-SVID is minted once so later calls hit the cache.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !modes::fetch_x509_first(client.clone()).await {
            assert!(Instant::now() < deadline, "the agent served no SVID within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(modes::fetch_jwt(client.clone()).await);
        client
    });
    group.bench_function("wl_fetch_x509_warm", |b| {
        b.iter(|| assert!(rt.block_on(modes::fetch_x509_first(client.clone()))))
    });
    group.bench_function("wl_fetch_jwt_cached", |b| b.iter(|| assert!(rt.block_on(modes::fetch_jwt(client.clone())))));
    group.finish();
    rt.block_on(deployment.shutdown()).unwrap();
}

criterion_group!(benches, limits, server, agent);

/// Where criterion stored its estimates: `$CRITERION_HOME`, else `<target dir>/criterion`.
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

fn median_ns(dir: &Path, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(id).join("new").join("estimates.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["median"]["point_estimate"].as_f64()
}

/// How a row is judged: the limit's time per operation, and the goal on limit/figure.
enum Goal {
    /// figure rate ≥ goal × limit rate.
    AtLeast(f64),
    /// figure time ≤ goal × limit time.
    AtMost(f64),
}

fn print_ratios() {
    let Some(dir) = criterion_dir() else { return };
    let get = |id: &str| median_ns(&dir, id);
    let (Some(sign), Some(verify), Some(attest), Some(rpc), Some(fsync)) = (
        get("limit/ring_p256_sign"),
        get("limit/ring_p256_verify"),
        get("limit/proc_attest_child"),
        get("limit/tonic_uds_unary_attest"),
        get("limit/fsync_4k"),
    ) else {
        eprintln!("(no limit probe results under {}; run the whole bench to get ratios)", dir.display());
        return;
    };
    let rows: Vec<(&str, &str, String, f64, Goal)> = vec![
        ("S1", "server/mint_x509_keygiven", "1/sign".into(), sign, Goal::AtLeast(0.70)),
        ("S2", "server/mint_x509_csr", "1/(sign+verify)".into(), sign + verify, Goal::AtLeast(0.70)),
        ("S4", "server/mint_jwt_es256", "1/sign".into(), sign, Goal::AtLeast(0.70)),
        ("S6", "server/agent_sync_100", "L_rpc+2us*100".into(), rpc + 2e3 * 100.0, Goal::AtMost(1.0)),
        ("S6", "server/agent_sync_1000", "L_rpc+2us*1k".into(), rpc + 2e3 * 1e3, Goal::AtMost(1.0)),
        ("S6", "server/agent_sync_10000", "L_rpc+2us*10k".into(), rpc + 2e3 * 1e4, Goal::AtMost(1.0)),
        ("S8", "server/entry_write_single", "fsync".into(), fsync, Goal::AtLeast(0.50)),
        ("S8", "server/entry_write_64way", "fsync".into(), fsync, Goal::AtLeast(10.0)),
        ("S9", "server/load_entries_10000", "10k/(200k/s)".into(), 1e9 * 1e4 / 2e5, Goal::AtMost(1.0)),
        ("A1", "agent/attest_unix_child", "proc reads".into(), attest, Goal::AtMost(1.3)),
        ("A2", "agent/attest_unix_child_sha256_hit", "proc reads".into(), attest, Goal::AtMost(1.3)),
        ("A3", "agent/wl_fetch_x509_warm", "unary+attest".into(), rpc, Goal::AtMost(1.3)),
        ("A5", "agent/wl_fetch_jwt_cached", "unary+attest".into(), rpc, Goal::AtMost(1.3)),
    ];
    println!();
    println!(
        "{:<3} {:<36} {:>12} {:>12} {:>16} {:>12} {:>8} {:>10} {:>4}",
        "#", "figure", "us/op", "ops/s", "limit", "limit us/op", "ratio", "goal", "met"
    );
    for (item, id, limit_name, limit_ns, goal) in rows {
        let Some(ns) = get(id) else { continue };
        // Throughput goals compare rates (limit time / figure time); latency goals compare times.
        let (ratio, goal_text, met) = match goal {
            Goal::AtLeast(g) => (limit_ns / ns, format!(">={g:.2}"), limit_ns / ns >= g),
            Goal::AtMost(g) => (ns / limit_ns, format!("<={g:.2}"), ns / limit_ns <= g),
        };
        println!(
            "{item:<3} {id:<36} {:>12.2} {:>12.0} {limit_name:>16} {:>12.2} {ratio:>8.2} {goal_text:>10} {:>4}",
            ns / 1e3,
            1e9 / ns,
            limit_ns / 1e3,
            if met { "yes" } else { "NO" }
        );
    }
    println!(
        "(limits, same run: P-256 sign {:.1} us, verify {:.1} us, /proc reads {:.1} us, unary+attest over UDS {:.1} us, \
         4 KiB fdatasync {:.1} us; load average {})",
        sign / 1e3,
        verify / 1e3,
        attest / 1e3,
        rpc / 1e3,
        fsync / 1e3,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_ratios();
}
