//! The agent's gRPC connection to the server's agent API (`tessera.agent.v1.AgentService`).
//!
//! A tonic [`Channel`] whose connector dials TCP and runs a rustls handshake itself
//! (tokio-rustls), so the server is authenticated by SPIFFE ID against the cached bundle
//! (see [`tls`]) and the agent presents its SVID as the client certificate.
//!
//! The channel is *lazy*: building it never fails and never blocks; each call (re)connects
//! when needed. When the agent SVID is renewed, [`ServerClient::set_credential`] builds a new
//! TLS configuration and a new channel (the server refuses an old serial once the renewal is
//! in effect, so the old connection must not be reused) and bumps a generation counter that
//! long-lived streams watch to reopen themselves over the new connection.

pub mod tls;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tessera_wire::tessera::agent::v1::agent_service_client::AgentServiceClient;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::storage::AgentCredential;
use tls::{ServerVerifier, TrustStore};

/// How long establishing a connection (TCP + TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of unary calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the server's agent API.
#[derive(Debug)]
pub struct ServerClient {
    endpoint: Endpoint,
    host_port: String,
    server_name: ServerName<'static>,
    verifier: Arc<ServerVerifier>,
    channel: RwLock<Channel>,
    generation: watch::Sender<u64>,
}

impl ServerClient {
    /// A client of `server_address` (`host:port`), authenticating the server with `verifier`
    /// and presenting `credential` (none for attestation).
    pub fn new(
        server_address: &str,
        verifier: Arc<ServerVerifier>,
        credential: Option<&AgentCredential>,
    ) -> Result<Self, String> {
        let (host, _) = crate::config::split_host_port(server_address)?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|error| format!("invalid server address {server_address:?}: {error}"))?;
        let endpoint = Endpoint::from_shared(format!("http://{server_address}"))
            .map_err(|error| format!("invalid server address {server_address:?}: {error}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Detect a vanished server on the long-lived sync stream.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = build_channel(&endpoint, server_address, &server_name, &verifier, credential)?;
        let (generation, _) = watch::channel(0);
        Ok(Self {
            endpoint,
            host_port: server_address.to_owned(),
            server_name,
            verifier,
            channel: RwLock::new(channel),
            generation,
        })
    }

    /// A gRPC client over the current channel (cheap: channels are shared handles).
    pub fn agent(&self) -> AgentServiceClient<Channel> {
        let channel = match self.channel.read() {
            Ok(channel) => channel.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        AgentServiceClient::new(channel)
    }

    /// Switches to a new client certificate: new TLS configuration, new connection.
    pub fn set_credential(&self, credential: &AgentCredential) -> Result<(), String> {
        let channel =
            build_channel(&self.endpoint, &self.host_port, &self.server_name, &self.verifier, Some(credential))?;
        match self.channel.write() {
            Ok(mut current) => *current = channel,
            Err(poisoned) => *poisoned.into_inner() = channel,
        }
        self.generation.send_modify(|generation| *generation += 1);
        Ok(())
    }

    /// A client of the same server without a client certificate (for attestation).
    pub fn without_credential(&self) -> Result<Self, String> {
        Self::new(&self.host_port, Arc::clone(&self.verifier), None)
    }

    /// Changes whenever the channel is replaced; streams reopen on a change.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// The trust store shared by a verifier (re-exported for the manager).
pub fn trust_store(state: tls::TrustState) -> TrustStore {
    Arc::new(RwLock::new(state))
}

fn build_channel(
    endpoint: &Endpoint,
    host_port: &str,
    server_name: &ServerName<'static>,
    verifier: &Arc<ServerVerifier>,
    credential: Option<&AgentCredential>,
) -> Result<Channel, String> {
    let config = tls::client_config(Arc::clone(verifier), credential)?;
    let address = host_port.to_owned();
    let server_name = server_name.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let (address, server_name, config) = (address.clone(), server_name.clone(), Arc::clone(&config));
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}
