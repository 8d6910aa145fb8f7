//! Typed configuration of `tessera-server`.
//!
//! The keys and defaults are those of the interface contract (`interface.md`, "Server
//! configuration"), plus the optional `[upstream_authority]` table of issue 3. Every key is
//! optional; [`load`]`(None)` returns the embedded defaults without touching the file system.
//!
//! Rules:
//! - Durations are humantime strings (`90s`, `5m`, `1h`, `7d`). Every duration here is a TTL: it
//!   must be a whole number of seconds between 1 second and [`MAX_TTL`] (about 100 years, which
//!   keeps every certificate date representable).
//! - Unknown keys are errors at every level, and so are values of the wrong type.
//! - Every error is one line naming the file and the dotted key (`health.bind_address`), see
//!   [`ConfigError`].
//! - Paths are kept exactly as written: a relative path is relative to the working directory of
//!   the process (like the default `data_dir = ".tessera/server"`), never to the config file.
//! - Keys whose documented "unset" value is the empty string (`jwt_issuer`, `datastore.path`,
//!   `health.bind_address`, `metrics.bind_address`, `upstream_authority.bundle_file`) are
//!   `Option`s: `""` and an absent key both mean `None`.
//! - Lifetimes longer than `ca_ttl` are not errors: the server caps every SVID at its CA's
//!   expiry (interface.md), so [`ServerConfig::warnings`] reports them for the caller to log
//!   once logging is set up.
//!
//! [`SERVER_KEYS`] lists every dotted key this module accepts, for the configuration reference
//! test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
pub use tessera_common::config::{
    ConfigError, ConfigWarning, LogFormat, LogLevel, MAX_SOCKET_PATH_LEN, MAX_TTL, MIN_TTL, io_message,
};
use tessera_common::config::{
    de_opt_path, de_opt_socket_addr, de_opt_string, de_opt_table, de_path, de_socket_addr, de_socket_path, de_str,
    de_table, de_trust_domain, de_ttl, keyword, parse_toml, parse_ttl, read_file,
};
use tessera_common::keyword_enum;
use tessera_spiffe::TrustDomain;

/// Every key the server configuration accepts, as dotted paths (`table.key`), in the order of
/// interface.md. Tables themselves (`datastore`, `health`, ...) are not listed, only their keys.
pub const SERVER_KEYS: &[&str] = &[
    "trust_domain",
    "data_dir",
    "bind_address",
    "admin_socket",
    "log_level",
    "log_format",
    "ca_key_type",
    "ca_ttl",
    "jwt_key_type",
    "jwt_issuer",
    "default_x509_svid_ttl",
    "default_jwt_svid_ttl",
    "agent_ttl",
    "datastore.kind",
    "datastore.path",
    "health.bind_address",
    "metrics.bind_address",
    "upstream_authority.kind",
    "upstream_authority.cert_file",
    "upstream_authority.key_file",
    "upstream_authority.bundle_file",
    // Issue 6: OIDC discovery and SPIFFE federation.
    "oidc.bind_address",
    "federation.bundle_endpoint.bind_address",
    "federation.bundle_endpoint.profile",
    "federation.bundle_endpoint.cert_path",
    "federation.bundle_endpoint.key_path",
    "federation.bundle_endpoint.refresh_hint",
    "federation.federates_with.trust_domain",
    "federation.federates_with.bundle_endpoint_url",
    "federation.federates_with.profile",
    "federation.federates_with.endpoint_spiffe_id",
    "federation.federates_with.trust_bundle_path",
    "federation.federates_with.ca_bundle_path",
    // Issue 9: node attestors besides join tokens.
    "node_attestor.x509pop.ca_bundle_path",
    "node_attestor.x509pop.agent_id_from",
    "node_attestor.k8s_psat.cluster.name",
    "node_attestor.k8s_psat.cluster.service_account_allow_list",
    "node_attestor.k8s_psat.cluster.single_use",
    "node_attestor.k8s_psat.cluster.issuer",
    "node_attestor.k8s_psat.cluster.jwks_uri",
    "node_attestor.k8s_psat.cluster.jwks",
    "node_attestor.k8s_psat.cluster.ca_bundle_path",
    "node_attestor.k8s_psat.cluster.allowed_algorithms",
    "node_attestor.k8s_psat.cluster.audience",
    "node_attestor.k8s_psat.cluster.leeway",
    "node_attestor.k8s_psat.cluster.max_token_lifetime",
    "node_attestor.k8s_psat.cluster.require_jti",
    "node_attestor.oidc.issuer.issuer",
    "node_attestor.oidc.issuer.preset",
    "node_attestor.oidc.issuer.jwks_uri",
    "node_attestor.oidc.issuer.jwks",
    "node_attestor.oidc.issuer.ca_bundle_path",
    "node_attestor.oidc.issuer.allowed_algorithms",
    "node_attestor.oidc.issuer.audience",
    "node_attestor.oidc.issuer.leeway",
    "node_attestor.oidc.issuer.max_token_lifetime",
    "node_attestor.oidc.issuer.require_jti",
    "node_attestor.oidc.issuer.immutable_claims",
    "node_attestor.oidc.policy.name",
    "node_attestor.oidc.policy.issuer",
    "node_attestor.oidc.policy.condition",
    "node_attestor.oidc.policy.spiffe_id",
    "node_attestor.oidc.policy.selector_claims",
    "node_attestor.oidc.policy.single_use",
    "agent_svid_rate_limit",
    // Issue 5: overload protection of the agent API.
    "max_concurrent_attestations",
    "max_concurrent_signing",
    "overload_wait",
    // Issue 8: the audit log.
    "audit.enabled",
    "audit.path",
    // Issue 9: token exchange (workload identity federation, inbound).
    "token_exchange.bind_address",
    "token_exchange.profile",
    "token_exchange.cert_path",
    "token_exchange.key_path",
    "token_exchange.max_concurrent_requests",
    "token_exchange.request_timeout",
    "token_exchange.issuer.issuer",
    "token_exchange.issuer.preset",
    "token_exchange.issuer.jwks_uri",
    "token_exchange.issuer.jwks",
    "token_exchange.issuer.ca_bundle_path",
    "token_exchange.issuer.allowed_algorithms",
    "token_exchange.issuer.audience",
    "token_exchange.issuer.leeway",
    "token_exchange.issuer.max_token_lifetime",
    "token_exchange.issuer.require_jti",
    "token_exchange.issuer.immutable_claims",
    "token_exchange.policy.name",
    "token_exchange.policy.issuer",
    "token_exchange.policy.spiffe_id",
    "token_exchange.policy.condition",
    "token_exchange.policy.x509_svid_ttl",
    "token_exchange.policy.jwt_svid_ttl",
];

