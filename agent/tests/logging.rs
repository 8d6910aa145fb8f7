#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The real `tessera-agent run` binary's logs and its SIGTERM handling, against a real
//! in-process server: `log_format = "json"` writes one JSON object per line with structured
//! fields, `text` carries no ANSI escape codes when stderr is a file, and SIGTERM stops the
//! agent with exit status 0 (its Workload API socket removed), both while serving and while
//! still trying to reach the server at start-up. A fatal error (a refused join token) is a JSON
//! line too when the logs are JSON.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{DataStore, JoinToken, MemoryDataStore};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::TrustDomain;
use tokio::process::{Child, Command};

const TD: &str = "example.org";
/// Generous: the CI box is a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

async fn start_server(dir: &Path) -> RunningServer {
    let config = ServerConfig {
        trust_domain: TrustDomain::new(TD).unwrap(),
        data_dir: dir.join("server"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("sadm.sock"),
        ..ServerConfig::default()
    };
    let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
    server::start_with(config, store).await.unwrap()
}

struct Agent {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Agent {
    /// Writes a config (`extra` appended) and starts the binary; stderr goes to a file.
    fn spawn(dir: &Path, server_address: &str, extra: &str) -> Self {
        let socket = dir.join("pub/api.sock");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TD}\"\nserver_address = \"{server_address}\"\ndata_dir = \"{}\"\n\
                 socket_path = \"{}\"\nadmin_socket = \"{}\"\n{extra}\n",
                dir.join("agent").display(),
                socket.display(),
                dir.join("priv/adm.sock").display(),
            ),
        )
        .unwrap();
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tessera-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, log, socket }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.log().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the agent never logged {needle:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("the agent did not stop within {DEADLINE:?} of SIGTERM:\n{}", self.log()),
        }
    }
}

fn json_lines(log: &str) -> Vec<Value> {
    assert!(!log.trim().is_empty(), "no log lines at all");
    log.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
            assert!(value["timestamp"].is_string(), "no timestamp: {line}");
            assert!(
                matches!(value["level"].as_str(), Some("ERROR" | "WARN" | "INFO" | "DEBUG" | "TRACE")),
                "bad level: {line}"
            );
            assert!(value["target"].as_str().is_some_and(|t| !t.is_empty()), "no target: {line}");
            assert!(value["fields"]["message"].is_string(), "no message field: {line}");
            value
        })
        .collect()
}

fn event<'a>(lines: &'a [Value], message: &str) -> &'a Value {
    lines
        .iter()
        .find(|line| line["fields"]["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} event in {lines:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_structured_fields_and_sigterm_drains_cleanly() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let server = start_server(dir.path()).await;
    let expires_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = JoinToken { token: "log-token".to_owned(), expires_at, alias_spiffe_id: None };
    server.state().datastore().create_join_token(&token).unwrap();
    let bundle = dir.path().join("bootstrap.pem");
    std::fs::write(&bundle, server.state().ca().bundle().x509_authorities_pem()).unwrap();
    let extra = format!(
        "trust_bundle_path = \"{}\"\njoin_token = \"log-token\"\nlog_format = \"json\"\nlog_level = \"debug\"",
        bundle.display()
    );
    let mut agent = Agent::spawn(dir.path(), &server.agent_api_addr().to_string(), &extra);
    agent.wait_for_log("agent running").await;
    assert!(agent.socket.exists());

    let status = agent.terminate().await;
    let log = agent.log();
    assert!(status.success(), "SIGTERM must be a clean stop, got {status}:\n{log}");
    assert!(!agent.socket.exists(), "the Workload API socket is removed on shutdown");
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file:\n{log:?}");

    let lines = json_lines(&log);
    let attested = event(&lines, "attested; agent SVID persisted");
    assert_eq!(attested["fields"]["agent_id"], format!("spiffe://{TD}/tessera/agent/join_token/log-token"));
    let running = event(&lines, "agent running");
    assert_eq!(running["level"], "INFO");
    assert_eq!(running["fields"]["socket"], agent.socket.display().to_string(), "fields, not a formatted message");
    assert_eq!(running["fields"]["server"], server.agent_api_addr().to_string());
    event(&lines, "shutting down");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_no_colour_codes_and_sigterm_stops_an_agent_still_starting() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    // A port nothing listens on: the agent keeps retrying its attestation.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let extra = "insecure_bootstrap = true\njoin_token = \"never-used\"\nlog_format = \"text\"";
    let mut agent = Agent::spawn(dir.path(), &closed.to_string(), extra);
    agent.wait_for_log("retrying in").await;

    let status = agent.terminate().await;
    let log = agent.log();
    assert!(status.success(), "SIGTERM during start-up must be a clean stop, got {status}:\n{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file:\n{log:?}");
    assert!(log.lines().any(|line| line.contains(" WARN ") && line.contains("retrying in")), "{log}");
    assert!(log.contains("stopping before start-up completed"), "{log}");
    assert!(log.lines().all(|line| serde_json::from_str::<Value>(line).is_err()), "text format is not JSON");
    assert!(!agent.socket.exists(), "no Workload API socket before start-up completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_token_with_json_logs_ends_with_a_json_error_line() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let server = start_server(dir.path()).await;
    let bundle = dir.path().join("bootstrap.pem");
    std::fs::write(&bundle, server.state().ca().bundle().x509_authorities_pem()).unwrap();
    let extra =
        format!("trust_bundle_path = \"{}\"\njoin_token = \"never-issued\"\nlog_format = \"json\"", bundle.display());
    let mut agent = Agent::spawn(dir.path(), &server.agent_api_addr().to_string(), &extra);
    let status = match tokio::time::timeout(DEADLINE, agent.child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!("the agent did not give up on a refused token:\n{}", agent.log()),
    };
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    let lines = json_lines(&agent.log());
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    let error = last["fields"]["error"].as_str().unwrap();
    assert!(error.contains("does not exist"), "the error gives the server's reason: {error}");
    server.shutdown().await.unwrap();
}
