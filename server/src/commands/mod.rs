//! The client side of the management subcommands: connect to the admin socket, call the
//! admin API, print the result (human text or `--output json`) on stdout.
//!
//! Errors are one line (printed by `main`): the socket that cannot be reached, the flag
//! that is wrong, or the server's status message, which names the field at fault.

mod bundle;
mod entry;
mod federation;
mod localauthority;
mod mint;
mod output;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow, bail};
use hyper_util::rt::TokioIo;
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::admin::v1::admin_service_client::AdminServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::cli::{AdminArgs, AgentCommand, Command, JwtCommand, OutputFormat, TokenCommand, X509Command};
use output::{AgentOutput, Print};

/// Runs one management subcommand on a small single-threaded runtime.
pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(dispatch(command))
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { .. } => bail!("`run` is not a management subcommand"),
        Command::Healthcheck(admin) => healthcheck(&admin).await,
        Command::Token(TokenCommand::Generate { spiffe_id, ttl, admin }) => {
            token_generate(spiffe_id, ttl, &admin).await
        }
        Command::Entry(command) => entry::run(command).await,
        Command::Agent(command) => agent(command).await,
        Command::Bundle(command) => bundle::run(command).await,
        Command::X509(X509Command::Mint { spiffe_id, ttl, dns_names, write, admin }) => {
            mint::x509(spiffe_id, ttl, dns_names, write, &admin).await
        }
        Command::Jwt(JwtCommand::Mint { spiffe_id, audiences, ttl, admin }) => {
            mint::jwt(spiffe_id, audiences, ttl, &admin).await
        }
        Command::Federation(command) => federation::run(command).await,
        Command::LocalAuthority(command) => localauthority::run(command).await,
    }
}

/// A connected admin API client that knows its socket path for error messages.
struct AdminClient {
    inner: AdminServiceClient<Channel>,
    socket: PathBuf,
}

