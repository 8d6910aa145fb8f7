#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The agent's manager against a real in-process tessera-server over real TLS: attestation,
//! persistence, entry sync, X.509-SVID minting and rotation, JWT-SVIDs, outage behaviour.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_agent::cache::{AgentSnapshot, Cache, CachedEntry, Identity};
use tessera_agent::config::AgentConfig;
use tessera_agent::manager::{self, ManagerError, RunningManager};
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{DataStore, JoinToken, MemoryDataStore, RegistrationEntry};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::x509::verify_x509_svid;
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};

const TD: &str = "example.org";
const WAIT: Duration = Duration::from_secs(20);

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn server_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        trust_domain: td(),
        data_dir: dir.join("server"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("sadm.sock"),
        ..ServerConfig::default()
    }
}

async fn start_memory_server(dir: &Path) -> RunningServer {
    let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
    server::start_with(server_config(dir), store).await.unwrap()
}

fn store(server: &RunningServer) -> Arc<dyn DataStore> {
    Arc::clone(server.state().datastore())
}

fn new_token(server: &RunningServer, token: &str) {
    let expires_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    store(server).create_join_token(&JoinToken { token: token.to_owned(), expires_at, alias_spiffe_id: None }).unwrap();
}

/// Writes the server's bundle as PEM and returns an agent configuration trusting it.
fn agent_config(dir: &Path, server: &RunningServer) -> AgentConfig {
    let pem_path = dir.join("bootstrap.pem");
    std::fs::write(&pem_path, server.state().ca().bundle().x509_authorities_pem()).unwrap();
    AgentConfig {
        trust_domain: td(),
        server_address: server.agent_api_addr().to_string(),
        data_dir: dir.join("agent"),
        trust_bundle_path: Some(pem_path),
        ..AgentConfig::default()
    }
}

fn new_cache() -> Arc<Cache> {
    Arc::new(Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(td())))))
}

async fn start_agent(config: &AgentConfig, token: Option<&str>) -> Result<RunningManager, ManagerError> {
    tokio::time::timeout(WAIT, manager::start(config, token.map(str::to_owned), new_cache())).await.unwrap()
}

fn agent_id(token: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/tessera/agent/join_token/{token}")).unwrap()
}

fn create_entry(server: &RunningServer, parent: &SpiffeId, path: &str, ttl: Option<Duration>) -> RegistrationEntry {
    let mut entry = RegistrationEntry::new(
        format!("entry-{}", path.replace('/', "-")),
        SpiffeId::parse(&format!("spiffe://{TD}/{path}")).unwrap(),
        parent.clone(),
        SelectorSet::parse_all(&["unix:uid:1000"]).unwrap(),
    );
    entry.x509_svid_ttl = ttl;
    store(server).create_entry(&entry).unwrap()
}

/// Polls the cache until `check` finds something, or fails after `limit`.
async fn wait_for<T>(cache: &Cache, limit: Duration, what: &str, check: impl Fn(&AgentSnapshot) -> Option<T>) -> T {
    let mut receiver = cache.subscribe();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check(&receiver.borrow_and_update()) {
            return found;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || tokio::time::timeout(remaining, receiver.changed()).await.is_err() {
            panic!("timed out after {limit:?} waiting for {what}");
        }
    }
}

fn identity_of(snapshot: &AgentSnapshot, entry_id: &str) -> Option<Identity> {
    snapshot.identity(entry_id)
}

async fn with_deadline<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future).await.unwrap_or_else(|_| panic!("{what} did not finish in {WAIT:?}"))
}

