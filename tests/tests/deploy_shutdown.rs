#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SIGTERM on a running deployment, as a service manager (systemd, Kubernetes) sends it:
//! real `tessera-server` and `tessera-agent` processes with JSON logs, an agent holding its
//! entry sync stream open to the server, and a workload holding a Workload API stream
//! (`tessera-agent api watch`) open to the agent.
//!
//! - The server drains with the agent's stream open: exit status 0 within the bound, admin
//!   socket removed, agent API port closed. The agent keeps serving the SVIDs it holds.
//! - The agent drains with the workload's stream open: exit status 0 within the bound, the
//!   workload's stream ends, the Workload API socket is removed.
//! - Every line both processes logged is a JSON object.
//!
//! The binaries are the ones `cargo test --workspace` builds (`target/debug/`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a drain may take. systemd's and Kubernetes' defaults allow 30 s before SIGKILL;
/// the processes must be well within that even on a loaded CI machine.
const DRAIN_BOUND: Duration = Duration::from_secs(20);
const DEADLINE: Duration = Duration::from_secs(30);

fn binary(name: &str) -> PathBuf {
    tessera_tests::harness::binary(name).unwrap()
}

/// A child process, killed on drop, its stderr (or stdout) in a file.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(command: &mut Command, log: PathBuf, to_stdout: bool) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        command.stdin(Stdio::null()).env_remove("NO_COLOR");
        if to_stdout {
            command.stdout(file).stderr(Stdio::null());
        } else {
            command.stdout(Stdio::null()).stderr(file);
        }
        Self { child: command.spawn().unwrap(), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Waits for the process to exit; `None` if it is still running after `bound`.
    fn wait(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

fn ok(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Polls `check` until it holds.
fn wait_until(what: &str, mut check: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen in time:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_json_lines(name: &str, log: &str) {
    assert!(!log.trim().is_empty(), "{name} logged nothing");
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{name}: log line is not JSON ({err}): {line:?}"));
        assert!(value["fields"]["message"].is_string() && value["level"].is_string(), "{name}: {line}");
    }
}

#[test]
fn sigterm_drains_the_server_and_the_agent_with_streams_open() {
    let dir = tempfile::Builder::new().prefix("dsd").tempdir_in("/tmp").unwrap();
    let d = dir.path();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin = d.join("s/admin.sock");
    let workload_socket = d.join("p/api.sock");
    std::fs::write(
        d.join("server.toml"),
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:{port}\"\n\
             admin_socket = \"{}\"\nlog_format = \"json\"\n",
            d.join("server").display(),
            admin.display()
        ),
    )
    .unwrap();
    let server_cli =
        |args: &[&str]| run(Command::new(binary("tessera-server")).args(args).arg("--admin-socket").arg(&admin));

    let mut server = Process::spawn(
        Command::new(binary("tessera-server")).args(["run", "--config"]).arg(d.join("server.toml")),
        d.join("server.log"),
        false,
    );
    wait_until("server start", || server_cli(&["healthcheck"]).status.success(), || server.log());
    std::fs::write(d.join("bundle.pem"), ok(server_cli(&["bundle", "show", "--format", "pem"]), "bundle show"))
        .unwrap();
    let generated = ok(server_cli(&["token", "generate", "--ttl", "600"]), "token generate");
    let token = generated.lines().find_map(|l| l.strip_prefix("Token: ")).unwrap().trim().to_owned();
    let uid = format!("unix:uid:{}", rustix::process::getuid().as_raw());
    let parent = format!("spiffe://example.org/tessera/agent/join_token/{token}");
    ok(
        server_cli(&[
            "entry",
            "create",
            "--parent-id",
            &parent,
            "--spiffe-id",
            "spiffe://example.org/drain",
            "--selector",
            &uid,
        ]),
        "entry create",
    );

    std::fs::write(
        d.join("agent.toml"),
        format!(
            "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             socket_path = \"{}\"\nadmin_socket = \"{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\n\
             log_format = \"json\"\n",
            d.join("agent").display(),
            workload_socket.display(),
            d.join("q/admin.sock").display(),
            d.join("bundle.pem").display()
        ),
    )
    .unwrap();
    let agent_cli = |args: &[&str]| {
        run(Command::new(binary("tessera-agent")).args(args).arg("--socket-path").arg(&workload_socket))
    };
    let mut agent = Process::spawn(
        Command::new(binary("tessera-agent")).args(["run", "--config"]).arg(d.join("agent.toml")),
        d.join("agent.log"),
        false,
    );
    wait_until("agent health", || agent_cli(&["healthcheck"]).status.success(), || agent.log());
    // The workload's SVID is minted and served: the agent is synced and holds its stream.
    wait_until(
        "workload SVID",
        || agent_cli(&["api", "fetch", "x509"]).stdout.windows(23).any(|w| w == b"spiffe://example.org/dr"),
        || agent.log(),
    );
    let mut watch = Process::spawn(
        Command::new(binary("tessera-agent")).args(["api", "watch", "--socket-path"]).arg(&workload_socket),
        d.join("watch.out"),
        true,
    );
    wait_until("watch update", || watch.log().contains("spiffe://example.org/drain"), || watch.log());

    // The server, with the agent's sync stream open.
    let agent_api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    server.sigterm();
    let status = server
        .wait(DRAIN_BOUND)
        .unwrap_or_else(|| panic!("the server did not stop within {DRAIN_BOUND:?} of SIGTERM:\n{}", server.log()));
    assert!(status.success(), "server: SIGTERM must be a clean stop, got {status}:\n{}", server.log());
    eprintln!("server drained in {:?}", started.elapsed());
    assert!(!admin.exists(), "the admin socket is removed");
    assert!(TcpStream::connect_timeout(&agent_api, Duration::from_secs(5)).is_err(), "the agent API still accepts");
    assert_json_lines("server", &server.log());
    // The agent outlives its server and keeps serving what it holds.
    assert!(agent.running(), "the agent must survive a server shutdown:\n{}", agent.log());
    assert!(watch.running(), "the workload's stream must survive a server shutdown");
    let fetched = ok(agent_cli(&["api", "fetch", "x509"]), "fetch x509 with the server down");
    assert!(fetched.contains("spiffe://example.org/drain"), "{fetched}");

    // The agent, with the workload's stream open.
    let started = Instant::now();
    agent.sigterm();
    let status = agent
        .wait(DRAIN_BOUND)
        .unwrap_or_else(|| panic!("the agent did not stop within {DRAIN_BOUND:?} of SIGTERM:\n{}", agent.log()));
    assert!(status.success(), "agent: SIGTERM must be a clean stop, got {status}:\n{}", agent.log());
    eprintln!("agent drained in {:?}", started.elapsed());
    assert!(!workload_socket.exists(), "the Workload API socket is removed");
    assert!(watch.wait(DRAIN_BOUND).is_some(), "the workload's stream did not end when the agent stopped");
    assert_json_lines("agent", &agent.log());
}
