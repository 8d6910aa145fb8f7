//! The server configuration against the interface contract: defaults, a full file, and one
//! test per kind of bad input, each checking that the one-line error names the file and key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_server::config::{
    self, ConfigError, DatastoreKind, KeyType, LogFormat, LogLevel, SERVER_KEYS, ServerConfig, UpstreamAuthorityKind,
};

/// The server block of interface.md, verbatim.
const INTERFACE_MD_EXAMPLE: &str = r#"
trust_domain = "example.org"
data_dir = ".tessera/server"                       # keys, sled database
bind_address = "127.0.0.1:8081"                    # agent-facing gRPC over TLS
admin_socket = "/tmp/tessera-server/private/admin.sock"  # operator API (0700 dir)
log_level = "info"                                 # error|warn|info|debug|trace
log_format = "text"                                # text|json
ca_key_type = "ec-p256"                            # ec-p256|ec-p384|rsa-2048
ca_ttl = "24h"
jwt_key_type = "ec-p256"                           # ec-p256|rsa-2048 (RS256 for Azure)
jwt_issuer = ""                                    # sets `iss` on JWT-SVIDs when non-empty
default_x509_svid_ttl = "1h"
default_jwt_svid_ttl = "5m"
agent_ttl = "1h"

[datastore]
kind = "sled"                                      # sled (embedded default); later: postgres
# path defaults to <data_dir>/datastore

[health]
bind_address = ""                                  # e.g. "127.0.0.1:8080": GET /live, GET /ready

[metrics]
bind_address = ""                                  # e.g. "127.0.0.1:9090": GET /metrics (Prometheus text)
"#;

/// Every key set to a value other than its default.
const FULL_EXAMPLE: &str = r#"
trust_domain = "prod.example.com"
data_dir = "/var/lib/tessera-server"
bind_address = "0.0.0.0:18081"
admin_socket = "/run/tessera-server/admin.sock"
log_level = "debug"
log_format = "json"
ca_key_type = "rsa-2048"
ca_ttl = "7d"
jwt_key_type = "rsa-2048"
jwt_issuer = "https://oidc.prod.example.com"
default_x509_svid_ttl = "2h"
default_jwt_svid_ttl = "90s"
agent_ttl = "12h"
agent_svid_rate_limit = 250
max_concurrent_attestations = 3
max_concurrent_signing = 5
overload_wait = "300ms"

[audit]
enabled = true
path = "/var/log/tessera/server-audit.log"

[datastore]
kind = "sled"
path = "/srv/tessera/db"

[health]
bind_address = "127.0.0.1:8080"

[metrics]
bind_address = "[::1]:9090"

[upstream_authority]
kind = "disk"
cert_file = "/etc/tessera/upstream.crt"
key_file = "/etc/tessera/upstream.key"
bundle_file = "/etc/tessera/upstream-roots.pem"

[oidc]
bind_address = "127.0.0.1:8444"

[federation.bundle_endpoint]
bind_address = "0.0.0.0:8443"
profile = "https_web"
cert_path = "/etc/tessera/endpoint.crt"
key_path = "/etc/tessera/endpoint.key"
refresh_hint = "2m"

[[federation.federates_with]]
trust_domain = "partner.example.org"
bundle_endpoint_url = "https://tessera.partner.example.org:8443/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://partner.example.org/tessera/server"
trust_bundle_path = "/etc/tessera/partner.json"

[[federation.federates_with]]
trust_domain = "web.example.net"
bundle_endpoint_url = "https://bundles.example.net/"
profile = "https_web"
ca_bundle_path = "/etc/tessera/web-roots.pem"

[node_attestor.x509pop]
ca_bundle_path = "/etc/tessera/node-ca.pem"
agent_id_from = "subject_cn"