/// Default `trust_domain`.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// Default `data_dir` (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = ".tessera/server";
/// Default `bind_address`: the agent-facing gRPC endpoint.
pub const DEFAULT_BIND_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081);
/// Default `admin_socket` (the same constant the CLI clients default to).
pub const DEFAULT_ADMIN_SOCKET: &str = crate::cli::DEFAULT_ADMIN_SOCKET;
/// Default `ca_ttl`.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default `default_x509_svid_ttl`.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default `default_jwt_svid_ttl`.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// Default `agent_svid_rate_limit` (SVIDs per second per agent).
pub const DEFAULT_AGENT_SVID_RATE_LIMIT: u32 = 100;
/// Default `overload_wait`: how long an attestation or signing call waits for a free slot.
pub const DEFAULT_OVERLOAD_WAIT: Duration = Duration::from_secs(1);
/// Longest `overload_wait` accepted.
pub const MAX_OVERLOAD_WAIT: Duration = Duration::from_secs(60);
/// Largest `max_concurrent_attestations` and `max_concurrent_signing` accepted.
pub const MAX_CONCURRENCY: u32 = 65_536;
/// Default `agent_ttl`.
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(3600);
/// The datastore directory under `data_dir` when `datastore.path` is unset.
pub const DEFAULT_DATASTORE_DIR: &str = "datastore";

/// Key types the server's X.509 CA may use (`ca_key_type`).
pub const CA_KEY_TYPES: &[KeyType] = &[KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048];

/// Key types the JWT-SVID signing key may use (`jwt_key_type`): ES256 and RS256, exactly the
/// contract's list. `ec-p384` (ES384) is refused: JWT-SVID validators are only required to
/// support what the contract names, and widening the list later is compatible while narrowing
/// it would not be.
pub const JWT_KEY_TYPES: &[KeyType] = &[KeyType::EcP256, KeyType::Rsa2048];

keyword_enum! {
    /// A signing key type (`ca_key_type`, `jwt_key_type`).
    ///
    /// Local for now; meant to be replaced by `tessera_spiffe::keys::KeyType` once that exists.
    /// Only [`CA_KEY_TYPES`], [`JWT_KEY_TYPES`] and the spelling (`as_str`) are relied on here.
    pub enum KeyType {
        /// ECDSA on P-256 (ES256).
        EcP256 = "ec-p256",
        /// ECDSA on P-384 (ES384).
        EcP384 = "ec-p384",
        /// RSA, 2048-bit modulus (RS256).
        Rsa2048 = "rsa-2048",
    }
}

keyword_enum! {
    /// `datastore.kind`.
    pub enum DatastoreKind {
        /// The embedded sled database under `datastore.path`.
        Sled = "sled",
    }
}

keyword_enum! {
    /// `upstream_authority.kind`.
    pub enum UpstreamAuthorityKind {
        /// An upstream CA certificate and key read from files.
        Disk = "disk",
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The trust domain this server is the CA of (a bare name such as `example.org`).
    #[serde(deserialize_with = "de_trust_domain")]
    pub trust_domain: TrustDomain,
    /// Keys and the sled database live here.
    #[serde(deserialize_with = "de_path")]
    pub data_dir: PathBuf,
    /// Agent-facing gRPC over TLS. Port 0 picks a free port (tests).
    #[serde(deserialize_with = "de_socket_addr")]
    pub bind_address: SocketAddr,
    /// The operator API's Unix socket (its directory is created 0700).
    #[serde(deserialize_with = "de_socket_path")]
    pub admin_socket: PathBuf,
    /// Most verbose level logged.
    pub log_level: LogLevel,
    /// Log line format.
    pub log_format: LogFormat,
    /// Key type of the X.509 CA (one of [`CA_KEY_TYPES`]).
    #[serde(deserialize_with = "de_ca_key_type")]
    pub ca_key_type: KeyType,
    /// Lifetime of the server's CA certificate.
    #[serde(deserialize_with = "de_ttl")]
    pub ca_ttl: Duration,
    /// Key type of the JWT-SVID signing key (one of [`JWT_KEY_TYPES`]).
    #[serde(deserialize_with = "de_jwt_key_type")]
    pub jwt_key_type: KeyType,
    /// `iss` claim of JWT-SVIDs; `None` (the default, `""`) leaves it out.
    #[serde(deserialize_with = "de_opt_string")]
    pub jwt_issuer: Option<String>,
    /// X.509-SVID lifetime for entries that set none.
    #[serde(deserialize_with = "de_ttl")]
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime for entries that set none.
    #[serde(deserialize_with = "de_ttl")]
    pub default_jwt_svid_ttl: Duration,
    /// Lifetime of agent SVIDs.
    #[serde(deserialize_with = "de_ttl")]
    pub agent_ttl: Duration,
    /// `[datastore]`.
    #[serde(deserialize_with = "de_table")]
    pub datastore: DatastoreConfig,
    /// `[health]`.
    #[serde(deserialize_with = "de_table")]
    pub health: HealthConfig,
    /// `[metrics]`.
    #[serde(deserialize_with = "de_table")]
    pub metrics: MetricsConfig,
    /// `[upstream_authority]`: when present, the server's CA is an intermediate signed by it.
    #[serde(deserialize_with = "de_opt_table")]
    pub upstream_authority: Option<UpstreamAuthorityConfig>,
    /// `[oidc]`: OIDC discovery for JWT-SVIDs (issue 6).
    #[serde(deserialize_with = "de_table")]
    pub oidc: OidcConfig,
    /// `[federation]`: the bundle endpoint and federation relationships (issue 6).
    #[serde(deserialize_with = "de_table")]
    pub federation: FederationConfig,
    /// `[node_attestor]`: node attestors besides join tokens (issue 9).
    #[serde(deserialize_with = "de_table")]
    pub node_attestor: NodeAttestorConfig,
    /// SVIDs (X.509 items, JWT-SVIDs, agent renewals) one agent may have signed per second on
    /// average; 0 = unlimited. Excess calls get `RESOURCE_EXHAUSTED`.
    pub agent_svid_rate_limit: u32,
    /// Agent attestations processed at once, server-wide; 0 = automatic (see
    /// [`ServerConfig::attestation_concurrency`]). Excess calls wait up to `overload_wait`.
    pub max_concurrent_attestations: u32,
    /// Signing calls (`BatchNewX509Svid`, `NewJwtSvid`, `RenewAgent`) processed at once,
    /// server-wide; 0 = automatic (see [`ServerConfig::signing_concurrency`]).
    pub max_concurrent_signing: u32,
    /// How long a call waits for a free attestation or signing slot before `UNAVAILABLE`;
    /// 0 refuses at once. Sub-second values are allowed (`"250ms"`).
    #[serde(deserialize_with = "de_wait")]
    pub overload_wait: Duration,
    /// `[audit]`: the security event log (issue 8).
    #[serde(deserialize_with = "de_table")]
    pub audit: AuditConfig,
    /// `[token_exchange]`: external OIDC tokens traded for SVIDs (issue 9).
    #[serde(deserialize_with = "de_table")]
    pub token_exchange: TokenExchangeConfig,
}

/// `[node_attestor]`: the node attestors enabled besides join tokens (always on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeAttestorConfig {
    /// `[node_attestor.x509pop]`: agents prove possession of a node certificate's key.
    #[serde(deserialize_with = "de_opt_table")]
    pub x509pop: Option<X509PopConfig>,
    /// `[node_attestor.k8s_psat]`: agents present their pod's projected service-account token.
    #[serde(deserialize_with = "de_opt_table")]
    pub k8s_psat: Option<K8sPsatConfig>,
    /// `[node_attestor.oidc]`: agents present a token of a trusted OIDC issuer.
    #[serde(deserialize_with = "de_opt_table")]
    pub oidc: Option<OidcNodeAttestorConfig>,
}

