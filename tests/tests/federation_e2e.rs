#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Two trust domains federated both ways, as real processes: for each of `a.test` and
//! `b.test`, `tessera-server run` (with an `https_spiffe` bundle endpoint) and `tessera-agent
//! run`, operated through the CLIs. Each server federates with the other
//! (`tessera-server federation create`), entries name the other trust domain with
//! `--federates-with`, and a workload in each domain, configured only from what its Workload
//! API returns (the `spiffe` crate as client), opens mutual TLS (rustls) to the other: each
//! side sees the other's SPIFFE ID. Federation then survives a restart of a server, and
//! deleting the relationship removes the foreign bundle from a workload's open stream.
//!
//! Like e2e_deployment.rs, this uses the binaries built next to the test (`cargo build -p
//! tessera-server -p tessera-agent` first when running this crate alone).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt as _;
use spiffe::{WorkloadApiClient, X509Context};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_spiffe::tls::{
    BundleSource, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, certified_key, client_config,
    server_config, verify_peer_svid,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

fn binary(name: &str) -> PathBuf {
    tessera_tests::harness::binary(name).unwrap()
}

fn free_port() -> u16 {
    tessera_tests::harness::free_port().unwrap()
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One trust domain: its server and agent processes in one temporary directory.
struct Domain {
    name: &'static str,
    dir: tempfile::TempDir,
    port: u16,
    endpoint_port: u16,
    server: Option<Process>,
    agent: Option<Process>,
}

impl Domain {
    fn new(name: &'static str) -> Self {
        let dir = tempfile::Builder::new().prefix("fed").tempdir_in("/tmp").unwrap();
        let (port, endpoint_port) = (free_port(), free_port());
        let toml = format!(
            "trust_domain = \"{name}\"\ndata_dir = \"{d}/server\"\nbind_address = \"127.0.0.1:{port}\"\n\
             admin_socket = \"{d}/sp/admin.sock\"\n\n[federation.bundle_endpoint]\n\
             bind_address = \"127.0.0.1:{endpoint_port}\"\nprofile = \"https_spiffe\"\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("server.toml"), toml).unwrap();
        Self { name, dir, port, endpoint_port, server: None, agent: None }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn spawn(&self, command: &mut Command, log: &str) -> Process {
        let file = std::fs::File::create(self.path(log)).unwrap();
        Process(command.stdout(Stdio::null()).stderr(file).spawn().unwrap())
    }

    fn start_server(&mut self) {
        self.server = None;
        let mut command = Command::new(binary("tessera-server"));
        command.arg("run").arg("--config").arg(self.path("server.toml"));
        self.server = Some(self.spawn(&mut command, "server.log"));
        let started = Instant::now();
        while !self.cli(&["healthcheck"]).status.success() {
            assert!(started.elapsed() < DEADLINE, "{} server not healthy:\n{}", self.name, self.log("server.log"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("tessera-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(self.path("sp/admin.sock"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "{}: tessera-server {args:?} failed: {}\n{}",
            self.name,
            String::from_utf8_lossy(&output.stderr),
            self.log("server.log")
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Federates with `other` through the CLI, bootstrapped with its exported bundle.
    fn federate_with(&self, other: &Domain) {
        let bundle = other.path("exported.json");
        std::fs::write(&bundle, other.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
        self.ok(&[
            "federation",
            "create",
            "--trust-domain",
            other.name,
            "--bundle-endpoint-url",
            &format!("https://127.0.0.1:{}/", other.endpoint_port),
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            &format!("spiffe://{}/tessera/server", other.name),
            "--trust-bundle-path",
            bundle.to_str().unwrap(),
        ]);
        self.ok(&["federation", "refresh", "--trust-domain", other.name]);
    }

    /// An agent with one workload entry (this uid) that federates with `other`.
    fn start_agent(&mut self, other: &str) {
        std::fs::write(self.path("bundle.pem"), self.ok(&["bundle", "show"])).unwrap();
        let token = self
            .ok(&["token", "generate"])
            .lines()
            .find_map(|line| line.strip_prefix("Token: "))
            .unwrap()
            .trim()
            .to_owned();
        let agent_id = format!("spiffe://{}/tessera/agent/join_token/{token}", self.name);
        self.ok(&[
            "entry",
            "create",
            "--parent-id",
            &agent_id,
            "--spiffe-id",
            &format!("spiffe://{}/workload", self.name),
            "--selector",
            &format!("unix:uid:{}", rustix::process::getuid().as_raw()),
            "--federates-with",
            other,
        ]);
        let d = self.dir.path().display();
        let toml = format!(
            "trust_domain = \"{}\"\nserver_address = \"127.0.0.1:{}\"\ndata_dir = \"{d}/agent\"\n\
             socket_path = \"{d}/ap/api.sock\"\nadmin_socket = \"{d}/apriv/admin.sock\"\n\
             trust_bundle_path = \"{d}/bundle.pem\"\n",
            self.name, self.port
        );
        std::fs::write(self.path("agent.toml"), toml).unwrap();
        let mut command = Command::new(binary("tessera-agent"));
        command.arg("run").arg("--config").arg(self.path("agent.toml")).arg("--join-token").arg(&token);
        self.agent = Some(self.spawn(&mut command, "agent.log"));
    }

    /// The workload's X.509 context once it carries the bundle of `other`.
    async fn context_with(&self, other: &str) -> X509Context {
        let started = Instant::now();
        let other = spiffe::TrustDomain::new(other).unwrap();
        loop {
            let attempt = async {
                let client = WorkloadApiClient::connect_to(format!("unix://{}", self.path("ap/api.sock").display()))
                    .await
                    .ok()?;
                client.fetch_x509_context().await.ok()
            };
            if let Some(context) = attempt.await
                && context.bundle_set().get(&other).is_some()
                && context.default_svid().is_some()
            {
                return context;
            }
            assert!(
                started.elapsed() < DEADLINE * 2,
                "{}: no context with {other}:\n{}",
                self.name,
                self.log("agent.log")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The TLS identity and the peer trust domain's bundle, from Workload API material only.
fn material(context: &X509Context, peer_td: &str) -> (Arc<SvidResolver>, Bundle) {
    let svid = context.default_svid().unwrap();
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let key = certified_key(&chain, svid.private_key().as_bytes()).unwrap();
    let peer = context.bundle_set().get(&spiffe::TrustDomain::new(peer_td).unwrap()).unwrap();
    let mut bundle = Bundle::new(TrustDomain::new(peer_td).unwrap());
    for authority in peer.authorities() {
        bundle.add_x509_authority(authority.as_bytes()).unwrap();
    }
    (Arc::new(SvidResolver::new(key)), bundle)
}

/// Workload of `a.test` serves mTLS; workload of `b.test` connects. Returns (what the server
/// saw, what the client saw) as SPIFFE IDs.
async fn mtls(a: &X509Context, b: &X509Context) -> (String, String) {
    let (a_identity, b_bundle) = material(a, "b.test");
    let (b_identity, a_bundle) = material(b, "a.test");
    let server =
        server_config(Arc::new(SpiffeClientVerifier::new(BundleSource::fixed(b_bundle.clone()))), a_identity).unwrap();
    let a_id = SpiffeId::parse("spiffe://a.test/workload").unwrap();
    let client =
        client_config(Arc::new(SpiffeServerVerifier::new(BundleSource::fixed(a_bundle.clone()), a_id)), b_identity)
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(tcp).await.unwrap();
        let chain: Vec<Vec<u8>> =
            tls.get_ref().1.peer_certificates().unwrap().iter().map(|c| c.as_ref().to_vec()).collect();
        let peer = verify_peer_svid(&chain, &b_bundle, SystemTime::now()).unwrap();
        let mut hello = [0u8; 5];
        tls.read_exact(&mut hello).await.unwrap();
        tls.write_all(b"world").await.unwrap();
        tls.shutdown().await.ok();
        peer.spiffe_id.to_string()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await.unwrap();
    let chain: Vec<Vec<u8>> =
        tls.get_ref().1.peer_certificates().unwrap().iter().map(|c| c.as_ref().to_vec()).collect();
    let seen_by_client = verify_peer_svid(&chain, &a_bundle, SystemTime::now()).unwrap().spiffe_id.to_string();
    tls.write_all(b"hello").await.unwrap();
    let mut reply = [0u8; 5];
    tls.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"world");
    (tokio::time::timeout(DEADLINE, accept).await.unwrap().unwrap(), seen_by_client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_of_two_federated_trust_domains_authenticate_each_other() {
    let (mut a, mut b) = (Domain::new("a.test"), Domain::new("b.test"));
    a.start_server();
    b.start_server();
    a.federate_with(&b);
    b.federate_with(&a);
    a.start_agent("b.test");
    b.start_agent("a.test");

    let (context_a, context_b) = (a.context_with("b.test").await, b.context_with("a.test").await);
    let (seen_by_a, seen_by_b) = mtls(&context_a, &context_b).await;
    assert_eq!(seen_by_a, "spiffe://b.test/workload");
    assert_eq!(seen_by_b, "spiffe://a.test/workload");

    // Server a restarts (SIGKILL): b keeps fetching from it, and both workloads still
    // authenticate each other with freshly fetched material.
    a.start_server();
    b.ok(&["federation", "refresh", "--trust-domain", "a.test"]);
    a.ok(&["federation", "refresh", "--trust-domain", "b.test"]);
    let (context_a, context_b) = (a.context_with("b.test").await, b.context_with("a.test").await);
    let (seen_by_a, seen_by_b) = mtls(&context_a, &context_b).await;
    assert_eq!((seen_by_a.as_str(), seen_by_b.as_str()), ("spiffe://b.test/workload", "spiffe://a.test/workload"));

    // Ending the relationship removes b.test's bundle from the next message on a workload's
    // open stream, without the workload asking.
    let client = WorkloadApiClient::connect_to(format!("unix://{}", a.path("ap/api.sock").display())).await.unwrap();
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let b_td = spiffe::TrustDomain::new("b.test").unwrap();
    let first = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap().unwrap();
    assert!(first.bundle_set().get(&b_td).is_some(), "the stream starts without b.test's bundle");
    a.ok(&["federation", "delete", "--trust-domain", "b.test"]);
    let next = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap().unwrap();
    assert!(next.bundle_set().get(&b_td).is_none(), "b.test's bundle is still delivered after the delete");
    assert_eq!(next.default_svid().unwrap().spiffe_id().to_string(), "spiffe://a.test/workload");
}