[[node_attestor.k8s_psat.cluster]]
name = "prod-eu"
service_account_allow_list = ["tessera:tessera-agent", "tessera-canary:tessera-agent"]
single_use = true
issuer = "https://kubernetes.default.svc.cluster.local"
jwks_uri = "https://10.96.0.1/openid/v1/jwks"
ca_bundle_path = "/etc/tessera/kube-ca.crt"
allowed_algorithms = ["RS256"]
audience = "tessera-server"
leeway = "10s"
max_token_lifetime = "2h"
require_jti = false

[[node_attestor.k8s_psat.cluster]]
name = "edge"
service_account_allow_list = ["tessera:tessera-agent"]
issuer = "https://oidc.edge.example.com"
jwks = '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "edge-1", "x": "0gcbgdGUyKc7UjwpOKT-3AafpIoAmpdS7SIP7jyy7Yo", "y": "bTstaiQUnJtWW8bFibM1KpG6EYtuN39V3bnZY_R6uNc"}]}'
audience = "tessera-server"

[[node_attestor.oidc.issuer]]
issuer = "https://accounts.google.com"
preset = "generic"
jwks_uri = "https://www.googleapis.com/oauth2/v3/certs"
ca_bundle_path = "/etc/tessera/google-roots.pem"
allowed_algorithms = ["RS256"]
audience = "https://tessera.prod.example.com/nodes"
leeway = "20s"
max_token_lifetime = "1h"
require_jti = false
immutable_claims = ["google.compute_engine.project_id", "google.compute_engine.instance_id"]

[[node_attestor.oidc.issuer]]
issuer = "https://nodes.example.com"
jwks = '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "n-1", "x": "0gcbgdGUyKc7UjwpOKT-3AafpIoAmpdS7SIP7jyy7Yo", "y": "bTstaiQUnJtWW8bFibM1KpG6EYtuN39V3bnZY_R6uNc"}]}'
audience = "tessera-nodes"

[[node_attestor.oidc.policy]]
name = "gce-nodes"
issuer = "https://accounts.google.com"
condition = 'claims.google.compute_engine.project_id == "prod-123"'
spiffe_id = "spiffe://prod.example.com/tessera/agent/oidc/gce/{google.compute_engine.instance_id}"
selector_claims = ["google.compute_engine.zone", "google.compute_engine.project_id"]
single_use = false
[token_exchange]
bind_address = "0.0.0.0:8445"
profile = "https_web"
cert_path = "/etc/tessera/exchange.crt"
key_path = "/etc/tessera/exchange.key"
max_concurrent_requests = 32
request_timeout = "5s"

[[token_exchange.issuer]]
issuer = "https://token.actions.githubusercontent.com"
preset = "github_actions"
jwks_uri = "https://token.actions.githubusercontent.com/.well-known/jwks"
ca_bundle_path = "/etc/tessera/github-roots.pem"
allowed_algorithms = ["RS256"]
audience = "https://tessera.prod.example.com"
leeway = "30s"
max_token_lifetime = "10m"
require_jti = true
immutable_claims = ["actor_id"]

[[token_exchange.issuer]]
issuer = "https://kubernetes.default.svc.cluster.local"
preset = "kubernetes"
jwks = '{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k8s-1", "x": "0gcbgdGUyKc7UjwpOKT-3AafpIoAmpdS7SIP7jyy7Yo", "y": "bTstaiQUnJtWW8bFibM1KpG6EYtuN39V3bnZY_R6uNc"}]}'
audience = "tessera"
require_jti = false