/// `[node_attestor.k8s_psat]`: the Kubernetes clusters whose agent pods may attest with their
/// projected service-account token (see `crate::agent_api::node_token`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct K8sPsatConfig {
    /// `[[node_attestor.k8s_psat.cluster]]`: one per cluster, keyed by its issuer.
    pub cluster: Vec<K8sPsatClusterConfig>,
}

/// One `[[node_attestor.k8s_psat.cluster]]`: a cluster's token issuer (the keys and checks of
/// `[[token_exchange.issuer]]`, without `preset` and `immutable_claims`, which only conditions
/// use) and which service accounts run agents there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatClusterConfig {
    /// 1 to 64 of `[A-Za-z0-9._-]`: a segment of the agent IDs and the `k8s_psat:cluster:`
    /// selector.
    pub name: String,
    /// `namespace:name` of the service accounts agent pods run as (at least one).
    pub service_account_allow_list: Vec<String>,
    /// Record each token's `jti` and refuse it the second time (off by default: the kubelet
    /// hands the agent pod the same token for most of its life).
    #[serde(default)]
    pub single_use: bool,
    /// The cluster's service-account issuer: the exact `iss` of its tokens.
    pub issuer: String,
    /// Where the JWKS is; `None`: from the discovery document under `issuer`.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub jwks_uri: Option<String>,
    /// The JWKS itself (JSON); when set, nothing is fetched.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub jwks: Option<String>,
    /// PEM roots to authenticate discovery and JWKS fetches with instead of the system's.
    #[serde(default, deserialize_with = "de_opt_path")]
    pub ca_bundle_path: Option<PathBuf>,
    /// JWS algorithms accepted (never `none` or `HS*`).
    #[serde(default = "default_issuer_algorithms")]
    pub allowed_algorithms: Vec<String>,
    /// The `aud` the projected token must carry (the volume's `audience`).
    pub audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (0 to 5 minutes).
    #[serde(default = "default_issuer_leeway", deserialize_with = "de_leeway")]
    pub leeway: Duration,
    /// Longest `exp - iat` accepted (at most 48 hours).
    #[serde(default = "default_max_token_lifetime", deserialize_with = "de_token_lifetime")]
    pub max_token_lifetime: Duration,
    /// Refuse tokens without a `jti`.
    #[serde(default = "default_true")]
    pub require_jti: bool,
}

impl K8sPsatClusterConfig {
    /// The issuer part, in the form the shared issuer checks take.
    pub fn issuer_config(&self) -> TrustedIssuerConfig {
        TrustedIssuerConfig {
            issuer: self.issuer.clone(),
            preset: IssuerPreset::Kubernetes,
            jwks_uri: self.jwks_uri.clone(),
            jwks: self.jwks.clone(),
            ca_bundle_path: self.ca_bundle_path.clone(),
            allowed_algorithms: self.allowed_algorithms.clone(),
            audience: self.audience.clone(),
            leeway: self.leeway,
            max_token_lifetime: self.max_token_lifetime,
            require_jti: self.require_jti,
            immutable_claims: Vec::new(),
        }
    }
}

/// `[node_attestor.oidc]`: agents attest with a token from any trusted OIDC issuer, mapped to
/// an agent ID by a policy (see `crate::agent_api::node_token`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcNodeAttestorConfig {
    /// `[[node_attestor.oidc.issuer]]`: the same keys as `[[token_exchange.issuer]]`, but a
    /// separate list (another audience).
    pub issuer: Vec<TrustedIssuerConfig>,
    /// `[[node_attestor.oidc.policy]]`: which tokens attest which agents.
    pub policy: Vec<NodePolicyConfig>,
}

/// One `[[node_attestor.oidc.policy]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePolicyConfig {
    /// Unique name (audit lines and the `oidc:policy:` selector name it).
    pub name: String,
    /// The `issuer` of the `[[node_attestor.oidc.issuer]]` it applies to.
    pub issuer: String,
    /// CEL expression over `claims` that must be true; it must pin an immutable claim.
    pub condition: String,
    /// Agent ID template under `spiffe://<td>/tessera/agent/oidc/`, with `{claim}` placeholders.
    pub spiffe_id: String,
    /// Claims (dotted paths) that become `oidc:claim:<path>:<value>` node selectors.
    #[serde(default)]
    pub selector_claims: Vec<String>,
    /// Record each token's `jti` and refuse it the second time (on by default).
    #[serde(default = "default_true")]
    pub single_use: bool,
}

keyword_enum! {
    /// `node_attestor.x509pop.agent_id_from`: the last segment of an x509pop agent's ID.
    pub enum X509PopAgentId {
        /// SHA-256 of the node certificate (DER), in hex: a new certificate is a new agent.
        Fingerprint = "fingerprint",
        /// The certificate's subject common name: stable across certificate renewals, so the
        /// CA must never issue one name to two machines.
        SubjectCn = "subject_cn",
    }
}

/// `[node_attestor.x509pop]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// PEM file of the CA certificates node certificates must chain to (required).
    #[serde(deserialize_with = "de_path")]
    pub ca_bundle_path: PathBuf,
    /// What names the agent: `fingerprint` (default) or `subject_cn`.
    #[serde(default = "default_x509pop_agent_id")]
    pub agent_id_from: X509PopAgentId,
}

