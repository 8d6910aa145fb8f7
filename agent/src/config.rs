//! Typed configuration of `tessera-agent`.
//!
//! The keys and defaults are those of the interface contract (`interface.md`, "Agent
//! configuration"), plus one key issue 4 calls for, `max_sha256_file_size`. Every key is
//! optional; [`load`]`(None)` returns the embedded defaults without touching the file system.
//!
//! Rules (the same as the server's, `tessera_server::config`):
//! - Unknown keys are errors at every level, and so are values of the wrong type.
//! - Every error is one line naming the file and the dotted key (`health.bind_address`), see
//!   [`ConfigError`].
//! - Paths are kept exactly as written: a relative path is relative to the working directory of
//!   the process (like the default `data_dir = ".tessera/agent"`), never to the config file.
//! - Keys whose documented "unset" value is the empty string (`trust_bundle_path`,
//!   `join_token`, `health.bind_address`, `metrics.bind_address`) are `Option`s: `""` and an
//!   absent key both mean `None`.
//! - `server_address` is `host:port` and stays a string (the host may be a DNS name resolved
//!   at connection time); its form is checked on load, see [`split_host_port`].
//! - `insecure_bootstrap = true` together with a `trust_bundle_path` is an error: the two are
//!   alternative ways to authenticate the server on first contact. Having neither is not an
//!   error here, since an agent restarting with a bundle cached in `data_dir` needs neither.
//! - `join_token` must be usable as the last segment of the agent's SPIFFE ID
//!   (`spiffe://<td>/tessera/agent/join_token/<token>`), see [`validate_join_token`]. `Debug`
//!   never prints it.
//!
//! Key added beyond interface.md:
//! - `max_sha256_file_size` (default [`DEFAULT_MAX_SHA256_FILE_SIZE`], 256 MiB): the largest
//!   executable the unix workload attestor hashes for the `unix:sha256` selector. A caller
//!   whose executable is larger gets every other selector but no `unix:sha256` one. `0`
//!   disables hashing. Written as a byte count (`268435456`) or a string with a unit:
//!   `"256MiB"`, `"1GiB"`, `"500MB"`, `"64KiB"` (`KiB`/`MiB`/`GiB` are powers of 1024,
//!   `KB`/`MB`/`GB` powers of 1000, `B` bytes).
//!
//! [`AGENT_KEYS`] lists every dotted key this module accepts, for the configuration reference
//! test.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
pub use tessera_common::config::{ConfigError, ConfigWarning, LogFormat, LogLevel, MAX_SOCKET_PATH_LEN, io_message};
use tessera_common::config::{
    de_byte_size, de_opt_path, de_opt_socket_addr, de_opt_string, de_opt_table, de_path, de_socket_path, de_str,
    de_table, de_trust_domain, parse_toml, read_file,
};
use tessera_spiffe::TrustDomain;

/// Every key the agent configuration accepts, as dotted paths (`table.key`), in the order of
/// interface.md (with the added `max_sha256_file_size` before the tables). Tables themselves
/// are not listed, only their keys.
pub const AGENT_KEYS: &[&str] = &[
    "trust_domain",
    "server_address",
    "data_dir",
    "socket_path",
    "admin_socket",
    "trust_bundle_path",
    "insecure_bootstrap",
    "join_token",
    "node_attestor.x509pop.certificate_path",
    "node_attestor.x509pop.private_key_path",
    "node_attestor.k8s_psat.token_path",
    "node_attestor.oidc.token_path",
    "log_level",
    "log_format",
    "max_sha256_file_size",
    "health.bind_address",
    "metrics.bind_address",
    "audit.enabled",
    "audit.path",
];

/// Default `trust_domain`.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// Default `server_address`.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";
/// Default `data_dir` (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = ".tessera/agent";
/// Default `socket_path`: the Workload API (the same constant the CLI clients default to).
pub const DEFAULT_SOCKET_PATH: &str = crate::cli::DEFAULT_SOCKET_PATH;
/// Default `admin_socket`.
pub const DEFAULT_ADMIN_SOCKET: &str = crate::cli::DEFAULT_ADMIN_SOCKET;
/// Default `node_attestor.k8s_psat.token_path`: where the agent DaemonSet mounts its projected
/// service-account token.
pub const DEFAULT_K8S_PSAT_TOKEN_PATH: &str = "/var/run/secrets/tokens/tessera-agent";
/// Default `max_sha256_file_size`: 256 MiB.
pub const DEFAULT_MAX_SHA256_FILE_SIZE: u64 = 256 * 1024 * 1024;