[[token_exchange.policy]]
name = "deploy"
issuer = "https://token.actions.githubusercontent.com"
spiffe_id = "spiffe://prod.example.com/github/{repository_owner_id}/{repository_id}"
condition = 'claims.repository_id == "42" && claims.ref == "refs/heads/main"'
x509_svid_ttl = "15m"
jwt_svid_ttl = "2m"
"#;

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("server.toml");
    std::fs::write(&path, text).unwrap();
    path
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
    assert_eq!(config.data_dir, PathBuf::from(".tessera/server"));
    assert_eq!(config.bind_address, "127.0.0.1:8081".parse::<SocketAddr>().unwrap());
    assert_eq!(config.admin_socket, PathBuf::from("/tmp/tessera-server/private/admin.sock"));
    assert_eq!(config.log_level, LogLevel::Info);
    assert_eq!(config.log_format, LogFormat::Text);
    assert_eq!(config.ca_key_type, KeyType::EcP256);
    assert_eq!(config.ca_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(config.jwt_key_type, KeyType::EcP256);
    assert_eq!(config.jwt_issuer, None);
    assert_eq!(config.default_x509_svid_ttl, Duration::from_secs(3600));
    assert_eq!(config.default_jwt_svid_ttl, Duration::from_secs(300));
    assert_eq!(config.agent_ttl, Duration::from_secs(3600));
    assert_eq!(config.datastore.kind, DatastoreKind::Sled);
    assert_eq!(config.datastore.path, None);
    assert_eq!(config.datastore_path(), Path::new(".tessera/server/datastore"));
    assert_eq!(config.health.bind_address, None);
    assert_eq!(config.metrics.bind_address, None);
    assert_eq!(config.upstream_authority, None);
    assert!(config.warnings().is_empty());
    // The CLI clients default to the same admin socket.
    assert_eq!(config.admin_socket, Path::new(tessera_server::cli::DEFAULT_ADMIN_SOCKET));
}

#[test]
fn interface_md_example_is_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, INTERFACE_MD_EXAMPLE);
    assert_eq!(config::load(Some(&path)).unwrap(), ServerConfig::default());
}

#[test]
fn empty_file_is_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "# nothing set\n");
    assert_eq!(config::load(Some(&path)).unwrap(), ServerConfig::default());
}