fn default_x509pop_agent_id() -> X509PopAgentId {
    X509PopAgentId::Fingerprint
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

/// `[datastore]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatastoreConfig {
    /// Which datastore (only `sled` so far).
    pub kind: DatastoreKind,
    /// Where the datastore lives; `None` means `<data_dir>/datastore`, see
    /// [`ServerConfig::datastore_path`].
    #[serde(deserialize_with = "de_opt_path")]
    pub path: Option<PathBuf>,
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        Self { kind: DatastoreKind::Sled, path: None }
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

/// `[upstream_authority]`: the "disk" upstream CA. `kind`, `cert_file` and `key_file` are
/// required when the table is present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamAuthorityConfig {
    /// Which upstream authority (only `disk` so far).
    pub kind: UpstreamAuthorityKind,
    /// PEM certificate of the upstream CA that signs the server's intermediate CA; it may be
    /// followed by the upstream's own intermediates, leaf first.
    #[serde(deserialize_with = "de_path")]
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8 or SEC1/PKCS#1) of `cert_file`.
    #[serde(deserialize_with = "de_path")]
    pub key_file: PathBuf,
    /// PEM roots to publish in the trust bundle; `None` means `cert_file` is itself a
    /// self-signed root and is published.
    #[serde(default, deserialize_with = "de_opt_path")]
    pub bundle_file: Option<PathBuf>,
}

// ---- Issue 6: OIDC discovery and SPIFFE federation ------------------------------------------

/// `[oidc]`: `GET /.well-known/openid-configuration` and the JWKS, so cloud providers can
/// trust JWT-SVIDs. Needs `jwt_issuer`, which is the public URL the discovery document is
/// served under (usually behind an HTTPS reverse proxy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcConfig {
    /// Where to serve discovery (plain HTTP); `None` (`""`, the default) disables it.
    #[serde(deserialize_with = "de_opt_socket_addr")]
    pub bind_address: Option<SocketAddr>,
}

keyword_enum! {
    /// A SPIFFE bundle endpoint profile (conformance §6).
    pub enum BundleEndpointProfile {
        /// TLS with a Web PKI certificate for the URL's host.
        HttpsWeb = "https_web",
        /// TLS with an X.509-SVID of a configured SPIFFE ID.
        HttpsSpiffe = "https_spiffe",
    }
}

/// Default `federation.bundle_endpoint.refresh_hint`.
pub const DEFAULT_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);

/// `[federation]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// `[federation.bundle_endpoint]`: serving this trust domain's bundle.
    #[serde(deserialize_with = "de_table")]
    pub bundle_endpoint: BundleEndpointConfig,
    /// `[[federation.federates_with]]`: foreign bundles to fetch.
    pub federates_with: Vec<FederatesWithConfig>,
}

/// `[federation.bundle_endpoint]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BundleEndpointConfig {
    /// Where to serve the bundle over HTTPS; `None` (`""`, the default) disables it.
    #[serde(deserialize_with = "de_opt_socket_addr")]
    pub bind_address: Option<SocketAddr>,
    /// `https_spiffe` (the default: the server's own SVID) or `https_web`.
    pub profile: BundleEndpointProfile,
    /// `https_web`: PEM certificate chain, leaf first.
    #[serde(deserialize_with = "de_opt_path")]
    pub cert_path: Option<PathBuf>,
    /// `https_web`: PEM private key of `cert_path`.
    #[serde(deserialize_with = "de_opt_path")]
    pub key_path: Option<PathBuf>,
    /// `spiffe_refresh_hint` of the served bundle.
    #[serde(deserialize_with = "de_ttl")]
    pub refresh_hint: Duration,
}

impl Default for BundleEndpointConfig {
    fn default() -> Self {
        Self {
            bind_address: None,
            profile: BundleEndpointProfile::HttpsSpiffe,
            cert_path: None,
            key_path: None,
            refresh_hint: DEFAULT_BUNDLE_REFRESH_HINT,
        }
    }
}

/// One `[[federation.federates_with]]` relationship: fetch `trust_domain`'s bundle from
/// `bundle_endpoint_url`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatesWithConfig {
    /// The foreign trust domain.
    #[serde(deserialize_with = "de_trust_domain")]
    pub trust_domain: TrustDomain,
    /// `https://host[:port]/path` of its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// How the endpoint authenticates.
    pub profile: BundleEndpointProfile,
    /// `https_spiffe`: the SPIFFE ID the endpoint's SVID must carry.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub endpoint_spiffe_id: Option<String>,
    /// `https_spiffe`: SPIFFE bundle (JSON) or PEM roots authenticating the endpoint on the
    /// first fetch, when no bundle of that trust domain is stored yet.
    #[serde(default, deserialize_with = "de_opt_path")]
    pub trust_bundle_path: Option<PathBuf>,
    /// `https_web`: PEM roots to trust instead of the system's.
    #[serde(default, deserialize_with = "de_opt_path")]
    pub ca_bundle_path: Option<PathBuf>,
}

// ---- Issue 9: token exchange (workload identity federation, inbound) ----------------------

/// Default `token_exchange.max_concurrent_requests`.
pub const DEFAULT_EXCHANGE_CONCURRENCY: u32 = 64;
/// Default `token_exchange.request_timeout`.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `token_exchange.issuer.leeway`.
pub const DEFAULT_ISSUER_LEEWAY: Duration = Duration::from_secs(60);
/// Longest `token_exchange.issuer.leeway` accepted.
pub const MAX_ISSUER_LEEWAY: Duration = Duration::from_secs(300);
/// Default `token_exchange.issuer.max_token_lifetime`.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Hard cap of `token_exchange.issuer.max_token_lifetime`: 48 hours.
pub const MAX_TOKEN_LIFETIME_CAP: Duration = Duration::from_secs(48 * 3600);
/// Default `token_exchange.issuer.allowed_algorithms`.
pub const DEFAULT_ISSUER_ALGORITHMS: &[&str] = &["RS256", "ES256"];

/// `[token_exchange]`: the RFC 8693 token exchange endpoint (`POST /v1/token`) and the
/// external issuers and policies it trusts. See `crate::token_exchange`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenExchangeConfig {
    /// Where to serve the endpoint over HTTPS; `None` (`""`, the default) disables it.
    #[serde(deserialize_with = "de_opt_socket_addr")]
    pub bind_address: Option<SocketAddr>,
    /// TLS identity: `https_spiffe` (the server's own SVID, the default) or `https_web`.
    pub profile: BundleEndpointProfile,
    /// `https_web`: PEM certificate chain, leaf first.
    #[serde(deserialize_with = "de_opt_path")]
    pub cert_path: Option<PathBuf>,
    /// `https_web`: PEM private key of `cert_path`.
    #[serde(deserialize_with = "de_opt_path")]
    pub key_path: Option<PathBuf>,
    /// Requests served at once; more get `503 temporarily_unavailable`.
    pub max_concurrent_requests: u32,
    /// Longest one request may take (reading the body included).
    #[serde(deserialize_with = "de_ttl")]
    pub request_timeout: Duration,
    /// `[[token_exchange.issuer]]`: the external OIDC issuers whose tokens are accepted.
    pub issuer: Vec<TrustedIssuerConfig>,
    /// `[[token_exchange.policy]]`: which tokens get which SPIFFE ID.
    pub policy: Vec<ExchangePolicyConfig>,
}

