#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Operations on a real deployment (`tessera-server run` and `tessera-agent run` as processes):
//! a scripted session attests an agent, refuses a used join token, issues X.509- and
//! JWT-SVIDs, denies a Workload API caller, runs admin actions and a forced rotation step.
//! Then:
//!
//! - both `/metrics` endpoints are scraped over HTTP and parsed with an independent Prometheus
//!   text parser (`prometheus-parse`), and the values must have moved as the session did;
//! - every line of both audit logs must be JSON, the session's events must be there with
//!   their fields, and no line may hold the join token, the JWT-SVID or key material;
//! - `tessera-agent diagnose --pid` on a spawned `sleep` explains why it gets no identity, and
//!   `diagnose --uid` and `show` answer over the agent's admin socket;
//! - the agent's `GET /ready` answers 200.
//!
//! The binaries are those `cargo test --workspace` builds (`target/debug/`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

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

/// A child process killed on drop, with its stderr in a log file.
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

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (the graceful path flushes the audit log).
    fn terminate(&mut self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < DEADLINE, "process did not stop on SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap()
}

fn ok(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// `GET path` over plain HTTP/1.1; returns the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "unexpected chunked body: {head}");
    (status, body.to_owned())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(key, value)| s.labels.get(key) == Some(*value)))
        .and_then(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn must(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(scrape, name, labels).unwrap_or_else(|| {
        let names: Vec<String> =
            scrape.samples.iter().filter(|s| s.metric == name).map(|s| format!("{}{}", s.metric, s.labels)).collect();
        panic!("no sample {name} {labels:?}; have {names:?}")
    })
}

fn audit_lines(path: &Path) -> Vec<Json> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")))
        .collect()
}

fn events<'a>(lines: &'a [Json], name: &str) -> Vec<&'a Json> {
    lines.iter().filter(|line| line["event"] == name).collect()
}

