#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Forced rotation seen from a workload: a real in-process server, a real agent (manager and
//! Workload API) and the Rust SPIFFE client. For the X.509 CA and the JWT key in turn:
//! prepare (the new authority reaches the workload's bundle), activate, taint the old one
//! (the workload is re-issued an SVID of the new authority long before its normal renewal),
//! revoke it (it disappears from the bundles the workload receives).
//!
//! The steps are driven through the CA object the admin API calls
//! (`CertificateAuthority::change_authority`); the admin RPCs and the CLI on top of it are
//! covered by `server/tests/localauthority_cli.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use spiffe::{JwtSvid, WorkloadApiClient, X509Context};
use tessera_agent::attestor::{UnixAttestor, UnixAttestorConfig};
use tessera_agent::cache::{AgentSnapshot, Cache};
use tessera_agent::config::AgentConfig;
use tessera_agent::manager;
use tessera_agent::workload_api::WorkloadApi;
use tessera_server::ca::AuthorityChange;
use tessera_server::ca::storage::SlotKind;
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{JoinToken, MemoryDataStore, RegistrationEntry};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::x509::verify_x509_svid;
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};

const TD: &str = "example.org";
/// Generous: taint re-minting is spread over 10 s, and the CI box is slow.
const WAIT: Duration = Duration::from_secs(45);
const AUDIENCE: &str = "forced";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn roots(context: &X509Context) -> Vec<Vec<u8>> {
    let x509 = context.bundle_set().get(&spiffe::TrustDomain::new(TD).unwrap()).unwrap();
    x509.authorities().iter().map(|c| c.as_bytes().to_vec()).collect()
}

/// Whether the default SVID of `context` verifies against `root` alone.
fn signed_by(context: &X509Context, root: &[u8]) -> bool {
    let svid = context.default_svid().unwrap();
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let mut single = Bundle::new(td());
    single.add_x509_authority(root).unwrap();
    verify_x509_svid(&chain, &single, SystemTime::now()).is_ok()
}

async fn poll<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn change(server: &RunningServer, kind: SlotKind, change: AuthorityChange) -> String {
    let state = Arc::clone(server.state());
    state.ca().change_authority(kind, change, state.datastore().as_ref(), SystemTime::now()).unwrap().id
}

async fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the Workload API socket did not appear");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_activate_taint_revoke_reissues_workloads_and_removes_the_authority() {
    let dir = tempfile::Builder::new().prefix("frc").tempdir_in("/tmp").unwrap();
    let config = ServerConfig {
        trust_domain: td(),
        data_dir: dir.path().join("server"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.path().join("s.sock"),
        // Long lifetimes: any re-issue seen here is caused by the taint, not by renewal.
        default_x509_svid_ttl: Duration::from_secs(3600),
        default_jwt_svid_ttl: Duration::from_secs(3600),
        ..ServerConfig::default()
    };
    let store: Arc<dyn tessera_server::datastore::DataStore> = Arc::new(MemoryDataStore::default());
    let server = server::start_with(config, store).await.unwrap();
    let store = Arc::clone(server.state().datastore());
    let expires_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    store.create_join_token(&JoinToken { token: "frc".into(), expires_at, alias_spiffe_id: None }).unwrap();
    let agent_id = SpiffeId::parse(&format!("spiffe://{TD}/tessera/agent/join_token/frc")).unwrap();
    let uid = rustix::process::getuid().as_raw();
    let selectors = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()]).unwrap();
    let workload_id = SpiffeId::parse(&format!("spiffe://{TD}/frc/web")).unwrap();
    store.create_entry(&RegistrationEntry::new("frc-web", workload_id, agent_id, selectors)).unwrap();

    let pem = dir.path().join("b.pem");
    std::fs::write(&pem, server.state().ca().bundle().x509_authorities_pem()).unwrap();
    let socket = dir.path().join("w.sock");
    let agent_config = AgentConfig {
        trust_domain: td(),
        server_address: server.agent_api_addr().to_string(),
        data_dir: dir.path().join("agent"),
        trust_bundle_path: Some(pem),
        socket_path: socket.clone(),
        ..AgentConfig::default()
    };
    let cache = Arc::new(Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(td())))));
    let manager = tokio::time::timeout(WAIT, manager::start(&agent_config, Some("frc".into()), Arc::clone(&cache)))
        .await
        .unwrap()
        .unwrap();
    let attestor = Arc::new(UnixAttestor::new(&UnixAttestorConfig::default()));
    let api = WorkloadApi::new(Arc::clone(&cache), attestor, manager.jwt_source(), td());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn({
        let socket = socket.clone();
        async move {
            api.serve(&socket, async move {
                let _ = api_stopped.await;
            })
            .await
        }
    });
    wait_for_socket(&socket).await;
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display())).await.unwrap();

    // ---- X.509 ----
    let old_root = server.state().ca().x509_authority_der();
    let first = poll("a first X.509-SVID", async || client.fetch_x509_context().await.ok()).await;
    assert!(signed_by(&first, &old_root));
    let first_serial = first.default_svid().unwrap().leaf().as_bytes().to_vec();

    let new_id = change(&server, SlotKind::X509, AuthorityChange::Prepare);
    let new_root = poll("the prepared CA in the workload's bundle", async || {
        let context = client.fetch_x509_context().await.ok()?;
        let roots = roots(&context);
        (roots.len() == 2).then(|| roots.into_iter().find(|r| r != &old_root).unwrap())
    })
    .await;
    change(&server, SlotKind::X509, AuthorityChange::Activate(new_id.clone()));
    let old_id = server.state().ca().authorities(SlotKind::X509).into_iter().find(|s| s.id != new_id).unwrap().id;
    // Activation alone does not re-issue a valid SVID.
    let context = client.fetch_x509_context().await.unwrap();
    assert_eq!(context.default_svid().unwrap().leaf().as_bytes(), first_serial.as_slice());

    let tainted_at = Instant::now();
    change(&server, SlotKind::X509, AuthorityChange::Taint(old_id.clone()));
    poll("an X.509-SVID of the new CA after the taint", async || {
        let context = client.fetch_x509_context().await.ok()?;
        signed_by(&context, &new_root).then_some(())
    })
    .await;
    eprintln!("X.509 re-issue after taint: {:?}", tainted_at.elapsed());

    change(&server, SlotKind::X509, AuthorityChange::Revoke(old_id));
    poll("the revoked CA to leave the workload's bundle", async || {
        let context = client.fetch_x509_context().await.ok()?;
        let roots = roots(&context);
        (roots == [new_root.clone()]).then_some(())
    })
    .await;
    assert!(!cache.current().bundles.own().x509_authorities().any(|r| r == old_root.as_slice()));

    // ---- JWT ----
    let jwt = client.fetch_jwt_svid([AUDIENCE], None).await.unwrap();
    let old_kid = JwtSvid::parse_insecure(jwt.token()).unwrap().key_id().to_owned();
    let new_kid = change(&server, SlotKind::Jwt, AuthorityChange::Prepare);
    poll("the prepared JWT key in the workload's JWT bundle", async || {
        let bundles = client.fetch_jwt_bundles().await.ok()?;
        let bundle = bundles.get(&spiffe::TrustDomain::new(TD).unwrap())?;
        bundle.find_jwt_authority(&new_kid).map(|_| ())
    })
    .await;
    change(&server, SlotKind::Jwt, AuthorityChange::Activate(new_kid.clone()));
    // The cached token of the old key is still served until the taint.
    let cached = client.fetch_jwt_svid([AUDIENCE], None).await.unwrap();
    assert_eq!(JwtSvid::parse_insecure(cached.token()).unwrap().key_id(), old_kid);
    change(&server, SlotKind::Jwt, AuthorityChange::Taint(old_kid.clone()));
    poll("a JWT-SVID of the new key after the taint", async || {
        let jwt = client.fetch_jwt_svid([AUDIENCE], None).await.ok()?;
        let bundles = client.fetch_jwt_bundles().await.ok()?;
        let checked = JwtSvid::parse_and_validate(jwt.token(), &bundles, &[AUDIENCE]).ok()?;
        (checked.key_id() == new_kid).then_some(())
    })
    .await;
    change(&server, SlotKind::Jwt, AuthorityChange::Revoke(old_kid.clone()));
    poll("the revoked JWT key to leave the workload's JWT bundle", async || {
        let bundles = client.fetch_jwt_bundles().await.ok()?;
        let bundle = bundles.get(&spiffe::TrustDomain::new(TD).unwrap())?;
        (bundle.find_jwt_authority(&old_kid).is_none() && bundle.find_jwt_authority(&new_kid).is_some()).then_some(())
    })
    .await;

    let _ = stop_api.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), api_task).await;
    tokio::time::timeout(Duration::from_secs(20), manager.shutdown()).await.unwrap();

    // A restarted agent opens new connections with what it persisted: its bundle (without the
    // revoked CA) must verify the server's certificate (re-issued at the taint) and the server
    // must accept its agent SVID (renewed at the taint). No join token is needed.
    let cache = Arc::new(Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(td())))));
    let restarted =
        tokio::time::timeout(WAIT, manager::start(&agent_config, None, Arc::clone(&cache))).await.unwrap().unwrap();
    let mut status = restarted.status_watch();
    tokio::time::timeout(WAIT, status.wait_for(|status| status.last_sync.is_some()))
        .await
        .expect("the restarted agent syncs over fresh connections")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), restarted.shutdown()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await.unwrap().unwrap();
}