impl Default for TokenExchangeConfig {
    fn default() -> Self {
        Self {
            bind_address: None,
            profile: BundleEndpointProfile::HttpsSpiffe,
            cert_path: None,
            key_path: None,
            max_concurrent_requests: DEFAULT_EXCHANGE_CONCURRENCY,
            request_timeout: DEFAULT_EXCHANGE_TIMEOUT,
            issuer: Vec::new(),
            policy: Vec::new(),
        }
    }
}

keyword_enum! {
    /// `token_exchange.issuer.preset`: which claims of the issuer's tokens are immutable IDs.
    pub enum IssuerPreset {
        /// Any OIDC issuer: `immutable_claims` (default `sub`) are the immutable IDs.
        Generic = "generic",
        /// GitHub Actions: `repository_id`, `repository_owner_id`.
        GithubActions = "github_actions",
        /// GitLab CI: `project_id`, `namespace_id`.
        GitlabCi = "gitlab_ci",
        /// Kubernetes service-account tokens: `kubernetes.io.serviceaccount.uid`,
        /// `kubernetes.io.pod.uid`.
        Kubernetes = "kubernetes",
    }
}

/// One `[[token_exchange.issuer]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuerConfig {
    /// The exact `iss` of its tokens (also where OIDC discovery is read from).
    pub issuer: String,
    /// Which claims are immutable IDs.
    #[serde(default = "default_preset")]
    pub preset: IssuerPreset,
    /// Where the JWKS is; `None`: from the discovery document at
    /// `<issuer>/.well-known/openid-configuration`.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub jwks_uri: Option<String>,
    /// The JWKS itself (JSON); when set, nothing is ever fetched for this issuer.
    #[serde(default, deserialize_with = "de_opt_string")]
    pub jwks: Option<String>,
    /// PEM roots to authenticate discovery and JWKS fetches with instead of the system's.
    #[serde(default, deserialize_with = "de_opt_path")]
    pub ca_bundle_path: Option<PathBuf>,
    /// JWS algorithms accepted (never `none` or `HS*`).
    #[serde(default = "default_issuer_algorithms")]
    pub allowed_algorithms: Vec<String>,
    /// The `aud` a token must carry to be exchanged here.
    pub audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (0 to 5 minutes).
    #[serde(default = "default_issuer_leeway", deserialize_with = "de_leeway")]
    pub leeway: Duration,
    /// Longest `exp - iat` accepted (at most 48 hours).
    #[serde(default = "default_max_token_lifetime", deserialize_with = "de_token_lifetime")]
    pub max_token_lifetime: Duration,
    /// Refuse tokens without a `jti` (every `jti` is single use either way).
    #[serde(default = "default_true")]
    pub require_jti: bool,
    /// Claims (dotted paths) that never change for one subject, in addition to the preset's;
    /// a policy's condition must pin one of them.
    #[serde(default)]
    pub immutable_claims: Vec<String>,
}

/// One `[[token_exchange.policy]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangePolicyConfig {
    /// Unique name (audit lines name it).
    pub name: String,
    /// The `issuer` of the `[[token_exchange.issuer]]` it applies to.
    pub issuer: String,
    /// SPIFFE ID template in this trust domain, with `{claim}` placeholders.
    pub spiffe_id: String,
    /// CEL expression over `claims` that must be true; it must pin an immutable claim.
    pub condition: String,
    /// Longest X.509-SVID issued; `None`: `default_x509_svid_ttl`.
    #[serde(default, deserialize_with = "de_opt_ttl")]
    pub x509_svid_ttl: Option<Duration>,
    /// Longest JWT-SVID issued; `None`: `default_jwt_svid_ttl`.
    #[serde(default, deserialize_with = "de_opt_ttl")]
    pub jwt_svid_ttl: Option<Duration>,
}

fn default_preset() -> IssuerPreset {
    IssuerPreset::Generic
}

fn default_issuer_algorithms() -> Vec<String> {
    DEFAULT_ISSUER_ALGORITHMS.iter().map(|alg| (*alg).to_owned()).collect()
}

fn default_issuer_leeway() -> Duration {
    DEFAULT_ISSUER_LEEWAY
}

fn default_max_token_lifetime() -> Duration {
    DEFAULT_MAX_TOKEN_LIFETIME
}

fn default_true() -> bool {
    true
}

impl ServerConfig {
    fn check_token_exchange(&self) -> Result<(), (&'static str, String)> {
        let exchange = &self.token_exchange;
        if exchange.max_concurrent_requests == 0 || exchange.max_concurrent_requests > 10_000 {
            return Err(("token_exchange.max_concurrent_requests", "must be between 1 and 10000".into()));
        }
        match exchange.profile {
            BundleEndpointProfile::HttpsWeb if exchange.bind_address.is_some() => {
                if exchange.cert_path.is_none() {
                    return Err(("token_exchange.cert_path", "is required by the https_web profile".into()));
                }
                if exchange.key_path.is_none() {
                    return Err(("token_exchange.key_path", "is required by the https_web profile".into()));
                }
            }
            BundleEndpointProfile::HttpsSpiffe if exchange.cert_path.is_some() || exchange.key_path.is_some() => {
                return Err((
                    "token_exchange.cert_path",
                    "only the https_web profile takes certificate files; https_spiffe serves the server's own SVID"
                        .into(),
                ));
            }
            _ => {}
        }
        crate::token_exchange::compile(self).map(|_| ())
    }
}

