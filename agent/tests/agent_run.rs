#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `tessera-agent run` as a real process against a real in-process server: it attests with
//! `--join-token`, serves the Workload API (fetched with `tessera-agent api fetch x509` and
//! `healthcheck`, separate processes), restarts without the token, and stops cleanly on
//! SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_server::config::ServerConfig;
use tessera_server::datastore::{DataStore, JoinToken, MemoryDataStore, RegistrationEntry};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
use tokio::process::{Child, Command};

const TD: &str = "example.org";
const WAIT: Duration = Duration::from_secs(30);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tessera-agent"))
}

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

fn write_config(dir: &Path, server: &RunningServer) -> (PathBuf, PathBuf) {
    let bundle = dir.join("bootstrap.pem");
    std::fs::write(&bundle, server.state().ca().bundle().x509_authorities_pem()).unwrap();
    let socket = dir.join("pub/api.sock");
    let file = dir.join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\n\
             socket_path = \"{}\"\nadmin_socket = \"{}\"\n",
            server.agent_api_addr(),
            dir.join("agent").display(),
            bundle.display(),
            socket.display(),
            dir.join("priv/adm.sock").display(),
        ),
    )
    .unwrap();
    (file, socket)
}

fn spawn_agent(config: &Path, token: Option<&str>) -> Child {
    let mut command = Command::new(bin());
    command.args(["run", "--config"]).arg(config);
    if let Some(token) = token {
        command.args(["--join-token", token]);
    }
    command.stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true).spawn().unwrap()
}

async fn cli(args: &[&str], socket: &Path) -> std::process::Output {
    let mut command = Command::new(bin());
    command.args(args).arg("--socket-path").arg(socket).env_remove("SPIFFE_ENDPOINT_SOCKET").kill_on_drop(true);
    tokio::time::timeout(WAIT, command.output()).await.expect("the CLI hung").unwrap()
}

/// Polls `healthcheck` until it succeeds.
async fn wait_healthy(socket: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        let output = cli(&["healthcheck"], socket).await;
        if output.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never became healthy: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn terminate(mut child: Child) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    tokio::time::timeout(WAIT, child.wait()).await.expect("the agent did not stop on SIGTERM").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_workload_svids_restarts_without_a_token_and_stops_on_sigterm() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let server = start_server(dir.path()).await;
    let store = Arc::clone(server.state().datastore());
    let expires_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    store.create_join_token(&JoinToken { token: "run-token".to_owned(), expires_at, alias_spiffe_id: None }).unwrap();
    let uid = rustix::process::getuid().as_raw();
    let entry = RegistrationEntry::new(
        "run-entry".to_owned(),
        SpiffeId::parse(&format!("spiffe://{TD}/run-workload")).unwrap(),
        SpiffeId::parse(&format!("spiffe://{TD}/tessera/agent/join_token/run-token")).unwrap(),
        SelectorSet::parse_all(&[format!("unix:uid:{uid}")]).unwrap(),
    );
    store.create_entry(&entry).unwrap();
    let (config, socket) = write_config(dir.path(), &server);

    let agent = spawn_agent(&config, Some("run-token"));
    wait_healthy(&socket).await;
    let fetched = cli(&["api", "fetch", "x509", "--output", "json"], &socket).await;
    let stdout = String::from_utf8_lossy(&fetched.stdout);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    assert!(stdout.contains(&format!("spiffe://{TD}/run-workload")), "{stdout}");
    let jwt = cli(&["api", "fetch", "jwt", "--audience", "aud-1", "--output", "json"], &socket).await;
    assert!(jwt.status.success(), "{}", String::from_utf8_lossy(&jwt.stderr));
    assert!(String::from_utf8_lossy(&jwt.stdout).contains(&format!("spiffe://{TD}/run-workload")));

    let status = terminate(agent).await;
    assert!(status.success(), "SIGTERM must be a clean stop: {status:?}");
    assert!(!socket.exists(), "the Workload API socket is removed on shutdown");

    // The token is used up; the persisted agent SVID lets the agent restart without it.
    let agent = spawn_agent(&config, None);
    wait_healthy(&socket).await;
    let fetched = cli(&["api", "fetch", "x509", "--output", "json"], &socket).await;
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    assert!(String::from_utf8_lossy(&fetched.stdout).contains("run-workload"));
    assert!(terminate(agent).await.success());
    server.shutdown().await.unwrap();
}
