//! The real `tessera-server` binary: `run` in a child process, the token and entry
//! subcommands against it (bundle, agent and mint commands: `cli_bundle.rs`, `cli_agent.rs`,
//! `cli_mint.rs`), bad input, a bad config, `kill -9` durability, and (as root) a
//! connection from another uid being refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tessera-server");
const AGENT: &str = "spiffe://example.org/tessera/agent/join_token/t1";

/// A server child process in its own temporary directory; killed on drop.
struct ServerProcess {
    child: Child,
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
}

impl ServerProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("private/admin.sock");
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\n",
                dir.path().join("data").display(),
                socket.display()
            ),
        )
        .unwrap();
        let child = spawn(&config, &dir.path().join("server.log"));
        let server = Self { child, dir, config, socket };
        server.wait_ready();
        server
    }

    fn restart(&mut self) {
        self.child = spawn(&self.config, &self.dir.path().join("server2.log"));
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not open {} in time; log:\n{}", self.socket.display(), self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs a management subcommand against this server.
    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.socket, args)
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn cli(socket: &Path, args: &[&str]) -> Output {
    // `--admin-socket` belongs to the leaf subcommand, so it goes last.
    Command::new(BIN).args(args).arg("--admin-socket").arg(socket).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[track_caller]
fn ok(output: Output) -> String {
    assert!(output.status.success(), "command failed: {}", stderr(&output));
    stdout(&output)
}

/// Fails with a one-line error on stderr that mentions `needle`, and nothing on stdout.
#[track_caller]
fn fails(output: Output, needle: &str) {
    let err = stderr(&output);
    assert!(!output.status.success(), "command should fail; stdout: {}", stdout(&output));
    assert!(err.contains(needle), "stderr {err:?} should mention {needle:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error expected: {err:?}");
    assert!(output.stdout.is_empty());
}

fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines().find_map(|line| line.strip_prefix(label)).unwrap_or_else(|| panic!("no {label:?} in {text:?}")).trim()
}

