//! A test agent for the agent API: real TLS (tokio-rustls with the SPIFFE verifiers of
//! `tessera_spiffe::tls`), real tonic clients, a real in-process server.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tessera_server::config::ServerConfig;
use tessera_server::datastore::{DataStore, JoinToken, MemoryDataStore, RegistrationEntry};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::tls::{BundleSource, SpiffeServerVerifier, SvidResolver, certified_key, client_config};
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::tessera::agent::v1::agent_service_client::AgentServiceClient;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

pub type Client = AgentServiceClient<Channel>;

pub const TD: &str = "example.org";
pub const SERVER_ID: &str = "spiffe://example.org/tessera/server";

pub fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        trust_domain: TrustDomain::new(TD).unwrap(),
        data_dir: dir.join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("private/admin.sock"),
        ..ServerConfig::default()
    }
}

/// A server on the in-memory datastore.
pub async fn start_memory(dir: &Path) -> RunningServer {
    start_memory_with(config(dir)).await
}

pub async fn start_memory_with(config: ServerConfig) -> RunningServer {
    let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
    server::start_with(config, store).await.unwrap()
}

pub fn bundle(server: &RunningServer) -> Bundle {
    server.state().ca().bundle()
}

pub fn store(server: &RunningServer) -> Arc<dyn DataStore> {
    Arc::clone(server.state().datastore())
}

/// A client presenting `identity` (chain, pkcs8 key) or nothing.
pub async fn connect(addr: SocketAddr, bundle: Bundle, identity: Option<(&[Vec<u8>], &[u8])>) -> Client {
    try_connect(addr, bundle, identity).await.unwrap()
}

pub async fn try_connect(
    addr: SocketAddr,
    bundle: Bundle,
    identity: Option<(&[Vec<u8>], &[u8])>,
) -> Result<Client, tonic::transport::Error> {
    let resolver = match identity {
        Some((chain, key)) => SvidResolver::new(certified_key(chain, key).unwrap()),
        None => SvidResolver::empty(),
    };
    let verifier = SpiffeServerVerifier::new(BundleSource::fixed(bundle), SpiffeId::parse(SERVER_ID).unwrap());
    let tls = client_config(Arc::new(verifier), Arc::new(resolver)).unwrap();
    let connector = TlsConnector::from(Arc::new(tls));
    let channel = Endpoint::from_shared(format!("http://tessera-server:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(20))
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("tessera-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(AgentServiceClient::new(channel))
}

/// A fresh EC P-256 key and a CSR for it whose subject and SANs claim things the server must
/// ignore.
pub fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from("spiffe://example.org/admin").unwrap()));
    params.distinguished_name.push(rcgen::DnType::CommonName, "evil");
    let csr = params.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

/// An attested agent: its ID, SVID and key, and a client presenting them.
pub struct Agent {
    pub id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    pub result: pb::AttestAgentResult,
    pub client: Client,
}

pub fn join_token(store: &Arc<dyn DataStore>, token: &str, ttl_secs: i64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    store
        .create_join_token(&JoinToken {
            token: token.to_owned(),
            expires_at: (now + ttl_secs) as u64,
            alias_spiffe_id: None,
        })
        .unwrap();
}

/// One attestation call with `token`.
pub async fn attest_call(
    client: &mut Client,
    token: &str,
) -> Result<(pb::AttestAgentResult, rcgen::KeyPair), tonic::Status> {
    let (key, csr) = key_and_csr();
    let params = pb::AttestationParams {
        data: Some(pb::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() }),
        csr,
    };
    let message = pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) };
    let mut responses = client.attest_agent(tokio_stream::iter(vec![message])).await?.into_inner();
    let first = responses.message().await?.expect("a result message");
    match first.step {
        Some(pb::attest_agent_response::Step::Result(result)) => Ok((result, key)),
        other => panic!("unexpected attestation step {other:?}"),
    }
}

/// Creates a join token, attests with it, and connects with the agent SVID.
pub async fn attest(server: &RunningServer, token: &str) -> Agent {
    join_token(&store(server), token, 600);
    let mut anonymous = connect(server.agent_api_addr(), bundle(server), None).await;
    let (result, key) = attest_call(&mut anonymous, token).await.unwrap();
    let svid = result.svid.clone().unwrap();
    let key = key.serialize_der();
    let client = connect(server.agent_api_addr(), bundle(server), Some((&svid.cert_chain, &key))).await;
    Agent { id: SpiffeId::parse(&svid.spiffe_id).unwrap(), chain: svid.cert_chain, key, result, client }
}

pub fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}{path}")).unwrap()
}

/// Creates an entry directly in the datastore.
pub fn entry(
    store: &Arc<dyn DataStore>,
    entry_id: &str,
    spiffe: &str,
    parent: &SpiffeId,
    selectors: &[&str],
) -> RegistrationEntry {
    store
        .create_entry(&RegistrationEntry::new(
            entry_id,
            id(spiffe),
            parent.clone(),
            SelectorSet::parse_all(selectors).unwrap(),
        ))
        .unwrap()
}

/// The next event of a sync stream, within `secs` seconds.
pub async fn next_event(
    stream: &mut tonic::Streaming<pb::SyncEntriesResponse>,
    secs: u64,
) -> Result<pb::sync_entries_response::Event, tonic::Status> {
    match tokio::time::timeout(Duration::from_secs(secs), stream.message()).await {
        Ok(Ok(Some(message))) => Ok(message.event.expect("an event")),
        Ok(Ok(None)) => panic!("stream ended without a status"),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("no sync event within {secs} s"),
    }
}

/// Reads `bundles`, the snapshot and `synced`; returns the snapshot's entry IDs (sorted),
/// the page count and the synced revision.
pub async fn read_initial(stream: &mut tonic::Streaming<pb::SyncEntriesResponse>) -> (Vec<String>, usize, u64) {
    use pb::sync_entries_response::Event;
    let Event::Bundles(bundles) = next_event(stream, 20).await.unwrap() else { panic!("bundles first") };
    assert_eq!(bundles.bundle.unwrap().trust_domain, TD);
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        match next_event(stream, 20).await.unwrap() {
            Event::SnapshotPage(page) => {
                assert_eq!(page.page as usize, pages);
                pages += 1;
                assert!(page.entries.len() <= 200);
                ids.extend(page.entries.into_iter().map(|e| e.id));
            }
            Event::Synced(synced) => {
                ids.sort();
                return (ids, pages, synced.revision);
            }
            other => panic!("unexpected event during catch-up: {other:?}"),
        }
    }
}

pub async fn start_memory_try(config: ServerConfig) -> Result<RunningServer, tessera_server::server::ServerError> {
    let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
    server::start_with(config, store).await
}
