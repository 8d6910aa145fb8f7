#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `k8s_psat` and `oidc` node attestors with the real binaries: the test OIDC issuer
//! (`tessera_tests::oidc_issuer`, real HTTPS with discovery and a JWKS) plays a Kubernetes
//! cluster's service-account issuer and a cloud's identity provider; a real server trusts
//! both; real agents attest with the tokens written to their token files, get workload SVIDs
//! through node-alias entries on the token's selectors, and attest again by themselves after
//! an eviction. Refused tokens stop the agent with one message, while the server's audit log
//! names the check that refused each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tessera_tests::harness::{Process, binary, free_port};
use tessera_tests::oidc_issuer::{IssuerKey, TestIssuer};

const TD: &str = "example.org";
const DEADLINE: Duration = Duration::from_secs(30);
const K8S_AUDIENCE: &str = "tessera-server";
const NODE_AUDIENCE: &str = "tessera-nodes";
const NOT_ACCEPTED: &str = "node token was not accepted";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str, log: impl Fn() -> String) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server trusting a test cluster (`k8s_psat`, keys by OIDC discovery) and a test cloud
/// identity provider (`oidc`, keys from a `jwks_uri`), both served by one [`TestIssuer`].
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    issuer: TestIssuer,
    cluster_key: IssuerKey,
    cloud_key: IssuerKey,
    server: Process,
}

impl Setup {
    fn start(name: &str) -> Self {
        let cluster_key = IssuerKey::new("cluster-1").unwrap();
        let cloud_key = IssuerKey::new("cloud-1").unwrap();
        let issuer = TestIssuer::start(|base| {
            Ok(BTreeMap::from([
                ("/k8s/.well-known/openid-configuration".to_owned(), TestIssuer::discovery(&format!("{base}/k8s"))),
                ("/k8s/jwks".to_owned(), cluster_key.jwks()?),
                ("/cloud/jwks".to_owned(), cloud_key.jwks()?),
            ]))
        })
        .unwrap();
        let dir = tempfile::Builder::new().prefix(name).tempdir_in("/tmp").unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("issuer-ca.pem"), &issuer.ca_pem).unwrap();
        let port = free_port().unwrap();
        let base = &issuer.base;
        std::fs::write(
            dir.path().join("server.toml"),
            format!(
                r#"trust_domain = "{TD}"
data_dir = "{d}/server"
bind_address = "127.0.0.1:{port}"
admin_socket = "{d}/sp/admin.sock"

[[node_attestor.k8s_psat.cluster]]
name = "prod"
issuer = "{base}/k8s"
ca_bundle_path = "{d}/issuer-ca.pem"
audience = "{K8S_AUDIENCE}"
allowed_algorithms = ["ES256"]
service_account_allow_list = ["tessera:tessera-agent"]

[[node_attestor.oidc.issuer]]
issuer = "{base}/cloud"
jwks_uri = "{base}/cloud/jwks"
ca_bundle_path = "{d}/issuer-ca.pem"
audience = "{NODE_AUDIENCE}"
allowed_algorithms = ["ES256"]
immutable_claims = ["project_id"]

[[node_attestor.oidc.policy]]
name = "vms"
issuer = "{base}/cloud"
condition = 'claims.project_id == "p-1"'
spiffe_id = "spiffe://{TD}/tessera/agent/oidc/vm/{{instance_id}}"
selector_claims = ["zone"]
"#
            ),
        )
        .unwrap();
        let mut command = Command::new(binary("tessera-server").unwrap());
        command.arg("run").arg("--config").arg(dir.path().join("server.toml"));
        let server = Process::spawn(&mut command, dir.path().join("server.log")).unwrap();
        let setup = Self { dir, port, issuer, cluster_key, cloud_key, server };
        wait_for(
            || setup.server(&["healthcheck"]).status.success(),
            "the server to become healthy",
            || setup.server.log(),
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

    /// A node alias on `node_selector` and a workload entry (this test's uid) under it.
    fn alias_with_workload(&self, alias: &str, node_selector: &str, workload: &str) {
        let alias = format!("spiffe://{TD}/nodes/{alias}");
        self.server_ok(&[
            "entry",
            "create",
            "--parent-id",
            &format!("spiffe://{TD}/tessera/server"),
            "--spiffe-id",
            &alias,
            "--selector",
            node_selector,
        ]);
        let uid = rustix::process::getuid().as_raw();
        self.server_ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/{workload}"),
            "--selector",
            &format!("unix:uid:{uid}"),
        ]);
    }

    fn write_token(&self, agent: &str, token: &str) {
        std::fs::write(self.path(&format!("{agent}.token")), format!("{token}\n")).unwrap();
    }

    /// Starts agent `name` attesting with `[node_attestor.<attestor>]` and `<name>.token`.
    fn agent(&self, name: &str, attestor: &str, token: &str) -> Process {
        self.write_token(name, token);
        let d = self.dir.path().display();
        let config = format!(
            "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/{name}\"\n\
             socket_path = \"{d}/{name}-pub/api.sock\"\nadmin_socket = \"{d}/{name}-priv/admin.sock\"\n\
             trust_bundle_path = \"{d}/bundle.pem\"\n\n[node_attestor.{attestor}]\ntoken_path = \"{d}/{name}.token\"\n",
            port = self.port
        );
        let file = self.path(&format!("{name}.toml"));
        std::fs::write(&file, config).unwrap();
        let mut command = Command::new(binary("tessera-agent").unwrap());
        command.arg("run").arg("--config").arg(&file);
        Process::spawn(&mut command, self.path(&format!("{name}.log"))).unwrap()
    }

    /// The workload's X.509-SVID through agent `name`'s Workload API, if it serves one.
    fn fetch(&self, name: &str) -> Option<String> {
        let output = Command::new(binary("tessera-agent").unwrap())
            .args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
            .arg(self.path(&format!("{name}-pub/api.sock")))
            .output()
            .unwrap();
        output.status.success().then(|| String::from_utf8(output.stdout).unwrap())
    }

    /// The `agent.attestation_refused` events of the server's audit log so far.
    fn refusals(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("server/audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| event["event"] == "agent.attestation_refused")
            .collect()
    }

    /// The `failed_check` of every refusal of `attestor` so far.
    fn failed_checks(&self, attestor: &str) -> Vec<String> {
        self.refusals()
            .iter()
            .filter(|event| event["attestation_type"] == attestor)
            .map(|event| event["failed_check"].as_str().unwrap_or("-").to_owned())
            .collect()
    }

    /// [`Self::failed_checks`] once there are at least `count` of them.
    fn wait_failed_checks(&self, attestor: &str, count: usize) -> Vec<String> {
        wait_for(
            || self.failed_checks(attestor).len() >= count,
            &format!("{count} audit lines of refused {attestor} attestations"),
            || format!("{:#?}", self.refusals()),
        );
        self.failed_checks(attestor)
    }

    /// `tessera-server agent show --output json` of `agent_id`, once it is attested.
    fn wait_attested(&self, agent_id: &str, log: impl Fn() -> String) -> Value {
        wait_for(
            || self.server(&["agent", "show", "--spiffe-id", agent_id]).status.success(),
            &format!("{agent_id} to be attested"),
            log,
        );
        let shown: Value =
            serde_json::from_str(&self.server_ok(&["agent", "show", "--spiffe-id", agent_id, "--output", "json"]))
                .unwrap();
        assert_eq!(shown["spiffe_id"], agent_id, "{shown}");
        shown
    }
}