impl AdminClient {
    /// Connects to the admin socket. The first connection is made here so that a missing
    /// socket or a server that is down gives a precise error.
    async fn connect(admin: &AdminArgs) -> anyhow::Result<Self> {
        let socket = admin.admin_socket.clone();
        let first = UnixStream::connect(&socket).await.map_err(|err| {
            anyhow!(
                "cannot connect to admin socket {}: {} (is tessera-server running?)",
                socket.display(),
                io_message(&err)
            )
        })?;
        let first = Arc::new(Mutex::new(Some(first)));
        let path = socket.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let ready = first.lock().ok().and_then(|mut slot| slot.take());
            let path = path.clone();
            async move {
                let stream = match ready {
                    Some(stream) => stream,
                    None => UnixStream::connect(path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The URI is required by the API but unused: the connector decides where to go.
        let channel = Endpoint::from_static("http://tessera-server.admin")
            .connect_with_connector(connector)
            .await
            .map_err(|err| {
                // The socket accepted, then the HTTP/2 handshake failed: the server closes
                // connections from peers it does not admit.
                anyhow!(
                    "cannot connect to admin socket {}: the server closed the connection ({err}); only the server's uid and root may use it",
                    socket.display()
                )
            })?;
        Ok(Self { inner: AdminServiceClient::new(channel), socket })
    }

    /// The response message, or a one-line error from the status.
    fn call<T>(&self, result: Result<tonic::Response<T>, Status>) -> anyhow::Result<T> {
        result.map(tonic::Response::into_inner).map_err(|status| status_error(&self.socket, &status))
    }
}

/// One line for a failed call: the server's message (which names the field), or what
/// happened to the connection.
fn status_error(socket: &Path, status: &Status) -> anyhow::Error {
    let message = status.message();
    match status.code() {
        // The CLI never cancels its own calls: a cancelled call is the connection going away
        // under it (h2 reports "operation was canceled" when the server closes first).
        Code::Cancelled => {
            anyhow!(
                "admin socket {}: the server closed the connection (only the server's uid and root may use it): {message}",
                socket.display()
            )
        }
        Code::Unavailable | Code::Unknown if message.contains("transport") || message.is_empty() => {
            anyhow!(
                "admin socket {}: the server closed the connection (only the server's uid and root may use it): {message}",
                socket.display()
            )
        }
        _ if message.is_empty() => anyhow!("the server answered {:?}", status.code()),
        _ => anyhow!("{message}"),
    }
}

/// The I/O error without Rust's " (os error N)" suffix.
fn io_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// A TTL flag: whole seconds, at least 1, at most `u32::MAX`; absent is 0 (server default).
fn ttl_flag(flag: &str, ttl: Option<u64>) -> anyhow::Result<u32> {
    match ttl {
        None => Ok(0),
        Some(0) => bail!("invalid {flag} 0: a TTL must be at least 1 second"),
        Some(secs) => u32::try_from(secs).map_err(|_| anyhow!("invalid {flag} {secs}: at most {} seconds", u32::MAX)),
    }
}

async fn healthcheck(admin: &AdminArgs) -> anyhow::Result<()> {
    let client = AdminClient::connect(admin).await?;
    let response = client.call(client.inner.clone().healthcheck(pb::HealthcheckRequest {}).await)?;
    output::HealthOutput { healthy: true, trust_domain: response.trust_domain, version: response.version }
        .print(admin.output)
}

async fn token_generate(spiffe_id: Option<String>, ttl: Option<u64>, admin: &AdminArgs) -> anyhow::Result<()> {
    let request =
        pb::GenerateJoinTokenRequest { spiffe_id: spiffe_id.unwrap_or_default(), ttl: ttl_flag("--ttl", ttl)? };
    let client = AdminClient::connect(admin).await?;
    let response = client.call(client.inner.clone().generate_join_token(request).await)?;
    output::TokenOutput {
        token: response.token,
        expires_at: output::rfc3339(response.expires_at),
        entry_id: (!response.entry_id.is_empty()).then_some(response.entry_id),
    }
    .print(admin.output)
}

async fn agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::List { admin } => {
            let client = AdminClient::connect(&admin).await?;
            let mut agents = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = pb::ListAgentsRequest { page_size: 0, page_token };
                let response = client.call(client.inner.clone().list_agents(request).await)?;
                agents.extend(response.agents.iter().map(AgentOutput::from));
                if response.next_page_token.is_empty() {
                    break;
                }
                page_token = response.next_page_token;
            }
            output::AgentList { agents }.print(admin.output)
        }
        AgentCommand::Show { spiffe_id, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(client.inner.clone().get_agent(pb::GetAgentRequest { spiffe_id }).await)?;
            let agent = response.agent.ok_or_else(|| anyhow!("the server answered without the agent"))?;
            AgentOutput::from(&agent).print(admin.output)
        }
        AgentCommand::Ban { spiffe_id, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::BanAgentRequest { spiffe_id: spiffe_id.clone() };
            client.call(client.inner.clone().ban_agent(request).await)?;
            output::Done { action: "banned", id: spiffe_id }.print(admin.output)
        }
        AgentCommand::Evict { spiffe_id, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::EvictAgentRequest { spiffe_id: spiffe_id.clone() };
            client.call(client.inner.clone().evict_agent(request).await)?;
            output::Done { action: "evicted", id: spiffe_id }.print(admin.output)
        }
    }
}

/// Whether the output is JSON.
fn is_json(format: OutputFormat) -> bool {
    format == OutputFormat::Json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_flags() {
        assert_eq!(ttl_flag("--ttl", None).unwrap(), 0);
        assert_eq!(ttl_flag("--ttl", Some(60)).unwrap(), 60);
        assert_eq!(
            ttl_flag("--ttl", Some(0)).unwrap_err().to_string(),
            "invalid --ttl 0: a TTL must be at least 1 second"
        );
        assert!(ttl_flag("--x509-svid-ttl", Some(u64::MAX)).unwrap_err().to_string().contains("--x509-svid-ttl"));
    }

    #[test]
    fn a_connection_closed_by_the_server_is_named_as_such() {
        let socket = Path::new("/run/tessera/admin.sock");
        for status in [
            Status::cancelled("operation was canceled"),
            Status::unavailable("error trying to connect: transport error"),
            Status::unknown(""),
        ] {
            let message = status_error(socket, &status).to_string();
            assert!(message.contains("closed the connection"), "{status:?}: {message}");
            assert!(message.contains("/run/tessera/admin.sock"), "{status:?}: {message}");
        }
        // A refusal with a reason is shown as the reason.
        let message = status_error(socket, &Status::invalid_argument("invalid spiffe_id: x")).to_string();
        assert_eq!(message, "invalid spiffe_id: x");
    }

    #[test]
    fn io_messages_drop_the_os_error_number() {
        let err = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_message(&err), "No such file or directory");
    }
}