/// The whole agent configuration.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The trust domain of the server this agent attests to (a bare name such as
    /// `example.org`).
    #[serde(deserialize_with = "de_trust_domain")]
    pub trust_domain: TrustDomain,
    /// The server's agent API, `host:port` (host: a DNS name, an IPv4 address or a bracketed
    /// IPv6 address). See [`split_host_port`].
    #[serde(deserialize_with = "de_server_address")]
    pub server_address: String,
    /// The agent key, agent SVID and cached bundle live here.
    #[serde(deserialize_with = "de_path")]
    pub data_dir: PathBuf,
    /// The Workload API's Unix socket (its directory is created 0755, the socket 0777).
    #[serde(deserialize_with = "de_socket_path")]
    pub socket_path: PathBuf,
    /// The agent's private admin socket (its directory is created 0700).
    #[serde(deserialize_with = "de_socket_path")]
    pub admin_socket: PathBuf,
    /// PEM bundle that authenticates the server on first contact; `None` (`""`, the default)
    /// when there is none.
    #[serde(deserialize_with = "de_opt_path")]
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust the server on first use (tests and demos only).
    pub insecure_bootstrap: bool,
    /// Join token for the first attestation (also `--join-token`); `None` (`""`, the default)
    /// when there is none. Never printed by `Debug`.
    #[serde(deserialize_with = "de_opt_string")]
    pub join_token: Option<String>,
    /// `[node_attestor]`: how the agent attests when it is not using a join token.
    #[serde(deserialize_with = "de_table")]
    pub node_attestor: NodeAttestorConfig,
    /// Most verbose level logged.
    pub log_level: LogLevel,
    /// Log line format.
    pub log_format: LogFormat,
    /// Largest executable hashed for `unix:sha256`, in bytes; 0 disables hashing.
    #[serde(deserialize_with = "de_byte_size")]
    pub max_sha256_file_size: u64,
    /// `[health]`.
    #[serde(deserialize_with = "de_table")]
    pub health: HealthConfig,
    /// `[metrics]`.
    #[serde(deserialize_with = "de_table")]
    pub metrics: MetricsConfig,
    /// `[audit]`: the security event log.
    #[serde(deserialize_with = "de_table")]
    pub audit: AuditConfig,
}

/// `[audit]`: one JSON line per security event (see docs/audit-log.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Whether the audit log is written (on by default).
    pub enabled: bool,
    /// The file lines are appended to; `None` (`""`, the default) means
    /// `<data_dir>/audit.log`, `"-"` means standard output.
    #[serde(deserialize_with = "de_opt_path")]
    pub path: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { enabled: true, path: None }
    }
}

/// `[node_attestor]`: node attestation other than a join token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeAttestorConfig {
    /// `[node_attestor.x509pop]`: attest with a node certificate and its key.
    #[serde(deserialize_with = "de_opt_table")]
    pub x509pop: Option<X509PopConfig>,
    /// `[node_attestor.k8s_psat]`: attest with the pod's projected service-account token.
    #[serde(deserialize_with = "de_opt_table")]
    pub k8s_psat: Option<K8sPsatConfig>,
    /// `[node_attestor.oidc]`: attest with a token of an OIDC issuer the server trusts.
    #[serde(deserialize_with = "de_opt_table")]
    pub oidc: Option<OidcConfig>,
}

impl NodeAttestorConfig {
    /// The tables that are set, by name.
    pub fn configured(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        if self.x509pop.is_some() {
            set.push("x509pop");
        }
        if self.k8s_psat.is_some() {
            set.push("k8s_psat");
        }
        if self.oidc.is_some() {
            set.push("oidc");
        }
        set
    }
}

/// `[node_attestor.k8s_psat]`: the projected service-account token of the agent's pod (a
/// `serviceAccountToken` volume source with the server's audience). Read at every
/// attestation, so the token the kubelet rotated in is the one sent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct K8sPsatConfig {
    /// The token file.
    #[serde(deserialize_with = "de_path")]
    pub token_path: PathBuf,
}

impl Default for K8sPsatConfig {
    fn default() -> Self {
        Self { token_path: PathBuf::from(DEFAULT_K8S_PSAT_TOKEN_PATH) }
    }
}

