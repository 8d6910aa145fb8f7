//! The raw limits the figures are held to, measured in the same run as the figure. Shared by
//! `tessera-loadgen` and the in-process criterion benches (`tests/benches/suite.rs`).
//!
//! - [`rate_on_all_cores`]: how many times per second `threads` OS threads can run an
//!   operation, each with its own state (one per core = the machine's ceiling for that work);
//! - [`csr_sign_op`]: parse a DER CSR, verify its proof of possession, build and sign a leaf,
//!   with rcgen and ring directly (what the server's X.509-SVID path cannot beat);
//! - [`es256_mint_op`]: a compact JWS over a typical JWT-SVID header and claims: JSON
//!   formatting, base64url and a ring P-256 (fixed-size) signature;
//! - [`p256_sign_op`], [`p256_verify_op`]: ring ECDSA P-256, the crypto floor;
//! - [`ecdh_op`]: one side of an ephemeral key agreement (ring X25519 or P-256: key
//!   generation, public key, agreement), the key exchange of a TLS 1.3 handshake;
//! - [`keygen_csr_op`]: a fresh P-256 key and a DER CSR for it (rcgen on ring), the agent's
//!   work per X.509-SVID before it asks the server;
//! - [`x509_parse_op`]: x509-parser over an X.509-SVID-shaped leaf (the parse half of
//!   workload-side SVID validation);
//! - [`proc_attest`]: the `/proc` reads of unix attestation; [`proc_attest_pinned`]: the same
//!   with the pidfd and `stat` that pin the process (A1's limit);
//! - [`fsync_rate`]: durable single-writer commits per second;
//! - [`FloorServer`]: the floor of a Workload API call: a tonic unary call over a Unix socket
//!   whose handler reads `/proc/<peer pid>/exe` and `/proc/<peer pid>/status` (the unix
//!   attestation's syscalls) and answers a cached, SVID-sized response;
//!   [`FloorServer::start_without_attestation`] answers without the `/proc` reads (the floor
//!   of the call alone: on a new connection each time it is `L_newconn`).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use tessera_wire::workload as wl;
use tessera_wire::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

/// The number of CPUs this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// Runs `make()`'s operation on `threads` threads for `duration` and returns the total rate
/// (operations per second over all threads). Every thread builds its own operation first,
/// outside the timed loop.
pub fn rate_on_all_cores<F>(
    threads: usize,
    duration: Duration,
    make: impl Fn() -> anyhow::Result<F> + Sync,
) -> anyhow::Result<f64>
where
    F: FnMut() -> anyhow::Result<()>,
{
    let threads = threads.max(1);
    let results: Vec<anyhow::Result<(u64, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut op = make()?;
                    op()?; // warm-up
                    let start = Instant::now();
                    let mut count = 0u64;
                    while start.elapsed() < duration {
                        op()?;
                        count += 1;
                    }
                    Ok((count, start.elapsed()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("probe thread panicked")))).collect()
    });
    let mut rate = 0.0;
    for result in results {
        let (count, elapsed) = result?;
        rate += count as f64 / elapsed.as_secs_f64().max(1e-9);
    }
    Ok(rate)
}

/// A fresh P-256 CA for the probes that sign a leaf.
fn fresh_ca() -> anyhow::Result<Issuer<'static, KeyPair>> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ok(Issuer::new(ca_params, ca_key))
}

/// One "parse CSR + verify + sign leaf" operation with rcgen/ring, over a fresh CA and CSR.
pub fn csr_sign_op() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let issuer = fresh_ca()?;
    let workload_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&workload_key)?;
    let der = csr.der().clone();
    let uri = SanType::URI(rcgen::string::Ia5String::try_from("spiffe://loadgen.example/workload/probe")?);
    Ok(move || {
        let mut request = CertificateSigningRequestParams::from_der(&der)?;
        request.params.subject_alt_names = vec![uri.clone()];
        let leaf = request.signed_by(&issuer)?;
        std::hint::black_box(leaf.der());
        Ok(())
    })
}

/// One ES256 JWT-SVID mint: header and claims JSON, base64url, P-256 signature.
pub fn es256_mint_op() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|e| anyhow!("{e}"))?;
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).map_err(|e| anyhow!("{e}"))?;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"probe-key-0123456789abcdef","typ":"JWT"}"#);
    Ok(move || {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = format!(
            r#"{{"sub":"spiffe://loadgen.example/workload/probe","aud":["spiffe://loadgen.example/db"],"exp":{},"iat":{now}}}"#,
            now + 300
        );
        let mut token = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.as_bytes()));
        let signature = key.sign(&rng, token.as_bytes()).map_err(|e| anyhow!("sign: {e}"))?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        std::hint::black_box(token);
        Ok(())
    })
}