#[test]
fn full_example_parses_to_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, FULL_EXAMPLE);
    let config = config::load(Some(&path)).unwrap();
    assert_eq!(config.trust_domain.name(), "prod.example.com");
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/tessera-server"));
    assert_eq!(config.bind_address, "0.0.0.0:18081".parse::<SocketAddr>().unwrap());
    assert_eq!(config.admin_socket, PathBuf::from("/run/tessera-server/admin.sock"));
    assert_eq!(config.log_level, LogLevel::Debug);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.ca_key_type, KeyType::Rsa2048);
    assert_eq!(config.ca_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(config.jwt_key_type, KeyType::Rsa2048);
    assert_eq!(config.jwt_issuer.as_deref(), Some("https://oidc.prod.example.com"));
    assert_eq!(config.default_x509_svid_ttl, Duration::from_secs(7200));
    assert_eq!(config.default_jwt_svid_ttl, Duration::from_secs(90));
    assert_eq!(config.agent_ttl, Duration::from_secs(12 * 3600));
    assert_eq!(config.agent_svid_rate_limit, 250);
    assert_eq!((config.max_concurrent_attestations, config.max_concurrent_signing), (3, 5));
    assert_eq!(config.overload_wait, std::time::Duration::from_millis(300));
    assert!(config.audit.enabled);
    assert_eq!(config.audit.path, Some(PathBuf::from("/var/log/tessera/server-audit.log")));
    assert_eq!(config.datastore.kind, DatastoreKind::Sled);
    assert_eq!(config.datastore_path(), PathBuf::from("/srv/tessera/db"));
    assert_eq!(config.health.bind_address, Some("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(config.metrics.bind_address, Some("[::1]:9090".parse().unwrap()));
    let upstream = config.upstream_authority.as_ref().unwrap();
    assert_eq!(upstream.kind, UpstreamAuthorityKind::Disk);
    assert_eq!(upstream.cert_file, PathBuf::from("/etc/tessera/upstream.crt"));
    assert_eq!(upstream.key_file, PathBuf::from("/etc/tessera/upstream.key"));
    assert_eq!(upstream.bundle_file, Some(PathBuf::from("/etc/tessera/upstream-roots.pem")));
    assert_eq!(config.oidc.bind_address, Some("127.0.0.1:8444".parse().unwrap()));
    let exchange = &config.token_exchange;
    assert_eq!(exchange.max_concurrent_requests, 32);
    assert_eq!(exchange.request_timeout, Duration::from_secs(5));
    assert_eq!(exchange.issuer.len(), 2);
    assert_eq!(exchange.issuer[0].leeway, Duration::from_secs(30));
    assert_eq!(exchange.issuer[0].max_token_lifetime, Duration::from_secs(600));
    assert!(!exchange.issuer[1].require_jti);
    assert_eq!(exchange.policy[0].x509_svid_ttl, Some(Duration::from_secs(900)));
    assert_eq!(exchange.policy[0].jwt_svid_ttl, Some(Duration::from_secs(120)));
    let clusters = &config.node_attestor.k8s_psat.as_ref().unwrap().cluster;
    assert_eq!((clusters[0].name.as_str(), clusters[0].single_use, clusters[0].require_jti), ("prod-eu", true, false));
    assert_eq!(clusters[0].leeway, Duration::from_secs(10));
    assert_eq!(clusters[0].max_token_lifetime, Duration::from_secs(7200));
    assert_eq!((clusters[1].single_use, clusters[1].require_jti), (false, true), "the defaults");
    assert_eq!(clusters[1].allowed_algorithms, ["RS256", "ES256"]);
    let oidc = config.node_attestor.oidc.as_ref().unwrap();
    assert_eq!(oidc.issuer.len(), 2);
    assert!(!oidc.policy[0].single_use);
    assert_eq!(oidc.policy[0].selector_claims.len(), 2);
    let endpoint = &config.federation.bundle_endpoint;
    assert_eq!(endpoint.refresh_hint, Duration::from_secs(120));
    assert_eq!(endpoint.cert_path, Some(PathBuf::from("/etc/tessera/endpoint.crt")));
    let relationships = &config.federation.federates_with;
    assert_eq!(relationships.len(), 2);
    assert_eq!(relationships[0].endpoint_spiffe_id.as_deref(), Some("spiffe://partner.example.org/tessera/server"));
    assert_eq!(relationships[1].ca_bundle_path, Some(PathBuf::from("/etc/tessera/web-roots.pem")));
    assert!(config.warnings().is_empty());
}

#[test]
fn full_example_sets_every_listed_key() {
    fn leaves(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(inner) => leaves(&path, inner, out),
                // `[[federation.federates_with]]`: the keys of every table, without an index.
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    for item in items.iter().filter_map(toml::Value::as_table) {
                        leaves(&path, item, out);
                    }
                }
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let mut in_example = BTreeSet::new();
    leaves("", &FULL_EXAMPLE.parse::<toml::Table>().unwrap(), &mut in_example);
    let listed: BTreeSet<String> = SERVER_KEYS.iter().map(|key| (*key).to_owned()).collect();
    assert_eq!(in_example, listed);
}

#[test]
fn upstream_authority_without_bundle_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "[upstream_authority]\nkind = \"disk\"\ncert_file = \"ca.pem\"\nkey_file = \"ca.key\"\n");
    let upstream = config::load(Some(&path)).unwrap().upstream_authority.unwrap();
    assert_eq!(upstream.cert_file, PathBuf::from("ca.pem"));
    assert_eq!(upstream.bundle_file, None);
}

#[test]
fn relative_paths_are_kept_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "data_dir = \"state\"\nadmin_socket = \"run/admin.sock\"\n");
    let config = config::load(Some(&path)).unwrap();
    assert_eq!(config.data_dir, PathBuf::from("state"));
    assert_eq!(config.admin_socket, PathBuf::from("run/admin.sock"));
    assert_eq!(config.datastore_path(), PathBuf::from("state/datastore"));
}

#[test]
fn unknown_top_level_key() {
    let (err, message) = load_err("trust_domian = \"example.org\"\n");
    assert_eq!(err.key(), Some("trust_domian"));
    assert!(message.contains("unknown key \"trust_domian\""), "{message}");
    assert!(message.contains("`trust_domain`"), "expected keys missing: {message}");
    assert!(message.contains("on line 1"), "{message}");
}

