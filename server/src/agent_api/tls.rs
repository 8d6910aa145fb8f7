//! The agent API's TLS: the server's own X.509-SVID (`spiffe://<td>/tessera/server`), its
//! renewal, and the TLS acceptor feeding tonic.
//!
//! - [`ServerSvid`]: at start-up the server signs itself an X.509-SVID with its CA
//!   (`default_x509_svid_ttl`, capped by the CA) over a fresh EC P-256 key, and a background
//!   task re-issues it at half its lifetime. Agents verify it with the bundle and require that
//!   exact SPIFFE ID (`tessera_spiffe::tls::SpiffeServerVerifier`).
//! - Client certificates are optional at the TLS layer (agent attestation has none) but a
//!   presented one must chain to the current bundle
//!   (`tessera_spiffe::tls::SpiffeClientVerifier`); each call then authenticates the chain
//!   again (`super::auth`), because a connection outlives bundle and node changes.
//! - [`incoming`]: TCP accept, then the TLS handshake in its own task with a deadline (a slow
//!   or silent client never holds up the accept loop), and the peer chain is handed to every
//!   request of the connection through tonic's connect info ([`AgentConnInfo`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use tessera_spiffe::keys::{KeyType, SigningKey};
use tessera_spiffe::tls::{SvidResolver, certified_key};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::server::ServerState;

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after a failed renewal of the server SVID.
const RENEW_RETRY: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPT_QUEUE: usize = 64;

/// The server's TLS identity, renewed in the background.
#[derive(Debug)]
pub(crate) struct ServerSvid {
    resolver: Arc<SvidResolver>,
    renew_at: SystemTime,
    signer: Vec<u8>,
}

/// One issuance: when it should be renewed.
struct Issued {
    renew_at: SystemTime,
    expires_at: SystemTime,
    /// DER of the CA that was active when it was signed.
    signer: Vec<u8>,
}

/// How often the renewal task looks for a taint of the CA that signed the current certificate.
const TAINT_CHECK: Duration = Duration::from_secs(1);

impl ServerSvid {
    /// Signs the first server SVID (blocking: key generation and signing).
    pub(crate) fn issue(state: &ServerState) -> Result<Self, String> {
        let resolver = Arc::new(SvidResolver::empty());
        let issued = issue_into(state, &resolver, SystemTime::now())?;
        Ok(Self { resolver, renew_at: issued.renew_at, signer: issued.signer })
    }

    /// The certificate resolver the TLS config presents.
    pub(crate) fn resolver(&self) -> Arc<SvidResolver> {
        Arc::clone(&self.resolver)
    }

    /// Re-issues the SVID at half its lifetime, or at once when an operator taints the CA that
    /// signed it (forced rotation: agents must be able to verify the server after the revoke),
    /// until `stopped`.
    pub(crate) async fn renew_loop(self, state: Arc<ServerState>, stopped: watch::Receiver<bool>) {
        let Self { resolver, mut renew_at, mut signer } = self;
        loop {
            let wait = renew_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            tokio::select! {
                () = crate::server::stop_requested(stopped.clone()) => return,
                () = tokio::time::sleep(wait.min(TAINT_CHECK)) => {}
            }
            let tainted = state.ca().tainted().x509.contains(&signer);
            if SystemTime::now() < renew_at && !tainted {
                continue;
            }
            let (state2, resolver2) = (Arc::clone(&state), Arc::clone(&resolver));
            let result = tokio::task::spawn_blocking(move || issue_into(&state2, &resolver2, SystemTime::now()))
                .await
                .map_err(|err| err.to_string())
                .and_then(|r| r);
            renew_at = match result {
                Ok(issued) => {
                    tracing::info!(expires_at = ?issued.expires_at, tainted, "renewed the agent API server certificate");
                    signer = issued.signer;
                    issued.renew_at
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot renew the agent API server certificate; retrying");
                    SystemTime::now() + RENEW_RETRY
                }
            };
        }
    }
}

fn issue_into(state: &ServerState, resolver: &SvidResolver, now: SystemTime) -> Result<Issued, String> {
    let rng = SystemRandom::new();
    let key = SigningKey::generate(KeyType::EcP256, &rng).map_err(|err| format!("server key: {err}"))?;
    let ttl = state.config().default_x509_svid_ttl;
    let signer = state.ca().x509_authority_der();
    let svid = state
        .ca()
        .sign_server_svid(state.server_id(), ttl, key.public_key().spki_der(), now)
        .map_err(|err| format!("server certificate: {err}"))?;
    let certified = certified_key(&svid.chain, key.pkcs8_der()).map_err(|err| format!("server certificate: {err}"))?;
    resolver.set(certified);
    let lifetime = svid.expires_at.duration_since(now).unwrap_or(Duration::ZERO);
    Ok(Issued { renew_at: now + lifetime / 2, expires_at: svid.expires_at, signer })
}

/// What every request on one agent API connection knows about its peer.
#[derive(Debug, Clone)]
pub(crate) struct AgentConnInfo {
    /// The client's address.
    pub(crate) remote_addr: Option<SocketAddr>,
    /// The client's certificate chain (DER, leaf first) as presented in the handshake, if any.
    pub(crate) peer_chain: Option<Arc<Vec<Vec<u8>>>>,
    /// The connection's last successful chain verification (see `auth::authenticate`).
    pub(crate) verified: Arc<super::auth::VerifiedPeer>,
}

/// A TLS connection from an agent.
pub(crate) struct AgentTlsStream {
    inner: TlsStream<TcpStream>,
    info: AgentConnInfo,
}

impl std::fmt::Debug for AgentTlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTlsStream").field("info", &self.info).finish_non_exhaustive()
    }
}

impl AgentTlsStream {
    /// The client's address.
    pub(crate) fn remote_addr(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }
}

impl Connected for AgentTlsStream {
    type ConnectInfo = AgentConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentTlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentTlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, completes TLS handshakes concurrently, and yields the finished
/// connections. Ends when `stopped` is raised.
pub(crate) fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) -> ReceiverStream<Result<AgentTlsStream, io::Error>> {
    incoming_named(listener, acceptor, stopped, "agent API")
}

/// [`incoming`] for another TLS listener (the federation bundle endpoint); `what` names it in
/// the logs.
pub(crate) fn incoming_named(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
    what: &'static str,
) -> ReceiverStream<Result<AgentTlsStream, io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = crate::server::stop_requested(stopped.clone()) => return,
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: log, breathe, go on.
                    tracing::warn!(error = %err, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let peer_chain = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|certs| Arc::new(certs.iter().map(|c| c.as_ref().to_vec()).collect::<Vec<_>>()));
                        let info = AgentConnInfo { remote_addr: Some(remote), peer_chain, verified: Arc::default() };
                        let _ = tx.send(Ok(AgentTlsStream { inner: tls, info })).await;
                    }
                    Ok(Err(err)) => tracing::warn!(peer = %remote, error = %err, "{what} TLS handshake failed"),
                    Err(_) => tracing::warn!(peer = %remote, "{what} TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
