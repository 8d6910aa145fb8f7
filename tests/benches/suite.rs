//! In-process benchmarks of the performance suite (docs/performance.md), each beside the raw
//! limit it is held to, measured in the same run with the load generator's probes
//! (`tessera_tests::probe`):
//!
//! - `limit/*`: ring P-256 sign and verify, ring X25519 and P-256 key agreement (one side of
//!   an ephemeral exchange), x509-parser over an SVID-shaped leaf, the `/proc` reads of
//!   attestation against a child process, a tonic unary call over a Unix socket whose handler
//!   does those reads (the Workload API floor), the same call without the reads on a new
//!   connection each time (`L_newconn`), a 4 KiB write + `fdatasync` next to the datastore;
//! - S1 `server/mint_x509_keygiven`, S2 `server/mint_x509_csr`, S4 `server/mint_jwt_es256`:
//!   the server's own CA (`CertificateAuthority` of a running server);
//! - S3 `server/mint_x509_scaling`: S1 on one thread per core sharing that CA (time per SVID
//!   over all threads), held to the number of threads times S1's single-thread rate;
//! - S5 `server/rpc_batch_new_x509`: `BatchNewX509Svid` with 50 CSRs over one warm mTLS
//!   connection (loopback TCP), the server on a runtime of its own so that its CPU time per
//!   SVID is measured apart from the client's; the table adds SVIDs per server-CPU-second and
//!   the p99 of a call from the same calls;
//! - S7 `server/mtls_accept`: full TLS 1.3 mutual handshakes against the running server's own
//!   rustls configuration, in memory, the server's side timed alone (`tessera_tests::handshake`);
//! - S6 `server/agent_sync_{100,1000,10000}`: a full `SyncEntries` from revision 0 over real
//!   mTLS for an agent authorized for N entries;
//! - S8 `server/entry_write_single`, `server/entry_write_64way`: durable entry creation, one
//!   writer and 64 writers at once (time per entry);
//! - S9 `server/load_entries_10000`: reading an agent's 10,000 entries from the datastore, the
//!   work behind its authorized set (by value: a clone of each out of the entry index);
//! - S9 `server/cache_hydrate_100k`: opening a sled datastore of 100,000 entries (sled's
//!   recovery, then loading every entry into the entry index), held to 100,000 entries at
//!   the guide's 200,000 entries/s;
//! - A1 `agent/attest_unix_child`, A2 `agent/attest_unix_child_sha256_hit`: the agent's unix
//!   attestor against a real child process (hashing off; hashing on with the digest cached);
//! - A3 `agent/wl_fetch_x509_warm`, A5 `agent/wl_fetch_jwt_cached`: the agent's Workload API
//!   over a Unix socket on a warm connection (attestation, cache, encoding);
//! - A4 `agent/wl_fetch_x509_newconn`: the same `FetchX509SVID` on a new connection each time;
//! - E2 `e2e/svid_verify`: what a workload does with the X.509-SVID it was served (split the
//!   chain, validate it against the bundle of the same response, take the SPIFFE ID), with
//!   `tessera_spiffe::x509::verify_x509_svid` (the `spiffe` client crate parses SVIDs but does
//!   not verify chains);
//! - A6, A8, A9 and A7 are `tessera-loadgen` modes (`wl-throughput`, `rotation-storm`,
//!   `stream-hygiene`, `agent-memory`): they need many connections, an agent's CPU time or a
//!   process of their own.
//!
//! Run with `cargo bench -p tessera-tests --bench suite` (append
//! `-- --warm-up-time 0.5 --measurement-time 2` for a quick run). After criterion's report a
//! table sets every figure against its limit from the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group};
use tessera_agent::attestor::{PeerCredentials, UnixAttestor, UnixAttestorConfig};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
use tessera_tests::cpu::{TrackedRuntime, current_thread_cpu};
use tessera_tests::handshake;
use tessera_tests::modes::{self, Deployment};
use tessera_tests::probe::{self, FloorServer};
use tessera_tests::sim::{SimAgent, SimServer, TRUST_DOMAIN, new_csr, workload_entry};
use tessera_tests::stats::{Samples, micros};
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
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
    bench_op(&mut group, "ring_x25519_ecdh", probe::ecdh_op(&ring::agreement::X25519).unwrap());
    bench_op(&mut group, "ring_p256_ecdh", probe::ecdh_op(&ring::agreement::ECDH_P256).unwrap());
    bench_op(&mut group, "x509_parse_leaf", probe::x509_parse_op().unwrap());
    bench_op(&mut group, "proc_attest_child", || probe::proc_attest(pid));
    bench_op(&mut group, "proc_attest_pinned_child", || probe::proc_attest_pinned(pid));
    group.bench_function("tonic_uds_unary_attest", |b| {
        b.iter(|| assert!(rt.block_on(modes::fetch_jwt(client.clone()))));
    });
    // L_newconn: a new connection and one unary call, no attestation.
    let bare = rt.block_on(async { FloorServer::start_without_attestation(&dir.path().join("bare.sock")) }).unwrap();
    group.bench_function("tonic_uds_newconn_unary", |b| {
        b.iter(|| {
            assert!(rt.block_on(async {
                let channel = probe::uds_channel(bare.socket()).await.unwrap();
                modes::fetch_jwt(SpiffeWorkloadApiClient::new(channel)).await
            }))
        });
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
    rt.block_on(bare.stop());
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
    // S3: the same signing on one thread per core, all sharing the CA (time per SVID overall).
    let threads = probe::cores();
    group.bench_function("mint_x509_scaling", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(threads as u64).max(1);
            let ready = std::sync::Barrier::new(threads + 1);
            let elapsed = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        scope.spawn(|| {
                            ready.wait();
                            let cpu_start = current_thread_cpu().unwrap();
                            for _ in 0..per_thread {
                                ca.sign_x509_svid(&spiffe_id, &[], ttl, &spki, SystemTime::now()).unwrap();
                            }
                            current_thread_cpu().unwrap() - cpu_start
                        })
                    })
                    .collect();
                ready.wait();
                let start = Instant::now();
                let cpu: Duration = workers.into_iter().map(|w| w.join().unwrap()).sum();
                let elapsed = start.elapsed();
                let mut total = S3_CPU.lock().unwrap_or_else(PoisonError::into_inner);
                total.0 += cpu;
                total.1 += elapsed;
                elapsed
            });
            elapsed.mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
        })
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

