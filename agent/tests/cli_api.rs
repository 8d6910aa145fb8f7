#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `tessera-agent api ...` and `healthcheck` as separate processes against a served socket.
//! Each CLI process is attested from its own peer credentials: entries select it by its
//! executable path (`unix:path`), which the test process does not share.

mod workload_api_harness;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::SystemTime;

use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt;
use tessera_spiffe::x509::{X509Svid, verify_x509_svid};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use workload_api_harness::*;

fn bin() -> PathBuf {
    std::fs::canonicalize(env!("CARGO_BIN_EXE_tessera-agent")).unwrap()
}

/// An agent whose only entry for this uid is bound to the CLI binary, and one bound to the
/// test binary (which the CLI must not get).
async fn agent_for_the_cli() -> Agent {
    let agent = Agent::start().await;
    let cli_path = format!("unix:path:{}", bin().display());
    let test_path = format!("unix:path:{}", std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap().display());
    agent.add_identity(entry("cli", "/cli", &[&my_uid_selector(), &cli_path], &[FEDERATED]));
    agent.add_identity(entry("test", "/test-only", &[&my_uid_selector(), &test_path], &[]));
    agent
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(bin());
    command.args(args).env_remove("SPIFFE_ENDPOINT_SOCKET").kill_on_drop(true);
    command
}

async fn run(mut command: Command) -> Output {
    tokio::time::timeout(DEADLINE, command.output()).await.expect("the CLI hung").unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The one-line error of a failed run.
fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure, got stdout {}", stdout(output));
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "not a one-line error: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn socket_arg(agent: &Agent) -> String {
    agent.socket.display().to_string()
}