impl ServerConfig {
    fn check_federation(&self) -> Result<(), (&'static str, String)> {
        if self.oidc.bind_address.is_some() {
            let Some(issuer) = &self.jwt_issuer else {
                return Err(("oidc.bind_address", "needs jwt_issuer: the public URL of the discovery document".into()));
            };
            crate::oidc::check_issuer(issuer).map_err(|message| ("jwt_issuer", message))?;
        }
        let endpoint = &self.federation.bundle_endpoint;
        match endpoint.profile {
            BundleEndpointProfile::HttpsWeb if endpoint.bind_address.is_some() => {
                if endpoint.cert_path.is_none() {
                    return Err((
                        "federation.bundle_endpoint.cert_path",
                        "is required by the https_web profile".into(),
                    ));
                }
                if endpoint.key_path.is_none() {
                    return Err(("federation.bundle_endpoint.key_path", "is required by the https_web profile".into()));
                }
            }
            BundleEndpointProfile::HttpsSpiffe if endpoint.cert_path.is_some() || endpoint.key_path.is_some() => {
                return Err((
                    "federation.bundle_endpoint.cert_path",
                    "only the https_web profile takes certificate files; https_spiffe serves the server's own SVID"
                        .into(),
                ));
            }
            _ => {}
        }
        let mut seen = Vec::new();
        for relationship in &self.federation.federates_with {
            let td = &relationship.trust_domain;
            if td == &self.trust_domain {
                return Err((
                    "federation.federates_with.trust_domain",
                    format!("{td} is this server's own trust domain"),
                ));
            }
            if seen.contains(&td) {
                return Err(("federation.federates_with.trust_domain", format!("{td} is listed twice")));
            }
            seen.push(td);
            crate::federation::check_relationship(relationship)
                .map_err(|(key, message)| (key, format!("trust domain {td}: {message}")))?;
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            bind_address: DEFAULT_BIND_ADDRESS,
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            ca_key_type: KeyType::EcP256,
            ca_ttl: DEFAULT_CA_TTL,
            jwt_key_type: KeyType::EcP256,
            jwt_issuer: None,
            default_x509_svid_ttl: DEFAULT_X509_SVID_TTL,
            default_jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
            agent_ttl: DEFAULT_AGENT_TTL,
            datastore: DatastoreConfig::default(),
            health: HealthConfig::default(),
            metrics: MetricsConfig::default(),
            upstream_authority: None,
            oidc: OidcConfig::default(),
            federation: FederationConfig::default(),
            node_attestor: NodeAttestorConfig::default(),
            agent_svid_rate_limit: DEFAULT_AGENT_SVID_RATE_LIMIT,
            max_concurrent_attestations: 0,
            max_concurrent_signing: 0,
            overload_wait: DEFAULT_OVERLOAD_WAIT,
            audit: AuditConfig::default(),
            token_exchange: TokenExchangeConfig::default(),
        }
    }
}

#[allow(clippy::expect_used, reason = "a constant known to be valid; the defaults test covers it")]
fn default_trust_domain() -> TrustDomain {
    TrustDomain::new(DEFAULT_TRUST_DOMAIN).expect("the default trust domain is valid")
}

impl ServerConfig {
    /// Where audit lines go: disabled, stdout, `audit.path`, or `<data_dir>/audit.log`.
    pub fn audit_target(&self) -> tessera_common::audit::AuditTarget {
        tessera_common::audit::target_from_config(self.audit.enabled, self.audit.path.as_deref(), &self.data_dir)
    }

    /// Where the datastore lives: `datastore.path`, else `<data_dir>/datastore`.
    pub fn datastore_path(&self) -> PathBuf {
        self.datastore.path.clone().unwrap_or_else(|| self.data_dir.join(DEFAULT_DATASTORE_DIR))
    }

    /// The number of attestations processed at once: `max_concurrent_attestations`, or when it
    /// is 0, [`automatic_concurrency`].
    pub fn attestation_concurrency(&self) -> usize {
        resolve_concurrency(self.max_concurrent_attestations)
    }

    /// The number of signing calls processed at once: `max_concurrent_signing`, or when it is
    /// 0, [`automatic_concurrency`].
    pub fn signing_concurrency(&self) -> usize {
        resolve_concurrency(self.max_concurrent_signing)
    }

    /// Settings that are accepted but probably not what the operator meant, for the caller to
    /// log as warnings once logging is set up. Today: lifetimes longer than `ca_ttl`, which the
    /// server always caps at the CA's expiry.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let ca_ttl = self.ca_ttl;
        [
            ("default_x509_svid_ttl", self.default_x509_svid_ttl),
            ("default_jwt_svid_ttl", self.default_jwt_svid_ttl),
            ("agent_ttl", self.agent_ttl),
        ]
        .into_iter()
        .filter(|(_, ttl)| *ttl > ca_ttl)
        .map(|(key, ttl)| ConfigWarning {
            key,
            message: format!(
                "{} is longer than ca_ttl ({}): such credentials are capped at the CA's expiry",
                humantime::format_duration(ttl),
                humantime::format_duration(ca_ttl)
            ),
        })
        .collect()
    }

    /// Checks between keys, after every value parsed on its own. Returns the key to blame.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let mut listeners = vec![("bind_address", self.bind_address)];
        if let Some(addr) = self.health.bind_address {
            listeners.push(("health.bind_address", addr));
        }
        if let Some(addr) = self.metrics.bind_address {
            listeners.push(("metrics.bind_address", addr));
        }
        if let Some(addr) = self.oidc.bind_address {
            listeners.push(("oidc.bind_address", addr));
        }
        if let Some(addr) = self.federation.bundle_endpoint.bind_address {
            listeners.push(("federation.bundle_endpoint.bind_address", addr));
        }
        if let Some(addr) = self.token_exchange.bind_address {
            listeners.push(("token_exchange.bind_address", addr));
        }
        self.check_federation()?;
        for (key, value) in [
            ("max_concurrent_attestations", self.max_concurrent_attestations),
            ("max_concurrent_signing", self.max_concurrent_signing),
        ] {
            if value > MAX_CONCURRENCY {
                return Err((key, format!("{value} is too large: the maximum is {MAX_CONCURRENCY} (0 = automatic)")));
            }
        }
        self.check_token_exchange()?;
        crate::agent_api::node_token::compile(self)?;
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, earlier)| earlier == addr) {
                return Err((key, format!("{addr} is already used by {other}")));
            }
        }
        Ok(())
    }
}

/// The concurrency used when `max_concurrent_attestations` or `max_concurrent_signing` is 0:
/// twice the CPUs the process may use (`std::thread::available_parallelism`, which honours
/// affinity masks and cgroup quotas), and at least 4.
pub fn automatic_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).saturating_mul(2).max(4)
}

fn resolve_concurrency(configured: u32) -> usize {
    match usize::try_from(configured) {
        Ok(0) | Err(_) => automatic_concurrency(),
        Ok(n) => n,
    }
}

/// Loads the server configuration: `None` gives the embedded defaults (no file is read),
/// `Some(file)` reads and checks that TOML file.
pub fn load(file: Option<&Path>) -> Result<ServerConfig, ConfigError> {
    let Some(file) = file else {
        return Ok(ServerConfig::default());
    };
    parse(&read_file(file)?, file)
}

