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
use std::marker::PhantomData;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
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
/// Default `max_sha256_file_size`: 256 MiB.
pub const DEFAULT_MAX_SHA256_FILE_SIZE: u64 = 256 * 1024 * 1024;

/// Longest Unix socket path accepted, in bytes (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Declares a configuration enum spelled by fixed keywords, with `ALL`, `as_str`, `Display`,
/// `FromStr` and a `Deserialize` whose errors list the accepted spellings.
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The configuration spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                find_keyword(s, Self::ALL, Self::as_str)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                keyword(deserializer, Self::ALL, Self::as_str)
            }
        }
    };
}

keyword_enum! {
    /// `log_level`: the most verbose level logged.
    pub enum LogLevel {
        /// Errors only.
        Error = "error",
        /// Warnings and errors.
        Warn = "warn",
        /// The default.
        Info = "info",
        /// Debugging detail.
        Debug = "debug",
        /// Everything.
        Trace = "trace",
    }
}

keyword_enum! {
    /// `log_format`: how log lines on stderr are written.
    pub enum LogFormat {
        /// Human-readable lines (the default).
        Text = "text",
        /// One JSON object per line.
        Json = "json",
    }
}

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

/// A setting that is valid but deserves a warning; see [`AgentConfig::warnings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The dotted key concerned.
    pub key: &'static str,
    /// What deserves attention.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key {}: {}", self.key, self.message)
    }
}

/// Loads the agent configuration: `None` gives the embedded defaults (no file is read),
/// `Some(file)` reads and checks that TOML file.
pub fn load(file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
    let Some(file) = file else {
        return Ok(AgentConfig::default());
    };
    let text = std::fs::read_to_string(file)
        .map_err(|error| ConfigError::Read { file: file.to_path_buf(), message: io_message(&error) })?;
    parse(&text, file)
}

/// Parses and checks configuration text; `file` is only used to name the source in errors.
pub fn parse(text: &str, file: &Path) -> Result<AgentConfig, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| syntax_error(file, text, &error))?;
    let config: AgentConfig =
        serde_path_to_error::deserialize(deserializer).map_err(|error| value_error(file, text, error))?;
    config.check().map_err(|(key, message)| ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_owned(),
        line: None,
        message,
    })?;
    Ok(config)
}

/// Why a configuration file was refused. Displays as one line naming the file and, when the
/// problem is a key, the dotted key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8, a directory, ...).
    #[error("cannot read config file {}: {message}", file.display())]
    Read {
        /// The file named on the command line.
        file: PathBuf,
        /// The operating system's reason.
        message: String,
    },
    /// The file is not valid TOML.
    #[error("config file {}: invalid TOML at line {line}, column {column}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// The parser's reason.
        message: String,
    },
    /// A key this version does not know (often a typo).
    #[error("config file {}: unknown key \"{key}\"{} ({expected})", file.display(), on_line(*line))]
    UnknownKey {
        /// The file.
        file: PathBuf,
        /// Dotted path of the unknown key.
        key: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The keys accepted at that level.
        expected: String,
    },
    /// A key whose value is missing, of the wrong type, or not acceptable.
    #[error("config file {}: key {key}{}: {message}", file.display(), at_line(*line))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Dotted path of the key.
        key: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// The configuration file concerned.
    pub fn file(&self) -> &Path {
        match self {
            Self::Read { file, .. }
            | Self::Syntax { file, .. }
            | Self::UnknownKey { file, .. }
            | Self::Invalid { file, .. } => file,
        }
    }

    /// The dotted key concerned, when the error is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::UnknownKey { key, .. } | Self::Invalid { key, .. } => Some(key),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Error shaping. The same code lives in the server's config module (`tessera_server::config`).

fn at_line(line: Option<usize>) -> String {
    line.map(|line| format!(" (line {line})")).unwrap_or_default()
}

fn on_line(line: Option<usize>) -> String {
    line.map(|line| format!(" on line {line}")).unwrap_or_default()
}

/// The I/O error without Rust's " (os error N)" suffix.
pub(crate) fn io_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// Messages are printed on one line whatever the parser says.
fn one_line(message: &str) -> String {
    message.trim().split('\n').map(str::trim).filter(|part| !part.is_empty()).collect::<Vec<_>>().join("; ")
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |last| last.chars().count()) + 1;
    (line, column)
}

