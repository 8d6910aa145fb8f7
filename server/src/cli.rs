//! The `tessera-server` command line, as fixed by the interface contract.
//!
//! Management subcommands talk to a running server over its admin socket. TTL flags are whole
//! seconds; `--selector` takes `type:value` where the value may contain colons.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default admin socket path, shared by `run` (via the config default) and the clients.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/tessera-server/private/admin.sock";

/// Top-level command line of `tessera-server`.
#[derive(Debug, Parser)]
#[command(
    name = "tessera-server",
    version,
    about = "The Tessera server: CA and control plane of one SPIFFE trust domain"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every `tessera-server` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run {
        /// Configuration file (TOML). Without it the embedded defaults apply.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Exit 0 when the server's datastore answers and its CA can sign.
    Healthcheck(AdminArgs),
    /// Join tokens for agent attestation.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Trust bundles (own and federated).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Mint X.509-SVIDs directly (operator use).
    #[command(subcommand)]
    X509(X509Command),
    /// Mint JWT-SVIDs directly (operator use).
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Federation relationships: foreign trust bundles fetched from bundle endpoints.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Forced rotation of the server's own X.509 CA and JWT signing key.
    #[command(name = "localauthority", subcommand)]
    LocalAuthority(LocalAuthorityCommand),
}

