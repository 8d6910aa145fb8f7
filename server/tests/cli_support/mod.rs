//! Helpers shared by the CLI tests (`cli_bundle.rs`, `cli_agent.rs`, `cli_mint.rs`): a real
//! `tessera-server run` child process in a short temporary directory, and running management
//! subcommands of the real binary against an admin socket.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera-server");

/// A short temporary directory (Unix socket paths must stay under ~100 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap()
}

/// A server child process in its own temporary directory; killed on drop.
pub struct ServerProcess {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl ServerProcess {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a server whose config file ends with `extra` (more top-level keys).
    pub fn start_with(extra: &str) -> Self {
        let dir = short_tempdir();
        let socket = dir.path().join("private/admin.sock");
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\n{extra}",
                dir.path().join("data").display(),
                socket.display()
            ),
        )
        .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let server = Self { child, dir, socket };
        wait_for_socket(&server.socket, || server.log());
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs a management subcommand against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.socket, args)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until something accepts on `socket` (the server binds it once its CA is ready).
pub fn wait_for_socket(socket: &Path, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("server did not open {} in time; log:\n{}", socket.display(), log());
}

/// Runs the binary with `args` and `--admin-socket socket` (which belongs to the leaf
/// subcommand, so it goes last).
pub fn cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).arg("--admin-socket").arg(socket).output().unwrap()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// The command succeeded; its stdout.
#[track_caller]
pub fn ok(output: Output) -> String {
    assert!(output.status.success(), "command failed: {}", stderr(&output));
    stdout(&output)
}

/// Fails with a one-line error on stderr that mentions `needle`, and nothing on stdout.
#[track_caller]
pub fn fails(output: Output, needle: &str) {
    let err = stderr(&output);
    assert!(!output.status.success(), "command should fail; stdout: {}", stdout(&output));
    assert!(err.contains(needle), "stderr {err:?} should mention {needle:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error expected: {err:?}");
    assert!(err.starts_with("tessera-server: "), "{err:?}");
    assert!(output.stdout.is_empty());
}

/// The JSON document a `--output json` command printed.
#[track_caller]
pub fn json(output: Output) -> serde_json::Value {
    let text = ok(output);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// The value of a `Label: value` line.
#[track_caller]
pub fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines().find_map(|line| line.strip_prefix(label)).unwrap_or_else(|| panic!("no {label:?} in {text:?}")).trim()
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}