/// S5's side figures, from the same calls criterion timed (warm-up included: the same warm
/// connection throughout): each call's latency, and the server's CPU time over all of them.
struct RpcStats {
    latency: Samples,
    server_cpu: Duration,
    svids: u64,
}

static RPC_STATS: Mutex<Option<RpcStats>> = Mutex::new(None);
/// CPU time (not wall time) of one P-256 sign and one verify, measured right after S5: the
/// limit of S5's server CPU per SVID, a CPU-time figure that a busy machine does not inflate
/// the way it inflates wall-time probes.
static SIGN_VERIFY_CPU: Mutex<Option<(Duration, Duration)>> = Mutex::new(None);
/// S7's negotiated key exchange group, to pick the matching ECDH probe.
static KEY_EXCHANGE: Mutex<Option<String>> = Mutex::new(None);

/// S3's threads: CPU time they got and wall time, summed over all samples. On a shared
/// machine the threads may not get a core each; this shows how many they had.
static S3_CPU: Mutex<(Duration, Duration)> = Mutex::new((Duration::ZERO, Duration::ZERO));

/// CSRs per `BatchNewX509Svid` call in S5.
const S5_BATCH: usize = 50;

/// S5 and S7: the agent API over real mTLS, and its TLS handshake. The server runs on a runtime
/// of its own ([`TrackedRuntime`]) so its CPU time is read apart from the client's.
fn server_rpc(c: &mut Criterion) {
    let server_rt = TrackedRuntime::new("bench-server", probe::cores()).unwrap();
    let server = server_rt.handle().block_on(SimServer::start_for_throughput()).unwrap();
    let rt = runtime();
    let agent = rt.block_on(SimAgent::attest(&server, "bench-rpc")).unwrap();
    let uid = rustix::process::getuid().as_raw();
    let entries = server.create_entries(&agent.id, "rpc", S5_BATCH, uid).unwrap();
    let params = entries
        .into_iter()
        .map(|entry_id| pb::NewX509SvidParams { entry_id, csr: new_csr().unwrap().1 })
        .collect::<Vec<_>>();
    let request = pb::BatchNewX509SvidRequest { params };
    let call = || {
        let response = rt.block_on(agent.client.clone().batch_new_x509_svid(request.clone())).unwrap().into_inner();
        let signed = response
            .results
            .iter()
            .filter(|r| matches!(r.result, Some(pb::new_x509_svid_result::Result::Svid(_))))
            .count();
        assert_eq!(signed, S5_BATCH, "{:?}", response.results.iter().find(|r| r.result.is_none()));
    };
    call(); // the connection is warm from here on
    let mut group = c.benchmark_group("server");
    group.bench_function("rpc_batch_new_x509", |b| {
        b.iter_custom(|iters| {
            let mut latency = Samples::new();
            let cpu_before = server_rt.cpu_time();
            let start = Instant::now();
            for _ in 0..iters {
                let began = Instant::now();
                call();
                latency.push(began.elapsed());
            }
            let elapsed = start.elapsed();
            let server_cpu = server_rt.cpu_time().saturating_sub(cpu_before);
            let mut stats = RPC_STATS.lock().unwrap_or_else(PoisonError::into_inner);
            let stats =
                stats.get_or_insert_with(|| RpcStats { latency: Samples::new(), server_cpu: Duration::ZERO, svids: 0 });
            stats.latency.extend(latency);
            stats.server_cpu += server_cpu;
            stats.svids += iters * S5_BATCH as u64;
            elapsed
        })
    });
    let sign_cpu = probe::cpu_per_op(Duration::from_millis(500), probe::p256_sign_op).unwrap();
    let verify_cpu = probe::cpu_per_op(Duration::from_millis(500), probe::p256_verify_op).unwrap();
    *SIGN_VERIFY_CPU.lock().unwrap_or_else(PoisonError::into_inner) = Some((sign_cpu, verify_cpu));
    // S7: the running server's own TLS configuration; a client like the agent's.
    let tls = server.server().agent_api_tls_config();
    let client = handshake::agent_client_config(server.bundle(), server.server_id(), &agent.chain, &agent.key).unwrap();
    let first = handshake::handshake(&tls, &client).unwrap();
    assert_eq!(
        (first.version, first.kind, first.client_certificates),
        (Some(rustls::ProtocolVersion::TLSv1_3), Some(rustls::HandshakeKind::Full), agent.chain.len()),
        "{first:?}"
    );
    *KEY_EXCHANGE.lock().unwrap_or_else(PoisonError::into_inner) = first.key_exchange;
    group.bench_function("mtls_accept", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake::handshake(&tls, &client).unwrap().server_time).sum())
    });
    group.finish();
    drop(agent);
    server_rt.handle().block_on(server.shutdown()).unwrap();
    server_rt.shutdown();
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
    // A4: a new connection per fetch, as a one-shot client (a CLI) does.
    let socket = deployment.socket.clone();
    group.bench_function("wl_fetch_x509_newconn", |b| {
        b.iter(|| {
            assert!(rt.block_on(async {
                let channel = probe::uds_channel(&socket).await.unwrap();
                modes::fetch_x509_first(SpiffeWorkloadApiClient::new(channel)).await
            }))
        })
    });
    group.finish();

    // E2: the workload validates the SVID it was served against the bundle of the same answer.
    let served = rt.block_on(async {
        let mut stream = client
            .clone()
            .fetch_x509svid(modes::with_header(tessera_wire::workload::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap()
    });
    let svid = served.svids.first().unwrap();
    let bundle = Bundle::from_x509_authorities_der(TrustDomain::new(TRUST_DOMAIN).unwrap(), &svid.bundle).unwrap();
    let validate = || {
        let chain = tessera_spiffe::x509::split_der_certificates(&svid.x509_svid).unwrap();
        let verified = tessera_spiffe::x509::verify_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
        verified.spiffe_id().to_string()
    };
    assert_eq!(validate(), svid.spiffe_id);
    let mut group = c.benchmark_group("e2e");
    group.bench_function("svid_verify", |b| b.iter(|| std::hint::black_box(validate())));
    group.finish();
    rt.block_on(deployment.shutdown()).unwrap();
}

/// Entries of the store S9's `server/cache_hydrate_100k` opens.
const HYDRATE_ENTRIES: usize = 100_000;

/// S9: opening a datastore of [`HYDRATE_ENTRIES`] entries under 1,000 agents (recovery and
/// hydration of the entry index, as at server start-up).
fn server_hydrate(c: &mut Criterion) {
    use tessera_server::datastore::{DataStore, DataStoreOptions, SledDataStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore");
    {
        let store = SledDataStore::open(&path, DataStoreOptions::default()).unwrap();
        let selectors = uid_selectors();
        std::thread::scope(|scope| {
            for w in 0..64 {
                let (store, selectors) = (&store, selectors.clone());
                scope.spawn(move || {
                    for n in (w..HYDRATE_ENTRIES).step_by(64) {
                        let parent = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/agent/{}", n % 1000)).unwrap();
                        store
                            .create_entry(&workload_entry(&format!("h-{n:06}"), &parent, selectors.clone()).unwrap())
                            .unwrap();
                    }
                });
            }
        });
    }
    let open = || SledDataStore::open(&path, DataStoreOptions::default()).unwrap();
    assert_eq!(open().count_entries().unwrap(), HYDRATE_ENTRIES as u64);
    let mut group = c.benchmark_group("server");
    group.sample_size(10).warm_up_time(Duration::from_millis(500));
    // Each iteration opens the store and closes it again (closing is timed too).
    group.bench_function("cache_hydrate_100k", |b| b.iter(open));
    group.finish();
}

criterion_group!(benches, limits, server, server_rpc, server_hydrate, agent);

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

/// One line of the ratio table: the figure's and the limit's time per operation.
struct Row {
    item: &'static str,
    figure: String,
    ns: Option<f64>,
    limit_name: String,
    limit_ns: Option<f64>,
    goal: Goal,
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
    // Limits that only some rows need: a row whose limit is missing is left out.
    let newconn = get("limit/tonic_uds_newconn_unary");
    let parse = get("limit/x509_parse_leaf");
    let pinned = get("limit/proc_attest_pinned_child");
    let key_exchange = KEY_EXCHANGE.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let (ecdh_name, ecdh) = match key_exchange.as_deref() {
        Some("secp256r1") => ("P-256", get("limit/ring_p256_ecdh")),
        Some("X25519") => ("X25519", get("limit/ring_x25519_ecdh")),
        _ => ("?", None),
    };
    let threads = probe::cores() as f64;
    let plus = |a: Option<f64>, b: f64| a.map(|a| a + b);
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |item: &'static str, id: &str, limit_name: &str, limit_ns: Option<f64>, goal: Goal| {
        rows.push(Row { item, figure: id.to_owned(), ns: get(id), limit_name: limit_name.to_owned(), limit_ns, goal });
    };
    row("S1", "server/mint_x509_keygiven", "1/sign", Some(sign), Goal::AtLeast(0.70));
    row("S2", "server/mint_x509_csr", "1/(sign+verify)", Some(sign + verify), Goal::AtLeast(0.70));
    // S3: the aggregate rate of N threads against N x S1's single-thread rate.
    let s1 = get("server/mint_x509_keygiven");
    row("S3", "server/mint_x509_scaling", &format!("{threads} x S1"), s1.map(|s1| s1 / threads), Goal::AtLeast(0.85));
    row("S4", "server/mint_jwt_es256", "1/sign", Some(sign), Goal::AtLeast(0.70));
    row("S5", "server/rpc_batch_new_x509", "50 x (sign+verify)", Some(50.0 * (sign + verify)), Goal::AtMost(2.0));
    row("S6", "server/agent_sync_100", "L_rpc+2us*100", Some(rpc + 2e3 * 100.0), Goal::AtMost(1.0));
    row("S6", "server/agent_sync_1000", "L_rpc+2us*1k", Some(rpc + 2e3 * 1e3), Goal::AtMost(1.0));
    row("S6", "server/agent_sync_10000", "L_rpc+2us*10k", Some(rpc + 2e3 * 1e4), Goal::AtMost(1.0));
    let handshake_limit = ecdh.map(|ecdh| sign + 2.0 * verify + ecdh);
    row("S7", "server/mtls_accept", &format!("1/(s+2v+ecdh {ecdh_name})"), handshake_limit, Goal::AtLeast(0.60));
    row("S8", "server/entry_write_single", "fsync", Some(fsync), Goal::AtLeast(0.50));
    row("S8", "server/entry_write_64way", "fsync", Some(fsync), Goal::AtLeast(10.0));
    row("S9", "server/load_entries_10000", "10k/(200k/s)", Some(1e9 * 1e4 / 2e5), Goal::AtMost(1.0));
    row("S9", "server/cache_hydrate_100k", "100k/(200k/s)", Some(1e9 * 1e5 / 2e5), Goal::AtMost(1.0));
    // A1/A2 against the pinned reads the guide names ("with pidfd + stat"), which the
    // attestor makes; the bare reads stay the limit of the Workload API floors.
    row("A1", "agent/attest_unix_child", "pinned proc reads", pinned, Goal::AtMost(1.3));
    row("A2", "agent/attest_unix_child_sha256_hit", "pinned proc reads", pinned, Goal::AtMost(1.3));
    row("A3", "agent/wl_fetch_x509_warm", "unary+attest", Some(rpc), Goal::AtMost(1.3));
    row("A4", "agent/wl_fetch_x509_newconn", "L_newconn+attest", plus(newconn, attest), Goal::AtMost(1.3));
    row("A5", "agent/wl_fetch_jwt_cached", "unary+attest", Some(rpc), Goal::AtMost(1.3));
    row("E2", "e2e/svid_verify", "parse+verify", plus(parse, verify), Goal::AtMost(1.3));
    // S5's side figures, from the calls criterion timed.
    let sign_verify_cpu = *SIGN_VERIFY_CPU.lock().unwrap_or_else(PoisonError::into_inner);
    let (s3_cpu, s3_wall) = *S3_CPU.lock().unwrap_or_else(PoisonError::into_inner);
    // How many cores S3's threads really had, and their rate per core had against S1's.
    let s3_cores = match (s3_wall > Duration::ZERO, get("server/mint_x509_scaling"), s1) {
        (true, Some(s3), Some(s1)) => {
            let had = s3_cpu.as_secs_f64() / s3_wall.as_secs_f64();
            format!(
                "; S3 threads had {had:.2} of {threads} cores (CPU time / wall time), {:.2} x S1's rate per core had",
                (s1 / s3) / had.max(1e-9)
            )
        }
        _ => String::new(),
    };
    let mut s5_calls = String::new();
    if let Some(stats) = RPC_STATS.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
        let cpu_per_svid = stats.server_cpu.as_secs_f64() * 1e9 / stats.svids.max(1) as f64;
        let p99 = stats.latency.percentile(99.0).as_secs_f64() * 1e9;
        s5_calls = format!(
            "; S5 calls p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            stats.latency.percentile(50.0).as_secs_f64() * 1e3,
            stats.latency.percentile(90.0).as_secs_f64() * 1e3,
            p99 / 1e6,
            stats.latency.max().as_secs_f64() * 1e3
        );
        rows.push(Row {
            item: "S5",
            figure: "  server CPU per SVID".to_owned(),
            ns: Some(cpu_per_svid),
            limit_name: "1/(sign+verify) CPU".to_owned(),
            limit_ns: sign_verify_cpu.map(|(s, v)| (s + v).as_secs_f64() * 1e9),
            goal: Goal::AtLeast(0.50),
        });
        rows.push(Row {
            item: "S5",
            figure: format!("  p99 of {} calls", stats.latency.len()),
            ns: Some(p99),
            limit_name: "50 x (sign+verify)".to_owned(),
            limit_ns: Some(50.0 * (sign + verify)),
            goal: Goal::AtMost(2.0),
        });
    }
    println!();
    println!(
        "{:<3} {:<36} {:>12} {:>12} {:>20} {:>12} {:>8} {:>10} {:>4}",
        "#", "figure", "us/op", "ops/s", "limit", "limit us/op", "ratio", "goal", "met"
    );
    for Row { item, figure: id, ns, limit_name, limit_ns, goal } in rows {
        let (Some(ns), Some(limit_ns)) = (ns, limit_ns) else { continue };
        // Throughput goals compare rates (limit time / figure time); latency goals compare times.
        let (ratio, goal_text, met) = match goal {
            Goal::AtLeast(g) => (limit_ns / ns, format!(">={g:.2}"), limit_ns / ns >= g),
            Goal::AtMost(g) => (ns / limit_ns, format!("<={g:.2}"), ns / limit_ns <= g),
        };
        println!(
            "{item:<3} {id:<36} {:>12.2} {:>12.0} {limit_name:>20} {:>12.2} {ratio:>8.2} {goal_text:>10} {:>4}",
            ns / 1e3,
            1e9 / ns,
            limit_ns / 1e3,
            if met { "yes" } else { "NO" }
        );
    }
    let optional =
        |name: &str, ns: Option<f64>| ns.map(|ns| format!(", {name} {:.1} us", ns / 1e3)).unwrap_or_default();
    println!(
        "(limits, same run: P-256 sign {:.1} us, verify {:.1} us, /proc reads {:.1} us, unary+attest over UDS {:.1} us, \
         4 KiB fdatasync {:.1} us{}{}{}{}{}{}; S7 negotiated {}{s3_cores}{s5_calls}; {} cores; load average {})",
        sign / 1e3,
        verify / 1e3,
        attest / 1e3,
        rpc / 1e3,
        fsync / 1e3,
        optional("pinned /proc reads (pidfd + stat + status + exe)", pinned),
        optional("new connection + unary", newconn),
        optional("x509 parse", parse),
        optional("X25519 ECDH", get("limit/ring_x25519_ecdh")),
        optional("P-256 ECDH", get("limit/ring_p256_ecdh")),
        sign_verify_cpu
            .map(|(s, v)| format!(", CPU time of sign {:.1} us and verify {:.1} us", micros(s), micros(v)))
            .unwrap_or_default(),
        key_exchange.as_deref().unwrap_or("-"),
        threads,
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
