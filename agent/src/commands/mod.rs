//! The client subcommands: `tessera-agent api ...` and `tessera-agent healthcheck`.
//!
//! They are ordinary Workload API clients: they connect to the agent's socket
//! (`--socket-path`, else `SPIFFE_ENDPOINT_SOCKET`, else the default, see [`endpoint`]), send the
//! `workload.spiffe.io: true` header and are attested like any workload, from their own pid,
//! uid and executable. Output goes to stdout (text, or JSON with `--output json`); every error
//! is one line naming the socket and the agent's status message, printed by `main`, with a
//! non-zero exit.

mod admin;
pub mod endpoint;
pub mod exchange;
mod output;

pub use admin::{diagnose, show};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use hyper_util::rt::TokioIo;
use tessera_wire::workload as pb;
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tonic::codegen::InterceptedService;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

use crate::cli::{ApiCommand, FetchCommand, SocketArgs, ValidateCommand};
use crate::workload_api::SECURITY_HEADER;
use output::Print as _;

/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a call (or the first message of a stream) may take. The agent itself waits up to a
/// few seconds for its first sync before it answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `tessera-agent healthcheck`: exit 0 when the Workload API answers on the socket.
///
/// "Answers" means a `FetchX509Bundles` call gets a bundle or PermissionDenied (the
/// healthcheck process itself need not have an identity); Unavailable (attestation failed, the
/// agent has not synced yet) and transport errors are failures.
pub fn healthcheck(socket: &SocketArgs) -> anyhow::Result<()> {
    block_on(async {
        let client = WorkloadClient::connect(socket).await?;
        let answered = client.first_message(client.api().fetch_x509_bundles(pb::X509BundlesRequest {})).await;
        match answered {
            Ok(_) => {}
            Err(status) if status.code() == Code::PermissionDenied => {}
            Err(status) => return Err(client.error(&status).context("the agent is not healthy")),
        }
        output::print_line("Agent is healthy.")
    })
}

/// `tessera-agent api ...`.
pub fn api(command: ApiCommand) -> anyhow::Result<()> {
    block_on(async move {
        match command {
            ApiCommand::Fetch(FetchCommand::X509 { socket, write, output }) => {
                let client = WorkloadClient::connect(&socket).await?;
                let response = client
                    .first_message(client.api().fetch_x509svid(pb::X509svidRequest {}))
                    .await
                    .map_err(|status| client.error(&status))?;
                let fetched = output::X509Output::from_response(&response)?;
                fetched.print(output)?;
                match write {
                    Some(dir) => fetched.write_files(&dir, output),
                    None => Ok(()),
                }
            }
            ApiCommand::Fetch(FetchCommand::Jwt { socket, audiences, spiffe_id, output }) => {
                let client = WorkloadClient::connect(&socket).await?;
                let request = pb::JwtsvidRequest { audience: audiences, spiffe_id: spiffe_id.unwrap_or_default() };
                let response = client.unary(client.api().fetch_jwtsvid(request)).await?;
                output::JwtOutput::from_response(response).print(output)
            }
            ApiCommand::Fetch(FetchCommand::Bundles { socket, output }) => {
                let client = WorkloadClient::connect(&socket).await?;
                let x509 = client
                    .first_message(client.api().fetch_x509_bundles(pb::X509BundlesRequest {}))
                    .await
                    .map_err(|status| client.error(&status))?;
                let jwt = client
                    .first_message(client.api().fetch_jwt_bundles(pb::JwtBundlesRequest {}))
                    .await
                    .map_err(|status| client.error(&status))?;
                output::BundlesOutput::from_responses(&x509, &jwt)?.print(output)
            }
            ApiCommand::Validate(ValidateCommand::Jwt { socket, audience, svid }) => {
                let client = WorkloadClient::connect(&socket).await?;
                let request = pb::ValidateJwtsvidRequest { audience, svid };
                let response = client.unary(client.api().validate_jwtsvid(request)).await?;
                output::ValidationOutput::from_response(response).print(crate::cli::OutputFormat::Human)
            }
            ApiCommand::Watch { socket } => watch(&socket).await,
        }
    })
}

