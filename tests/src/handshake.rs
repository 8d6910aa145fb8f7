//! TLS handshakes between two rustls connections in memory, timing the server's side only
//! (suite item S7, `server/mtls_accept`).
//!
//! The client's flights are handed to the server as byte buffers and back, in the same thread,
//! so no socket or scheduler time is counted and the client's own work (its signature, its
//! verification of the server's chain) is left out of the figure: only the server's
//! `read_tls`, `process_new_packets` and `write_tls` calls are timed, which is what one agent
//! API accept costs the server. [`agent_client_config`] is a client like the agent's (the
//! agent SVID as client certificate, the server's SPIFFE ID required) with resumption off, so
//! every handshake is a full one; [`resuming_agent_client_config`] keeps rustls' default
//! resumption, as the agent's own client does (the agent API sends no tickets, so it never
//! resumes there either).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion, ServerConfig, ServerConnection};
use tessera_spiffe::SpiffeId;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::tls::{BundleSource, SpiffeServerVerifier, SvidResolver, certified_key, client_config};

/// The name the client dials (only SNI: the server is identified by its SPIFFE ID).
const SERVER_NAME: &str = "tessera-server";
/// Flights back and forth before a handshake is declared stuck (TLS 1.3 needs 2, plus tickets).
const MAX_FLIGHTS: usize = 8;

/// What one handshake negotiated, and what it cost the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Handshake {
    /// Time spent in the server connection's calls.
    pub server_time: Duration,
    /// The negotiated TLS version.
    pub version: Option<ProtocolVersion>,
    /// Full or resumed.
    pub kind: Option<HandshakeKind>,
    /// The key exchange group (`X25519`, `secp256r1`, ...).
    pub key_exchange: Option<String>,
    /// Certificates the client presented, as the server received them.
    pub client_certificates: usize,
}

