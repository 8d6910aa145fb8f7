//! The agent configuration against the interface contract: defaults, a full file, and one test
//! per kind of bad input, each checking that the one-line error names the file and key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tessera_agent::config::{self, AGENT_KEYS, AgentConfig, ConfigError, LogFormat, LogLevel};

/// The agent block of interface.md, verbatim.
const INTERFACE_MD_EXAMPLE: &str = r#"
trust_domain = "example.org"
server_address = "127.0.0.1:8081"
data_dir = ".tessera/agent"                        # agent key, agent SVID, cached bundle
socket_path = "/tmp/tessera-agent/public/api.sock" # Workload API (and SDS, when built)
admin_socket = "/tmp/tessera-agent/private/admin.sock"
trust_bundle_path = ""                             # PEM bundle used to authenticate the server on first contact
insecure_bootstrap = false                         # trust the server on first use (tests and demos only)
join_token = ""                                    # also --join-token
log_level = "info"
log_format = "text"

[health]
bind_address = ""
[metrics]
bind_address = ""
"#;

/// Every key set to a value other than its default.
const FULL_EXAMPLE: &str = r#"
trust_domain = "prod.example.com"
server_address = "tessera-server.prod.example.com:443"
data_dir = "/var/lib/tessera-agent"
socket_path = "/run/spire/sockets/agent.sock"
admin_socket = "/run/tessera-agent/admin.sock"
trust_bundle_path = "/etc/tessera/bootstrap.pem"
insecure_bootstrap = false
join_token = "3f1c6c1e-2b7a-4c47-9a55-0d3b1f1e2a9c"
log_level = "trace"
log_format = "json"
max_sha256_file_size = "64MiB"

[health]
bind_address = "127.0.0.1:8088"

[metrics]
bind_address = "0.0.0.0:9988"

[audit]
enabled = false
path = "-"
"#;

/// The keys [`FULL_EXAMPLE`] cannot hold: x509pop attestation excludes a join token.
const X509POP_EXAMPLE: &str = r#"
[node_attestor.x509pop]
certificate_path = "/etc/tessera/node.pem"
private_key_path = "/etc/tessera/node.key"
"#;

/// The k8s_psat table, which excludes a join token and the other attestors.
const K8S_PSAT_EXAMPLE: &str = r#"
[node_attestor.k8s_psat]
token_path = "/run/tessera/psat/token"
"#;

/// The oidc table, which excludes a join token and the other attestors.
const OIDC_EXAMPLE: &str = r#"
[node_attestor.oidc]
token_path = "/run/idp/node-token"
"#;

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load_ok(text: &str) -> AgentConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, text);
    config::load(Some(&path)).unwrap()
}

/// Loads `text` from a file and returns the error, checking it is one line naming the file.
fn load_err(text: &str) -> (ConfigError, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, text);
    let err = config::load(Some(&path)).expect_err("the config should be refused");
    let message = err.to_string();
    assert!(!message.contains('\n'), "not one line: {message}");
    assert!(message.contains(&path.display().to_string()), "no file in: {message}");
    assert_eq!(err.file(), path);
    (err, message)
}