fn syntax_error(file: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let span = error.span().unwrap_or(0..0);
    let (line, column) = line_col(text, span.start);
    let mut message = one_line(error.message());
    if message == "duplicate key"
        && let Some(key) = text.get(span.clone()).filter(|key| !key.is_empty())
    {
        message = format!("duplicate key {}", key.trim());
    }
    ConfigError::Syntax { file: file.to_path_buf(), line, column, message }
}

fn value_error(file: &Path, text: &str, error: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = error.path().to_string();
    let error = error.into_inner();
    let line = error.span().map(|span| line_col(text, span.start).0);
    let message = one_line(error.message());
    let file = file.to_path_buf();
    // serde's wording for deny_unknown_fields: "unknown field `x`, expected one of `a`, `b`";
    // the path already ends with the unknown key.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest.split_once("`, ").map_or("", |(_, expected)| expected).to_owned();
        return ConfigError::UnknownKey { file, key: path, line, expected };
    }
    // serde's wording for a required key: "missing field `x`"; the path names its table.
    if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
        let key = if path == "." { field.to_owned() } else { format!("{path}.{field}") };
        return ConfigError::Invalid { file, key, line, message: "is required but missing".to_owned() };
    }
    let key = if path == "." { "(top level)".to_owned() } else { path };
    ConfigError::Invalid { file, key, line, message }
}

// ---------------------------------------------------------------------------------------------
// Value deserializers. Each states the expected form, so a wrong type reads
// "invalid type: integer `5`, expected a duration such as ...".

/// A visitor for string values: `parse` turns the string into the value or an explanation.
struct StrVisitor<T, F> {
    expecting: &'static str,
    parse: F,
    marker: PhantomData<T>,
}

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for StrVisitor<T, F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        (self.parse)(value).map_err(E::custom)
    }
}

fn de_str<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_str(StrVisitor { expecting, parse, marker: PhantomData })
}

/// `"a", "b" or "c"`.
fn one_of<T: Copy>(allowed: &[T], name: fn(T) -> &'static str) -> String {
    let names: Vec<String> = allowed.iter().map(|value| format!("{:?}", name(*value))).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("one of {} or {last}", rest.join(", ")),
        Some((only, _)) => only.clone(),
        None => "nothing".to_owned(),
    }
}

fn find_keyword<T: Copy>(value: &str, allowed: &[T], name: fn(T) -> &'static str) -> Result<T, String> {
    allowed
        .iter()
        .copied()
        .find(|candidate| name(*candidate) == value)
        .ok_or_else(|| format!("invalid value {value:?}: expected {}", one_of(allowed, name)))
}

/// Visitor for [`keyword`]: a string that must be one of `allowed`.
struct KeywordVisitor<T: 'static> {
    expecting: String,
    allowed: &'static [T],
    name: fn(T) -> &'static str,
}

impl<'de, T: Copy> Visitor<'de> for KeywordVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        find_keyword(value, self.allowed, self.name).map_err(E::custom)
    }
}

fn keyword<'de, D: Deserializer<'de>, T: Copy>(
    deserializer: D,
    allowed: &'static [T],
    name: fn(T) -> &'static str,
) -> Result<T, D::Error> {
    deserializer.deserialize_str(KeywordVisitor { expecting: one_of(allowed, name), allowed, name })
}

fn de_trust_domain<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TrustDomain, D::Error> {
    de_str(deserializer, "a trust domain name such as \"example.org\"", |value| {
        if value.contains(":/") {
            return Err(format!(
                "invalid trust domain {value:?}: expected a bare trust domain name such as \"example.org\", \
                 not a SPIFFE ID"
            ));
        }
        TrustDomain::new(value).map_err(|error| format!("invalid trust domain {value:?}: {error}"))
    })
}

const SOCKET_ADDR_FORM: &str = "an IP address and port such as \"127.0.0.1:8080\" or \"[::1]:8080\"";

fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| format!("invalid socket address {value:?}: expected {SOCKET_ADDR_FORM}"))
}

fn de_opt_socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    de_str(deserializer, "an IP address and port such as \"127.0.0.1:8080\", or \"\" for none", |value| {
        if value.is_empty() { Ok(None) } else { parse_socket_addr(value).map(Some) }
    })
}

fn de_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    de_str(deserializer, "a path", |value| {
        if value.is_empty() { Err("must not be empty: expected a path".to_owned()) } else { Ok(PathBuf::from(value)) }
    })
}