/// Waits for `agent` to exit and returns its log; it must have failed.
fn refused_at_start(agent: &mut Process) -> String {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "the agent kept running:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "the agent attested:\n{}", agent.log());
    agent.log()
}

/// The selectors `agent show --output json` lists, as `type:value` strings.
fn selectors(shown: &Value) -> Vec<String> {
    let listed = shown["selectors"].as_array().unwrap_or_else(|| panic!("no selectors in {shown}"));
    listed.iter().map(|selector| selector.as_str().unwrap().to_owned()).collect()
}

fn k8s_claims(setup: &Setup, namespace: &str, account: &str, node_uid: &str) -> Value {
    let now = now();
    json!({
        "iss": format!("{}/k8s", setup.issuer.base),
        "aud": [K8S_AUDIENCE],
        "sub": format!("system:serviceaccount:{namespace}:{account}"),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": account, "uid": format!("sa-{account}")},
            "pod": {"name": format!("{account}-x7k2p"), "uid": format!("pod-{node_uid}")},
            "node": {"name": format!("worker-{node_uid}"), "uid": node_uid},
        },
        "jti": format!("k8s-{node_uid}-{now}"),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    })
}

#[test]
fn k8s_psat_agents_attest_with_their_pod_token_and_come_back_after_eviction() {
    let setup = Setup::start("k8s-psat");
    setup.alias_with_workload("k8s-prod", "k8s_psat:cluster:prod", "k8s/web");

    // Refused tokens, each by an agent of its own (started now, checked below): a service
    // account that is not allow-listed, a token for another audience, an expired token.
    let other_account = setup.cluster_key.mint(&k8s_claims(&setup, "default", "builder", "n-2")).unwrap();
    let mut wrong_audience_claims = k8s_claims(&setup, "tessera", "tessera-agent", "n-3");
    wrong_audience_claims["aud"] = json!("tessera-exchange");
    let wrong_audience = setup.cluster_key.mint(&wrong_audience_claims).unwrap();
    let mut expired_claims = k8s_claims(&setup, "tessera", "tessera-agent", "n-4");
    let t = now();
    expired_claims["iat"] = json!(t - 7200);
    expired_claims["nbf"] = json!(t - 7200);
    expired_claims["exp"] = json!(t - 3600);
    let expired = setup.cluster_key.mint(&expired_claims).unwrap();
    let mut refused: Vec<Process> =
        [("other-account", other_account), ("wrong-audience", wrong_audience), ("expired", expired)]
            .iter()
            .map(|(name, token)| setup.agent(name, "k8s_psat", token))
            .collect();

    let token = setup.cluster_key.mint(&k8s_claims(&setup, "tessera", "tessera-agent", "node-uid-1")).unwrap();
    let agent = setup.agent("agent", "k8s_psat", &token);
    let log = || format!("{}\n--- server:\n{}", agent.log(), setup.server.log());
    let agent_id = format!("spiffe://{TD}/tessera/agent/k8s_psat/prod/node-uid-1");
    let shown = setup.wait_attested(&agent_id, log);
    let selectors = selectors(&shown);
    for expected in [
        "k8s_psat:cluster:prod".to_owned(),
        "k8s_psat:agent_ns:tessera".to_owned(),
        "k8s_psat:agent_sa:tessera-agent".to_owned(),
        "k8s_psat:agent_sa_uid:sa-tessera-agent".to_owned(),
        "k8s_psat:agent_pod_name:tessera-agent-x7k2p".to_owned(),
        "k8s_psat:agent_pod_uid:pod-node-uid-1".to_owned(),
        "k8s_psat:agent_node_name:worker-node-uid-1".to_owned(),
        "k8s_psat:agent_node_uid:node-uid-1".to_owned(),
        format!("spiffe_id:{agent_id}"),
    ] {
        assert!(selectors.contains(&expected), "{expected} not in {selectors:?}");
    }
    // The node alias on the cluster selector reaches the workload.
    wait_for(|| setup.fetch("agent").is_some(), "the workload's SVID", log);
    let fetched = setup.fetch("agent").unwrap();
    assert!(fetched.contains(&format!("spiffe://{TD}/k8s/web")), "{fetched}");

    // Evicted: the agent attests again by itself with the same (still valid) pod token.
    setup.server_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    setup.wait_attested(&agent_id, log);
    wait_for(|| agent.log().contains("re-attested"), "the agent to log its re-attestation", log);
    wait_for(|| setup.fetch("agent").is_some(), "the workload's SVID after re-attestation", log);

    for agent in &mut refused {
        let agent_log = refused_at_start(agent);
        assert!(agent_log.contains(NOT_ACCEPTED), "{agent_log}");
    }
    // The audit writer runs on its own thread: the lines follow the refusals shortly.
    let mut checks = setup.wait_failed_checks("k8s_psat", 3);
    checks.sort();
    assert_eq!(checks, ["audience", "expired", "service_account"], "{:#?}", setup.refusals());
    let server_log = setup.server.log();
    for check in ["service_account", "audience", "expired"] {
        assert!(
            server_log.lines().any(|line| line.contains("agent attestation refused") && line.contains(check)),
            "no warning naming {check}:\n{server_log}"
        );
    }
    assert!(server_log.contains("default:builder is not on the service_account_allow_list"), "{server_log}");
    for refusal in setup.refusals() {
        assert_eq!(refusal["code"], "PermissionDenied", "{refusal}");
        assert!(refusal["reason"].as_str().unwrap().starts_with(NOT_ACCEPTED), "{refusal}");
    }
    let agents: Value = serde_json::from_str(&setup.server_ok(&["agent", "list", "--output", "json"])).unwrap();
    let ids: Vec<&str> =
        agents["agents"].as_array().unwrap().iter().map(|a| a["spiffe_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [agent_id.as_str()], "only the allow-listed agent is attested");

    // Banned: its next re-attestation is refused, whatever the token.
    setup.server_ok(&["agent", "ban", "--spiffe-id", &agent_id]);
    wait_for(|| agent.log().contains("agent is banned"), "the ban to reach the agent", log);
    // The agent first meets the ban on its sync stream; the refused re-attestation (and its
    // audit line) follows.
    wait_for(
        || setup.failed_checks("k8s_psat").contains(&"banned".to_owned()),
        "the audit line of the refused re-attestation",
        || format!("{:#?}\n{}", setup.refusals(), log()),
    );
}

fn vm_claims(setup: &Setup, jti: &str) -> Value {
    let now = now();
    json!({
        "iss": format!("{}/cloud", setup.issuer.base),
        "aud": NODE_AUDIENCE,
        "sub": "vm-0abc",
        "project_id": "p-1",
        "instance_id": "i-0abc",
        "zone": "eu-west-3a",
        "jti": jti,
        "iat": now,
        "exp": now + 600,
    })
}

#[test]
fn oidc_agents_attest_through_a_policy_and_a_spent_token_is_refused() {
    let setup = Setup::start("oidc-node");
    setup.alias_with_workload("eu-west-3a", "oidc:claim:zone:eu-west-3a", "vm/web");
    let first = setup.cloud_key.mint(&vm_claims(&setup, &format!("vm-{}-1", now()))).unwrap();
    let agent = setup.agent("agent", "oidc", &first);
    let log = || format!("{}\n--- server:\n{}", agent.log(), setup.server.log());
    let agent_id = format!("spiffe://{TD}/tessera/agent/oidc/vm/i-0abc");
    let shown = setup.wait_attested(&agent_id, log);
    let selectors = selectors(&shown);
    for expected in [
        format!("oidc:issuer:{}/cloud", setup.issuer.base),
        "oidc:policy:vms".to_owned(),
        "oidc:sub:vm-0abc".to_owned(),
        "oidc:claim:zone:eu-west-3a".to_owned(),
        format!("spiffe_id:{agent_id}"),
    ] {
        assert!(selectors.contains(&expected), "{expected} not in {selectors:?}");
    }
    wait_for(|| setup.fetch("agent").is_some(), "the workload's SVID", log);
    assert!(setup.fetch("agent").unwrap().contains(&format!("spiffe://{TD}/vm/web")));
    assert!(setup.issuer.requests().iter().any(|path| path == "/cloud/jwks"), "{:?}", setup.issuer.requests());

    // The same token again, from another agent: a replay.
    let mut replayed = setup.agent("replayed", "oidc", &first);
    assert!(refused_at_start(&mut replayed).contains(NOT_ACCEPTED));
    assert_eq!(setup.wait_failed_checks("oidc", 1), ["replay"], "{:#?}", setup.refusals());

    // Evicted while its file still holds the spent token: refused as a replay, until a fresh
    // token is written; then the agent recovers by itself.
    setup.server_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    wait_for(|| setup.failed_checks("oidc").len() >= 2, "the re-attestation with the spent token", log);
    assert!(setup.failed_checks("oidc").iter().all(|check| check == "replay"), "{:#?}", setup.refusals());
    assert!(setup.server(&["agent", "show", "--spiffe-id", &agent_id]).status.code() != Some(0));
    setup.write_token("agent", &setup.cloud_key.mint(&vm_claims(&setup, &format!("vm-{}-2", now()))).unwrap());
    setup.wait_attested(&agent_id, log);
    wait_for(|| agent.log().contains("re-attested"), "the agent to log its re-attestation", log);
    wait_for(|| setup.fetch("agent").is_some(), "the workload's SVID after re-attestation", log);

    // A token meant for another policy's project is refused by the condition.
    let mut other_project = vm_claims(&setup, &format!("vm-{}-3", now()));
    other_project["project_id"] = json!("p-2");
    let before = setup.failed_checks("oidc").len();
    let mut stranger = setup.agent("stranger", "oidc", &setup.cloud_key.mint(&other_project).unwrap());
    assert!(refused_at_start(&mut stranger).contains(NOT_ACCEPTED));
    let checks = setup.wait_failed_checks("oidc", before + 1);
    assert_eq!(checks.last().map(String::as_str), Some("condition"), "{checks:?}");
}

#[test]
fn a_missing_token_file_stops_the_agent_naming_the_key_and_the_file() {
    let dir = tempfile::Builder::new().prefix("no-token").tempdir_in("/tmp").unwrap();
    let d = dir.path().display();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{d}/agent\"\nsocket_path = \"{d}/pub/api.sock\"\n\
             admin_socket = \"{d}/priv/admin.sock\"\ninsecure_bootstrap = true\n\n[node_attestor.k8s_psat]\n\
             token_path = \"{d}/absent-token\"\n"
        ),
    )
    .unwrap();
    let output =
        Command::new(binary("tessera-agent").unwrap()).arg("run").arg("--config").arg(&config).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let path = Path::new(&format!("{d}/absent-token")).display().to_string();
    assert!(stderr.contains("node_attestor.k8s_psat.token_path") && stderr.contains(&path), "{stderr}");
}