/// The error names `key` in the form `key <key>`.
fn assert_key_error(text: &str, key: &str, also: &[&str]) -> String {
    let (err, message) = load_err(text);
    assert_eq!(err.key(), Some(key), "{message}");
    assert!(message.contains(&format!("key {key}")), "key {key} not in: {message}");
    for part in also {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
    message
}

#[test]
fn defaults_are_those_of_interface_md() {
    let config = config::load(None).unwrap();
    assert_eq!(config.trust_domain.name(), "example.org");
    assert_eq!(config.server_address, "127.0.0.1:8081");
    assert_eq!(config.server_host_port().unwrap(), ("127.0.0.1", 8081));
    assert_eq!(config.data_dir, PathBuf::from(".tessera/agent"));
    assert_eq!(config.socket_path, PathBuf::from("/tmp/tessera-agent/public/api.sock"));
    assert_eq!(config.admin_socket, PathBuf::from("/tmp/tessera-agent/private/admin.sock"));
    assert_eq!(config.trust_bundle_path, None);
    assert!(!config.insecure_bootstrap);
    assert_eq!(config.join_token, None);
    assert_eq!(config.log_level, LogLevel::Info);
    assert_eq!(config.log_format, LogFormat::Text);
    assert_eq!(config.health.bind_address, None);
    assert_eq!(config.metrics.bind_address, None);
    // Added by issue 4, not in interface.md's table.
    assert_eq!(config.max_sha256_file_size, 256 * 1024 * 1024);
    assert!(config.warnings().is_empty());
    // The CLI clients default to the same Workload API socket.
    assert_eq!(config.socket_path, Path::new(tessera_agent::cli::DEFAULT_SOCKET_PATH));
}

#[test]
fn interface_md_example_is_the_defaults() {
    assert_eq!(load_ok(INTERFACE_MD_EXAMPLE), AgentConfig::default());
}

#[test]
fn empty_file_is_the_defaults() {
    assert_eq!(load_ok("# nothing set\n"), AgentConfig::default());
}

#[test]
fn full_example_parses_to_every_value() {
    let config = load_ok(FULL_EXAMPLE);
    assert_eq!(config.trust_domain.name(), "prod.example.com");
    assert_eq!(config.server_address, "tessera-server.prod.example.com:443");
    assert_eq!(config.server_host_port().unwrap(), ("tessera-server.prod.example.com", 443));
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/tessera-agent"));
    assert_eq!(config.socket_path, PathBuf::from("/run/spire/sockets/agent.sock"));
    assert_eq!(config.admin_socket, PathBuf::from("/run/tessera-agent/admin.sock"));
    assert_eq!(config.trust_bundle_path, Some(PathBuf::from("/etc/tessera/bootstrap.pem")));
    assert!(!config.insecure_bootstrap);
    assert_eq!(config.join_token.as_deref(), Some("3f1c6c1e-2b7a-4c47-9a55-0d3b1f1e2a9c"));
    assert_eq!(config.log_level, LogLevel::Trace);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.max_sha256_file_size, 64 * 1024 * 1024);
    assert_eq!(config.health.bind_address, Some("127.0.0.1:8088".parse().unwrap()));
    assert_eq!(config.metrics.bind_address, Some("0.0.0.0:9988".parse().unwrap()));
    assert!(!config.audit.enabled);
    assert_eq!(config.audit.path, Some(PathBuf::from("-")));
}