fn de_opt_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
    de_str(deserializer, "a path, or \"\" for none", |value| Ok((!value.is_empty()).then(|| PathBuf::from(value))))
}

fn de_socket_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    de_str(deserializer, "a Unix socket path", |value| {
        if value.is_empty() {
            return Err("must not be empty: expected a Unix socket path".to_owned());
        }
        if value.len() > MAX_SOCKET_PATH_LEN {
            return Err(format!(
                "socket path {value:?} is {} bytes long: a Unix socket path is at most {MAX_SOCKET_PATH_LEN} bytes",
                value.len()
            ));
        }
        Ok(PathBuf::from(value))
    })
}

fn de_opt_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    de_str(deserializer, "a string, or \"\" for none", |value| Ok((!value.is_empty()).then(|| value.to_owned())))
}

/// A nested table. Asking for a map (rather than a struct) refuses arrays, which serde would
/// otherwise read as positional fields, and words the error as "expected a table".
fn de_table<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    struct TableVisitor<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for TableVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(TableVisitor(PhantomData))
}

const SERVER_ADDRESS_FORM: &str =
    "host:port such as \"127.0.0.1:8081\", \"tessera-server.example.org:8081\" or \"[::1]:8081\"";

fn de_server_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    de_str(deserializer, SERVER_ADDRESS_FORM, |value| split_host_port(value).map(|_| value.to_owned()))
}

const BYTE_SIZE_FORM: &str = "a byte count such as 268435456 or a size such as \"256MiB\", \"1GiB\" or \"500MB\"";

/// A byte count: a non-negative integer, or a string `<number>[ ]<unit>` with unit `B`, `KB`,
/// `MB`, `GB` (powers of 1000) or `KiB`, `MiB`, `GiB` (powers of 1024); a bare number string
/// is bytes.
fn parse_byte_size(value: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {value:?}: expected {BYTE_SIZE_FORM}");
    let trimmed = value.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(invalid()),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("size {value:?} is too large"))
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(BYTE_SIZE_FORM)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("invalid size {value}: must not be negative")))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        parse_byte_size(value).map_err(E::custom)
    }
}

fn de_byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(ByteSizeVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<AgentConfig, ConfigError> {
        parse(text, Path::new("/etc/tessera/agent.toml"))
    }

    /// A deserializer that only records the field list serde's derive passes to
    /// `deserialize_struct`, to compare the code's keys with [`AGENT_KEYS`].
    struct FieldProbe;

    #[derive(Debug)]
    struct Probed(Option<&'static [&'static str]>);

    impl fmt::Display for Probed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl std::error::Error for Probed {}

    impl de::Error for Probed {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Probed(None)
        }
    }

    impl<'de> Deserializer<'de> for FieldProbe {
        type Error = Probed;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
            Err(Probed(None))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Probed> {
            Err(Probed(Some(fields)))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        match T::deserialize(FieldProbe) {
            Err(Probed(Some(fields))) => fields,
            _ => panic!("not a struct"),
        }
    }

    #[test]
    fn agent_keys_are_exactly_the_struct_fields() {
        let mut from_code: Vec<String> = Vec::new();
        for field in fields_of::<AgentConfig>() {
            let nested = match *field {
                "health" => Some(fields_of::<HealthConfig>()),
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
    fn byte_sizes() {
        assert_eq!(parse_byte_size("0").unwrap(), 0);
        assert_eq!(parse_byte_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_byte_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_byte_size("256 MiB").unwrap(), 256 << 20);
        assert_eq!(parse_byte_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_byte_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_byte_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_byte_size("10B").unwrap(), 10);
        assert!(parse_byte_size("1.5GiB").unwrap_err().contains("invalid size"));
        assert!(parse_byte_size("MiB").unwrap_err().contains("invalid size"));
        assert!(parse_byte_size("12 parsecs").unwrap_err().contains("invalid size"));
        assert!(parse_byte_size("99999999999999GiB").unwrap_err().contains("too large"));
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
    fn insecure_bootstrap_warns() {
        assert!(AgentConfig::default().warnings().is_empty());
        let config = parse_str("insecure_bootstrap = true").unwrap();
        assert_eq!(config.warnings()[0].key, "insecure_bootstrap");
    }

    #[test]
    fn io_message_drops_the_os_error_number() {
        let error = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_message(&error), "No such file or directory");
    }
}