fn pem_ders(path: &Path) -> Vec<Vec<u8>> {
    pem::parse_many(std::fs::read(path).unwrap()).unwrap().into_iter().map(|p| p.into_contents()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_x509_writes_files_that_parse_and_validate() {
    let agent = agent_for_the_cli().await;
    let out = agent.dir().join("out");
    let output =
        run(command(&["api", "fetch", "x509", "--socket-path", &socket_arg(&agent), "--write", out.to_str().unwrap()]))
            .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = stdout(&output);
    assert!(text.contains("SPIFFE ID:      spiffe://example.org/cli"), "{text}");
    assert!(!text.contains("test-only"), "the CLI got the test binary's identity: {text}");
    assert!(text.contains("Wrote"), "{text}");

    let key_mode = std::fs::metadata(out.join("svid.0.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let chain = pem_ders(&out.join("svid.0.pem")).concat();
    let key = pem::parse(std::fs::read(out.join("svid.0.key")).unwrap()).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    let svid = X509Svid::parse(&chain, key.contents(), &ring::rand::SystemRandom::new()).unwrap();
    assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/cli");
    let bundle =
        Bundle::from_x509_authorities_pem(td(TRUST_DOMAIN), &std::fs::read(out.join("bundle.0.pem")).unwrap()).unwrap();
    let chain_refs: Vec<&[u8]> = svid.chain().iter().map(Vec::as_slice).collect();
    verify_x509_svid(&chain_refs, &bundle, SystemTime::now()).unwrap();
    assert_eq!(pem_ders(&out.join("federated_bundle.0.pem")), [agent.trust.federated_ca.der().to_vec()]);
    assert!(!out.join("svid.1.pem").exists());

    // JSON output, for scripts.
    let output =
        run(command(&["api", "fetch", "x509", "--socket-path", &socket_arg(&agent), "--output", "json"])).await;
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/cli");
    assert!(json["federated_bundles"]["spiffe://partner.test"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_jwt_and_validate_jwt() {
    let agent = agent_for_the_cli().await;
    let socket = socket_arg(&agent);
    let output = run(command(&["api", "fetch", "jwt", "--audience", "svc", "--socket-path", &socket])).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = stdout(&output);
    let token = text.strip_prefix("token(spiffe://example.org/cli):\n\t").expect(&text).trim_end().to_owned();
    let validated = jwt::validate(&token, &agent.trust.bundles(), &["svc"], SystemTime::now()).unwrap();
    assert_eq!(validated.spiffe_id().as_str(), "spiffe://example.org/cli");

    let output =
        run(command(&["api", "fetch", "jwt", "--audience", "svc", "--socket-path", &socket, "--output", "json"])).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/cli");

    let output =
        run(command(&["api", "validate", "jwt", "--audience", "svc", "--svid", &token, "--socket-path", &socket]))
            .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = stdout(&output);
    assert!(text.starts_with("SVID is valid.\nSPIFFE ID: spiffe://example.org/cli\n"), "{text}");
    assert!(text.contains(r#""aud":["svc"]"#), "{text}");

    let output =
        run(command(&["api", "validate", "jwt", "--audience", "other", "--svid", &token, "--socket-path", &socket]))
            .await;
    let line = error_line(&output);
    assert!(line.contains("InvalidArgument: expected audience in [\"other\"]"), "{line}");

    let output = run(command(&[
        "api",
        "fetch",
        "jwt",
        "--audience",
        "svc",
        "--spiffe-id",
        "spiffe://example.org/test-only",
        "--socket-path",
        &socket,
    ]))
    .await;
    assert!(error_line(&output).contains("PermissionDenied: no identity issued"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_endpoint_socket_is_honoured_in_both_unix_forms() {
    let agent = agent_for_the_cli().await;
    for value in [format!("unix://{}", agent.socket.display()), format!("unix:{}", agent.socket.display())] {
        let mut cli = command(&["api", "fetch", "bundles", "--output", "json"]);
        cli.env("SPIFFE_ENDPOINT_SOCKET", &value);
        let output = run(cli).await;
        assert!(output.status.success(), "{value}: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(json["x509_bundles"]["spiffe://example.org"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
        assert!(json["x509_bundles"]["spiffe://partner.test"].is_string());
        assert_eq!(json["jwt_bundles"]["spiffe://example.org"]["keys"][0]["kid"], JWT_KEY_ID);
    }

    // The flag wins over the variable.
    let mut cli = command(&["api", "fetch", "bundles", "--socket-path", &socket_arg(&agent)]);
    cli.env("SPIFFE_ENDPOINT_SOCKET", "unix:///nonexistent/api.sock");
    assert!(run(cli).await.status.success());

    let mut cli = command(&["api", "fetch", "x509"]);
    cli.env("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:1");
    let line = error_line(&run(cli).await);
    assert!(line.contains("SPIFFE_ENDPOINT_SOCKET=\"tcp://127.0.0.1:1\" is invalid"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_socket_and_missing_identity_fail_with_one_line() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let missing = dir.path().join("missing.sock");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["api", "fetch", "x509", "--socket-path", missing],
        vec!["api", "fetch", "jwt", "--audience", "a", "--socket-path", missing],
        vec!["api", "watch", "--socket-path", missing],
        vec!["healthcheck", "--socket-path", missing],
    ] {
        let line = error_line(&run(command(&args)).await);
        assert!(line.contains(&format!("cannot connect to the Workload API at {missing}")), "{line}");
    }

    // Reachable, but nothing is registered for this process.
    let agent = Agent::start().await;
    agent.add_identity(entry("other", "/other", &[&other_uid_selector()], &[]));
    let line = error_line(&run(command(&["api", "fetch", "x509", "--socket-path", &socket_arg(&agent)])).await);
    assert!(line.contains("answered PermissionDenied: no identity issued"), "{line}");
    // The healthcheck only needs the API to answer.
    let output = run(command(&["healthcheck", "--socket-path", &socket_arg(&agent)])).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout(&output), "Agent is healthy.\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_update() {
    let agent = agent_for_the_cli().await;
    let mut cli = command(&["api", "watch", "--socket-path", &socket_arg(&agent)]);
    cli.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cli.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(first.contains("received 1 X.509-SVID(s): spiffe://example.org/cli"), "{first}");
    agent.rotate("cli");
    let second = tokio::time::timeout(DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(second.contains("spiffe://example.org/cli"), "{second}");

    // The identity goes away: watch ends with the agent's reason.
    agent.remove_entry("cli");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no identity issued"));
}

/// A CLI process running as another user (uid 65534, `nobody`) is attested from its own
/// credentials: it gets the entry for that user and not the one for the test's user. Switching
/// users needs root; as any other user only the second half runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_of_another_user_gets_that_users_identity() {
    const NOBODY: u32 = 65534;
    let agent = Agent::start().await;
    let cli_path = format!("unix:path:{}", bin().display());
    agent.add_identity(entry("mine", "/mine", &[&my_uid_selector(), &cli_path], &[]));
    agent.add_identity(entry("nobody", "/nobody", &[&format!("unix:uid:{NOBODY}"), "unix:user:nobody"], &[]));
    // The other user must be able to reach the socket inside the test's private directory.
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = socket_arg(&agent);

    let output = run(command(&["api", "fetch", "x509", "--socket-path", &socket, "--output", "json"])).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["svids"].as_array().unwrap().len(), 1);
    assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/mine");

    if !rustix::process::getuid().is_root() {
        eprintln!("not root: the run as uid {NOBODY} is skipped");
        return;
    }
    let mut as_nobody = command(&["api", "fetch", "x509", "--socket-path", &socket, "--output", "json"]);
    as_nobody.uid(NOBODY).gid(NOBODY);
    let output = run(as_nobody).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["svids"].as_array().unwrap().len(), 1);
    assert_eq!(json["svids"][0]["spiffe_id"], "spiffe://example.org/nobody");
}

/// The agent's connection goes away mid-stream (a proxy between the CLI and the socket is
/// cut): `watch` exits non-zero with one line naming the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_a_lost_connection_in_one_line() {
    let agent = agent_for_the_cli().await;
    let proxy_socket = agent.dir().join("proxy.sock");
    let listener = tokio::net::UnixListener::bind(&proxy_socket).unwrap();
    let upstream = agent.socket.clone();
    let proxy = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = tokio::net::UnixStream::connect(&upstream).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });

    let mut cli = command(&["api", "watch", "--socket-path", proxy_socket.to_str().unwrap()]);
    cli.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cli.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();
    // (The agent attests the proxy, i.e. the test process.)
    assert!(first.contains("received 1 X.509-SVID(s): spiffe://example.org/test-only"), "{first}");
    proxy.abort();
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    let line = error_line(&output);
    assert!(line.contains(&format!("lost the connection to the Workload API at {}", proxy_socket.display())), "{line}");
}