#[test]
fn unknown_nested_key() {
    let (err, message) = load_err("[health]\nbind_adress = \"127.0.0.1:8080\"\n");
    assert_eq!(err.key(), Some("health.bind_adress"));
    assert!(message.contains("unknown key \"health.bind_adress\""), "{message}");
    assert!(message.contains("`bind_address`"), "{message}");
    assert!(message.contains("on line 2"), "{message}");
}

#[test]
fn unknown_table() {
    let (err, _) = load_err("[datastores]\nkind = \"sled\"\n");
    assert_eq!(err.key(), Some("datastores"));
}

#[test]
fn bad_duration() {
    let message =
        assert_key_error("ca_ttl = \"5 parsecs\"\n", "ca_ttl", &["invalid duration \"5 parsecs\"", "(line 1)"]);
    assert!(message.contains("\"90s\""), "expected form missing: {message}");
}

#[test]
fn duration_without_unit() {
    assert_key_error("agent_ttl = \"90\"\n", "agent_ttl", &["invalid duration \"90\""]);
}

#[test]
fn zero_ttl() {
    assert_key_error("default_x509_svid_ttl = \"0s\"\n", "default_x509_svid_ttl", &["too short"]);
}

#[test]
fn bad_trust_domain() {
    assert_key_error(
        "trust_domain = \"Example.org\"\n",
        "trust_domain",
        &["invalid trust domain \"Example.org\"", "lowercase"],
    );
}

#[test]
fn trust_domain_given_as_spiffe_id() {
    assert_key_error("trust_domain = \"spiffe://example.org\"\n", "trust_domain", &["bare trust domain name"]);
}

#[test]
fn bad_enum_value() {
    assert_key_error(
        "ca_key_type = \"dsa\"\n",
        "ca_key_type",
        &["invalid value \"dsa\"", "\"ec-p256\", \"ec-p384\" or \"rsa-2048\""],
    );
    assert_key_error(
        "log_level = \"verbose\"\n",
        "log_level",
        &["\"error\", \"warn\", \"info\", \"debug\" or \"trace\""],
    );
    assert_key_error("log_format = \"xml\"\n", "log_format", &["\"text\" or \"json\""]);
    assert_key_error("[datastore]\nkind = \"postgres\"\n", "datastore.kind", &["\"sled\""]);
}

#[test]
fn jwt_key_type_is_limited_to_the_contract() {
    assert_key_error("jwt_key_type = \"ec-p384\"\n", "jwt_key_type", &["\"ec-p256\" or \"rsa-2048\""]);
}

#[test]
fn bad_socket_address() {
    assert_key_error(
        "bind_address = \"localhost:8081\"\n",
        "bind_address",
        &["invalid socket address \"localhost:8081\"", "expected an IP address and port"],
    );
    assert_key_error("[metrics]\nbind_address = \"127.0.0.1\"\n", "metrics.bind_address", &["invalid socket address"]);
}

#[test]
fn wrong_type() {
    assert_key_error("ca_ttl = 5\n", "ca_ttl", &["invalid type: integer `5`", "expected a duration"]);
    assert_key_error("log_level = 3\n", "log_level", &["invalid type: integer `3`"]);
    assert_key_error("health = 5\n", "health", &["expected a table"]);
    assert_key_error("[[metrics]]\nbind_address = \"\"\n", "metrics", &["expected a table"]);
    assert_key_error("data_dir = true\n", "data_dir", &["invalid type: boolean `true`"]);
}

#[test]
fn empty_required_path() {
    assert_key_error("data_dir = \"\"\n", "data_dir", &["must not be empty"]);
    assert_key_error("admin_socket = \"\"\n", "admin_socket", &["must not be empty"]);
}

#[test]
fn socket_path_too_long() {
    let long = format!("/tmp/{}/admin.sock", "x".repeat(120));
    assert_key_error(&format!("admin_socket = \"{long}\"\n"), "admin_socket", &["at most 107 bytes"]);
}