/// Options shared by every management subcommand.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Path of the server's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// How management subcommands print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Human,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a single-use join token. Prints `Token: <token>`.
    Generate {
        /// Also register a node-alias entry: the agent attested with this token gets this ID.
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        /// Token lifetime in seconds.
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Flags shared by `entry create` and `entry update`.
#[derive(Debug, Clone, Args)]
pub struct EntryFields {
    /// Parent SPIFFE ID (an agent, or the server ID for node-alias entries).
    #[arg(long, value_name = "ID")]
    pub parent_id: Option<String>,
    /// SPIFFE ID issued to matching workloads.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// Selector `type:value`; repeat for several (all must match).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub x509_svid_ttl: Option<u64>,
    /// JWT-SVID lifetime in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub jwt_svid_ttl: Option<u64>,
    /// DNS SAN to add to the X.509-SVID; repeatable.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// Trust domain whose bundle the workload receives; repeatable.
    #[arg(long = "federates-with", value_name = "TD")]
    pub federates_with: Vec<String>,
    /// Hint passed to workloads to tell identities apart.
    #[arg(long, value_name = "TEXT")]
    pub hint: Option<String>,
    /// The workload may use the admin API.
    #[arg(long)]
    pub admin: bool,
    /// The workload is a downstream CA.
    #[arg(long)]
    pub downstream: bool,
    /// Expiry of the entry itself (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create a registration entry. Prints `Entry ID: <id>`.
    Create {
        #[command(flatten)]
        fields: EntryFields,
        /// Use this entry ID instead of a generated one.
        #[arg(long, value_name = "ID")]
        entry_id: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show entries, optionally filtered.
    Show {
        /// Show only this entry.
        #[arg(long, value_name = "ID")]
        entry_id: Option<String>,
        /// Only entries with this SPIFFE ID.
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        /// Only entries with this parent ID.
        #[arg(long, value_name = "ID")]
        parent_id: Option<String>,
        /// Only entries having this selector among theirs; repeatable (all must be present).
        #[arg(long = "selector", value_name = "TYPE:VALUE")]
        selectors: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Update an entry: only the flags given change.
    Update {
        /// The entry to update.
        #[arg(long, value_name = "ID")]
        entry_id: String,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete an entry.
    Delete {
        /// The entry to delete.
        #[arg(long, value_name = "ID")]
        entry_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Count entries.
    Count {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Bundle encodings on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// PEM `CERTIFICATE` blocks (X.509 authorities only).
    Pem,
    /// The SPIFFE bundle JSON document.
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Show this trust domain's bundle.
    Show {
        /// Encoding of the printed bundle.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List federated bundles.
    List {
        /// Encoding of the printed bundles.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set (create or replace) a federated bundle.
    Set {
        /// Trust domain ID of the bundle, `spiffe://TD`.
        #[arg(long, value_name = "spiffe://TD")]
        id: String,
        /// File holding the bundle.
        #[arg(long, value_name = "FILE")]
        path: PathBuf,
        /// Encoding of the file.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a federated bundle.
    Delete {
        /// Trust domain ID of the bundle, `spiffe://TD`.
        #[arg(long, value_name = "spiffe://TD")]
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show one agent.
    Show {
        /// SPIFFE ID of the agent.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Ban an agent: it keeps no valid serial and cannot attest again.
    Ban {
        /// SPIFFE ID of the agent.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Evict an agent: it must attest again.
    Evict {
        /// SPIFFE ID of the agent.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Mint an X.509-SVID for a new EC P-256 key generated here (only a CSR is sent).
    Mint {
        /// SPIFFE ID of the SVID (in the server's trust domain).
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        /// Lifetime in seconds (default: the server's default_x509_svid_ttl; capped by the CA).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// DNS SAN to add; repeatable.
        #[arg(long = "dns-name", value_name = "NAME")]
        dns_names: Vec<String>,
        /// Write svid.pem, key.pem (mode 0600) and bundle.pem into this directory instead of
        /// printing them.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Mint a JWT-SVID. Prints the token.
    Mint {
        /// `sub` of the token (in the server's trust domain).
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        /// `aud` value; at least one, repeatable.
        #[arg(long = "audience", value_name = "AUD", required = true)]
        audiences: Vec<String>,
        /// Lifetime in seconds (default: the server's default_jwt_svid_ttl; capped by the CA).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn entry_create_accepts_repeated_selectors_with_colons_in_values() {
        let cli = Cli::try_parse_from([
            "tessera-server",
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/tessera/agent/join_token/abc",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--selector",
            "unix:uid:1000",
            "--selector",
            "unix:path:/usr/bin/web",
        ])
        .unwrap();
        let Command::Entry(EntryCommand::Create { fields, .. }) = cli.command else {
            panic!("parsed into the wrong subcommand");
        };
        assert_eq!(fields.selectors, ["unix:uid:1000", "unix:path:/usr/bin/web"]);
    }

    #[test]
    fn jwt_mint_requires_an_audience() {
        let err = Cli::try_parse_from(["tessera-server", "jwt", "mint", "--spiffe-id", "spiffe://example.org/a"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn authority_ids_may_start_with_a_hyphen() {
        // JWT key IDs are base64url, so about one in 32 begins with '-'.
        for verb in ["activate", "taint", "revoke"] {
            let cli = Cli::try_parse_from(["tessera-server", "localauthority", "jwt", verb, "--authority-id", "-QyZ3"])
                .unwrap_or_else(|e| panic!("{verb}: {e}"));
            let Command::LocalAuthority(LocalAuthorityCommand::Jwt(action)) = cli.command else {
                panic!("parsed into the wrong subcommand");
            };
            let id = match action {
                LocalAuthorityAction::Activate { authority_id, .. }
                | LocalAuthorityAction::Taint { authority_id, .. }
                | LocalAuthorityAction::Revoke { authority_id, .. } => authority_id,
                LocalAuthorityAction::Show { .. } | LocalAuthorityAction::Prepare { .. } => {
                    panic!("{verb} parsed as a step without an ID")
                }
            };
            assert_eq!(id, "-QyZ3");
        }
    }

    #[test]
    fn ttl_flags_are_whole_seconds() {
        let err = Cli::try_parse_from(["tessera-server", "token", "generate", "--ttl", "5m"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}

// ---- Issue 6: federation relationships ------------------------------------------------------

/// `--profile` of a federation relationship.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FederationProfile {
    /// TLS with a Web PKI certificate for the URL's host.
    #[value(name = "https_web")]
    HttpsWeb,
    /// TLS with an X.509-SVID carrying `--endpoint-spiffe-id`.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
}

/// What `federation create` and `federation update` take.
#[derive(Debug, Clone, Args)]
pub struct FederationFields {
    /// The foreign trust domain (`example.org` or `spiffe://example.org`).
    #[arg(long, value_name = "TD")]
    pub trust_domain: String,
    /// `https://host[:port]/path` of its bundle endpoint.
    #[arg(long, value_name = "URL")]
    pub bundle_endpoint_url: String,
    /// How the endpoint authenticates.
    #[arg(long, value_enum)]
    pub profile: FederationProfile,
    /// https_spiffe: the SPIFFE ID the endpoint must present.
    #[arg(long, value_name = "ID")]
    pub endpoint_spiffe_id: Option<String>,
    /// https_spiffe: bundle (SPIFFE JSON or PEM) of the endpoint's trust domain for the first fetch.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle_path: Option<PathBuf>,
    /// https_web: PEM roots to trust instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle_path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Create a relationship (stored by the server, fetched at once).
    Create {
        #[command(flatten)]
        fields: FederationFields,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List relationships with their fetch status.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show one relationship.
    Show {
        /// The foreign trust domain.
        #[arg(long, value_name = "TD")]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replace a relationship created with `create`.
    Update {
        #[command(flatten)]
        fields: FederationFields,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a relationship and the bundle it fetched.
    Delete {
        /// The foreign trust domain.
        #[arg(long, value_name = "TD")]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Fetch the bundle now.
    Refresh {
        /// The foreign trust domain.
        #[arg(long, value_name = "TD")]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

// ---- localauthority (forced rotation) -----------------------------------------------------

/// `localauthority x509|jwt ...`.
#[derive(Debug, Subcommand)]
pub enum LocalAuthorityCommand {
    /// The X.509 CA that signs X.509-SVIDs.
    #[command(subcommand)]
    X509(LocalAuthorityAction),
    /// The key that signs JWT-SVIDs.
    #[command(subcommand)]
    Jwt(LocalAuthorityAction),
}

/// One forced-rotation step.
#[derive(Debug, Subcommand)]
pub enum LocalAuthorityAction {
    /// Show the active, prepared and old authorities.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Create a new authority and publish it in the bundle (it does not sign yet).
    Prepare {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the prepared authority the one that signs; the active one becomes old.
    Activate {
        /// ID of the prepared authority (from `show`).
        #[arg(long, value_name = "ID", allow_hyphen_values = true)]
        authority_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Taint an old authority: agents replace every SVID it signed.
    Taint {
        /// ID of the old authority.
        #[arg(long, value_name = "ID", allow_hyphen_values = true)]
        authority_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a tainted old authority from the bundle everywhere.
    Revoke {
        /// ID of the tainted authority.
        #[arg(long, value_name = "ID", allow_hyphen_values = true)]
        authority_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}
