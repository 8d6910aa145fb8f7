#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Workload identity federation, inbound, end to end: a test OIDC issuer served over real HTTPS
//! inside this test (its own CA, keys, discovery documents and JWKS) mints GitHub-Actions-,
//! GitLab- and Kubernetes-shaped tokens; the real `tessera-server` binary trades them for SVIDs
//! at its token exchange endpoint, through the real `tessera-agent exchange` binary and the
//! agent library's client. Every refusal is checked for its OAuth error (one and the same for
//! every refused token) and for the audit line that names the check that refused it.
//!
//! The binaries are the ones `cargo test --workspace` builds next to this test (`target/debug/`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tessera_agent::commands::exchange::{ExchangeError, ServerTrust, Want, exchange, spiffe_trust};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::TrustDomain;
use tessera_tests::oidc_issuer::{IssuerKey, TestIssuer};

const TRUST_DOMAIN: &str = "example.org";
const AUDIENCE: &str = "tessera-e2e";
const DEADLINE: Duration = Duration::from_secs(30);
const REFUSED: &str = "the subject token was not accepted";

fn binary(name: &str) -> PathBuf {
    tessera_tests::harness::binary(name).unwrap()
}

fn free_port() -> u16 {
    tessera_tests::harness::free_port().unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ---- The test OIDC issuer (tessera_tests::oidc_issuer) ------------------------------------------

/// Three issuers under `/github` (discovery), `/gitlab` (a `jwks_uri` only) and `/unknown`
/// (discovery, not configured in the server).
fn start_issuer(github: &IssuerKey, gitlab: &IssuerKey) -> TestIssuer {
    TestIssuer::start(|base| {
        Ok(BTreeMap::from([
            ("/github/.well-known/openid-configuration".to_owned(), TestIssuer::discovery(&format!("{base}/github"))),
            ("/github/jwks".to_owned(), github.jwks()?),
            ("/gitlab/jwks".to_owned(), gitlab.jwks()?),
            ("/unknown/.well-known/openid-configuration".to_owned(), TestIssuer::discovery(&format!("{base}/unknown"))),
            ("/unknown/jwks".to_owned(), github.jwks()?),
        ]))
    })
    .unwrap()
}

// ---- The server ---------------------------------------------------------------------------------

struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
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

struct Server {
    dir: tempfile::TempDir,
    exchange_port: u16,
    process: Option<Process>,
    starts: usize,
}

impl Server {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("tessera-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(self.path("sp/admin.sock"))
            .output()
            .unwrap()
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = self.path(&format!("server.{}.log", self.starts));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary("tessera-server"))
            .arg("run")
            .arg("--config")
            .arg(self.path("server.toml"))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        self.process = Some(Process { child, log });
        let started = Instant::now();
        loop {
            let healthy = self.cli(&["healthcheck"]).status.success();
            if healthy && std::net::TcpStream::connect(("127.0.0.1", self.exchange_port)).is_ok() {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "server did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    /// The `token_exchange` events of the server's audit log (`<data_dir>/audit.log`, JSON
    /// lines, kept across restarts).
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("server/audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|line| line["event"] == "token_exchange")
            .collect()
    }

    /// The audit events once there are more than `before` (the writer is asynchronous).
    fn audit_after(&self, before: usize) -> Vec<Value> {
        let started = std::time::Instant::now();
        loop {
            let audit = self.audit();
            if audit.len() > before || started.elapsed() > Duration::from_secs(5) {
                return audit;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> url::Url {
        url::Url::parse(&format!("https://127.0.0.1:{}", self.exchange_port)).unwrap()
    }
}

fn server_config(
    dir: &Path,
    exchange_port: u16,
    issuer: &TestIssuer,
    kubernetes: &IssuerKey,
    k8s_condition: &str,
) -> String {
    let d = dir.display();
    let base = &issuer.base;
    let k8s_jwks = kubernetes.jwks().unwrap().to_string();
    format!(
        r#"trust_domain = "{TRUST_DOMAIN}"
data_dir = "{d}/server"
bind_address = "127.0.0.1:{agent_port}"
admin_socket = "{d}/sp/admin.sock"
log_format = "json"

[token_exchange]
bind_address = "127.0.0.1:{exchange_port}"

[[token_exchange.issuer]]
issuer = "{base}/github"
preset = "github_actions"
audience = "{AUDIENCE}"
ca_bundle_path = "{d}/issuer-ca.pem"
allowed_algorithms = ["ES256"]

[[token_exchange.issuer]]
issuer = "{base}/gitlab"
preset = "gitlab_ci"
jwks_uri = "{base}/gitlab/jwks"
audience = "{AUDIENCE}"
ca_bundle_path = "{d}/issuer-ca.pem"
allowed_algorithms = ["ES256"]

[[token_exchange.issuer]]
issuer = "https://kubernetes.default.svc.cluster.local"
preset = "kubernetes"
jwks = '{k8s_jwks}'
audience = "{AUDIENCE}"
allowed_algorithms = ["ES256"]
max_token_lifetime = "2h"

[[token_exchange.policy]]
name = "github-main"
issuer = "{base}/github"
spiffe_id = "spiffe://{TRUST_DOMAIN}/github/{{repository_owner_id}}/{{repository_id}}"
condition = 'claims.repository_id == "4242" && claims.ref == "refs/heads/main"'
x509_svid_ttl = "30m"

[[token_exchange.policy]]
name = "gitlab-project"
issuer = "{base}/gitlab"
spiffe_id = "spiffe://{TRUST_DOMAIN}/gitlab/{{namespace_id}}/{{project_id}}"
condition = 'claims.project_id == "11" && claims.namespace_id == "22"'
jwt_svid_ttl = "5m"

[[token_exchange.policy]]
name = "k8s-builder"
issuer = "https://kubernetes.default.svc.cluster.local"
spiffe_id = "spiffe://{TRUST_DOMAIN}/k8s/{{kubernetes.io.namespace}}/{{kubernetes.io.serviceaccount.name}}"
condition = '{k8s_condition}'
"#,
        agent_port = free_port(),
    )
}

fn github_claims(issuer: &TestIssuer, jti: &str) -> Value {
    let now = now();
    json!({
        "iss": format!("{}/github", issuer.base),
        "aud": AUDIENCE,
        "sub": "repo:octo/app:ref:refs/heads/main",
        "repository": "octo/app",
        "repository_id": "4242",
        "repository_owner": "octo",
        "repository_owner_id": "77",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "workflow": "deploy",
        "jti": jti,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    })
}

fn with(mut claims: Value, patch: Value) -> Value {
    for (key, value) in patch.as_object().unwrap() {
        claims[key] = value.clone();
    }
    claims
}

fn unique(name: &str) -> String {
    format!("{name}-{}", now())
}

fn k8s_condition() -> &'static str {
    r#"claims["kubernetes.io"].serviceaccount.uid == "sa-uid-1" && claims["kubernetes.io"].namespace == "ci""#
}

/// Exchanges a token for a JWT-SVID and expects a refusal whose audit line names `check`.
async fn expect_refused(server: &Server, trust: &ServerTrust, token: &str, check: &str) {
    let before = server.audit().len();
    let result = exchange(&server.url(), trust, token, &Want::Jwt { audiences: vec!["db".into()] }).await;
    match result {
        Err(ExchangeError::Refused { status, error, description }) => {
            assert_eq!((status, error.as_str(), description.as_str()), (400, "invalid_request", REFUSED), "{check}");
        }
        other => panic!("{check}: expected a refusal, got {other:?}"),
    }
    let audit = server.audit_after(before);
    assert_eq!(audit.len(), before + 1, "{check}: one audit line per attempt:\n{}", server.log());
    let line = audit.last().unwrap();
    assert_eq!(line["outcome"], "refused", "{line}");
    assert_eq!(line["failed_check"], check, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_are_exchanged_for_svids_and_every_bad_token_is_refused() {
    let github = IssuerKey::new("gh-1").unwrap();
    let gitlab = IssuerKey::new("gl-1").unwrap();
    let kubernetes = IssuerKey::new("k8s-1").unwrap();
    let issuer = start_issuer(&github, &gitlab);
    let dir = tempfile::Builder::new().prefix("wif").tempdir_in("/tmp").unwrap();
    std::fs::write(dir.path().join("issuer-ca.pem"), &issuer.ca_pem).unwrap();
    let exchange_port = free_port();
    std::fs::write(
        dir.path().join("server.toml"),
        server_config(dir.path(), exchange_port, &issuer, &kubernetes, k8s_condition()),
    )
    .unwrap();
    let mut server = Server { dir, exchange_port, process: None, starts: 0 };
    server.start();
    let bundle_pem = String::from_utf8(server.cli(&["bundle", "show", "--format", "pem"]).stdout).unwrap();
    std::fs::write(server.path("bundle.pem"), &bundle_pem).unwrap();
    let spiffe_bundle = String::from_utf8(server.cli(&["bundle", "show", "--format", "spiffe"]).stdout).unwrap();
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let bundle = Bundle::from_json(td.clone(), spiffe_bundle.as_bytes()).unwrap();
    let trust = spiffe_trust(&server.path("bundle.pem")).unwrap();

    // GitHub Actions through the real CLI: key made locally, X.509-SVID written with its key.
    let first_github = github.mint(&github_claims(&issuer, &unique("gh-run-1"))).unwrap();
    std::fs::write(server.path("gh.token"), &first_github).unwrap();
    let out = server.path("out");
    let output = Command::new(binary("tessera-agent"))
        .args(["exchange", "--server", server.url().as_str(), "--token-file"])
        .arg(server.path("gh.token"))
        .arg("--trust-bundle")
        .arg(server.path("bundle.pem"))
        .arg("--write")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "exchange failed: {}\n{}", String::from_utf8_lossy(&output.stderr), server.log());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("SPIFFE ID: spiffe://example.org/github/77/4242"), "{stdout}");
    let key_mode = std::fs::metadata(out.join("svid.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let chain: Vec<u8> = CertificateDer::pem_file_iter(out.join("svid.pem"))
        .unwrap()
        .flat_map(|cert| cert.unwrap().as_ref().to_vec())
        .collect();
    let key = PrivateKeyDer::from_pem_file(out.join("svid.key")).unwrap();
    let svid = tessera_spiffe::x509::X509Svid::parse(&chain, key.secret_der(), &ring::rand::SystemRandom::new())
        .expect("the written key matches the written certificate");
    let written_bundle = std::fs::read_to_string(out.join("bundle.pem")).unwrap();
    assert_eq!(written_bundle, bundle_pem, "bundle.pem is the trust domain's bundle");
    let chain_refs: Vec<&[u8]> = svid.chain().iter().map(Vec::as_slice).collect();
    let verified = tessera_spiffe::x509::verify_x509_svid(&chain_refs, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id().as_str(), "spiffe://example.org/github/77/4242");
    // Capped by the subject token's remaining life (300 s), below the policy's 30 minutes.
    let left = verified.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(left <= Duration::from_secs(301), "{left:?}");
    let issued = server.audit_after(0);
    let line = issued.last().unwrap();
    assert_eq!((line["outcome"].as_str(), line["policy"].as_str()), (Some("issued"), Some("github-main")), "{line}");
    assert_eq!(line["spiffe_id"], "spiffe://example.org/github/77/4242");
    assert!(issuer.requests().iter().any(|path| path == "/github/.well-known/openid-configuration"));

    // GitLab CI: a JWT-SVID through the agent library's client (keys from jwks_uri).
    let now = now();
    let gitlab_claims = json!({
        "iss": format!("{}/gitlab", issuer.base), "aud": AUDIENCE, "sub": "project_path:grp/proj:ref_type:branch:ref:main",
        "project_id": "11", "project_path": "grp/proj", "namespace_id": "22", "namespace_path": "grp",
        "ref": "main", "jti": unique("gl-job-1"), "iat": now, "nbf": now, "exp": now + 600,
    });
    let response = exchange(
        &server.url(),
        &trust,
        &gitlab.mint(&gitlab_claims).unwrap(),
        &Want::Jwt { audiences: vec!["db".into()] },
    )
    .await
    .unwrap();
    assert_eq!(response.issued_token_type, "urn:ietf:params:oauth:token-type:jwt");
    let validated = tessera_spiffe::jwt::validate(&response.access_token, &bundle, &["db"], SystemTime::now()).unwrap();
    assert_eq!(validated.spiffe_id().as_str(), "spiffe://example.org/gitlab/22/11");
    assert!(response.expires_in <= 300, "capped by the policy's jwt_svid_ttl: {}", response.expires_in);

    // Kubernetes: an X.509-SVID from an inline JWKS (no fetch at all).
    let k8s_claims = |uid: &str, jti: &str| {
        json!({
            "iss": "https://kubernetes.default.svc.cluster.local", "aud": [AUDIENCE], "sub": "system:serviceaccount:ci:builder",
            "kubernetes.io": {"namespace": "ci", "pod": {"name": "builder-7f9", "uid": "pod-uid-9"},
                              "serviceaccount": {"name": "builder", "uid": uid}},
            "jti": jti, "iat": now, "nbf": now, "exp": now + 3600,
        })
    };
    let csr_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&csr_key).unwrap();
    let k8s_token = kubernetes.mint(&k8s_claims("sa-uid-1", &unique("k8s-1"))).unwrap();
    let response =
        exchange(&server.url(), &trust, &k8s_token, &Want::X509 { csr_der: csr.der().to_vec() }).await.unwrap();
    assert_eq!(response.token_type, "N_A");
    assert_eq!(response.spiffe_id, "spiffe://example.org/k8s/ci/builder");
    assert!(!issuer.requests().iter().any(|path| path.contains("kubernetes")));

    // Refusals: one error for all, and an audit line naming the check.
    let fetched_before = issuer.requests().len();
    let unknown = with(github_claims(&issuer, &unique("u")), json!({"iss": format!("{}/unknown", issuer.base)}));
    expect_refused(&server, &trust, &github.mint(&unknown).unwrap(), "unknown_issuer").await;
    assert_eq!(issuer.requests().len(), fetched_before, "an unknown issuer caused a fetch: {:?}", issuer.requests());

    let wrong_audience = with(github_claims(&issuer, &unique("a")), json!({"aud": "someone-else"}));
    expect_refused(&server, &trust, &github.mint(&wrong_audience).unwrap(), "audience").await;
    let t = now;
    let expired =
        with(github_claims(&issuer, &unique("e")), json!({"iat": t - 4000, "nbf": t - 4000, "exp": t - 3600}));
    expect_refused(&server, &trust, &github.mint(&expired).unwrap(), "expired").await;
    let early = with(github_claims(&issuer, &unique("n")), json!({"nbf": t + 600, "exp": t + 900}));
    expect_refused(&server, &trust, &github.mint(&early).unwrap(), "not_yet_valid").await;
    let long = with(github_claims(&issuer, &unique("l")), json!({"exp": t + 7200}));
    expect_refused(&server, &trust, &github.mint(&long).unwrap(), "lifetime").await;
    expect_refused(&server, &trust, &first_github, "replay").await;
    let not_main = with(github_claims(&issuer, &unique("c")), json!({"ref": "refs/heads/feature"}));
    expect_refused(&server, &trust, &github.mint(&not_main).unwrap(), "condition").await;
    let other_repo = with(github_claims(&issuer, &unique("c2")), json!({"repository_id": "9999"}));
    expect_refused(&server, &trust, &github.mint(&other_repo).unwrap(), "condition").await;
    let wrong_uid = kubernetes.mint(&k8s_claims("sa-uid-2", &unique("k8s-2"))).unwrap();
    expect_refused(&server, &trust, &wrong_uid, "condition").await;

    // alg none: no signature at all.
    let claims = github_claims(&issuer, &unique("none"));
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": "gh-1"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    expect_refused(&server, &trust, &none, "malformed").await;
    // HS256 keyed with the issuer's public key (the classic algorithm confusion).
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("gh-1".into());
    let public_jwk = github.jwk().unwrap().to_string();
    let confused = jsonwebtoken::encode(
        &header,
        &github_claims(&issuer, &unique("hs")),
        &EncodingKey::from_secret(public_jwk.as_bytes()),
    )
    .unwrap();
    expect_refused(&server, &trust, &confused, "malformed").await;
    let confused_spki = jsonwebtoken::encode(
        &header,
        &github_claims(&issuer, &unique("hs2")),
        &EncodingKey::from_secret(github.key.public_key().spki_der()),
    )
    .unwrap();
    expect_refused(&server, &trust, &confused_spki, "malformed").await;
    // A key ID the issuer does not publish, repeatedly: at most one refresh of its keys.
    let jwks_fetches = |requests: Vec<String>| requests.iter().filter(|path| path.starts_with("/github/")).count();
    let before = jwks_fetches(issuer.requests());
    for n in 0..5 {
        let token = github.mint_with_kid("rotated-away", &github_claims(&issuer, &unique(&format!("k{n}")))).unwrap();
        expect_refused(&server, &trust, &token, "unknown_kid").await;
    }
    assert!(jwks_fetches(issuer.requests()) <= before + 2, "unbounded key refreshes: {:?}", issuer.requests());
    // A payload changed after signing.
    let genuine = github.mint(&github_claims(&issuer, &unique("t"))).unwrap();
    let parts: Vec<&str> = genuine.split('.').collect();
    let forged_claims = with(github_claims(&issuer, &unique("t")), json!({"repository_owner_id": "1"}));
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(forged_claims.to_string()), parts[2]);
    expect_refused(&server, &trust, &forged, "signature").await;

    // The replay cache survives a restart (kill -9).
    server.stop();
    server.start();
    expect_refused(&server, &trust, &first_github, "replay").await;
    // And a fresh token still works after the restart.
    let fresh = github.mint(&github_claims(&issuer, &unique("gh-run-2"))).unwrap();
    let response = exchange(&server.url(), &trust, &fresh, &Want::Jwt { audiences: vec!["db".into()] }).await.unwrap();
    assert_eq!(response.spiffe_id, "spiffe://example.org/github/77/4242");

    // Refused by the CLI: one line naming the OAuth error, non-zero exit.
    std::fs::write(server.path("replayed.token"), &first_github).unwrap();
    let output = Command::new(binary("tessera-agent"))
        .args(["exchange", "--server", server.url().as_str(), "--token-file"])
        .arg(server.path("replayed.token"))
        .arg("--trust-bundle")
        .arg(server.path("bundle.pem"))
        .arg("--write")
        .arg(server.path("out2"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("invalid_request") && stderr.contains(REFUSED), "{stderr}");
    assert!(!server.path("out2/svid.key").exists());

    // A policy that pins only names is refused at load, naming the file and the key.
    let bad = server.path("bad.toml");
    std::fs::write(
        &bad,
        server_config(
            server.dir.path(),
            free_port(),
            &issuer,
            &kubernetes,
            r#"claims["kubernetes.io"].namespace == "ci" && claims["kubernetes.io"].serviceaccount.name == "builder""#,
        ),
    )
    .unwrap();
    let output = Command::new(binary("tessera-server")).arg("run").arg("--config").arg(&bad).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
    assert!(stderr.contains("token_exchange.policy.condition"), "{stderr}");
    assert!(stderr.contains("pins no immutable claim"), "{stderr}");
}