/// `api watch`: prints every `X509SVIDResponse` until the stream ends or Ctrl-C.
async fn watch(socket: &SocketArgs) -> anyhow::Result<()> {
    let client = WorkloadClient::connect(socket).await?;
    let mut stream = tokio::time::timeout(CALL_TIMEOUT, client.api().fetch_x509svid(pb::X509svidRequest {}))
        .await
        .map_err(|_| client.timeout())?
        .map_err(|status| client.error(&status))?
        .into_inner();
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(response)) => output::X509Output::from_response(&response)?.print_update()?,
                Ok(None) => bail!("the Workload API at {} closed the stream", client.socket.display()),
                Err(status) => return Err(client.error(&status)),
            },
            signal = tokio::signal::ctrl_c() => {
                signal.context("cannot listen for Ctrl-C")?;
                return Ok(());
            }
        }
    }
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(future)
}

type HeaderInterceptor = fn(Request<()>) -> Result<Request<()>, Status>;

/// Adds the security header every Workload API request must carry.
fn add_security_header(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.metadata_mut().insert(SECURITY_HEADER, MetadataValue::from_static("true"));
    Ok(request)
}

/// A connected Workload API client that knows its socket path for error messages.
struct WorkloadClient {
    api: SpiffeWorkloadApiClient<InterceptedService<Channel, HeaderInterceptor>>,
    socket: PathBuf,
}

impl WorkloadClient {
    /// Resolves the socket and connects. The first connection is made here so that a missing
    /// socket or an agent that is down gives a precise error.
    async fn connect(args: &SocketArgs) -> anyhow::Result<Self> {
        let env = std::env::var_os(endpoint::SPIFFE_ENDPOINT_SOCKET);
        let socket = endpoint::resolve_socket(args.socket_path.as_deref(), env.as_deref())?;
        let first = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&socket))
            .await
            .map_err(|_| anyhow!("cannot connect to the Workload API at {}: timed out", socket.display()))?
            .map_err(|err| {
                anyhow!(
                    "cannot connect to the Workload API at {}: {} (is tessera-agent running?)",
                    socket.display(),
                    err
                )
            })?;
        let channel = channel(first, &socket).await?;
        let api = SpiffeWorkloadApiClient::with_interceptor(channel, add_security_header as HeaderInterceptor);
        Ok(Self { api, socket })
    }

    fn api(&self) -> SpiffeWorkloadApiClient<InterceptedService<Channel, HeaderInterceptor>> {
        self.api.clone()
    }

    /// A unary call with a deadline; a failed call becomes a one-line error.
    async fn unary<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.error(&status)),
            Err(_) => Err(self.timeout()),
        }
    }

    /// The first message of a server stream (the stream is dropped afterwards).
    async fn first_message<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, Status>>,
    ) -> Result<T, Status> {
        let first = async {
            let mut stream = call.await?.into_inner();
            stream.message().await?.ok_or_else(|| Status::unavailable("the stream ended without a message"))
        };
        tokio::time::timeout(CALL_TIMEOUT, first)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")))
    }

    fn error(&self, status: &Status) -> anyhow::Error {
        let message = status.message().replace('\n', " ");
        // Statuses made on this side from an I/O or HTTP/2 failure carry their cause; those the
        // agent sent do not.
        if let Some(cause) = std::error::Error::source(status) {
            let cause = cause.to_string();
            let reason = if message.contains(&cause) { message } else { format!("{message}: {cause}") };
            return anyhow!("lost the connection to the Workload API at {}: {reason}", self.socket.display());
        }
        anyhow!("the Workload API at {} answered {:?}: {}", self.socket.display(), status.code(), message)
    }

    fn timeout(&self) -> anyhow::Error {
        anyhow!("the Workload API at {} did not answer within {}s", self.socket.display(), CALL_TIMEOUT.as_secs())
    }
}

/// A channel over the already connected `first` stream; later reconnections dial `socket`.
pub(crate) async fn channel(first: UnixStream, socket: &Path) -> anyhow::Result<Channel> {
    let first = Arc::new(Mutex::new(Some(first)));
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let first = first.lock().ok().and_then(|mut slot| slot.take());
        let path = path.clone();
        async move {
            let stream = match first {
                Some(stream) => stream,
                None => UnixStream::connect(&path).await?,
            };
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("cannot connect to the Workload API at {}", socket.display()))
}
