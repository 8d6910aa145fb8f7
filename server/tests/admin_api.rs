//! The admin API against a real server started in-process: sled datastore in a temporary
//! data directory, tonic over the real admin Unix socket, the real health endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hyper_util::rt::TokioIo;
use tessera_server::admin::CA_PENDING;
use tessera_server::config::ServerConfig;
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::TrustDomain;
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::admin::v1::admin_service_client::AdminServiceClient;
use tessera_wire::tessera::common::v1 as common;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = AdminServiceClient<Channel>;

async fn start(dir: &Path) -> RunningServer {
    let config = ServerConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("private/admin.sock"),
        health: tessera_server::config::HealthConfig { bind_address: Some("127.0.0.1:0".parse().unwrap()) },
        ..ServerConfig::default()
    };
    server::start(config).await.unwrap()
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

    // Agents: none attested yet.
    let agents = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner();
    assert!(agents.agents.is_empty());
    let unknown = pb::GetAgentRequest { spiffe_id: AGENT.into() };
    assert_status(client.get_agent(unknown).await, Code::NotFound, AGENT);
    let malformed = pb::BanAgentRequest { spiffe_id: "agent".into() };
    assert_status(client.ban_agent(malformed).await, Code::InvalidArgument, "invalid spiffe_id");
    assert_status(client.evict_agent(pb::EvictAgentRequest { spiffe_id: AGENT.into() }).await, Code::NotFound, AGENT);

    // What needs the CA says so.
    assert_status(client.get_bundle(pb::GetBundleRequest {}).await, Code::Unimplemented, CA_PENDING);
    let mint =
        pb::MintJwtSvidRequest { spiffe_id: "spiffe://example.org/web".into(), audiences: vec!["a".into()], ttl: 0 };
    assert_status(client.mint_jwt_svid(mint).await, Code::Unimplemented, CA_PENDING);

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

    // A second server on the same socket is refused while the first runs.
    let other = tempfile::tempdir().unwrap();
    let config =
        ServerConfig { data_dir: other.path().join("data"), admin_socket: socket.clone(), ..ServerConfig::default() };
    let err = server::start(config).await.unwrap_err();
    assert!(err.to_string().contains("another server is listening"), "{err}");
    drop(client);
    server.shutdown().await.unwrap();
}