fn mode(path: &PathBuf) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_persists_and_a_restart_reuses_the_agent_svid() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-persist");
    let config = agent_config(dir.path(), &server);

    let agent = start_agent(&config, Some("tok-persist")).await.unwrap();
    let status = agent.status();
    assert!(status.attested);
    assert_eq!(status.agent_id, Some(agent_id("tok-persist")));
    let svid_file = config.data_dir.join("agent_svid.pem");
    assert_eq!(mode(&svid_file), 0o600);
    assert_eq!(mode(&config.data_dir), 0o700);
    assert!(config.data_dir.join("bundle.json").exists());
    let persisted = std::fs::read(&svid_file).unwrap();
    with_deadline("agent shutdown", agent.shutdown()).await;

    // A restart needs no token (the token is used up) and keeps the same identity.
    let restarted = start_agent(&config, None).await.unwrap();
    assert_eq!(restarted.status().agent_id, Some(agent_id("tok-persist")));
    assert_eq!(std::fs::read(&svid_file).unwrap(), persisted, "no new attestation happened");
    // And it can talk to the server with the persisted SVID: it syncs.
    let mut status = restarted.status_watch();
    with_deadline("first sync after restart", status.wait_for(|status| status.last_sync.is_some())).await.unwrap();
    with_deadline("agent shutdown", restarted.shutdown()).await;

    // The token cannot be used twice.
    let mut other = config.clone();
    other.data_dir = dir.path().join("agent2");
    match start_agent(&other, Some("tok-persist")).await {
        Err(ManagerError::AttestationRefused(reason)) => assert!(!reason.is_empty()),
        other => panic!("a used token must be refused, got {other:?}"),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_is_refused_with_the_servers_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    let config = agent_config(dir.path(), &server);
    let error = start_agent(&config, Some("no-such-token")).await.unwrap_err();
    let ManagerError::AttestationRefused(reason) = &error else { panic!("expected a refusal, got {error:?}") };
    assert!(!reason.is_empty());
    assert!(error.to_string().starts_with("the server refused attestation: "), "{error}");
    assert!(!config.data_dir.join("agent_svid.pem").exists(), "nothing is persisted");

    // Without any token and without a persisted SVID the agent says what is missing.
    let error = start_agent(&config, None).await.unwrap_err();
    assert!(matches!(error, ManagerError::NoJoinToken { .. }), "{error}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_non_zero_with_the_reason_when_the_token_is_refused() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let server = start_memory_server(dir.path()).await;
    let config = agent_config(dir.path(), &server);
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\n\
             socket_path = \"{}\"\nadmin_socket = \"{}\"\n",
            config.server_address,
            config.data_dir.display(),
            config.trust_bundle_path.as_ref().unwrap().display(),
            dir.path().join("api.sock").display(),
            dir.path().join("adm.sock").display(),
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera-agent"))
        .args(["run", "--config"])
        .arg(&file)
        .args(["--join-token", "bogus-token"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let output = with_deadline("tessera-agent run", child.wait()).await.unwrap();
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::BufReader::new(stderr), &mut text).await.unwrap();
    assert!(!output.success(), "{text}");
    assert!(text.contains("tessera-agent: the server refused attestation: "), "{text}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reach_the_cache_quickly_with_valid_svids_and_leave_on_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-entries");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-entries")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    wait_for(&cache, WAIT, "the first sync", |snapshot| snapshot.ready.then_some(())).await;

    let started = Instant::now();
    let entry = create_entry(&server, &agent_id("tok-entries"), "web", None);
    let identity = wait_for(&cache, WAIT, "the new identity", |snapshot| identity_of(snapshot, &entry.id)).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "the entry took {elapsed:?} to become an identity");

    assert_eq!(identity.entry.spiffe_id, entry.spiffe_id);
    let chain: Vec<&[u8]> = identity.svid.chain_refs();
    let bundle = server.state().ca().bundle();
    let verified = verify_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id(), &entry.spiffe_id);
    assert_eq!(cache.current().bundles.own().x509_authorities().len(), bundle.x509_authorities().len());

    store(&server).delete_entry(&entry.id).unwrap();
    wait_for(&cache, WAIT, "the identity to disappear", |snapshot| {
        (identity_of(snapshot, &entry.id).is_none() && snapshot.entry(&entry.id).is_none()).then_some(())
    })
    .await;
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_svids_rotate_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-rotate");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-rotate")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    let entry = create_entry(&server, &agent_id("tok-rotate"), "short", Some(Duration::from_secs(4)));

    let first = wait_for(&cache, WAIT, "the first SVID", |snapshot| identity_of(snapshot, &entry.id)).await;
    let lifetime = first.svid.expires_at().duration_since(SystemTime::now()).unwrap_or_default();
    assert!(lifetime <= Duration::from_secs(5), "TTL not applied: {lifetime:?}");
    let second = wait_for(&cache, WAIT, "a rotated SVID", |snapshot| {
        identity_of(snapshot, &entry.id).filter(|identity| identity.svid.leaf() != first.svid.leaf())
    })
    .await;
    let rotated_at = SystemTime::now();
    assert!(rotated_at < first.svid.expires_at(), "the new SVID arrived only after the old one expired");
    assert!(second.svid.expires_at() > first.svid.expires_at());
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_fetched_once_and_then_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-jwt");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-jwt")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    let created = create_entry(&server, &agent_id("tok-jwt"), "jwt", None);
    let entry: Arc<CachedEntry> =
        wait_for(&cache, WAIT, "the entry", |snapshot| snapshot.entry(&created.id).cloned()).await;

    let source = agent.jwt_source();
    let audiences = ["service-b".to_owned(), "service-a".to_owned()];
    let first = with_deadline("JWT fetch", source.fetch_jwt_svid(&entry, &audiences)).await.unwrap();
    assert_eq!(first.spiffe_id, entry.spiffe_id);
    assert!(first.expires_at > SystemTime::now());
    assert_eq!(first.token.split('.').count(), 3, "a JWS compact token");
    // Same audiences in another order: a cache hit.
    let reordered = ["service-a".to_owned(), "service-b".to_owned()];
    let second = with_deadline("JWT fetch", source.fetch_jwt_svid(&entry, &reordered)).await.unwrap();
    assert_eq!(second.token, first.token);
    assert_eq!(agent.jwt_svids().server_fetches(), 1);
    assert_eq!(agent.jwt_svids().cache_hits(), 1);
    // Other audiences: a new token.
    let third = with_deadline("JWT fetch", source.fetch_jwt_svid(&entry, &["other".to_owned()])).await.unwrap();
    assert_ne!(third.token, first.token);
    assert_eq!(agent.jwt_svids().server_fetches(), 2);
    assert_eq!(agent.jwt_svids().server_calls(), 2, "lone misses go out at once, one call each");

    // Concurrent misses travel together: one BatchNewJwtSvid call carries many of them.
    let bursts: Vec<[String; 1]> = (0..40).map(|n| [format!("burst-{n}")]).collect();
    let burst = futures_util::future::join_all(bursts.iter().map(|aud| source.fetch_jwt_svid(&entry, aud)));
    let tokens = with_deadline("JWT burst", burst).await;
    for (token, aud) in tokens.iter().zip(&bursts) {
        let token = token.as_ref().unwrap();
        let bundle = agent.cache().current().bundles.clone();
        let claims = tessera_spiffe::jwt::validate(&token.token, bundle.as_ref(), aud, SystemTime::now()).unwrap();
        assert_eq!(claims.spiffe_id(), &entry.spiffe_id);
    }
    assert_eq!(agent.jwt_svids().server_fetches(), 42);
    let calls = agent.jwt_svids().server_calls() - 2;
    assert!(calls < 40, "40 concurrent misses took {calls} calls: they were not batched");

    // An entry the agent does not hold is refused locally.
    let mut stranger = CachedEntry::clone(&entry);
    stranger.id = "not-an-entry".into();
    assert!(source.fetch_jwt_svid(&stranger, &audiences).await.is_err());
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_survives_a_server_outage_and_the_agent_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    // A persistent server, so that a restart keeps its CA, nodes and entries.
    let first = server::start(server_config(dir.path())).await.unwrap();
    let address = first.agent_api_addr();
    new_token(&first, "tok-outage");
    let config = agent_config(dir.path(), &first);
    let agent = start_agent(&config, Some("tok-outage")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    let entry = create_entry(&first, &agent_id("tok-outage"), "steady", None);
    let identity = wait_for(&cache, WAIT, "the identity", |snapshot| identity_of(snapshot, &entry.id)).await;

    with_deadline("server shutdown", first.shutdown()).await.unwrap();
    let mut status = agent.status_watch();
    with_deadline("the agent noticing the outage", status.wait_for(|status| !status.connected)).await.unwrap();
    // Still served while the server is away.
    let during = identity_of(&cache.current(), &entry.id).expect("the identity is still served");
    assert_eq!(during.svid.chain_refs(), identity.svid.chain_refs());

    let mut restarted_config = server_config(dir.path());
    restarted_config.bind_address = address;
    let second = server::start(restarted_config).await.unwrap();
    let later = create_entry(&second, &agent_id("tok-outage"), "after-outage", None);
    wait_for(&cache, Duration::from_secs(60), "an entry created after the outage", |snapshot| {
        identity_of(snapshot, &later.id)
    })
    .await;
    assert!(identity_of(&cache.current(), &entry.id).is_some());
    with_deadline("agent shutdown", agent.shutdown()).await;
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_svid_is_renewed_persisted_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config(dir.path());
    config.agent_ttl = Duration::from_secs(4);
    let store_impl: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
    let server = server::start_with(config, store_impl).await.unwrap();
    new_token(&server, "tok-renew");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-renew")).await.unwrap();
    let first_expiry = agent.status().agent_svid_expires_at.unwrap();
    let persisted = std::fs::read(config.data_dir.join("agent_svid.pem")).unwrap();

    let mut status = agent.status_watch();
    with_deadline(
        "agent SVID renewal",
        status.wait_for(|status| status.agent_svid_expires_at.is_some_and(|at| at > first_expiry)),
    )
    .await
    .unwrap();
    assert!(SystemTime::now() < first_expiry, "renewed only after the old SVID expired");
    assert_ne!(std::fs::read(config.data_dir.join("agent_svid.pem")).unwrap(), persisted, "the renewal is persisted");

    // The server now only accepts the new serial: the agent keeps working with it.
    let cache = Arc::clone(agent.cache());
    let entry = create_entry(&server, &agent_id("tok-renew"), "after-renewal", None);
    wait_for(&cache, WAIT, "an entry after renewal", |snapshot| identity_of(snapshot, &entry.id)).await;
    // A second renewal proves the renewed credential authenticates RenewAgent too.
    let second_expiry = agent.status().agent_svid_expires_at.unwrap();
    with_deadline(
        "second agent SVID renewal",
        status.wait_for(|status| status.agent_svid_expires_at.is_some_and(|at| at > second_expiry)),
    )
    .await
    .unwrap();
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_entries_are_minted_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-many");
    let config = agent_config(dir.path(), &server);
    let parent = agent_id("tok-many");
    // More than one snapshot page and more than one mint batch.
    let ids: Vec<String> = (0..250).map(|i| create_entry(&server, &parent, &format!("w{i}"), None).id).collect();
    let agent = start_agent(&config, Some("tok-many")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    wait_for(&cache, Duration::from_secs(60), "250 identities", |snapshot| {
        (snapshot.ready && ids.iter().all(|id| identity_of(snapshot, id).is_some())).then_some(())
    })
    .await;
    assert_eq!(cache.current().identity_count(), 250);
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_bootstrap_trusts_the_first_server_then_caches_its_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-tofu");
    let mut config = agent_config(dir.path(), &server);
    config.trust_bundle_path = None;
    config.insecure_bootstrap = true;
    let agent = start_agent(&config, Some("tok-tofu")).await.unwrap();
    let cached = std::fs::read(config.data_dir.join("bundle.json")).unwrap();
    let bundle = Bundle::from_json(td(), &cached).unwrap();
    assert_eq!(bundle.x509_authorities().len(), server.state().ca().bundle().x509_authorities().len());
    let mut status = agent.status_watch();
    with_deadline("first sync", status.wait_for(|status| status.last_sync.is_some())).await.unwrap();
    with_deadline("agent shutdown", agent.shutdown()).await;

    // Neither a bundle nor insecure_bootstrap nor a cache: refused before contacting anyone.
    let mut bare = agent_config(dir.path(), &server);
    bare.trust_bundle_path = None;
    bare.data_dir = dir.path().join("bare");
    let error = start_agent(&bare, Some("unused-token")).await.unwrap_err();
    assert!(matches!(error, ManagerError::NoTrustAnchor { .. }), "{error}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_changes_and_federated_bundles_reach_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-change");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-change")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    let entry = create_entry(&server, &agent_id("tok-change"), "before", None);
    wait_for(&cache, WAIT, "the first identity", |snapshot| identity_of(snapshot, &entry.id)).await;

    // A federated bundle, and the entry changed to federate with it under a new SPIFFE ID.
    let partner = TrustDomain::new("partner.org").unwrap();
    let mut federated = Bundle::new(partner.clone());
    federated.add_x509_authority(server.state().ca().bundle().x509_authorities().next().unwrap()).unwrap();
    store(&server).set_bundle(&partner, federated.to_json().as_bytes(), None).unwrap();
    let mut changed = entry.clone();
    changed.spiffe_id = SpiffeId::parse(&format!("spiffe://{TD}/after")).unwrap();
    changed.federates_with = vec![partner.clone()];
    store(&server).update_entry(&changed, None).unwrap();

    let renamed = wait_for(&cache, WAIT, "the re-minted identity", |snapshot| {
        identity_of(snapshot, &entry.id).filter(|identity| identity.entry.spiffe_id == changed.spiffe_id)
    })
    .await;
    let chain: Vec<&[u8]> = renamed.svid.chain_refs();
    let verified = verify_x509_svid(&chain, &server.state().ca().bundle(), SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id(), &changed.spiffe_id, "the SVID carries the new SPIFFE ID");
    assert!(renamed.entry.federates_with.contains(&partner));
    wait_for(&cache, WAIT, "the federated bundle", |snapshot| snapshot.bundles.get(&partner).map(|_| ())).await;
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_svids_are_served_until_they_expire_and_no_longer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-expire");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-expire")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    let entry = create_entry(&server, &agent_id("tok-expire"), "short-outage", Some(Duration::from_secs(3)));
    wait_for(&cache, WAIT, "the identity", |snapshot| identity_of(snapshot, &entry.id)).await;
    with_deadline("server shutdown", server.shutdown()).await.unwrap();

    // The last SVID minted before the outage stays until its notAfter, then leaves.
    let last = identity_of(&cache.current(), &entry.id).expect("served during the outage");
    wait_for(&cache, WAIT, "the expired SVID to leave", |snapshot| {
        identity_of(snapshot, &entry.id).is_none().then_some(())
    })
    .await;
    assert!(SystemTime::now() >= last.svid.expires_at(), "an unexpired SVID was dropped");
    assert!(cache.current().entry(&entry.id).is_some(), "the entry itself is still known");
    with_deadline("agent shutdown", agent.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_keeps_serving_its_cache_and_reports_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_memory_server(dir.path()).await;
    new_token(&server, "tok-ban");
    let config = agent_config(dir.path(), &server);
    let agent = start_agent(&config, Some("tok-ban")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    let entry = create_entry(&server, &agent_id("tok-ban"), "banned-node", None);
    wait_for(&cache, WAIT, "the identity", |snapshot| identity_of(snapshot, &entry.id)).await;

    store(&server).ban_attested_node(&agent_id("tok-ban")).unwrap();
    // The server ends the agent's calls; reconnecting is refused.
    let mut status = agent.status_watch();
    with_deadline("the agent noticing the ban", status.wait_for(|status| !status.attested)).await.unwrap();
    assert!(identity_of(&cache.current(), &entry.id).is_some(), "the cache keeps serving unexpired SVIDs");
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}

/// Captured log lines with the time they were written.
type Logs = Arc<std::sync::Mutex<Vec<(Instant, String)>>>;

/// Log events of every test in this binary with the time they were written, for tests that
/// check what the server and the agent did and when (a global subscriber: filter by content).
fn captured_logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs: Logs = Arc::default();
        struct Capture(Logs);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(buf).into_owned()));
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Arc::clone(&logs);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .try_init()
            .unwrap();
        logs
    }))
}