#[test]
fn management_commands_against_a_running_server() {
    let server = ServerProcess::start();

    assert!(ok(server.cli(&["healthcheck"])).contains("healthy"));

    // Tokens.
    let token = ok(server.cli(&["token", "generate"]));
    assert_eq!(field(&token, "Token: ").len(), 36);
    let aliased = ok(server.cli(&["token", "generate", "--spiffe-id", "spiffe://example.org/node", "--ttl", "60"]));
    assert!(!field(&aliased, "Entry ID: ").is_empty());
    fails(server.cli(&["token", "generate", "--ttl", "0"]), "--ttl");

    // Entry create, then show with each filter.
    let created = ok(server.cli(&[
        "entry",
        "create",
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "spiffe://example.org/web",
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:path:/usr/bin/web",
        "--x509-svid-ttl",
        "300",
        "--dns-name",
        "web.example.org",
        "--hint",
        "web",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    ]));
    let web_id = field(&created, "Entry ID: ").to_owned();
    assert!(created.contains("Selector: unix:path:/usr/bin/web"));
    assert!(created.contains("Expires at: 2099-01-01T00:00:00Z"));
    let db = ok(server.cli(&[
        "entry",
        "create",
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "spiffe://example.org/db",
        "--selector",
        "unix:uid:1001",
        "--entry-id",
        "db-entry",
    ]));
    assert_eq!(field(&db, "Entry ID: "), "db-entry");

    let shown = ok(server.cli(&["entry", "show", "--entry-id", &web_id]));
    assert!(shown.starts_with("Found 1 entry"), "{shown}");
    assert!(ok(server.cli(&["entry", "show"])).starts_with("Found 3 entries")); // + the alias
    let by_spiffe = ok(server.cli(&["entry", "show", "--spiffe-id", "spiffe://example.org/db"]));
    assert_eq!(field(&by_spiffe, "Entry ID: "), "db-entry");
    assert!(ok(server.cli(&["entry", "show", "--parent-id", AGENT])).starts_with("Found 2 entries"));
    let by_selector = ok(server.cli(&["entry", "show", "--selector", "unix:uid:1000"]));
    assert!(by_selector.starts_with("Found 1 entry"));
    assert_eq!(field(&by_selector, "Entry ID: "), web_id);

    // JSON output parses.
    let json: serde_json::Value =
        serde_json::from_str(&ok(server.cli(&["entry", "show", "--entry-id", "db-entry", "--output", "json"])))
            .unwrap();
    assert_eq!(json["entries"][0]["spiffe_id"], "spiffe://example.org/db");
    assert_eq!(json["entries"][0]["selectors"][0], "unix:uid:1001");
    let count: serde_json::Value =
        serde_json::from_str(&ok(server.cli(&["entry", "count", "--output", "json"]))).unwrap();
    assert_eq!(count["count"], 3);
    let token: serde_json::Value =
        serde_json::from_str(&ok(server.cli(&["token", "generate", "--output", "json"]))).unwrap();
    assert_eq!(token["token"].as_str().unwrap().len(), 36);

    // Update, delete, count.
    let updated =
        ok(server.cli(&["entry", "update", "--entry-id", "db-entry", "--hint", "database", "--jwt-svid-ttl", "60"]));
    assert_eq!(field(&updated, "Hint: "), "database");
    assert_eq!(field(&updated, "JWT-SVID TTL: "), "60s");
    assert_eq!(field(&updated, "SPIFFE ID: "), "spiffe://example.org/db");
    assert!(ok(server.cli(&["entry", "delete", "--entry-id", "db-entry"])).contains("db-entry"));
    assert_eq!(ok(server.cli(&["entry", "count"])).trim(), "2 registration entries");

    // Agents: none yet.
    assert_eq!(ok(server.cli(&["agent", "list"])).trim(), "Found 0 attested agents");
    let agents: serde_json::Value =
        serde_json::from_str(&ok(server.cli(&["agent", "list", "--output", "json"]))).unwrap();
    assert_eq!(agents["agents"], serde_json::json!([]));
    fails(server.cli(&["agent", "show", "--spiffe-id", AGENT]), "not found");
    fails(server.cli(&["agent", "evict", "--spiffe-id", "not-an-id"]), "invalid spiffe_id");

    // Bad input: each fails with one line naming the field.
    let create = |spiffe_id: &str, parent_id: &str, extra: &[&str]| {
        let mut args = vec!["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent_id];
        args.extend_from_slice(extra);
        server.cli(&args)
    };
    fails(create("web", AGENT, &["--selector", "unix:uid:1"]), "invalid spiffe_id");
    fails(create("spiffe://other.org/web", AGENT, &["--selector", "unix:uid:1"]), "trust domain");
    fails(create("spiffe://example.org/x", "spiffe://other.org/a", &["--selector", "unix:uid:1"]), "invalid parent_id");
    fails(create("spiffe://example.org/x", AGENT, &["--selector", "nocolon"]), "--selector");
    fails(create("spiffe://example.org/x", AGENT, &[]), "--selector");
    fails(
        create("spiffe://example.org/x", AGENT, &["--selector", "unix:uid:1", "--x509-svid-ttl", "0"]),
        "--x509-svid-ttl",
    );
    fails(
        create(
            "spiffe://example.org/web",
            AGENT,
            &["--selector", "unix:uid:1000", "--selector", "unix:path:/usr/bin/web"],
        ),
        "already exists",
    );
    fails(
        server.cli(&["entry", "create", "--spiffe-id", "spiffe://example.org/x", "--selector", "a:b"]),
        "--parent-id",
    );
    fails(server.cli(&["entry", "create", "--parent-id", AGENT, "--selector", "a:b"]), "--spiffe-id");
    fails(server.cli(&["entry", "show", "--entry-id", "nope"]), "\"nope\" not found");
    fails(server.cli(&["entry", "update", "--entry-id", "nope", "--hint", "x"]), "\"nope\" not found");
    fails(server.cli(&["entry", "delete", "--entry-id", "nope"]), "\"nope\" not found");
}

#[test]
fn kill_9_right_after_entry_create_loses_nothing() {
    let mut server = ServerProcess::start();
    let created = ok(server.cli(&[
        "entry",
        "create",
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "spiffe://example.org/durable",
        "--selector",
        "unix:uid:7",
    ]));
    let id = field(&created, "Entry ID: ").to_owned();
    server.kill9();
    // The socket file stays behind after SIGKILL; the restarted server replaces it.
    assert!(server.socket.exists());
    server.restart();
    let shown = ok(server.cli(&["entry", "show", "--entry-id", &id]));
    assert_eq!(field(&shown, "SPIFFE ID: "), "spiffe://example.org/durable");
}

#[test]
fn healthcheck_without_a_server_fails_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    fails(cli(&socket, &["healthcheck"]), "cannot connect to admin socket");
    fails(cli(&socket, &["entry", "count"]), &socket.display().to_string());
}

#[test]
fn bad_config_exits_before_opening_any_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("private/admin.sock");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "admin_socket = \"{}\"\ndata_dir = \"{}\"\nca_ttl = \"soon\"\n",
            socket.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let output = Command::new(BIN).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("bad.toml") && err.contains("ca_ttl"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!socket.exists() && !socket.parent().unwrap().exists());

    let missing = dir.path().join("missing.toml");
    let output = Command::new(BIN).args(["run", "--config"]).arg(&missing).output().unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("missing.toml"));
}

#[test]
fn another_uid_is_refused() {
    if rustix::process::geteuid().as_raw() != 0 {
        println!("skipped: refusing another uid needs root to run a client as uid 65534");
        return;
    }
    let server = ServerProcess::start();
    // Open the path up so that only the peer credential check stands in the way.
    for dir in [server.dir.path(), server.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&server.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = Command::new(BIN)
        .args(["healthcheck", "--admin-socket"])
        .arg(&server.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!output.status.success(), "uid 65534 must be refused: {}", stdout(&output));
    assert!(stderr(&output).contains("closed the connection"), "{}", stderr(&output));
    // Root (the server's own uid here) is still served.
    ok(server.cli(&["healthcheck"]));
    assert!(server.log().contains("admin connection refused"), "{}", server.log());
}