/// Parses and checks configuration text; `file` is only used to name the source in errors.
pub fn parse(text: &str, file: &Path) -> Result<ServerConfig, ConfigError> {
    let config: ServerConfig = parse_toml(text, file)?;
    config.check().map_err(|(key, message)| ConfigError::invalid(file, key, message))?;
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Server-specific value deserializers; the shared ones are in `tessera_common::config`.

fn de_ca_key_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<KeyType, D::Error> {
    keyword(deserializer, CA_KEY_TYPES, KeyType::as_str)
}

fn de_jwt_key_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<KeyType, D::Error> {
    keyword(deserializer, JWT_KEY_TYPES, KeyType::as_str)
}

fn de_wait<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    de_str(deserializer, "a duration such as \"500ms\" or \"2s\", or \"0s\"", |value| {
        let wait = humantime::parse_duration(value).map_err(|error| {
            format!("invalid duration {value:?}: {error}; expected a duration such as \"500ms\" or \"2s\"")
        })?;
        if wait > MAX_OVERLOAD_WAIT {
            return Err(format!(
                "duration {value:?} is too long: the maximum is {}",
                humantime::format_duration(MAX_OVERLOAD_WAIT)
            ));
        }
        Ok(wait)
    })
}

const DURATION_FORM: &str = "a duration such as \"90s\", \"5m\", \"1h\" or \"7d\"";

fn de_opt_ttl<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    de_str(deserializer, "a duration such as \"5m\", or \"\" for the default", |value| {
        if value.is_empty() { Ok(None) } else { parse_ttl(value).map(Some) }
    })
}

fn de_leeway<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    de_str(deserializer, DURATION_FORM, |value| {
        let leeway = humantime::parse_duration(value)
            .map_err(|error| format!("invalid duration {value:?}: {error}; expected {DURATION_FORM}"))?;
        if leeway > MAX_ISSUER_LEEWAY || leeway.subsec_nanos() != 0 {
            return Err(format!("leeway {value:?} must be a whole number of seconds between 0s and 5m"));
        }
        Ok(leeway)
    })
}

fn de_token_lifetime<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    de_str(deserializer, DURATION_FORM, |value| {
        let lifetime = parse_ttl(value)?;
        if lifetime > MAX_TOKEN_LIFETIME_CAP {
            return Err(format!("max_token_lifetime {value:?} is above the hard cap of 48h"));
        }
        Ok(lifetime)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_common::config::{one_of, struct_fields};

    fn parse_str(text: &str) -> Result<ServerConfig, ConfigError> {
        parse(text, Path::new("/etc/tessera/server.toml"))
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        struct_fields::<T>().unwrap()
    }

    #[test]
    fn server_keys_are_exactly_the_struct_fields() {
        let mut from_code: Vec<String> = Vec::new();
        for field in fields_of::<ServerConfig>() {
            let nested = match *field {
                "datastore" => Some(fields_of::<DatastoreConfig>()),
                "health" => Some(fields_of::<HealthConfig>()),
                "metrics" => Some(fields_of::<MetricsConfig>()),
                "upstream_authority" => Some(fields_of::<UpstreamAuthorityConfig>()),
                "oidc" => Some(fields_of::<OidcConfig>()),
                "audit" => Some(fields_of::<AuditConfig>()),
                "federation" => {
                    for (table, keys) in [
                        ("bundle_endpoint", fields_of::<BundleEndpointConfig>()),
                        ("federates_with", fields_of::<FederatesWithConfig>()),
                    ] {
                        from_code.extend(keys.iter().map(|key| format!("federation.{table}.{key}")));
                    }
                    continue;
                }
                "node_attestor" => {
                    assert_eq!(fields_of::<NodeAttestorConfig>(), ["x509pop", "k8s_psat", "oidc"]);
                    let keys = fields_of::<X509PopConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.x509pop.{key}")));
                    assert_eq!(fields_of::<K8sPsatConfig>(), ["cluster"]);
                    let keys = fields_of::<K8sPsatClusterConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.k8s_psat.cluster.{key}")));
                    assert_eq!(fields_of::<OidcNodeAttestorConfig>(), ["issuer", "policy"]);
                    let keys = fields_of::<TrustedIssuerConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.oidc.issuer.{key}")));
                    let keys = fields_of::<NodePolicyConfig>();
                    from_code.extend(keys.iter().map(|key| format!("node_attestor.oidc.policy.{key}")));
                    continue;
                }
                "token_exchange" => {
                    for key in fields_of::<TokenExchangeConfig>() {
                        let nested = match *key {
                            "issuer" => fields_of::<TrustedIssuerConfig>(),
                            "policy" => fields_of::<ExchangePolicyConfig>(),
                            _ => {
                                from_code.push(format!("token_exchange.{key}"));
                                continue;
                            }
                        };
                        from_code.extend(nested.iter().map(|inner| format!("token_exchange.{key}.{inner}")));
                    }
                    continue;
                }
                _ => None,
            };
            match nested {
                Some(keys) => from_code.extend(keys.iter().map(|key| format!("{field}.{key}"))),
                None => from_code.push((*field).to_owned()),
            }
        }
        let listed: Vec<String> = SERVER_KEYS.iter().map(|key| (*key).to_owned()).collect();
        assert_eq!(from_code, listed);
    }

    #[test]
    fn empty_text_gives_defaults() {
        assert_eq!(parse_str("").unwrap(), ServerConfig::default());
    }

    #[test]
    fn datastore_path_defaults_under_data_dir() {
        let config = parse_str("data_dir = \"/var/lib/tessera\"").unwrap();
        assert_eq!(config.datastore_path(), PathBuf::from("/var/lib/tessera/datastore"));
        let config = parse_str("data_dir = \"/var/lib/tessera\"\n[datastore]\npath = \"\"").unwrap();
        assert_eq!(config.datastore_path(), PathBuf::from("/var/lib/tessera/datastore"));
        let config = parse_str("[datastore]\npath = \"/srv/db\"").unwrap();
        assert_eq!(config.datastore_path(), PathBuf::from("/srv/db"));
    }

    #[test]
    fn keywords_round_trip() {
        for level in LogLevel::ALL {
            assert_eq!(level.as_str().parse::<LogLevel>().unwrap(), *level);
        }
        assert_eq!("ec-p384".parse::<KeyType>().unwrap(), KeyType::EcP384);
        assert_eq!(
            "dsa".parse::<KeyType>().unwrap_err(),
            "invalid value \"dsa\": expected one of \"ec-p256\", \"ec-p384\" or \"rsa-2048\""
        );
        assert_eq!(one_of(&[DatastoreKind::Sled], DatastoreKind::as_str), "\"sled\"");
    }

    #[test]
    fn warnings_for_lifetimes_beyond_the_ca() {
        assert!(ServerConfig::default().warnings().is_empty());
        let config = parse_str("ca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"2h\"").unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].key, "default_x509_svid_ttl");
        assert!(warnings[0].to_string().starts_with("config key default_x509_svid_ttl: 2h is longer than ca_ttl (1h)"));
    }

    #[test]
    fn overload_bounds_parse_resolve_and_refuse_bad_values() {
        let config =
            parse_str("max_concurrent_attestations = 3\nmax_concurrent_signing = 7\noverload_wait = \"250ms\"")
                .unwrap();
        assert_eq!((config.attestation_concurrency(), config.signing_concurrency()), (3, 7));
        assert_eq!(config.overload_wait, Duration::from_millis(250));
        let automatic = ServerConfig::default();
        assert_eq!(automatic.signing_concurrency(), automatic_concurrency());
        assert!(automatic_concurrency() >= 4);
        assert_eq!(parse_str("overload_wait = \"0s\"").unwrap().overload_wait, Duration::ZERO);
        let err = parse_str("max_concurrent_signing = 100000").unwrap_err();
        assert_eq!(err.key(), Some("max_concurrent_signing"));
        assert!(err.to_string().contains("the maximum is 65536"), "{err}");
        let err = parse_str("overload_wait = \"2m\"").unwrap_err();
        assert_eq!(err.key(), Some("overload_wait"));
        assert!(err.to_string().contains("the maximum is 1m"), "{err}");
        let err = parse_str("max_concurrent_attestations = -1").unwrap_err();
        assert_eq!(err.key(), Some("max_concurrent_attestations"));
        let err = parse_str("overload_wait = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("key overload_wait"), "{err}");
    }

    #[test]
    fn listeners_must_differ() {
        let err = parse_str("bind_address = \"127.0.0.1:9000\"\n[health]\nbind_address = \"127.0.0.1:9000\"")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config file /etc/tessera/server.toml: key health.bind_address: 127.0.0.1:9000 is already used by \
             bind_address"
        );
        // Port 0 means "any free port": several listeners may ask for it.
        parse_str("bind_address = \"127.0.0.1:0\"\n[health]\nbind_address = \"127.0.0.1:0\"").unwrap();
    }

    const GITHUB_ISSUER: &str = r#"