/// Issues 5 and 7: an agent whose signing calls the server refuses with its per-agent rate
/// limit (`RESOURCE_EXHAUSTED` from `agent_svid_rate_limit`) waits the time the refusal names
/// (`tessera-retry-after-ms`) instead of hammering the server or backing off ever longer
/// (which made a long burst's rate decay to a batch per 30 s), keeps what it minted, and is
/// served in the end at the configured rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_signing_calls_wait_the_time_the_server_names_until_served() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    // 10 SVIDs per second, bursts of 500: five batches of 100 pass, the sixth is refused until
    // the bucket has refilled 100 tokens (about 10 s), a wait the refusal names.
    let config = ServerConfig { agent_svid_rate_limit: 10, ..server_config(dir.path()) };
    let store_: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
    let server = server::start_with(config, store_).await.unwrap();
    new_token(&server, "tok-backoff");
    let parent = agent_id("tok-backoff");
    let ids: Vec<String> = (0..600).map(|i| create_entry(&server, &parent, &format!("b{i}"), None).id).collect();
    let started = Instant::now();
    let agent = start_agent(&agent_config(dir.path(), &server), Some("tok-backoff")).await.unwrap();
    let cache = Arc::clone(agent.cache());
    wait_for(&cache, Duration::from_secs(90), "600 identities", |snapshot| {
        (ids.iter().all(|id| identity_of(snapshot, id).is_some())).then_some(())
    })
    .await;
    let served_after = started.elapsed();

    let refusals = logs
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, line)| line.contains("per-agent signing rate limit reached") && line.contains("tok-backoff"))
        .count();
    eprintln!("served after {served_after:?}; {refusals} refusals");
    assert!(refusals >= 1, "the sixth batch must have been refused");
    // Waiting what the refusal names finds the tokens there: the sixth batch is refused once
    // (twice at most, should the clock round against it). Backing off from 0.25 s doubling
    // takes five refusals to reach 10 s.
    assert!(refusals <= 2, "the agent retried before the named time: {refusals} refusals");
    // The limit held: 100 SVIDs beyond the burst took most of 10 s of refill.
    assert!(served_after >= Duration::from_secs(5), "served after {served_after:?}");
    with_deadline("agent shutdown", agent.shutdown()).await;
    server.shutdown().await.unwrap();
}
