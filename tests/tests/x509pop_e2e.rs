#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! x509pop node attestation with the real binaries: a server trusting an operator's node CA,
//! agents holding node certificates from it (or from another CA), node-alias entries on the
//! certificate's selectors, and re-attestation after an eviction with no operator action.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tessera_tests::harness::{Process, binary, free_port};

const TD: &str = "example.org";
const DEADLINE: Duration = Duration::from_secs(30);

struct NodeCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn node_ca(name: &str) -> NodeCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    NodeCa { cert: params.self_signed(&key).unwrap(), key }
}

/// Writes `<dir>/<cn>.pem` and `<dir>/<cn>.key`; returns the leaf DER.
fn node_certificate(ca: &NodeCa, cn: &str, dir: &Path) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![format!("{cn}.nodes.example.org")]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let issuer = Issuer::from_ca_cert_der(ca.cert.der(), &ca.key).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{cn}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{cn}.key")), key.serialize_pem()).unwrap();
    cert.der().to_vec()
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    _server: Process,
}

impl Setup {
    fn start(ca: &NodeCa) -> Self {
        let dir = tempfile::Builder::new().prefix("x509pop").tempdir_in("/tmp").unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("node-ca.pem"), ca.cert.pem()).unwrap();
        let port = free_port().unwrap();
        std::fs::write(
            dir.path().join("server.toml"),
            format!(
                "trust_domain = \"{TD}\"\ndata_dir = \"{d}/server\"\nbind_address = \"127.0.0.1:{port}\"\n\
                 admin_socket = \"{d}/sp/admin.sock\"\n\n[node_attestor.x509pop]\nca_bundle_path = \"{d}/node-ca.pem\"\n"
            ),
        )
        .unwrap();
        let mut command = Command::new(binary("tessera-server").unwrap());
        command.arg("run").arg("--config").arg(dir.path().join("server.toml"));
        let server = Process::spawn(&mut command, dir.path().join("server.log")).unwrap();
        let setup = Self { dir, port, _server: server };
        wait_for(
            || setup.server(&["healthcheck"]).status.success(),
            "the server to become healthy",
            || std::fs::read_to_string(setup.path("server.log")).unwrap_or_default(),
        );
        std::fs::write(setup.path("bundle.pem"), setup.server_ok(&["bundle", "show", "--format", "pem"])).unwrap();
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self, args: &[&str]) -> Output {
        Command::new(binary("tessera-server").unwrap())
            .args(args)
            .arg("--admin-socket")
            .arg(self.path("sp/admin.sock"))
            .output()
            .unwrap()
    }

    fn server_ok(&self, args: &[&str]) -> String {
        let output = self.server(args);
        assert!(output.status.success(), "tessera-server {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// Starts an agent named `name` attesting with `<cn>.pem` / `<cn>.key`.
    fn agent(&self, name: &str, cn: &str) -> Process {
        let d = self.dir.path().display();
        let config = format!(
            "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/{name}\"\n\
             socket_path = \"{d}/{name}-pub/api.sock\"\nadmin_socket = \"{d}/{name}-priv/admin.sock\"\n\
             trust_bundle_path = \"{d}/bundle.pem\"\n\n[node_attestor.x509pop]\n\
             certificate_path = \"{d}/{cn}.pem\"\nprivate_key_path = \"{d}/{cn}.key\"\n",
            port = self.port
        );
        let file = self.path(&format!("{name}.toml"));
        std::fs::write(&file, config).unwrap();
        let mut command = Command::new(binary("tessera-agent").unwrap());
        command.arg("run").arg("--config").arg(&file);
        Process::spawn(&mut command, self.path(&format!("{name}.log"))).unwrap()
    }

    fn fetch(&self, name: &str) -> Output {
        Command::new(binary("tessera-agent").unwrap())
            .args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
            .arg(self.path(&format!("{name}-pub/api.sock")))
            .output()
            .unwrap()
    }
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str, log: impl Fn() -> String) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

#[test]
fn agents_attest_with_node_certificates_and_come_back_after_eviction() {
    let ca = node_ca("node CA");
    let setup = Setup::start(&ca);
    let leaf = node_certificate(&ca, "node-1", setup.dir.path());
    let agent_id = format!("spiffe://{TD}/tessera/agent/x509pop/{}", sha256_hex(&leaf));

    // A node alias on the certificate's common name, and a workload under it: the entry
    // reaches the agent only through the node selectors x509pop derived.
    setup.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        &format!("spiffe://{TD}/tessera/server"),
        "--spiffe-id",
        &format!("spiffe://{TD}/nodes/web"),
        "--selector",
        "x509pop:subject:cn:node-1",
    ]);
    let uid = rustix::process::getuid().as_raw();
    setup.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        &format!("spiffe://{TD}/nodes/web"),
        "--spiffe-id",
        &format!("spiffe://{TD}/x509pop/web"),
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);

    let agent = setup.agent("agent", "node-1");
    let log = || agent.log();
    wait_for(|| setup.fetch("agent").status.success(), "the workload's SVID", log);
    let fetched = String::from_utf8(setup.fetch("agent").stdout).unwrap();
    assert!(fetched.contains(&format!("spiffe://{TD}/x509pop/web")), "{fetched}");

    let shown = setup.server_ok(&["agent", "show", "--spiffe-id", &agent_id, "--output", "json"]);
    assert!(shown.contains("x509pop:subject:cn:node-1"), "{shown}");
    assert!(shown.contains(&format!("x509pop:ca:fingerprint:{}", sha256_hex(ca.cert.der()))), "{shown}");

    // Evicted: the agent attests again by itself and keeps serving the workload.
    setup.server_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    wait_for(
        || setup.server(&["agent", "show", "--spiffe-id", &agent_id]).status.success(),
        "the agent to attest again after eviction",
        log,
    );
    wait_for(|| agent.log().contains("re-attested"), "the agent to log its re-attestation", log);
    assert!(setup.fetch("agent").status.success(), "{}", agent.log());

    // Banned: re-attestation is refused too.
    setup.server_ok(&["agent", "ban", "--spiffe-id", &agent_id]);
    wait_for(|| agent.log().contains("agent is banned"), "the ban to reach the agent", log);
    let banned = setup.server_ok(&["agent", "show", "--spiffe-id", &agent_id, "--output", "json"]);
    assert!(banned.contains("\"banned\": true") || banned.contains("\"banned\":true"), "{banned}");
}

#[test]
fn a_node_certificate_from_another_ca_is_refused() {
    let (trusted, stranger) = (node_ca("node CA"), node_ca("someone else's CA"));
    let setup = Setup::start(&trusted);
    node_certificate(&stranger, "intruder", setup.dir.path());
    let mut agent = setup.agent("intruder", "intruder");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "the agent kept running:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("not trusted by node_attestor.x509pop"), "{log}");
    let agents = setup.server_ok(&["agent", "list"]);
    assert!(!agents.contains("x509pop"), "{agents}");
}
