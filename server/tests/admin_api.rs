//! The admin API against a real server started in-process: sled datastore in a temporary
//! data directory (or an in-memory one where the test needs to plant an attested node), tonic
//! over the real admin Unix socket, the real health endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{AttestedNode, DataStore, DataStoreOptions, MemoryDataStore};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::bundle::{Bundle, encode_pem_certificates};
use tessera_spiffe::keys::PublicKey;
use tessera_spiffe::x509::{CaTemplate, X509Svid, verify_x509_svid};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::admin::v1::admin_service_client::AdminServiceClient;
use tessera_wire::tessera::common::v1 as common;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = AdminServiceClient<Channel>;

async fn start(dir: &Path) -> RunningServer {
    server::start(config(dir)).await.unwrap()
}

fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("private/admin.sock"),
        health: tessera_server::config::HealthConfig { bind_address: Some("127.0.0.1:0".parse().unwrap()) },
        ..ServerConfig::default()
    }
}

async fn connect(socket: &Path) -> Client {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://admin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    AdminServiceClient::new(channel)
}

fn selector(kind: &str, value: &str) -> common::Selector {
    common::Selector { r#type: kind.into(), value: value.into() }
}

fn entry(spiffe_id: &str, parent_id: &str, selectors: &[(&str, &str)]) -> common::Entry {
    common::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: selectors.iter().map(|(k, v)| selector(k, v)).collect(),
        ..Default::default()
    }
}

const AGENT: &str = "spiffe://example.org/tessera/agent/join_token/t1";