#[test]
fn metrics_audit_and_diagnostics_on_a_real_deployment() {
    let dir = tempfile::Builder::new().prefix("ops").tempdir_in("/tmp").unwrap();
    let d = dir.path();
    let (port, server_metrics, agent_metrics, agent_health) = (free_port(), free_port(), free_port(), free_port());
    let server_admin = d.join("sp/admin.sock");
    let agent_admin = d.join("apriv/admin.sock");
    let workload_socket = d.join("ap/api.sock");
    std::fs::write(
        d.join("server.toml"),
        format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{d}/server\"\nbind_address = \"127.0.0.1:{port}\"\n\
             admin_socket = \"{admin}\"\n[metrics]\nbind_address = \"127.0.0.1:{server_metrics}\"\n",
            d = d.display(),
            admin = server_admin.display()
        ),
    )
    .unwrap();
    let mut server = Process::spawn(
        Command::new(binary("tessera-server")).arg("run").arg("--config").arg(d.join("server.toml")),
        d.join("server.log"),
    );
    let server_cli =
        |args: &[&str]| run(Command::new(binary("tessera-server")).args(args).arg("--admin-socket").arg(&server_admin));
    let started = Instant::now();
    while !server_cli(&["healthcheck"]).status.success() {
        assert!(started.elapsed() < DEADLINE, "server did not start:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(d.join("bundle.pem"), ok(server_cli(&["bundle", "show", "--format", "pem"]), "bundle show"))
        .unwrap();
    let generated = ok(server_cli(&["token", "generate"]), "token generate");
    let token = generated.lines().find_map(|line| line.strip_prefix("Token: ")).unwrap().trim().to_owned();
    let agent_id = format!("spiffe://{TRUST_DOMAIN}/tessera/agent/join_token/{token}");

    // Only the agent's own CLI binary matches the web entry; anything else this uid runs (the
    // test binary, `sleep`) gets no identity.
    let agent_binary = std::fs::canonicalize(binary("tessera-agent")).unwrap();
    let uid_selector = format!("unix:uid:{}", uid());
    let path_selector = format!("unix:path:{}", agent_binary.display());
    let created = ok(
        server_cli(&[
            "entry",
            "create",
            "--parent-id",
            &agent_id,
            "--spiffe-id",
            "spiffe://example.org/ops/web",
            "--selector",
            &uid_selector,
            "--selector",
            &path_selector,
        ]),
        "entry create",
    );
    let web_entry = created.lines().find_map(|line| line.strip_prefix("Entry ID")).unwrap();
    let web_entry = web_entry.trim_start_matches([' ', ':']).trim().to_owned();
    ok(
        server_cli(&[
            "entry",
            "create",
            "--parent-id",
            &agent_id,
            "--spiffe-id",
            "spiffe://example.org/ops/batch",
            "--selector",
            &uid_selector,
            "--selector",
            "unix:path:/opt/batch/run",
        ]),
        "entry create",
    );

    let agent_audit = d.join("agent-audit/audit.log");
    let agent_config = |data: &str, sockets: &str, admin: &Path, extra: &str| {
        format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/{data}\"\n\
             socket_path = \"{d}/{sockets}/api.sock\"\nadmin_socket = \"{admin}\"\n\
             trust_bundle_path = \"{d}/bundle.pem\"\n{extra}",
            d = d.display(),
            admin = admin.display()
        )
    };
    std::fs::write(
        d.join("agent.toml"),
        agent_config(
            "agent",
            "ap",
            &agent_admin,
            &format!(
                "[health]\nbind_address = \"127.0.0.1:{agent_health}\"\n[metrics]\nbind_address = \
                 \"127.0.0.1:{agent_metrics}\"\n[audit]\npath = \"{}\"\n",
                agent_audit.display()
            ),
        ),
    )
    .unwrap();
    let mut agent = Process::spawn(
        Command::new(binary("tessera-agent"))
            .arg("run")
            .arg("--config")
            .arg(d.join("agent.toml"))
            .arg("--join-token")
            .arg(&token),
        d.join("agent.log"),
    );
    let agent_cli = |args: &[&str]| run(Command::new(binary("tessera-agent")).args(args));
    let started = Instant::now();
    while !agent_cli(&["healthcheck", "--socket-path", workload_socket.to_str().unwrap()]).status.success() {
        assert!(started.elapsed() < DEADLINE, "agent did not start:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let health = SocketAddr::from(([127, 0, 0, 1], agent_health));
    assert_eq!(http_get(health, "/live").0, 200);
    let started = Instant::now();
    while http_get(health, "/ready").0 != 200 {
        assert!(started.elapsed() < DEADLINE, "agent /ready never answered 200");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A second agent with the used token is refused (its agent ID exists: AlreadyExists) and exits
    // non-zero.
    std::fs::write(d.join("agent2.toml"), agent_config("agent2", "ap2", &d.join("apriv2/admin.sock"), "")).unwrap();
    let refused = run(Command::new(binary("tessera-agent"))
        .arg("run")
        .arg("--config")
        .arg(d.join("agent2.toml"))
        .arg("--join-token")
        .arg(&token));
    assert!(!refused.status.success(), "a used join token must be refused");

    // Issued: an X.509-SVID (the agent's CLI matches) and a JWT-SVID.
    let socket = workload_socket.to_str().unwrap();
    ok(agent_cli(&["api", "fetch", "x509", "--socket-path", socket]), "api fetch x509");
    let jwt = ok(
        agent_cli(&["api", "fetch", "jwt", "--audience", "ops", "--socket-path", socket, "--output", "json"]),
        "fetch jwt",
    );
    let jwt: Json = serde_json::from_str(&jwt).unwrap();
    let jwt_token = jwt.to_string();
    let jwt_token = jwt_token.split('"').find(|part| part.starts_with("eyJ")).unwrap().to_owned();

    // Denied: the test binary itself has no identity.
    let denied = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{socket}")).await.unwrap();
        client.fetch_x509_svid().await.unwrap_err()
    });
    assert!(
        denied.to_string().contains("no identity issued") || denied.to_string().contains("PermissionDenied"),
        "{denied}"
    );

    // Diagnose a `sleep`: its selectors, and why no entry matches.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let admin = agent_admin.to_str().unwrap();
    let pid = sleeper.id().to_string();
    let diagnosis: Json = serde_json::from_str(&ok(
        agent_cli(&["diagnose", "--pid", &pid, "--admin-socket", admin, "--output", "json"]),
        "diagnose --pid",
    ))
    .unwrap();
    let selectors: Vec<&str> = diagnosis["selectors"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(selectors.contains(&uid_selector.as_str()), "{diagnosis}");
    assert!(selectors.iter().any(|s| s.starts_with("unix:path:") && s.ends_with("sleep")), "{diagnosis}");
    assert!(selectors.iter().any(|s| s.starts_with("unix:sha256:")), "{diagnosis}");
    assert_eq!(diagnosis["matching_entries"], 0, "{diagnosis}");
    let entries = diagnosis["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{diagnosis}");
    let web = entries.iter().find(|e| e["entry_id"] == web_entry.as_str()).unwrap();
    assert_eq!(web["missing_selectors"], serde_json::json!([path_selector]), "{diagnosis}");
    let text = ok(agent_cli(&["diagnose", "--pid", &pid, "--admin-socket", admin]), "diagnose --pid (text)");
    assert!(text.contains("No entry matches") && text.contains(&format!("missing {path_selector}")), "{text}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let gone = agent_cli(&["diagnose", "--pid", &pid, "--admin-socket", admin]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains(&format!("no process with pid {pid}")));

    let by_uid: Json = serde_json::from_str(&ok(
        agent_cli(&["diagnose", "--uid", &uid().to_string(), "--admin-socket", admin, "--output", "json"]),
        "diagnose --uid",
    ))
    .unwrap();
    let uid_selectors: Vec<&str> =
        by_uid["selectors"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(uid_selectors.contains(&uid_selector.as_str()), "{by_uid}");
    assert!(uid_selectors.iter().all(|s| !s.starts_with("unix:path:") && !s.starts_with("unix:sha256:")), "{by_uid}");
    let shown: Json =
        serde_json::from_str(&ok(agent_cli(&["show", "--admin-socket", admin, "--output", "json"]), "show")).unwrap();
    assert_eq!(shown["agent_id"], agent_id.as_str());
    assert_eq!(shown["attested"], true);
    assert_eq!(shown["entries"], 2);
    assert_eq!(shown["svids"], 2, "the agent holds an SVID for every entry it is authorized for");

    // Agent metrics.
    let metrics = scrape(SocketAddr::from(([127, 0, 0, 1], agent_metrics)));
    let calls = "tessera_agent_workload_api_calls_total";
    assert!(must(&metrics, calls, &[("method", "FetchX509SVID"), ("code", "OK")]) >= 1.0);
    assert!(must(&metrics, calls, &[("method", "FetchX509SVID"), ("code", "PermissionDenied")]) >= 1.0);
    assert!(must(&metrics, calls, &[("method", "FetchJWTSVID"), ("code", "OK")]) >= 1.0);
    assert_eq!(must(&metrics, "tessera_agent_cache_entries", &[]), 2.0);
    assert_eq!(must(&metrics, "tessera_agent_cache_svids", &[]), 2.0);
    let horizon = must(&metrics, "tessera_agent_svid_expiry_horizon_seconds", &[]);
    assert!(horizon > 3000.0 && horizon <= 3600.0, "{horizon}");
    assert_eq!(must(&metrics, "tessera_agent_sync_connected", &[]), 1.0);
    assert_eq!(must(&metrics, "tessera_agent_sync_lag_seconds", &[]), 0.0);
    assert!(metrics.samples.iter().any(|s| s.metric == "tessera_agent_workload_api_call_seconds"));

    // Server metrics.
    let metrics = scrape(SocketAddr::from(([127, 0, 0, 1], server_metrics)));
    let signed = "tessera_server_svids_signed_total";
    assert!(must(&metrics, signed, &[("type", "x509"), ("outcome", "success")]) >= 1.0);
    assert_eq!(must(&metrics, signed, &[("type", "jwt"), ("outcome", "success")]), 1.0);
    assert_eq!(must(&metrics, signed, &[("type", "agent_x509"), ("outcome", "success")]), 1.0);
    let attestations = "tessera_server_agent_attestations_total";
    assert_eq!(must(&metrics, attestations, &[("result", "success")]), 1.0);
    assert_eq!(must(&metrics, attestations, &[("result", "refused")]), 1.0);
    assert_eq!(must(&metrics, "tessera_server_entries", &[]), 2.0);
    assert_eq!(must(&metrics, "tessera_server_agents", &[]), 1.0);
    assert_eq!(must(&metrics, "tessera_server_sync_streams", &[]), 1.0);
    let next = must(&metrics, "tessera_server_ca_next_rotation_seconds", &[("kind", "x509")]);
    assert!(next > 0.0 && next <= 24.0 * 3600.0, "{next}");
    let api = "tessera_server_agent_api_calls_total";
    assert_eq!(must(&metrics, api, &[("method", "AttestAgent"), ("code", "OK")]), 1.0);
    assert_eq!(must(&metrics, api, &[("method", "AttestAgent"), ("code", "AlreadyExists")]), 1.0);
    assert!(must(&metrics, api, &[("method", "BatchNewX509Svid"), ("code", "OK")]) >= 1.0);
    let histogram = metrics.samples.iter().find(|s| s.metric == "tessera_server_svid_signing_seconds").unwrap();
    assert!(matches!(&histogram.value, Value::Histogram(buckets) if !buckets.is_empty()));

    // Admin actions with the caller, a forced rotation step, a ban.
    ok(server_cli(&["localauthority", "x509", "prepare"]), "localauthority x509 prepare");
    ok(server_cli(&["agent", "ban", "--spiffe-id", &agent_id]), "agent ban");

    agent.terminate();
    server.terminate();

    let server_events = audit_lines(&d.join("server/audit.log"));
    let agent_events = audit_lines(&agent_audit);
    let all =
        std::fs::read_to_string(d.join("server/audit.log")).unwrap() + &std::fs::read_to_string(&agent_audit).unwrap();
    assert!(!all.contains(&token), "the join token leaked into an audit log");
    assert!(!all.contains(&jwt_token), "a JWT-SVID leaked into an audit log");
    assert!(!all.contains("PRIVATE KEY") && !all.contains("BEGIN"), "key material in an audit log");
    for line in server_events.iter().chain(&agent_events) {
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
    let redacted_agent = tessera_common_redacted(&agent_id);

    let attested = events(&server_events, "agent.attested");
    assert_eq!(attested.len(), 1, "{server_events:?}");
    assert_eq!(attested[0]["agent_id"], redacted_agent.as_str());
    assert!(attested[0]["serial"].as_str().is_some_and(|s| !s.is_empty()));
    let refused = events(&server_events, "agent.attestation_refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["code"], "AlreadyExists");
    assert!(refused[0]["reason"].as_str().unwrap().contains("join token"));

    let issued = events(&server_events, "svid.issued");
    // One X.509-SVID per entry (the agent holds one for every entry it is authorized for).
    assert_eq!(issued.iter().filter(|e| e["type"] == "x509").count(), 2, "{issued:?}");
    let x509 = issued.iter().find(|e| e["type"] == "x509" && e["entry_id"] == web_entry.as_str()).unwrap();
    assert_eq!(x509["spiffe_id"], "spiffe://example.org/ops/web");
    assert_eq!(x509["agent_id"], redacted_agent.as_str());
    assert!(x509["serial"].as_str().is_some_and(|s| s.len() >= 2));
    let jwt_event = issued.iter().find(|e| e["type"] == "jwt").unwrap();
    assert_eq!(jwt_event["entry_id"], web_entry.as_str());
    assert_eq!(jwt_event["audiences"], serde_json::json!(["ops"]));
    assert!(jwt_event["token_fingerprint"].as_str().unwrap().starts_with("sha256:"));

    let admin_actions = events(&server_events, "admin.action");
    let action = |name: &str| admin_actions.iter().find(|e| e["action"] == name).copied();
    let generated = action("join_token.generate").unwrap();
    assert!(generated["token_fingerprint"].as_str().unwrap().starts_with("sha256:"));
    let created = action("entry.create").unwrap();
    assert_eq!(created["caller_uid"], uid());
    assert!(created["caller_pid"].as_i64().is_some_and(|pid| pid > 0));
    assert!(created["selectors"].as_array().unwrap().iter().any(|s| s == &Json::from(path_selector.clone())));
    assert_eq!(action("agent.ban").unwrap()["agent_id"], redacted_agent.as_str());
    assert_eq!(action("localauthority.change").unwrap()["step"], "prepare");
    let rotation = events(&server_events, "ca.rotation");
    assert!(rotation.iter().any(|e| e["step"] == "prepare" && e["trigger"] == "forced" && e["kind"] == "x509"));

    let denials = events(&agent_events, "workload.denied");
    let denial = denials.iter().find(|e| e["method"] == "FetchX509SVID").unwrap();
    assert_eq!(denial["pid"], std::process::id());
    assert_eq!(denial["uid"], uid());
    assert!(denial["selectors"].as_array().unwrap().iter().any(|s| s == &Json::from(uid_selector.clone())));
}

/// A join-token agent ID as the audit log writes it: the token replaced by `sha256:` and the
/// first 16 hex digits of its SHA-256 (computed here independently of Tessera's code).
fn tessera_common_redacted(agent_id: &str) -> String {
    let (prefix, token) = agent_id.rsplit_once('/').unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}/sha256:{hex}")
}

#[test]
fn an_audit_file_that_cannot_be_opened_stops_the_start_up_naming_key_and_file() {
    let dir = tempfile::Builder::new().prefix("opsa").tempdir_in("/tmp").unwrap();
    let d = dir.path();
    // The audit path is a directory: it cannot be opened for appending.
    std::fs::create_dir(d.join("taken")).unwrap();
    std::fs::write(
        d.join("server.toml"),
        format!(
            "data_dir = \"{d}/server\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{d}/sp/admin.sock\"\n\
             [audit]\npath = \"{d}/taken\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let output = run(Command::new(binary("tessera-server")).arg("run").arg("--config").arg(d.join("server.toml")));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("audit.path") && stderr.contains(&format!("{}/taken", d.display())), "{stderr}");
    assert!(!d.join("sp/admin.sock").exists(), "no socket may be bound before the audit log opens");
}