[token_exchange]
bind_address = "127.0.0.1:0"

[[token_exchange.issuer]]
issuer = "https://token.actions.githubusercontent.com"
preset = "github_actions"
audience = "tessera"
"#;

    #[test]
    fn token_exchange_policies_must_pin_an_immutable_claim() {
        let good = format!(
            "{GITHUB_ISSUER}\n[[token_exchange.policy]]\nname = \"ci\"\nissuer = \"https://token.actions.githubusercontent.com\"\n\
             spiffe_id = \"spiffe://example.org/gh/{{repository_id}}\"\ncondition = 'claims.repository_id == \"42\"'\n"
        );
        let config = parse_str(&good).unwrap();
        assert_eq!(config.token_exchange.issuer[0].leeway, DEFAULT_ISSUER_LEEWAY);
        assert_eq!(config.token_exchange.issuer[0].max_token_lifetime, DEFAULT_MAX_TOKEN_LIFETIME);
        for (condition, expected) in [
            (r#"claims.aud == "tessera""#, "pins no immutable claim"),
            (r#"claims.repository == "octo/app" && claims.repository_owner == "octo""#, "pins no immutable claim"),
            ("", "must not be empty"),
        ] {
            let text = good.replace(r#"claims.repository_id == "42""#, condition);
            let err = parse_str(&text).unwrap_err();
            assert_eq!(err.key(), Some("token_exchange.policy.condition"), "{err}");
            let message = err.to_string();
            assert!(
                message.starts_with("config file /etc/tessera/server.toml: key token_exchange.policy.condition"),
                "{message}"
            );
            assert!(message.contains(expected) && message.contains("policy \"ci\""), "{message}");
        }
    }

    #[test]
    fn token_exchange_issuer_checks() {
        for (patch, key, expected) in [
            ("allowed_algorithms = [\"none\"]", "token_exchange.issuer.allowed_algorithms", "never accepted"),
            ("allowed_algorithms = [\"HS256\"]", "token_exchange.issuer.allowed_algorithms", "never accepted"),
            ("allowed_algorithms = [\"EdDSA\"]", "token_exchange.issuer.allowed_algorithms", "is not one of"),
            ("max_token_lifetime = \"49h\"", "token_exchange.issuer[0].max_token_lifetime", "hard cap of 48h"),
            ("leeway = \"10m\"", "token_exchange.issuer[0].leeway", "between 0s and 5m"),
            ("jwks = \"{}\"", "token_exchange.issuer.jwks", "no \"keys\""),
            ("immutable_claims = [\"aud\"]", "token_exchange.issuer.immutable_claims", "identifies no subject"),
        ] {
            let err = parse_str(&format!("{GITHUB_ISSUER}{patch}\n")).unwrap_err();
            assert_eq!(err.key(), Some(key), "{patch}: {err}");
            assert!(err.to_string().contains(expected), "{patch}: {err}");
        }
        let err = parse_str(&GITHUB_ISSUER.replace("https://token", "http://token")).unwrap_err();
        assert_eq!(err.key(), Some("token_exchange.issuer.issuer"), "{err}");
        let err = parse_str(&GITHUB_ISSUER.replace("audience = \"tessera\"", "")).unwrap_err();
        assert_eq!(err.key(), Some("token_exchange.issuer[0].audience"), "{err}");
        let err = parse_str(&format!(
            "{GITHUB_ISSUER}\n[[token_exchange.policy]]\nname = \"x\"\nissuer = \"https://other\"\nspiffe_id = \"spiffe://example.org/a\"\n\
             condition = 'claims.repository_id == \"1\"'\n"
        ))
        .unwrap_err();
        assert_eq!(err.key(), Some("token_exchange.policy.issuer"), "{err}");
        let err = parse_str(&format!(
            "{GITHUB_ISSUER}\n[[token_exchange.policy]]\nname = \"x\"\nissuer = \"https://token.actions.githubusercontent.com\"\n\
             spiffe_id = \"spiffe://other.org/{{sub}}\"\ncondition = 'claims.repository_id == \"1\"'\n"
        ))
        .unwrap_err();
        assert_eq!(err.key(), Some("token_exchange.policy.spiffe_id"), "{err}");
        let err = parse_str("[token_exchange]\nbind_address = \"127.0.0.1:0\"\nprofile = \"https_web\"\n").unwrap_err();
        assert_eq!(err.key(), Some("token_exchange.cert_path"), "{err}");
    }
}