async fn create(client: &mut Client, entry: common::Entry) -> Result<common::Entry, tonic::Status> {
    client.create_entry(pb::CreateEntryRequest { entry: Some(entry) }).await.map(|r| r.into_inner().entry.unwrap())
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{:?} should mention {needle:?}", status.message());
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_tokens_agents_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let socket = server.admin_socket().to_path_buf();
    let mode = std::fs::metadata(socket.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "admin socket directory must be private");
    let mut client = connect(&socket).await;

    // Health.
    let health = client.healthcheck(pb::HealthcheckRequest {}).await.unwrap().into_inner();
    assert_eq!(health.trust_domain, "example.org");
    let addr = server.health_addr().unwrap();
    assert!(http_get(addr, "/live").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

    // Create, with a generated ID and a chosen one.
    let web = create(&mut client, entry("spiffe://example.org/web", AGENT, &[("unix", "uid:1000")])).await.unwrap();
    assert_eq!(web.id.len(), 36);
    assert!(web.revision > 0);
    let mut chosen = entry("spiffe://example.org/db", AGENT, &[("unix", "uid:1001"), ("unix", "path:/usr/bin/db")]);
    chosen.id = "db-entry".into();
    chosen.x509_svid_ttl = 120;
    let db = create(&mut client, chosen.clone()).await.unwrap();
    assert_eq!((db.id.as_str(), db.x509_svid_ttl), ("db-entry", 120));

    // Bad input, each naming the field.
    assert_status(create(&mut client, chosen.clone()).await, Code::AlreadyExists, "db-entry");
    let duplicate = entry("spiffe://example.org/web", AGENT, &[("unix", "uid:1000")]);
    assert_status(create(&mut client, duplicate).await, Code::AlreadyExists, "same SPIFFE ID");
    let cases = [
        (entry("web", AGENT, &[("unix", "uid:1")]), "spiffe_id"),
        (entry("spiffe://other.org/web", AGENT, &[("unix", "uid:1")]), "spiffe_id"),
        // The server's and agents' own namespace: such an SVID could pass for the server.
        (entry("spiffe://example.org/tessera/server", AGENT, &[("unix", "uid:1")]), "spiffe_id"),
        (entry("spiffe://example.org/tessera/agent/x", AGENT, &[("unix", "uid:1")]), "spiffe_id"),
        (entry("spiffe://example.org/web", "spiffe://other.org/agent", &[("unix", "uid:1")]), "parent_id"),
        (entry("spiffe://example.org/web", "spiffe://example.org/a//b", &[("unix", "uid:1")]), "parent_id"),
        (entry("spiffe://example.org/web", AGENT, &[]), "selectors"),
        (entry("spiffe://example.org/web", AGENT, &[("unix", "")]), "selectors"),
        (entry("spiffe://example.org/web", AGENT, &[("", "x")]), "selectors"),
    ];
    for (bad, field) in cases {
        assert_status(create(&mut client, bad).await, Code::InvalidArgument, &format!("invalid {field}"));
    }
    assert_status(client.create_entry(pb::CreateEntryRequest { entry: None }).await, Code::InvalidArgument, "entry");

    // Get, list with filters, count.
    let got = client.get_entry(pb::GetEntryRequest { id: web.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.entry.unwrap(), web);
    assert_status(client.get_entry(pb::GetEntryRequest { id: "nope".into() }).await, Code::NotFound, "nope");
    let list = |filter: pb::EntryFilter| {
        let mut client = client.clone();
        async move {
            let request = pb::ListEntriesRequest { filter: Some(filter), ..Default::default() };
            client.list_entries(request).await.unwrap().into_inner().entries
        }
    };
    assert_eq!(list(pb::EntryFilter::default()).await.len(), 2);
    let by_id = list(pb::EntryFilter { spiffe_id: "spiffe://example.org/db".into(), ..Default::default() }).await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].id, "db-entry");
    assert_eq!(list(pb::EntryFilter { parent_id: AGENT.into(), ..Default::default() }).await.len(), 2);
    let by_selector = pb::EntryFilter {
        selectors: Some(pb::SelectorMatch { selectors: vec![selector("unix", "uid:1001")], mode: 0 }),
        ..Default::default()
    };
    assert_eq!(list(by_selector).await.len(), 1);
    let paged =
        client.list_entries(pb::ListEntriesRequest { page_size: 1, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(paged.entries.len(), 1);
    assert!(!paged.next_page_token.is_empty());
    assert_eq!(client.count_entries(pb::CountEntriesRequest {}).await.unwrap().into_inner().count, 2);

    // Update: masked and whole.
    let change = common::Entry { id: web.id.clone(), hint: "frontend".into(), ..Default::default() };
    let mask = pb::EntryMask { hint: true, ..Default::default() };
    let updated = client
        .update_entry(pb::UpdateEntryRequest { entry: Some(change), mask: Some(mask) })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(updated.hint, "frontend");
    assert_eq!(updated.spiffe_id, web.spiffe_id);
    assert!(updated.revision > web.revision);
    let unknown = common::Entry { id: "nope".into(), ..entry("spiffe://example.org/x", AGENT, &[("a", "b")]) };
    assert_status(
        client.update_entry(pb::UpdateEntryRequest { entry: Some(unknown), mask: None }).await,
        Code::NotFound,
        "nope",
    );
    let foreign = common::Entry { id: web.id.clone(), spiffe_id: "spiffe://other.org/x".into(), ..Default::default() };
    let mask = pb::EntryMask { spiffe_id: true, ..Default::default() };
    assert_status(
        client.update_entry(pb::UpdateEntryRequest { entry: Some(foreign), mask: Some(mask) }).await,
        Code::InvalidArgument,
        "invalid spiffe_id",
    );

    // Delete.
    client.delete_entry(pb::DeleteEntryRequest { id: "db-entry".into() }).await.unwrap();
    assert_status(
        client.delete_entry(pb::DeleteEntryRequest { id: "db-entry".into() }).await,
        Code::NotFound,
        "db-entry",
    );
    assert_status(client.delete_entry(pb::DeleteEntryRequest { id: String::new() }).await, Code::InvalidArgument, "id");

    // Join tokens, with and without a node alias.
    let plain = client.generate_join_token(pb::GenerateJoinTokenRequest::default()).await.unwrap().into_inner();
    assert_eq!(plain.token.len(), 36);
    assert!(plain.entry_id.is_empty());
    let request = pb::GenerateJoinTokenRequest { spiffe_id: "spiffe://example.org/node/web".into(), ttl: 60 };
    let aliased = client.generate_join_token(request).await.unwrap().into_inner();
    assert_ne!(aliased.token, plain.token);
    let alias =
        client.get_entry(pb::GetEntryRequest { id: aliased.entry_id }).await.unwrap().into_inner().entry.unwrap();
    let agent_id = format!("spiffe://example.org/tessera/agent/join_token/{}", aliased.token);
    assert_eq!(alias.parent_id, agent_id);
    assert_eq!(alias.spiffe_id, "spiffe://example.org/node/web");
    assert_eq!(alias.selectors, vec![selector("spiffe_id", &agent_id)]);
    let bad = pb::GenerateJoinTokenRequest { spiffe_id: "spiffe://other.org/node".into(), ttl: 0 };
    assert_status(client.generate_join_token(bad).await, Code::InvalidArgument, "invalid spiffe_id");
    let reserved = pb::GenerateJoinTokenRequest { spiffe_id: "spiffe://example.org/tessera".into(), ttl: 0 };
    assert_status(client.generate_join_token(reserved).await, Code::InvalidArgument, "reserved /tessera namespace");

    // Agents: none attested yet.
    let agents = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner();
    assert!(agents.agents.is_empty());
    let unknown = pb::GetAgentRequest { spiffe_id: AGENT.into() };
    assert_status(client.get_agent(unknown).await, Code::NotFound, AGENT);
    let malformed = pb::BanAgentRequest { spiffe_id: "agent".into() };
    assert_status(client.ban_agent(malformed).await, Code::InvalidArgument, "invalid spiffe_id");
    assert_status(client.evict_agent(pb::EvictAgentRequest { spiffe_id: AGENT.into() }).await, Code::NotFound, AGENT);

    // Graceful shutdown removes the socket.
    drop(client);
    server.shutdown().await.unwrap();
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_entries_and_replaces_the_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let socket = server.admin_socket().to_path_buf();
    let mut client = connect(&socket).await;
    let created = create(&mut client, entry("spiffe://example.org/web", AGENT, &[("unix", "uid:1")])).await.unwrap();
    drop(client);
    server.shutdown().await.unwrap();

    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = start(dir.path()).await;
    let mut client = connect(&socket).await;
    let got = client.get_entry(pb::GetEntryRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.entry.unwrap(), created);

    // A second server on the same socket is refused while the first runs. (Its agent API
    // port is ephemeral: the default 8081 may be taken by a deployment on this machine.)
    let other = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: other.path().join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: socket.clone(),
        ..ServerConfig::default()
    };
    let err = server::start(config).await.unwrap_err();
    assert!(err.to_string().contains("another server is listening"), "{err}");
    drop(client);
    server.shutdown().await.unwrap();
}

/// The protobuf bundle as a tessera-spiffe bundle (what a client of the API would do).
fn bundle_of(proto: &common::Bundle) -> Bundle {
    let mut bundle = Bundle::new(TrustDomain::new(&proto.trust_domain).unwrap());
    for der in &proto.x509_authorities {
        bundle.add_x509_authority(der).unwrap();
    }
    for jwt in &proto.jwt_authorities {
        bundle.add_jwt_authority(jwt.key_id.clone(), PublicKey::from_spki_der(&jwt.public_key).unwrap()).unwrap();
    }
    bundle
}

/// A self-signed CA certificate (DER) of another trust domain.
fn foreign_ca(trust_domain: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    CaTemplate::new(TrustDomain::new(trust_domain).unwrap(), Duration::from_secs(3600))
        .unwrap()
        .self_signed(&key, SystemTime::now(), &SystemRandom::new())
        .unwrap()
}

fn unix_now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_and_minting() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut client = connect(server.admin_socket()).await;

    // The own bundle: the CA's root and JWT key, published (sequence >= 1).
    let own = client.get_bundle(pb::GetBundleRequest {}).await.unwrap().into_inner().bundle.unwrap();
    assert_eq!(own.trust_domain, "example.org");
    assert_eq!(own.x509_authorities.len(), 1);
    assert_eq!(own.jwt_authorities.len(), 1);
    assert!(own.sequence >= 1);
    let own_bundle = bundle_of(&own);

    // X.509-SVID with a server-generated key: verifies against the bundle, key matches.
    let request = pb::MintX509SvidRequest {
        spiffe_id: "spiffe://example.org/web".into(),
        ttl: 120,
        dns_names: vec!["web.example.org".into()],
        csr: Vec::new(),
    };
    let minted = client.mint_x509_svid(request).await.unwrap().into_inner();
    assert!(!minted.private_key.is_empty());
    let chain: Vec<&[u8]> = minted.cert_chain.iter().map(Vec::as_slice).collect();
    let verified = verify_x509_svid(&chain, &own_bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id().as_str(), "spiffe://example.org/web");
    let svid = X509Svid::parse(&minted.cert_chain.concat(), &minted.private_key, &SystemRandom::new()).unwrap();
    assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/web");
    assert!((minted.expires_at - unix_now() - 120).abs() <= 5, "ttl 120 honoured: {}", minted.expires_at);
    assert_eq!(minted.bundle.unwrap(), own);

    // With a CSR the key stays with the caller; a huge TTL is capped by the CA (24h default).
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
    let request =
        pb::MintX509SvidRequest { spiffe_id: "spiffe://example.org/db".into(), ttl: u32::MAX, dns_names: vec![], csr };
    let minted = client.mint_x509_svid(request).await.unwrap().into_inner();
    assert!(minted.private_key.is_empty());
    assert!(minted.expires_at <= unix_now() + 24 * 3600 + 5, "capped by the CA: {}", minted.expires_at);
    let svid = X509Svid::parse(&minted.cert_chain.concat(), &key.serialize_der(), &SystemRandom::new()).unwrap();
    assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/db");

    // Bad mint requests name the field.
    let x509 = |spiffe_id: &str, csr: Vec<u8>, dns_names: Vec<String>| pb::MintX509SvidRequest {
        spiffe_id: spiffe_id.into(),
        ttl: 0,
        dns_names,
        csr,
    };
    let cases = [
        (x509("spiffe://other.org/web", vec![], vec![]), "invalid spiffe_id"),
        (x509("spiffe://example.org", vec![], vec![]), "invalid spiffe_id"),
        (x509("", vec![], vec![]), "invalid spiffe_id"),
        (x509("spiffe://example.org/tessera/server", vec![], vec![]), "reserved /tessera namespace"),
        (x509("spiffe://example.org/web", b"not a csr".to_vec(), vec![]), "invalid csr"),
        (x509("spiffe://example.org/web", vec![], vec![String::new()]), "invalid dns_names"),
        (x509("spiffe://example.org/web", vec![], vec!["web_.-x".into()]), "invalid dns_names"),
    ];
    for (request, needle) in cases {
        assert_status(client.mint_x509_svid(request).await, Code::InvalidArgument, needle);
    }

    // JWT-SVID: validates against the bundle with the right sub and aud; default TTL 5m.
    let request = pb::MintJwtSvidRequest {
        spiffe_id: "spiffe://example.org/web".into(),
        audiences: vec!["aud-1".into(), "aud-2".into()],
        ttl: 0,
    };
    let jwt = client.mint_jwt_svid(request).await.unwrap().into_inner();
    let validated = tessera_spiffe::jwt::validate(&jwt.token, &own_bundle, &["aud-2"], SystemTime::now()).unwrap();
    assert_eq!(validated.spiffe_id().as_str(), "spiffe://example.org/web");
    assert_eq!(validated.audience(), ["aud-1", "aud-2"]);
    assert!((jwt.expires_at - unix_now() - 300).abs() <= 5, "default ttl: {}", jwt.expires_at);
    let jwt_req = |spiffe_id: &str, audiences: Vec<String>| pb::MintJwtSvidRequest {
        spiffe_id: spiffe_id.into(),
        audiences,
        ttl: 60,
    };
    assert_status(
        client.mint_jwt_svid(jwt_req("spiffe://example.org/web", vec![])).await,
        Code::InvalidArgument,
        "invalid audiences",
    );
    assert_status(
        client.mint_jwt_svid(jwt_req("spiffe://example.org/web", vec![String::new()])).await,
        Code::InvalidArgument,
        "invalid audiences",
    );
    assert_status(
        client.mint_jwt_svid(jwt_req("spiffe://other.org/web", vec!["a".into()])).await,
        Code::InvalidArgument,
        "invalid spiffe_id",
    );
    assert_status(
        client.mint_jwt_svid(jwt_req("spiffe://example.org/tessera/server", vec!["a".into()])).await,
        Code::InvalidArgument,
        "reserved /tessera namespace",
    );

    // Federated bundles: none, then set (PEM, then SPIFFE JSON), list, delete.
    let listed = client.list_federated_bundles(pb::ListFederatedBundlesRequest {}).await.unwrap().into_inner();
    assert!(listed.bundles.is_empty(), "the own bundle is not federated: {listed:?}");
    let other_ca = foreign_ca("other.org");
    let set = |trust_domain: &str, bundle: Vec<u8>, format: pb::BundleFormat| pb::SetFederatedBundleRequest {
        trust_domain: trust_domain.into(),
        bundle,
        format: format as i32,
    };
    let pem = encode_pem_certificates([other_ca.as_slice()]).into_bytes();
    let stored = client
        .set_federated_bundle(set("spiffe://other.org", pem.clone(), pb::BundleFormat::Pem))
        .await
        .unwrap()
        .into_inner()
        .bundle
        .unwrap();
    assert_eq!((stored.trust_domain.as_str(), stored.sequence), ("other.org", 1));
    assert_eq!(stored.x509_authorities, vec![other_ca.clone()]);
    let mut third = Bundle::new(TrustDomain::new("third.org").unwrap());
    third.add_x509_authority(&foreign_ca("third.org")).unwrap();
    third.add_jwt_authority("k1", own_bundle.jwt_authorities().values().next().unwrap().clone()).unwrap();
    let stored = client
        .set_federated_bundle(set("third.org", third.to_json().into_bytes(), pb::BundleFormat::Spiffe))
        .await
        .unwrap()
        .into_inner()
        .bundle
        .unwrap();
    assert_eq!(stored.jwt_authorities[0].key_id, "k1");
    // Setting again replaces and bumps the sequence.
    let again = client
        .set_federated_bundle(set("other.org", pem.clone(), pb::BundleFormat::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.bundle.unwrap().sequence, 2);
    let listed = client.list_federated_bundles(pb::ListFederatedBundlesRequest {}).await.unwrap().into_inner();
    let names: Vec<_> = listed.bundles.iter().map(|b| (b.trust_domain.as_str(), b.sequence)).collect();
    assert_eq!(names, [("other.org", 2), ("third.org", 1)]);
    assert_eq!(bundle_of(&listed.bundles[1]).jwt_authorities().len(), 1);

    // Refusals, each naming the field.
    let cases = [
        (set("example.org", pem.clone(), pb::BundleFormat::Pem), "own trust domain"),
        (set("spiffe://example.org", pem.clone(), pb::BundleFormat::Pem), "own trust domain"),
        (set("spiffe://other.org/workload", pem.clone(), pb::BundleFormat::Pem), "invalid trust_domain"),
        (set("Not A Domain", pem.clone(), pb::BundleFormat::Pem), "invalid trust_domain"),
        (set("", pem.clone(), pb::BundleFormat::Pem), "invalid trust_domain"),
        (set("other.org", b"garbage".to_vec(), pb::BundleFormat::Pem), "invalid bundle"),
        (set("other.org", b"{\"keys\": [}".to_vec(), pb::BundleFormat::Spiffe), "invalid bundle"),
        (set("other.org", b"{\"keys\": []}".to_vec(), pb::BundleFormat::Spiffe), "trust nothing"),
        (set("other.org", pem.clone(), pb::BundleFormat::Spiffe), "invalid bundle"),
    ];
    for (request, needle) in cases {
        assert_status(client.set_federated_bundle(request).await, Code::InvalidArgument, needle);
    }
    let bad_format = pb::SetFederatedBundleRequest { trust_domain: "other.org".into(), bundle: pem, format: 99 };
    assert_status(client.set_federated_bundle(bad_format).await, Code::InvalidArgument, "invalid format");

    let delete = |trust_domain: &str| pb::DeleteFederatedBundleRequest { trust_domain: trust_domain.into() };
    client.delete_federated_bundle(delete("spiffe://other.org")).await.unwrap();
    assert_status(client.delete_federated_bundle(delete("other.org")).await, Code::NotFound, "other.org");
    assert_status(client.delete_federated_bundle(delete("example.org")).await, Code::InvalidArgument, "own trust");
    assert_status(client.delete_federated_bundle(delete("a/b")).await, Code::InvalidArgument, "invalid trust_domain");
    let listed = client.list_federated_bundles(pb::ListFederatedBundlesRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.bundles.len(), 1);
    // The own bundle is untouched by all of this.
    let own_after = client.get_bundle(pb::GetBundleRequest {}).await.unwrap().into_inner().bundle.unwrap();
    assert_eq!(own_after, own);
    drop(client);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_show_ban_and_evict() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryDataStore::new(DataStoreOptions::default()));
    let server = server::start_with(config(dir.path()), Arc::clone(&store) as Arc<dyn DataStore>).await.unwrap();
    let mut client = connect(server.admin_socket()).await;

    let id = SpiffeId::parse(AGENT).unwrap();
    let selectors: SelectorSet = [Selector::new("join_token", "t1").unwrap()].into_iter().collect();
    let node = AttestedNode {
        spiffe_id: id.clone(),
        attestation_type: "join_token".into(),
        serial: "0a1b".into(),
        new_serial: None,
        expires_at: 4_000_000_000,
        banned: false,
        selectors,
        can_reattest: false,
    };
    store.create_attested_node(&node).unwrap();

    let agent = client.get_agent(pb::GetAgentRequest { spiffe_id: AGENT.into() }).await.unwrap().into_inner();
    let agent = agent.agent.unwrap();
    assert_eq!(agent.attestation_type, "join_token");
    assert_eq!((agent.serial.as_str(), agent.expires_at, agent.banned), ("0a1b", 4_000_000_000, false));
    assert_eq!(agent.selectors, vec![selector("join_token", "t1")]);
    let listed = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.agents, vec![agent]);

    client.ban_agent(pb::BanAgentRequest { spiffe_id: AGENT.into() }).await.unwrap();
    let banned = store.get_attested_node(&id).unwrap().unwrap();
    assert!(banned.banned);
    assert!(banned.serial.is_empty());
    let shown = client.get_agent(pb::GetAgentRequest { spiffe_id: AGENT.into() }).await.unwrap().into_inner();
    assert!(shown.agent.unwrap().banned);

    client.evict_agent(pb::EvictAgentRequest { spiffe_id: AGENT.into() }).await.unwrap();
    assert!(store.get_attested_node(&id).unwrap().is_none());
    assert_status(client.get_agent(pb::GetAgentRequest { spiffe_id: AGENT.into() }).await, Code::NotFound, AGENT);
    assert_status(client.ban_agent(pb::BanAgentRequest { spiffe_id: AGENT.into() }).await, Code::NotFound, AGENT);
    drop(client);
    server.shutdown().await.unwrap();
}
