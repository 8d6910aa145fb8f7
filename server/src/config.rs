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

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
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
    "agent_svid_rate_limit",
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
/// Default `agent_ttl`.
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(3600);
/// The datastore directory under `data_dir` when `datastore.path` is unset.
pub const DEFAULT_DATASTORE_DIR: &str = "datastore";

/// Shortest TTL accepted.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest TTL accepted: 36525 days (100 humantime years).
pub const MAX_TTL: Duration = Duration::from_secs(36525 * 86400);

/// Longest Unix socket path accepted, in bytes (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Key types the server's X.509 CA may use (`ca_key_type`).
pub const CA_KEY_TYPES: &[KeyType] = &[KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048];

/// Key types the JWT-SVID signing key may use (`jwt_key_type`): ES256 and RS256, exactly the
/// contract's list. `ec-p384` (ES384) is refused: JWT-SVID validators are only required to
/// support what the contract names, and widening the list later is compatible while narrowing
/// it would not be.
pub const JWT_KEY_TYPES: &[KeyType] = &[KeyType::EcP256, KeyType::Rsa2048];

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
    /// SVIDs (X.509 items, JWT-SVIDs, agent renewals) one agent may have signed per second on
    /// average; 0 = unlimited. Excess calls get `RESOURCE_EXHAUSTED`.
    pub agent_svid_rate_limit: u32,
    /// `[token_exchange]`: external OIDC tokens traded for SVIDs (issue 9).
    #[serde(deserialize_with = "de_table")]
    pub token_exchange: TokenExchangeConfig,
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
            agent_svid_rate_limit: DEFAULT_AGENT_SVID_RATE_LIMIT,
            token_exchange: TokenExchangeConfig::default(),
        }
    }
}

#[allow(clippy::expect_used, reason = "a constant known to be valid; the defaults test covers it")]
fn default_trust_domain() -> TrustDomain {
    TrustDomain::new(DEFAULT_TRUST_DOMAIN).expect("the default trust domain is valid")
}

impl ServerConfig {
    /// Where the datastore lives: `datastore.path`, else `<data_dir>/datastore`.
    pub fn datastore_path(&self) -> PathBuf {
        self.datastore.path.clone().unwrap_or_else(|| self.data_dir.join(DEFAULT_DATASTORE_DIR))
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
        self.check_token_exchange()?;
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

/// A setting that is valid but suspicious; see [`ServerConfig::warnings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The dotted key concerned.
    pub key: &'static str,
    /// What is suspicious about it.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key {}: {}", self.key, self.message)
    }
}

/// Loads the server configuration: `None` gives the embedded defaults (no file is read),
/// `Some(file)` reads and checks that TOML file.
pub fn load(file: Option<&Path>) -> Result<ServerConfig, ConfigError> {
    let Some(file) = file else {
        return Ok(ServerConfig::default());
    };
    let text = std::fs::read_to_string(file)
        .map_err(|error| ConfigError::Read { file: file.to_path_buf(), message: io_message(&error) })?;
    parse(&text, file)
}

/// Parses and checks configuration text; `file` is only used to name the source in errors.
pub fn parse(text: &str, file: &Path) -> Result<ServerConfig, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| syntax_error(file, text, &error))?;
    let config: ServerConfig =
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
// Error shaping. The same code lives in the agent's config module.

fn at_line(line: Option<usize>) -> String {
    line.map(|line| format!(" (line {line})")).unwrap_or_default()
}

fn on_line(line: Option<usize>) -> String {
    line.map(|line| format!(" on line {line}")).unwrap_or_default()
}

/// The I/O error without Rust's " (os error N)" suffix.
fn io_message(error: &std::io::Error) -> String {
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

fn de_ca_key_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<KeyType, D::Error> {
    keyword(deserializer, CA_KEY_TYPES, KeyType::as_str)
}

fn de_jwt_key_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<KeyType, D::Error> {
    keyword(deserializer, JWT_KEY_TYPES, KeyType::as_str)
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

const DURATION_FORM: &str = "a duration such as \"90s\", \"5m\", \"1h\" or \"7d\"";

fn de_ttl<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    de_str(deserializer, DURATION_FORM, parse_ttl)
}

fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value)
        .map_err(|error| format!("invalid duration {value:?}: {error}; expected {DURATION_FORM}"))?;
    if ttl < MIN_TTL {
        return Err(format!("duration {value:?} is too short: the minimum is 1s"));
    }
    if ttl > MAX_TTL {
        return Err(format!("duration {value:?} is too long: the maximum is {}", humantime::format_duration(MAX_TTL)));
    }
    if ttl.subsec_nanos() != 0 {
        return Err(format!("duration {value:?} is not a whole number of seconds"));
    }
    Ok(ttl)
}

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

const SOCKET_ADDR_FORM: &str = "an IP address and port such as \"127.0.0.1:8081\" or \"[::1]:8081\"";

fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| format!("invalid socket address {value:?}: expected {SOCKET_ADDR_FORM}"))
}

fn de_socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    de_str(deserializer, SOCKET_ADDR_FORM, parse_socket_addr)
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

fn de_opt_table<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    de_table(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<ServerConfig, ConfigError> {
        parse(text, Path::new("/etc/tessera/server.toml"))
    }

    /// A deserializer that only records the field list serde's derive passes to
    /// `deserialize_struct`, to compare the code's keys with [`SERVER_KEYS`].
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
    fn server_keys_are_exactly_the_struct_fields() {
        let mut from_code: Vec<String> = Vec::new();
        for field in fields_of::<ServerConfig>() {
            let nested = match *field {
                "datastore" => Some(fields_of::<DatastoreConfig>()),
                "health" => Some(fields_of::<HealthConfig>()),
                "metrics" => Some(fields_of::<MetricsConfig>()),
                "upstream_authority" => Some(fields_of::<UpstreamAuthorityConfig>()),
                "oidc" => Some(fields_of::<OidcConfig>()),
                "federation" => {
                    for (table, keys) in [
                        ("bundle_endpoint", fields_of::<BundleEndpointConfig>()),
                        ("federates_with", fields_of::<FederatesWithConfig>()),
                    ] {
                        from_code.extend(keys.iter().map(|key| format!("federation.{table}.{key}")));
                    }
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
    fn ttl_bounds() {
        assert_eq!(parse_ttl("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_ttl("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_ttl("0s").unwrap_err().contains("too short"));
        assert!(parse_ttl("500ms").unwrap_err().contains("too short"));
        assert!(parse_ttl("1500ms").unwrap_err().contains("whole number of seconds"));
        assert!(parse_ttl("101y").unwrap_err().contains("too long"));
        assert!(parse_ttl("90").unwrap_err().contains("invalid duration \"90\""));
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
    fn line_and_column() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 5), (3, 1));
        assert_eq!(line_col("é\nx", 99), (2, 2));
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

    #[test]
    fn io_message_drops_the_os_error_number() {
        let error = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_message(&error), "No such file or directory");
    }
}