/// `[node_attestor.oidc]`: a token (a compact JWT) from an issuer the server's
/// `[node_attestor.oidc]` trusts, kept fresh in a file by something else (a cloud metadata
/// helper, a sidecar). Read at every attestation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The token file (required).
    #[serde(deserialize_with = "de_path")]
    pub token_path: PathBuf,
}

/// `[node_attestor.x509pop]`: the node certificate the server's `node_attestor.x509pop` CA
/// issued to this machine. Read at every attestation, so a renewed file is picked up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// PEM: the node certificate first, then any intermediates up to the CA.
    #[serde(deserialize_with = "de_path")]
    pub certificate_path: PathBuf,
    /// PEM PKCS#8 private key of the node certificate (EC P-256/P-384, Ed25519 or RSA).
    #[serde(deserialize_with = "de_path")]
    pub private_key_path: PathBuf,
}

/// `[health]`: `GET /live` and `GET /ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Where to serve the health endpoints; `None` (`""`, the default) disables them.
    #[serde(deserialize_with = "de_opt_socket_addr")]
    pub bind_address: Option<SocketAddr>,
}

/// `[metrics]`: `GET /metrics` in the Prometheus text format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve metrics; `None` (`""`, the default) disables them.
    #[serde(deserialize_with = "de_opt_socket_addr")]
    pub bind_address: Option<SocketAddr>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            server_address: DEFAULT_SERVER_ADDRESS.to_owned(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            socket_path: PathBuf::from(DEFAULT_SOCKET_PATH),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            trust_bundle_path: None,
            insecure_bootstrap: false,
            join_token: None,
            node_attestor: NodeAttestorConfig::default(),
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            max_sha256_file_size: DEFAULT_MAX_SHA256_FILE_SIZE,
            health: HealthConfig::default(),
            metrics: MetricsConfig::default(),
            audit: AuditConfig::default(),
        }
    }
}

/// Written by hand so that the join token, a bearer credential, never reaches a log.
impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("trust_domain", &self.trust_domain)
            .field("server_address", &self.server_address)
            .field("data_dir", &self.data_dir)
            .field("socket_path", &self.socket_path)
            .field("admin_socket", &self.admin_socket)
            .field("trust_bundle_path", &self.trust_bundle_path)
            .field("insecure_bootstrap", &self.insecure_bootstrap)
            .field("join_token", &self.join_token.as_ref().map(|_| "<redacted>"))
            .field("node_attestor", &self.node_attestor)
            .field("log_level", &self.log_level)
            .field("log_format", &self.log_format)
            .field("max_sha256_file_size", &self.max_sha256_file_size)
            .field("health", &self.health)
            .field("metrics", &self.metrics)
            .field("audit", &self.audit)
            .finish()
    }
}

#[allow(clippy::expect_used, reason = "a constant known to be valid; the defaults test covers it")]
fn default_trust_domain() -> TrustDomain {
    TrustDomain::new(DEFAULT_TRUST_DOMAIN).expect("the default trust domain is valid")
}

impl AgentConfig {
    /// Where audit lines go: disabled, stdout, `audit.path`, or `<data_dir>/audit.log`.
    pub fn audit_target(&self) -> tessera_common::audit::AuditTarget {
        tessera_common::audit::target_from_config(self.audit.enabled, self.audit.path.as_deref(), &self.data_dir)
    }

    /// `server_address` split into host and port (checked on load, so this only fails for a
    /// value set in code).
    pub fn server_host_port(&self) -> Result<(&str, u16), String> {
        split_host_port(&self.server_address)
    }

