#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The real `tessera-server run` binary's logs and its SIGTERM handling: `log_format = "json"`
//! writes one JSON object per line with structured fields, `text` carries no ANSI escape
//! codes when stderr is a file, `log_level` filters, and SIGTERM stops the server with exit
//! status 0, its listeners closed and its admin socket removed. A fatal error after logging is
//! up is a JSON line too.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-server");
/// Generous: the CI box is a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts the binary with `extra` appended to a minimal config; stderr goes to a file.
    fn start(extra: &str) -> Self {
        Self::start_on("127.0.0.1:0", extra)
    }

    /// As [`Server::start`], with the agent API on `bind_address`.
    fn start_on(bind_address: &str, extra: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
        let socket = dir.path().join("private/admin.sock");
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"{bind_address}\"\n\
                 admin_socket = \"{}\"\n{extra}\n",
                dir.path().join("data").display(),
                socket.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("server.log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            // Colour must be off because stderr is a file, not because of NO_COLOR.
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, _dir: dir, socket, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until the log contains `needle` (the server writes it once it serves).
    fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.log().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the server exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the server never logged {needle:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until the admin socket accepts connections.
    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the server exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "the server never opened {}:\n{}", self.socket.display(), self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within {DEADLINE:?} of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses every line of `log` as a JSON object with the fields every event carries.
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

fn assert_no_ansi(log: &str) {
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log written to a file:\n{log:?}");
}

#[test]
fn json_logs_carry_structured_fields_and_sigterm_drains_cleanly() {
    let mut server = Server::start("log_format = \"json\"\nlog_level = \"debug\"");
    server.wait_for_log("tessera-server started");
    assert!(std::os::unix::net::UnixStream::connect(&server.socket).is_ok());

    let status = server.terminate();
    let log = server.log();
    assert!(status.success(), "SIGTERM must be a clean stop, got {status}:\n{log}");
    assert!(!server.socket.exists(), "the admin socket is removed on shutdown");
    assert_no_ansi(&log);

    let lines = json_lines(&log);
    let started = event(&lines, "tessera-server started");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["fields"]["trust_domain"], "example.org", "fields, not a formatted message: {started}");
    assert_eq!(started["fields"]["admin_socket"], server.socket.display().to_string());
    let agent_api: SocketAddr = started["fields"]["agent_api"].as_str().unwrap().parse().unwrap();
    assert_ne!(agent_api.port(), 0, "the bound port is logged, not the configured 0");
    assert_eq!(event(&lines, "shutting down")["fields"]["signal"], "SIGTERM");
    let position = |message: &str| lines.iter().position(|line| line["fields"]["message"] == message);
    assert!(position("tessera-server stopped") > position("shutting down"), "{log}");
    assert!(TcpStream::connect_timeout(&agent_api, Duration::from_secs(5)).is_err(), "the agent API still accepts");
}

#[test]
fn text_logs_written_to_a_file_have_no_colour_codes() {
    let mut server = Server::start("log_format = \"text\"");
    server.wait_for_log("tessera-server started");
    assert!(server.terminate().success(), "{}", server.log());
    let log = server.log();
    assert_no_ansi(&log);
    let started = log.lines().find(|line| line.contains("tessera-server started")).unwrap();
    assert!(started.contains(" INFO "), "{started}");
    assert!(started.contains("trust_domain=example.org"), "fields are key=value in text: {started}");
    assert!(serde_json::from_str::<Value>(started).is_err(), "text format is not JSON");
}

#[test]
fn log_level_warn_keeps_warnings_and_drops_info() {
    // An SVID lifetime longer than the CA's is accepted with a warning at start-up.
    let mut server =
        Server::start("log_format = \"json\"\nlog_level = \"warn\"\nca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"2h\"");
    server.wait_for_socket();
    assert!(server.terminate().success(), "{}", server.log());
    let lines = json_lines(&server.log());
    assert!(lines.iter().any(|line| line["level"] == "WARN"), "the TTL warning is logged: {lines:#?}");
    assert!(lines.iter().all(|line| matches!(line["level"].as_str(), Some("WARN" | "ERROR"))), "{lines:#?}");
}

#[test]
fn a_fatal_error_after_start_up_is_a_json_line_too() {
    // The agent API port is taken: the server fails after logging is up, exit status 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut server = Server::start_on(&format!("127.0.0.1:{port}"), "log_format = \"json\"");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not fail on a taken port:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{}", server.log());
    let lines = json_lines(&server.log());
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    let error = last["fields"]["error"].as_str().unwrap();
    assert!(error.contains(&port.to_string()), "the error names the address: {error}");
}
