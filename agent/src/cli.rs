//! The `tessera-agent` command line, as fixed by the interface contract.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default Workload API socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/tessera-agent/public/api.sock";

/// Default agent admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/tessera-agent/private/admin.sock";

/// Top-level command line of `tessera-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "tessera-agent",
    version,
    about = "The Tessera node agent: attests workloads and serves the SPIFFE Workload API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every `tessera-agent` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        /// Configuration file (TOML). Without it the embedded defaults apply.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Join token for the first attestation (single use).
        #[arg(long, value_name = "TOKEN")]
        join_token: Option<String>,
    },
    /// Exit 0 when the agent is attested, synced, and its Workload API answers.
    Healthcheck(SocketArgs),
    /// Workload API client commands.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Show the selectors the agent derives for a process or uid, and which entries match or
    /// which selectors they lack ("why did my workload get no identity?"). Uses the admin socket.
    Diagnose(DiagnoseArgs),
    /// Show the agent's identity, its connection to the server and its cache. Uses the admin
    /// socket.
    Show {
        #[command(flatten)]
        admin: AdminSocketArgs,
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        output: OutputFormat,
    },
    /// Trade an OIDC token (CI job, pod) for an SVID at the server's token exchange endpoint,
    /// without an agent.
    Exchange(ExchangeArgs),
}

/// Where the agent's admin socket is.
#[derive(Debug, Clone, Args)]
pub struct AdminSocketArgs {
    /// The agent's admin socket (default: the `admin_socket` default).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

/// `tessera-agent diagnose`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "uid"])))]
pub struct DiagnoseArgs {
    /// A running process: every selector the Workload API would derive for it.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// A uid: its uid, user, gid and group selectors only.
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    #[command(flatten)]
    pub admin: AdminSocketArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

/// `tessera-agent exchange`.
#[derive(Debug, Clone, Args)]
pub struct ExchangeArgs {
    /// The server's token exchange endpoint, `https://host:port`.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// File holding the OIDC token to exchange.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Ask for a JWT-SVID with this audience (repeatable) instead of an X.509-SVID.
    #[arg(long = "audience", value_name = "AUD")]
    pub audiences: Vec<String>,
    /// Write `svid.pem`, `svid.key`, `bundle.pem` (or `jwt_svid.token`) here.
    #[arg(long, value_name = "DIR")]
    pub write: Option<PathBuf>,
    /// PEM bundle of the trust domain: authenticate the server by its SPIFFE ID.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// PEM roots to authenticate the server by Web PKI instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Where the Workload API is: `--socket-path`, else `SPIFFE_ENDPOINT_SOCKET`, else the default.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// Workload API socket path.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
}

/// Output format of the `api` subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Human,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs and bundles.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate tokens.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print each X509SVIDResponse as it arrives.
    Watch {
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// Fetch X.509-SVIDs.
    X509 {
        #[command(flatten)]
        socket: SocketArgs,
        /// Write `svid.0.pem`, `svid.0.key`, `bundle.0.pem` (and `federated_bundle.<n>.pem`) here.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        output: OutputFormat,
    },
    /// Fetch JWT-SVIDs.
    Jwt {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long = "audience", value_name = "AUD", required = true)]
        audiences: Vec<String>,
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        output: OutputFormat,
    },
    /// Fetch X.509 and JWT bundles.
    Bundles {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        output: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID.
    Jwt {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long, value_name = "AUD")]
        audience: String,
        #[arg(long, value_name = "TOKEN")]
        svid: String,
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
    fn fetch_jwt_takes_repeated_audiences() {
        let cli = Cli::try_parse_from(["tessera-agent", "api", "fetch", "jwt", "--audience", "a", "--audience", "b"])
            .unwrap();
        let Command::Api(ApiCommand::Fetch(FetchCommand::Jwt { audiences, .. })) = cli.command else {
            panic!("parsed into the wrong subcommand");
        };
        assert_eq!(audiences, ["a", "b"]);
    }

    #[test]
    fn diagnose_needs_exactly_one_of_pid_and_uid() {
        let err = Cli::try_parse_from(["tessera-agent", "diagnose"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = Cli::try_parse_from(["tessera-agent", "diagnose", "--pid", "1", "--uid", "0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli = Cli::try_parse_from(["tessera-agent", "diagnose", "--uid", "0"]).unwrap();
        assert!(matches!(cli.command, Command::Diagnose(DiagnoseArgs { uid: Some(0), pid: None, .. })));
    }

    #[test]
    fn validate_jwt_requires_svid() {
        let err = Cli::try_parse_from(["tessera-agent", "api", "validate", "jwt", "--audience", "a"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }
}