    /// Settings that are accepted but deserve a warning, for the caller to log once logging
    /// is set up. Today: `insecure_bootstrap = true`.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut warnings = Vec::new();
        if self.insecure_bootstrap {
            warnings.push(ConfigWarning {
                key: "insecure_bootstrap",
                message: "the server is trusted on first use without authentication; for tests and demos only"
                    .to_owned(),
            });
        }
        warnings
    }

    /// Checks between keys, after every value parsed on its own. Returns the key to blame.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.insecure_bootstrap
            && let Some(bundle) = &self.trust_bundle_path
        {
            return Err((
                "insecure_bootstrap",
                format!(
                    "cannot be true when trust_bundle_path is set ({}): authenticate the server with the bundle \
                     or trust it on first use, not both",
                    bundle.display()
                ),
            ));
        }
        if self.socket_path == self.admin_socket {
            return Err(("admin_socket", "must differ from socket_path".to_owned()));
        }
        let attestors = self.node_attestor.configured();
        if let [first, second, ..] = attestors.as_slice() {
            let key = match *second {
                "k8s_psat" => "node_attestor.k8s_psat",
                _ => "node_attestor.oidc",
            };
            return Err((
                key,
                format!("cannot be set together with [node_attestor.{first}]: the agent attests one way"),
            ));
        }
        if let (Some(_), [attestor]) = (&self.join_token, attestors.as_slice()) {
            return Err((
                "join_token",
                format!("cannot be set together with [node_attestor.{attestor}]: the agent attests one way"),
            ));
        }
        if let Some(token) = &self.join_token {
            validate_join_token(&self.trust_domain, token).map_err(|message| ("join_token", message))?;
        }
        if let (Some(health), Some(metrics)) = (self.health.bind_address, self.metrics.bind_address)
            && health == metrics
            && health.port() != 0
        {
            return Err(("metrics.bind_address", format!("{metrics} is already used by health.bind_address")));
        }
        Ok(())
    }
}

/// Checks that `token` can be a join token in `trust_domain`: it must be a valid last segment
/// of `spiffe://<td>/tessera/agent/join_token/<token>` (letters, digits, `.`, `-`, `_`). Also
/// meant for `--join-token`.
pub fn validate_join_token(trust_domain: &TrustDomain, token: &str) -> Result<(), String> {
    trust_domain
        .id_from_segments(&["tessera", "agent", "join_token", token])
        .map(|_| ())
        .map_err(|error| format!("invalid join token: {error}"))
}

/// Splits `host:port`. The host is a DNS name, an IPv4 address, or an IPv6 address in
/// brackets (`[::1]:8081`); the port is 1-65535.
pub fn split_host_port(address: &str) -> Result<(&str, u16), String> {
    let invalid = |why: &str| format!("invalid server address {address:?}: {why}; expected {SERVER_ADDRESS_FORM}");
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| invalid("missing ']'"))?;
        host.parse::<Ipv6Addr>().map_err(|_| invalid("not an IPv6 address between the brackets"))?;
        let port = after.strip_prefix(':').ok_or_else(|| invalid("missing port"))?;
        (host, port)
    } else {
        let (host, port) = address.rsplit_once(':').ok_or_else(|| invalid("missing port"))?;
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        if host.contains(':') {
            return Err(invalid("an IPv6 address must be in brackets"));
        }
        if host.len() > 253 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
            return Err(invalid("not a host name or IP address"));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid("the port must be a number from 1 to 65535")),
        Ok(port) => Ok((host, port)),
    }
}

/// Loads the agent configuration: `None` gives the embedded defaults (no file is read),
/// `Some(file)` reads and checks that TOML file.
pub fn load(file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
    let Some(file) = file else {
        return Ok(AgentConfig::default());
    };
    parse(&read_file(file)?, file)
}