/// A Workload-API-shaped floor server (see the [module docs](self)): `FetchJWTSVID` attests the
/// caller through `/proc` and answers a cached response; every other call is unimplemented.
#[derive(Debug)]
pub struct FloorServer {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl FloorServer {
    /// Serves the floor on a new socket at `socket`.
    pub fn start(socket: &Path) -> anyhow::Result<Self> {
        Self::serve(socket, true)
    }

    /// Serves the floor without the `/proc` reads: a tonic unary call answering a cached
    /// response, nothing else.
    pub fn start_without_attestation(socket: &Path) -> anyhow::Result<Self> {
        Self::serve(socket, false)
    }

    fn serve(socket: &Path, attest: bool) -> anyhow::Result<Self> {
        let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        let service = Floor {
            attest,
            response: wl::JwtsvidResponse {
                svids: vec![wl::Jwtsvid {
                    spiffe_id: "spiffe://loadgen.example/workload/floor".into(),
                    svid: "x".repeat(1024),
                    hint: String::new(),
                }],
            },
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        Ok(Self { socket: socket.to_owned(), stop: Some(stop), task: Some(task) })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

struct Floor {
    attest: bool,
    response: wl::JwtsvidResponse,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Floor {
    type FetchX509SVIDStream = BoxStream<wl::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<wl::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<wl::JwtBundlesResponse>;
    type FetchWITSVIDStream = BoxStream<wl::WitsvidResponse>;
    type FetchWITBundlesStream = BoxStream<wl::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(Status::unimplemented("floor probe"))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("floor probe"))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        if !self.attest {
            return Ok(Response::new(self.response.clone()));
        }
        let pid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .and_then(|cred| cred.pid())
            .ok_or_else(|| Status::permission_denied("no peer credentials"))?;
        proc_attest(u32::try_from(pid).unwrap_or(0)).map_err(|e| Status::permission_denied(e.to_string()))?;
        Ok(Response::new(self.response.clone()))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("floor probe"))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("floor probe"))
    }

    async fn fetch_witsvid(
        &self,
        _: Request<wl::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("floor probe"))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<wl::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("floor probe"))
    }
}

/// The floor of unix workload attestation: read `/proc/<pid>/exe` and `/proc/<pid>/status`
/// (the attestor's syscalls, without deriving selectors).
pub fn proc_attest(pid: u32) -> anyhow::Result<()> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).with_context(|| format!("exe of {pid}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("status of {pid}"))?;
    if !status.lines().any(|line| line.starts_with("Uid:")) || exe.as_os_str().is_empty() {
        anyhow::bail!("unreadable process {pid}");
    }
    std::hint::black_box((exe, status));
    Ok(())
}

/// The floor of unix attestation with the pinning the suite's guide names for A1 ("with
/// pidfd + stat"): a pidfd opened first, then `/proc/<pid>/stat` (the start time), the reads of
/// [`proc_attest`], and a poll of the pidfd that proves the process still runs (so every read
/// was of that process and not of a reused PID).
pub fn proc_attest_pinned(pid: u32) -> anyhow::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let raw = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw).ok_or_else(|| anyhow!("pid {pid}"))?;
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .with_context(|| format!("pidfd of {pid}"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("stat of {pid}"))?;
    if !stat.starts_with(&format!("{pid} (")) {
        anyhow::bail!("unreadable stat of process {pid}");
    }
    proc_attest(pid)?;
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let ready = rustix::event::poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 }))
        .with_context(|| format!("polling the pidfd of {pid}"))?;
    if ready != 0 {
        anyhow::bail!("process {pid} exited");
    }
    std::hint::black_box(stat);
    Ok(())
}

/// One ring ECDSA P-256 signature over a 70-byte message (the crypto floor of every SVID).
pub fn p256_sign_op() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let rng = SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| anyhow!("{e}"))?;
    let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| anyhow!("{e}"))?;
    Ok(move || {
        let signature = key.sign(&rng, PROBE_MESSAGE).map_err(|e| anyhow!("sign: {e}"))?;
        std::hint::black_box(signature);
        Ok(())
    })
}

/// One ring ECDSA P-256 verification (the floor of a CSR's proof of possession and of chain
/// validation).
pub fn p256_verify_op() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    use ring::signature::KeyPair as _;
    let rng = SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| anyhow!("{e}"))?;
    let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| anyhow!("{e}"))?;
    let signature = key.sign(&rng, PROBE_MESSAGE).map_err(|e| anyhow!("sign: {e}"))?;
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );
    Ok(move || public.verify(PROBE_MESSAGE, signature.as_ref()).map_err(|_| anyhow!("verify failed")))
}

