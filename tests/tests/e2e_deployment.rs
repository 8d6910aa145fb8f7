#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A whole deployment as real processes: `tessera-server run` and `tessera-agent run` (the
//! binaries, each with its own config file, data directory and sockets), operated through the
//! server CLI, and a workload using the real Rust SPIFFE client library (crate `spiffe`) over
//! the agent's Workload API socket. Nothing is in-process or faked.
//!
//! The binaries are the ones `cargo test --workspace` builds next to this test
//! (`target/debug/`); run the workspace tests, or `cargo build -p tessera-server -p
//! tessera-agent` first, when running this crate alone.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use spiffe::{JwtSvid, SpiffeId, WorkloadApiClient};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::TrustDomain;

const TRUST_DOMAIN: &str = "example.org";
const DEADLINE: Duration = Duration::from_secs(30);

fn binary(name: &str) -> PathBuf {
    tessera_tests::harness::binary(name).unwrap()
}

fn free_port() -> u16 {
    tessera_tests::harness::free_port().unwrap()
}

fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// A child process killed (SIGKILL) on drop, with its output in a log file for diagnosis.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(command: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = command.stdout(Stdio::null()).stderr(file).spawn().unwrap();
        Self { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Deployment {
    dir: tempfile::TempDir,
    port: u16,
    server: Option<Process>,
    agent: Option<Process>,
}

impl Deployment {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("e2e").tempdir_in("/tmp").unwrap();
        let port = free_port();
        let server_toml = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{d}/server\"\nbind_address = \"127.0.0.1:{port}\"\n\
             admin_socket = \"{d}/sp/admin.sock\"\ndefault_x509_svid_ttl = \"1h\"\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("server.toml"), server_toml).unwrap();
        Self { dir, port, server: None, agent: None }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn admin_socket(&self) -> PathBuf {
        self.path("sp/admin.sock")
    }

    fn workload_socket(&self) -> PathBuf {
        self.path("ap/api.sock")
    }

    fn start_server(&mut self) {
        let mut command = Command::new(binary("tessera-server"));
        command.arg("run").arg("--config").arg(self.path("server.toml"));
        self.server = Some(Process::spawn(&mut command, self.path("server.log")));
        let started = Instant::now();
        while !self.server_cli(&["healthcheck"]).status.success() {
            assert!(started.elapsed() < DEADLINE, "server did not become healthy:\n{}", self.server_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn server_log(&self) -> String {
        self.server.as_ref().map(Process::log).unwrap_or_default()
    }

    fn server_cli(&self, args: &[&str]) -> Output {
        Command::new(binary("tessera-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .output()
            .unwrap()
    }

    /// Runs a server CLI command that must succeed; returns its stdout.
    fn server_ok(&self, args: &[&str]) -> String {
        let output = self.server_cli(args);
        assert!(output.status.success(), "tessera-server {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    fn start_agent(&mut self, join_token: Option<&str>) {
        let d = self.dir.path().display();
        let agent_toml = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/agent\"\n\
             socket_path = \"{d}/ap/api.sock\"\nadmin_socket = \"{d}/apriv/admin.sock\"\n\
             trust_bundle_path = \"{d}/bundle.pem\"\n",
            port = self.port
        );
        std::fs::write(self.path("agent.toml"), agent_toml).unwrap();
        let mut command = Command::new(binary("tessera-agent"));
        command.arg("run").arg("--config").arg(self.path("agent.toml"));
        if let Some(token) = join_token {
            command.arg("--join-token").arg(token);
        }
        self.agent = Some(Process::spawn(&mut command, self.path("agent.log")));
        let started = Instant::now();
        loop {
            let status = Command::new(binary("tessera-agent"))
                .arg("healthcheck")
                .arg("--socket-path")
                .arg(self.workload_socket())
                .output()
                .unwrap()
                .status;
            if status.success() {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "agent did not become healthy:\n{}", self.agent_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(Process::log).unwrap_or_default()
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(format!("unix://{}", self.workload_socket().display())).await.unwrap()
    }
}

fn token(output: &str) -> String {
    output.lines().find_map(|line| line.strip_prefix("Token: ")).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_gets_svids_through_a_real_deployment() {
    let mut deployment = Deployment::new();
    deployment.start_server();
    let bundle_pem = deployment.server_ok(&["bundle", "show", "--format", "pem"]);
    std::fs::write(deployment.path("bundle.pem"), &bundle_pem).unwrap();

    let token = token(&deployment.server_ok(&["token", "generate"]));
    let agent_id = format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{token}");
    let uid_selector = format!("unix:uid:{}", uid());
    deployment.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        &agent_id,
        "--spiffe-id",
        "spiffe://example.org/e2e/web",
        "--selector",
        &uid_selector,
    ]);
    deployment.start_agent(Some(&token));

    // X.509: the SPIFFE client library gets the SVID, and it validates against the bundle the
    // operator exported from the server (not only the one the agent handed out).
    let client = deployment.client().await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/e2e/web");
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let operator_bundle = Bundle::from_x509_authorities_pem(td, bundle_pem.as_bytes()).unwrap();
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|cert| cert.as_bytes()).collect();
    let verified =
        tessera_spiffe::x509::verify_x509_svid(&chain, &operator_bundle, std::time::SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id().as_str(), "spiffe://example.org/e2e/web");

    // JWT: minted by the server through the agent, validated locally and by the agent.
    let jwt = client.fetch_jwt_svid(["e2e-audience"], None).await.unwrap();
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let checked = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["e2e-audience"]).unwrap();
    assert_eq!(checked.spiffe_id().to_string(), "spiffe://example.org/e2e/web");
    assert!(client.validate_jwt_token("e2e-audience", jwt.token()).await.is_ok());

    // A new entry registered while a stream is open reaches the workload without asking.
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.svids().len(), 1);
    let created_at = Instant::now();
    deployment.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        &agent_id,
        "--spiffe-id",
        "spiffe://example.org/e2e/api",
        "--selector",
        &uid_selector,
    ]);
    let next = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap().unwrap();
    let ids: Vec<String> = next.svids().iter().map(|svid| svid.spiffe_id().to_string()).collect();
    assert!(ids.contains(&"spiffe://example.org/e2e/api".to_owned()), "{ids:?}");
    eprintln!("entry propagation (CLI return -> stream message): {:?}", created_at.elapsed());

    // The agent restarts from its persisted identity: no new join token (it is single-use).
    deployment.agent.as_mut().unwrap().kill();
    deployment.start_agent(None);
    let client = deployment.client().await;
    let svid = client.fetch_x509_svid().await.unwrap();
    assert!(svid.spiffe_id().to_string().starts_with("spiffe://example.org/e2e/"));

    // The server restarts (kill -9) with the same CA: the agent's SVIDs still validate
    // against the bundle the server serves afterwards.
    deployment.server.as_mut().unwrap().kill();
    deployment.start_server();
    let after = deployment.server_ok(&["bundle", "show", "--format", "pem"]);
    assert_eq!(after, bundle_pem, "the CA changed across a server restart");
    let id = SpiffeId::new("spiffe://example.org/e2e/web").unwrap();
    let jwt = client.fetch_jwt_svid(["after-restart"], Some(&id)).await.unwrap();
    assert_eq!(jwt.spiffe_id(), &id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_token_stops_the_agent_with_the_reason() {
    let mut deployment = Deployment::new();
    deployment.start_server();
    std::fs::write(deployment.path("bundle.pem"), deployment.server_ok(&["bundle", "show", "--format", "pem"]))
        .unwrap();
    let d = deployment.dir.path().display().to_string();
    let agent_toml = format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/agent\"\n\
         socket_path = \"{d}/ap/api.sock\"\nadmin_socket = \"{d}/apriv/admin.sock\"\n\
         trust_bundle_path = \"{d}/bundle.pem\"\n",
        port = deployment.port
    );
    std::fs::write(deployment.path("agent.toml"), agent_toml).unwrap();
    let output = Command::new(binary("tessera-agent"))
        .arg("run")
        .arg("--config")
        .arg(deployment.path("agent.toml"))
        .arg("--join-token")
        .arg("not-a-token-the-server-issued")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.to_lowercase().contains("join token"), "{stderr}");
}