/// Parses and checks configuration text; `file` is only used to name the source in errors.
pub fn parse(text: &str, file: &Path) -> Result<AgentConfig, ConfigError> {
    let config: AgentConfig = parse_toml(text, file)?;
    config.check().map_err(|(key, message)| ConfigError::invalid(file, key, message))?;
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Agent-specific value deserializers; the shared ones are in `tessera_common::config`.

const SERVER_ADDRESS_FORM: &str =
    "host:port such as \"127.0.0.1:8081\", \"tessera-server.example.org:8081\" or \"[::1]:8081\"";

fn de_server_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    de_str(deserializer, SERVER_ADDRESS_FORM, |value| split_host_port(value).map(|_| value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::config::struct_fields;

    fn parse_str(text: &str) -> Result<AgentConfig, ConfigError> {
        parse(text, Path::new("/etc/tessera/agent.toml"))
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        struct_fields::<T>().unwrap()
    }

    #[test]
    fn agent_keys_are_exactly_the_struct_fields() {
        let mut from_code: Vec<String> = Vec::new();
        for field in fields_of::<AgentConfig>() {
            let nested = match *field {
                "health" => Some(fields_of::<HealthConfig>()),
                "node_attestor" => {
                    assert_eq!(fields_of::<NodeAttestorConfig>(), ["x509pop", "k8s_psat", "oidc"]);
                    let keys = fields_of::<X509PopConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.x509pop.{key}")));
                    let keys = fields_of::<K8sPsatConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.k8s_psat.{key}")));
                    let keys = fields_of::<OidcConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.oidc.{key}")));
                    continue;
                }
                "metrics" => Some(fields_of::<MetricsConfig>()),
                "audit" => Some(fields_of::<AuditConfig>()),
                _ => None,
            };
            match nested {
                Some(keys) => from_code.extend(keys.iter().map(|key| format!("{field}.{key}"))),
                None => from_code.push((*field).to_owned()),
            }
        }
        let listed: Vec<String> = AGENT_KEYS.iter().map(|key| (*key).to_owned()).collect();
        assert_eq!(from_code, listed);
    }

    #[test]
    fn empty_text_gives_defaults() {
        assert_eq!(parse_str("").unwrap(), AgentConfig::default());
    }

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("127.0.0.1:8081").unwrap(), ("127.0.0.1", 8081));
        assert_eq!(split_host_port("tessera-server.example.org:443").unwrap(), ("tessera-server.example.org", 443));
        assert_eq!(split_host_port("[::1]:8081").unwrap(), ("::1", 8081));
        assert_eq!(split_host_port("localhost:1").unwrap(), ("localhost", 1));
        for bad in
            ["", "host", ":8081", "host:", "host:0", "host:65536", "::1:8081", "[::1]", "[nope]:1", "a b:1", "h:x"]
        {
            let err = split_host_port(bad).unwrap_err();
            assert!(err.starts_with(&format!("invalid server address {bad:?}: ")), "{err}");
        }
    }

    #[test]
    fn join_token_rules() {
        let td = TrustDomain::new("example.org").unwrap();
        validate_join_token(&td, "3f1c6c1e-2b7a-4c47-9a55-0d3b1f1e2a9c").unwrap();
        for bad in ["a/b", ".", "..", "tok en", "tök"] {
            assert!(validate_join_token(&td, bad).unwrap_err().starts_with("invalid join token: "), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_join_token() {
        let config = AgentConfig { join_token: Some("s3cr3t-token".to_owned()), ..AgentConfig::default() };
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr3t-token"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn at_most_one_node_attestor() {
        let config = parse_str("[node_attestor.k8s_psat]\n").unwrap();
        assert_eq!(config.node_attestor.k8s_psat.unwrap().token_path, Path::new(DEFAULT_K8S_PSAT_TOKEN_PATH));
        let config = parse_str("[node_attestor.oidc]\ntoken_path = \"/run/idp/token\"\n").unwrap();
        assert_eq!(config.node_attestor.oidc.unwrap().token_path, Path::new("/run/idp/token"));
        let err = parse_str("[node_attestor.oidc]\n").unwrap_err();
        assert_eq!(err.key(), Some("node_attestor.oidc.token_path"), "{err}");
        let err = parse_str("[node_attestor.k8s_psat]\n[node_attestor.oidc]\ntoken_path = \"t\"\n").unwrap_err();
        assert_eq!(err.key(), Some("node_attestor.oidc"), "{err}");
        assert!(err.to_string().contains("cannot be set together with [node_attestor.k8s_psat]"), "{err}");
        let both =
            "[node_attestor.x509pop]\ncertificate_path = \"c\"\nprivate_key_path = \"k\"\n[node_attestor.k8s_psat]\n";
        assert_eq!(parse_str(both).unwrap_err().key(), Some("node_attestor.k8s_psat"));
        let err = parse_str("join_token = \"abc\"\n[node_attestor.k8s_psat]\n").unwrap_err();
        assert_eq!(err.key(), Some("join_token"), "{err}");
        assert!(err.to_string().contains("[node_attestor.k8s_psat]"), "{err}");
        let err = parse_str("[node_attestor.k8s_psat]\ntoken_path = \"\"\n").unwrap_err();
        assert_eq!(err.key(), Some("node_attestor.k8s_psat.token_path"), "{err}");
    }

    #[test]
    fn insecure_bootstrap_warns() {
        assert!(AgentConfig::default().warnings().is_empty());
        let config = parse_str("insecure_bootstrap = true").unwrap();
        assert_eq!(config.warnings()[0].key, "insecure_bootstrap");
    }
}