/// One side of an ephemeral key agreement with `algorithm` (`ring::agreement::X25519` or
/// `ECDH_P256`): a new private key, its public key, and the agreement with a peer's public key
/// (what a TLS 1.3 server does per full handshake).
pub fn ecdh_op(algorithm: &'static ring::agreement::Algorithm) -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    let rng = SystemRandom::new();
    let peer = EphemeralPrivateKey::generate(algorithm, &rng).map_err(|e| anyhow!("{e}"))?;
    let peer_public = peer.compute_public_key().map_err(|e| anyhow!("{e}"))?.as_ref().to_vec();
    Ok(move || {
        let private = EphemeralPrivateKey::generate(algorithm, &rng).map_err(|e| anyhow!("{e}"))?;
        let public = private.compute_public_key().map_err(|e| anyhow!("{e}"))?;
        std::hint::black_box(public.as_ref());
        let secret = agree_ephemeral(private, &UnparsedPublicKey::new(algorithm, &peer_public), |secret| {
            secret.first().copied()
        })
        .map_err(|_| anyhow!("key agreement failed"))?;
        std::hint::black_box(secret);
        Ok(())
    })
}

/// A fresh EC P-256 key and a DER PKCS#10 request for it with rcgen (on ring), as the agent
/// makes one per X.509-SVID it mints or renews.
pub fn keygen_csr_op() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    Ok(|| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::default().serialize_request(&key)?;
        std::hint::black_box((key.serialize_der(), csr.der().len()));
        Ok(())
    })
}

/// x509-parser over a leaf shaped like an X.509-SVID (P-256, a SPIFFE URI SAN), signed by a
/// fresh CA: the parse the workload's validator cannot avoid.
pub fn x509_parse_op() -> anyhow::Result<impl FnMut() -> anyhow::Result<()>> {
    let issuer = fresh_ca()?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names =
        vec![SanType::URI(rcgen::string::Ia5String::try_from("spiffe://loadgen.example/workload/probe")?)];
    let der = params.signed_by(&key, &issuer)?.der().to_vec();
    Ok(move || {
        let (_, certificate) = x509_parser::parse_x509_certificate(&der).map_err(|e| anyhow!("parse: {e}"))?;
        std::hint::black_box(certificate.subject_alternative_name().ok().flatten().is_some());
        Ok(())
    })
}

/// CPU time per operation of `make()`'s operation, run on the calling thread for `duration`
/// (at least 10 operations). Unlike wall time this does not grow when other processes take
/// the CPU, so it is the limit for figures that are themselves CPU time (CPU per SVID, per
/// fetch).
pub fn cpu_per_op<F>(duration: Duration, make: impl Fn() -> anyhow::Result<F>) -> anyhow::Result<Duration>
where
    F: FnMut() -> anyhow::Result<()>,
{
    let mut op = make()?;
    op()?; // warm-up
    let cpu = || crate::cpu::current_thread_cpu().ok_or_else(|| anyhow!("no per-thread CPU accounting"));
    let (start, cpu_start) = (Instant::now(), cpu()?);
    let mut count = 0u32;
    while start.elapsed() < duration || count < 10 {
        op()?;
        count += 1;
    }
    Ok(cpu()?.saturating_sub(cpu_start) / count)
}

/// Time per operation of `make()`'s operation on one thread, run for `duration`.
pub fn time_per_op<F>(duration: Duration, make: impl Fn() -> anyhow::Result<F> + Sync) -> anyhow::Result<Duration>
where
    F: FnMut() -> anyhow::Result<()>,
{
    let rate = rate_on_all_cores(1, duration, make)?;
    Ok(Duration::from_secs_f64(1.0 / rate.max(1e-9)))
}

const PROBE_MESSAGE: &[u8] = b"tessera limit probe message of typical to-be-signed size .............";

/// One HTTP/2 connection over the Unix socket at `socket`.
pub async fn uds_channel(socket: &Path) -> anyhow::Result<Channel> {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

/// Raises the soft limit on open files to the hard limit (1000 clients are 2000+ descriptors
/// when client and server share the process).
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// Durable single-writer commits per second in `dir`: a 4 KiB write plus `fdatasync`, for
/// `duration` (the limit of a store that flushes every write).
pub fn fsync_rate(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let block = [0x5au8; 4096];
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < duration {
        file.write_all(&block)?;
        file.sync_data()?;
        count += 1;
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

/// This process's resident set size in bytes (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> anyhow::Result<u64> {
    rss_in("/proc/self/status")
}

/// The `VmRSS` of a `/proc/<pid>/status` file, in bytes.
pub fn rss_in(status_path: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(status_path).with_context(|| format!("reading {status_path}"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {status_path}"))?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_probe_reads_a_running_process_and_refuses_a_pid_that_names_none() {
        proc_attest_pinned(std::process::id()).unwrap();
        assert!(proc_attest_pinned(u32::MAX).is_err(), "a PID out of range");
    }
}