#[test]
fn upstream_authority_missing_key() {
    assert_key_error(
        "[upstream_authority]\nkind = \"disk\"\ncert_file = \"ca.pem\"\n",
        "upstream_authority.key_file",
        &["is required"],
    );
    assert_key_error(
        "[upstream_authority]\nkind = \"vault\"\ncert_file = \"a\"\nkey_file = \"b\"\n",
        "upstream_authority.kind",
        &["\"disk\""],
    );
}

#[test]
fn listeners_clash() {
    assert_key_error(
        "[health]\nbind_address = \"127.0.0.1:8080\"\n[metrics]\nbind_address = \"127.0.0.1:8080\"\n",
        "metrics.bind_address",
        &["already used by health.bind_address"],
    );
}

#[test]
fn invalid_toml_syntax() {
    let (err, message) = load_err("trust_domain = \"example.org\"\nca_ttl = 1h\n");
    assert!(matches!(err, ConfigError::Syntax { line: 2, .. }), "{err:?}");
    assert!(message.contains("invalid TOML at line 2"), "{message}");
}

#[test]
fn duplicate_key() {
    let (_, message) = load_err("ca_ttl = \"1h\"\nca_ttl = \"2h\"\n");
    assert!(message.contains("duplicate key ca_ttl"), "{message}");
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
fn not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(&path, b"trust_domain = \"\xff\"\n").unwrap();
    let message = config::load(Some(&path)).unwrap_err().to_string();
    assert!(message.starts_with(&format!("cannot read config file {}: ", path.display())), "{message}");
}

#[test]
fn token_node_attestor_errors_name_the_key() {
    let cluster = "[[node_attestor.k8s_psat.cluster]]\nname = \"prod\"\nissuer = \"https://k8s.example\"\n\
                   audience = \"tessera-server\"\nservice_account_allow_list = [\"tessera:tessera-agent\"]\n";
    assert_key_error(
        &cluster.replace("\"prod\"", "\"prod/eu\""),
        "node_attestor.k8s_psat.cluster.name",
        &["\"prod/eu\""],
    );
    assert_key_error(
        &cluster.replace("[\"tessera:tessera-agent\"]", "[]"),
        "node_attestor.k8s_psat.cluster.service_account_allow_list",
        &["at least one service account"],
    );
    assert_key_error(
        &cluster.replace("https://k8s.example", "http://k8s.example"),
        "node_attestor.k8s_psat.cluster.issuer",
        &["OIDC discovery needs an https:// issuer"],
    );
    let (err, message) = load_err(&cluster.replace("audience = \"tessera-server\"\n", ""));
    assert_eq!(err.key(), Some("node_attestor.k8s_psat.cluster[0].audience"), "{message}");
    let oidc = "[[node_attestor.oidc.issuer]]\nissuer = \"https://idp.example\"\naudience = \"nodes\"\n\
                [[node_attestor.oidc.policy]]\nname = \"vms\"\nissuer = \"https://idp.example\"\n\
                condition = 'claims.sub == \"vm-1\"'\nspiffe_id = \"spiffe://example.org/tessera/agent/oidc/{sub}\"\n";
    config::parse(oidc, Path::new("server.toml")).unwrap();
    assert_key_error(
        &oidc.replace("/tessera/agent/oidc/{sub}", "/nodes/{sub}"),
        "node_attestor.oidc.policy.spiffe_id",
        &["policy \"vms\"", "spiffe://example.org/tessera/agent/oidc/"],
    );
    assert_key_error(
        &oidc.replace("claims.sub == \"vm-1\"", "claims.name == \"vm\""),
        "node_attestor.oidc.policy.condition",
        &["pins no immutable claim"],
    );
    assert_key_error(
        &oidc.replace("issuer = \"https://idp.example\"\ncondition", "issuer = \"https://other.example\"\ncondition"),
        "node_attestor.oidc.policy.issuer",
        &["is not the issuer of any [[node_attestor.oidc.issuer]]"],
    );
}