/// A client configuration as the agent's: presents `chain`/`key` (an agent SVID), requires the
/// server's SPIFFE ID `server_id` through `bundle`, ALPN `h2`; session resumption disabled so
/// that each handshake is full.
pub fn agent_client_config(
    bundle: Bundle,
    server_id: SpiffeId,
    chain: &[Vec<u8>],
    key: &[u8],
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut config = resuming_agent_client_config(bundle, server_id, chain, key)?;
    Arc::make_mut(&mut config).resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// [`agent_client_config`] with rustls' default resumption (an in-memory session store), as
/// the agent's own client has: handshakes on one configuration resume when the server lets them.
pub fn resuming_agent_client_config(
    bundle: Bundle,
    server_id: SpiffeId,
    chain: &[Vec<u8>],
    key: &[u8],
) -> anyhow::Result<Arc<ClientConfig>> {
    let resolver = SvidResolver::new(certified_key(chain, key).map_err(|e| anyhow!("agent SVID: {e}"))?);
    let verifier = SpiffeServerVerifier::new(BundleSource::fixed(bundle), server_id);
    let config =
        client_config(Arc::new(verifier), Arc::new(resolver)).map_err(|e| anyhow!("TLS configuration: {e}"))?;
    Ok(Arc::new(config))
}

/// One handshake between a new client connection on `client` and a new server connection on
/// `server`, in memory; the server's share of the time is measured.
pub fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> anyhow::Result<Handshake> {
    let name = ServerName::try_from(SERVER_NAME).context("server name")?.to_owned();
    let mut client_conn = ClientConnection::new(Arc::clone(client), name).context("client connection")?;
    let mut server_time = Duration::ZERO;
    let started = Instant::now();
    let mut server_conn = ServerConnection::new(Arc::clone(server)).context("server connection")?;
    server_time += started.elapsed();
    for _ in 0..MAX_FLIGHTS {
        // Client to server: the client's writes are not timed, the server's reads are.
        let mut sent = Vec::with_capacity(8192);
        while client_conn.wants_write() {
            client_conn.write_tls(&mut sent).context("client write")?;
        }
        let started = Instant::now();
        let mut rest = &sent[..];
        while !rest.is_empty() {
            server_conn.read_tls(&mut rest).context("server read")?;
            server_conn.process_new_packets().map_err(|e| anyhow!("server: {e}"))?;
        }
        server_time += started.elapsed();
        let sent = !sent.is_empty();
        // Server to client: the server's writes are timed.
        let mut written = Vec::with_capacity(8192);
        let started = Instant::now();
        while server_conn.wants_write() {
            server_conn.write_tls(&mut written).context("server write")?;
        }
        server_time += started.elapsed();
        let answered = !written.is_empty();
        let mut rest = &written[..];
        while !rest.is_empty() {
            client_conn.read_tls(&mut rest).context("client read")?;
            client_conn.process_new_packets().map_err(|e| anyhow!("client: {e}"))?;
        }
        let done = !client_conn.is_handshaking() && !server_conn.is_handshaking();
        if done && !client_conn.wants_write() && !server_conn.wants_write() {
            return Ok(Handshake {
                server_time,
                version: server_conn.protocol_version(),
                kind: server_conn.handshake_kind(),
                key_exchange: server_conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
                client_certificates: server_conn.peer_certificates().map_or(0, <[_]>::len),
            });
        }
        if !sent && !answered {
            bail!("the handshake stalled (nothing to send either way)");
        }
    }
    bail!("the handshake did not complete in {MAX_FLIGHTS} flights")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimAgent, SimServer};

    /// The handshake the bench times is the one S7 means: TLS 1.3, full, the agent's
    /// certificate received by the server's real configuration, and the server spends time.
    #[tokio::test]
    async fn a_full_mutual_tls13_handshake_with_the_servers_config() {
        let server = SimServer::start().await.unwrap();
        let agent = SimAgent::attest(&server, "handshake-test").await.unwrap();
        let client = agent_client_config(server.bundle(), server.server_id(), &agent.chain, &agent.key).unwrap();
        let config = server.server().agent_api_tls_config();
        for _ in 0..2 {
            let done = handshake(&config, &client).unwrap();
            assert_eq!(done.version, Some(ProtocolVersion::TLSv1_3), "{done:?}");
            assert_eq!(done.kind, Some(HandshakeKind::Full), "{done:?}");
            assert_eq!(done.client_certificates, agent.chain.len(), "{done:?}");
            assert!(done.key_exchange.is_some() && done.server_time > Duration::ZERO, "{done:?}");
        }
        // A client the server's bundle does not trust is refused by the same configuration.
        let other = SimServer::start().await.unwrap();
        let stranger = SimAgent::attest(&other, "handshake-stranger").await.unwrap();
        let refused = agent_client_config(server.bundle(), server.server_id(), &stranger.chain, &stranger.key).unwrap();
        assert!(handshake(&config, &refused).is_err());
        other.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
    }

    /// The agent API does not resume sessions (decision of suite item S7): a client that
    /// resumes whenever it can, as the agent's does, gets a full handshake on every reconnect,
    /// because the server sends no TLS 1.3 ticket and caches no session. The same client
    /// resumes against a configuration that sends tickets, so the check can fail.
    #[tokio::test]
    async fn the_agent_api_sends_no_session_tickets_so_reconnects_are_full_handshakes() {
        let server = SimServer::start().await.unwrap();
        let agent = SimAgent::attest(&server, "handshake-resume").await.unwrap();
        let config = server.server().agent_api_tls_config();
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.session_storage.can_cache());
        let client =
            resuming_agent_client_config(server.bundle(), server.server_id(), &agent.chain, &agent.key).unwrap();
        for round in 0..3 {
            let done = handshake(&config, &client).unwrap();
            assert_eq!(done.kind, Some(HandshakeKind::Full), "round {round}: {done:?}");
            assert_eq!(done.client_certificates, agent.chain.len(), "round {round}: {done:?}");
        }
        let mut with_tickets = (*config).clone();
        with_tickets.send_tls13_tickets = 2;
        with_tickets.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        let with_tickets = Arc::new(with_tickets);
        let client =
            resuming_agent_client_config(server.bundle(), server.server_id(), &agent.chain, &agent.key).unwrap();
        assert_eq!(handshake(&with_tickets, &client).unwrap().kind, Some(HandshakeKind::Full));
        assert_eq!(handshake(&with_tickets, &client).unwrap().kind, Some(HandshakeKind::Resumed));
        server.shutdown().await.unwrap();
    }
}