#[test]
fn full_example_sets_every_listed_key() {
    fn leaves(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(inner) => leaves(&path, inner, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let mut in_example = BTreeSet::new();
    leaves("", &FULL_EXAMPLE.parse::<toml::Table>().unwrap(), &mut in_example);
    for example in [X509POP_EXAMPLE, K8S_PSAT_EXAMPLE, OIDC_EXAMPLE] {
        leaves("", &example.parse::<toml::Table>().unwrap(), &mut in_example);
    }
    let listed: BTreeSet<String> = AGENT_KEYS.iter().map(|key| (*key).to_owned()).collect();
    assert_eq!(in_example, listed);
}

#[test]
fn insecure_bootstrap_alone_is_accepted_with_a_warning() {
    let config = load_ok("insecure_bootstrap = true\n");
    assert!(config.insecure_bootstrap);
    assert_eq!(config.warnings().len(), 1);
}

#[test]
fn sha256_size_limit_forms() {
    assert_eq!(load_ok("max_sha256_file_size = 1048576\n").max_sha256_file_size, 1 << 20);
    assert_eq!(load_ok("max_sha256_file_size = \"1GiB\"\n").max_sha256_file_size, 1 << 30);
    assert_eq!(load_ok("max_sha256_file_size = 0\n").max_sha256_file_size, 0);
}

#[test]
fn relative_paths_are_kept_as_written() {
    let config = load_ok("data_dir = \"state\"\nsocket_path = \"run/api.sock\"\ntrust_bundle_path = \"b.pem\"\n");
    assert_eq!(config.data_dir, PathBuf::from("state"));
    assert_eq!(config.socket_path, PathBuf::from("run/api.sock"));
    assert_eq!(config.trust_bundle_path, Some(PathBuf::from("b.pem")));
}

#[test]
fn unknown_top_level_key() {
    let (err, message) = load_err("server_adress = \"127.0.0.1:8081\"\n");
    assert_eq!(err.key(), Some("server_adress"));
    assert!(message.contains("unknown key \"server_adress\" on line 1"), "{message}");
    assert!(message.contains("`server_address`"), "expected keys missing: {message}");
}

#[test]
fn unknown_nested_key() {
    let (err, message) = load_err("[health]\nbind_adress = \"127.0.0.1:8080\"\n");
    assert_eq!(err.key(), Some("health.bind_adress"));
    assert!(message.contains("unknown key \"health.bind_adress\" on line 2"), "{message}");
    assert!(message.contains("`bind_address`"), "{message}");
}

#[test]
fn bad_trust_domain() {
    assert_key_error("trust_domain = \"Example.org\"\n", "trust_domain", &["invalid trust domain \"Example.org\""]);
}

#[test]
fn bad_enum_value() {
    assert_key_error("log_level = \"verbose\"\n", "log_level", &["invalid value \"verbose\"", "\"trace\""]);
    assert_key_error("log_format = \"xml\"\n", "log_format", &["\"text\" or \"json\""]);
}

#[test]
fn bad_server_address() {
    for bad in ["127.0.0.1", "127.0.0.1:0", "::1:8081", "https://server:8081", ""] {
        assert_key_error(
            &format!("server_address = \"{bad}\"\n"),
            "server_address",
            &[&format!("invalid server address {bad:?}"), "host:port"],
        );
    }
}

#[test]
fn bad_socket_address() {
    assert_key_error(
        "[metrics]\nbind_address = \"localhost:9090\"\n",
        "metrics.bind_address",
        &["invalid socket address \"localhost:9090\""],
    );
}

#[test]
fn bad_byte_size() {
    assert_key_error("max_sha256_file_size = \"lots\"\n", "max_sha256_file_size", &["invalid size \"lots\"", "256MiB"]);
    assert_key_error("max_sha256_file_size = -1\n", "max_sha256_file_size", &["must not be negative"]);
    assert_key_error("max_sha256_file_size = 1.5\n", "max_sha256_file_size", &["invalid type: floating point"]);
}

#[test]
fn wrong_type() {
    assert_key_error(
        "insecure_bootstrap = \"yes\"\n",
        "insecure_bootstrap",
        &["invalid type: string \"yes\"", "boolean"],
    );
    assert_key_error("server_address = 8081\n", "server_address", &["invalid type: integer `8081`", "host:port"]);
    assert_key_error("health = \"127.0.0.1:8080\"\n", "health", &["expected a table"]);
}

#[test]
fn insecure_bootstrap_with_trust_bundle() {
    assert_key_error(
        "insecure_bootstrap = true\ntrust_bundle_path = \"/etc/tessera/bundle.pem\"\n",
        "insecure_bootstrap",
        &["trust_bundle_path", "/etc/tessera/bundle.pem"],
    );
}

#[test]
fn bad_join_token() {
    assert_key_error("join_token = \"a/b\"\n", "join_token", &["invalid join token"]);
}

#[test]
fn same_socket_twice() {
    assert_key_error(
        "socket_path = \"/tmp/t/api.sock\"\nadmin_socket = \"/tmp/t/api.sock\"\n",
        "admin_socket",
        &["must differ from socket_path"],
    );
}

#[test]
fn empty_required_path() {
    assert_key_error("socket_path = \"\"\n", "socket_path", &["must not be empty"]);
    assert_key_error("data_dir = \"\"\n", "data_dir", &["must not be empty"]);
}

#[test]
fn invalid_toml_syntax() {
    let (err, message) = load_err("[health\nbind_address = \"\"\n");
    assert!(matches!(err, ConfigError::Syntax { line: 1, .. }), "{err:?}");
    assert!(message.contains("invalid TOML at line 1"), "{message}");
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let message = config::load(Some(&path)).unwrap_err().to_string();
    assert_eq!(message, format!("cannot read config file {}: No such file or directory", path.display()));
}

#[test]
fn unreadable_file() {
    // A directory cannot be read as a file, even by root (a 0000 file can).
    let dir = tempfile::tempdir().unwrap();
    let message = config::load(Some(dir.path())).unwrap_err().to_string();
    assert!(message.starts_with(&format!("cannot read config file {}: ", dir.path().display())), "{message}");
    assert!(!message.contains('\n'));
}

#[test]
fn x509pop_attestation_loads_and_excludes_a_join_token() {
    let config = load_ok(X509POP_EXAMPLE);
    let x509pop = config.node_attestor.x509pop.unwrap();
    assert_eq!(x509pop.certificate_path, PathBuf::from("/etc/tessera/node.pem"));
    assert_eq!(x509pop.private_key_path, PathBuf::from("/etc/tessera/node.key"));

    let dir = tempfile::tempdir().unwrap();
    let both = write(&dir, &format!("join_token = \"abc\"\n{X509POP_EXAMPLE}"));
    let error = tessera_agent::config::load(Some(&both)).unwrap_err();
    assert_eq!(error.key(), Some("join_token"));
    assert!(error.to_string().contains("[node_attestor.x509pop]"), "{error}");

    let missing_key = write(&dir, "[node_attestor.x509pop]\ncertificate_path = \"/etc/tessera/node.pem\"\n");
    let error = tessera_agent::config::load(Some(&missing_key)).unwrap_err();
    assert_eq!(error.key(), Some("node_attestor.x509pop.private_key_path"), "{error}");
}

#[test]
fn token_attestors_load_and_exclude_every_other_way_to_attest() {
    let config = load_ok(K8S_PSAT_EXAMPLE);
    assert_eq!(config.node_attestor.k8s_psat.unwrap().token_path, PathBuf::from("/run/tessera/psat/token"));
    let config = load_ok("[node_attestor.k8s_psat]\n");
    assert_eq!(
        config.node_attestor.k8s_psat.unwrap().token_path,
        PathBuf::from(tessera_agent::config::DEFAULT_K8S_PSAT_TOKEN_PATH)
    );
    let config = load_ok(OIDC_EXAMPLE);
    assert_eq!(config.node_attestor.oidc.unwrap().token_path, PathBuf::from("/run/idp/node-token"));

    let dir = tempfile::tempdir().unwrap();
    for (text, key, names) in [
        (format!("join_token = \"abc\"\n{OIDC_EXAMPLE}"), "join_token", "[node_attestor.oidc]"),
        (format!("{X509POP_EXAMPLE}{K8S_PSAT_EXAMPLE}"), "node_attestor.k8s_psat", "[node_attestor.x509pop]"),
        (format!("{K8S_PSAT_EXAMPLE}{OIDC_EXAMPLE}"), "node_attestor.oidc", "[node_attestor.k8s_psat]"),
        ("[node_attestor.oidc]\n".to_owned(), "node_attestor.oidc.token_path", "missing"),
        ("[node_attestor.k8s_psat]\ntoken_path = 5\n".to_owned(), "node_attestor.k8s_psat.token_path", "token_path"),
    ] {
        let path = write(&dir, &text);
        let error = tessera_agent::config::load(Some(&path)).unwrap_err();
        assert_eq!(error.key(), Some(key), "{text}: {error}");
        let message = error.to_string();
        assert!(message.contains(names) && message.contains(&path.display().to_string()), "{message}");
    }
}
