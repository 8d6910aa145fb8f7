#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Rotation soak: a real in-process tessera-server (sled datastore, CA in its data directory)
//! with `ca_ttl = 60s`, a real agent (the `tessera_agent` manager and Workload API on a unix
//! socket) and a workload using the Rust SPIFFE client library, for at least three X.509 CA
//! and JWT-key rotations (about two minutes: prepare at +30 s, activations at +50, +80 and
//! +110 s).
//!
//! The workload checks, for every X.509 context the stream delivers, that the SVID verifies
//! against the bundle delivered with it, that it arrives before the previous SVID expired (no
//! gap), and that every new CA was in a bundle the workload received before the first SVID
//! that CA signed. In parallel it keeps fetching: an X.509 context and a JWT-SVID with the JWT
//! bundle, each checked the same way, none failing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use spiffe::{JwtSvid, WorkloadApiClient, X509Context};
use tessera_agent::attestor::{UnixAttestor, UnixAttestorConfig};
use tessera_agent::cache::{AgentSnapshot, Cache};
use tessera_agent::config::AgentConfig;
use tessera_agent::manager;
use tessera_agent::workload_api::WorkloadApi;
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{JoinToken, RegistrationEntry};
use tessera_server::server;
use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::x509::verify_x509_svid;
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};

const TD: &str = "example.org";
const CA_TTL: Duration = Duration::from_secs(60);
const SVID_TTL: Duration = Duration::from_secs(10);
/// The whole soak must end within this (three rotations take about 110 s).
const SOAK_LIMIT: Duration = Duration::from_secs(200);
/// Distinct CAs (and JWT keys) the workload must see signing: the first + three rotations.
const SIGNERS: usize = 4;
const AUDIENCE: &str = "soak";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

/// What the X.509 stream observed.
#[derive(Default)]
struct X509Observations {
    messages: usize,
    /// Root DER -> index of the first message whose bundle held it.
    first_in_bundle: BTreeMap<Vec<u8>, usize>,
    /// Root DER -> index of the first message whose SVID it signed.
    first_signed: BTreeMap<Vec<u8>, usize>,
    /// End of validity of the SVID held.
    held_until: Option<SystemTime>,
}

/// The own bundle of an X.509 context, as a Tessera bundle.
fn own_bundle(context: &X509Context) -> Bundle {
    let x509 = context.bundle_set().get(&spiffe::TrustDomain::new(TD).unwrap()).expect("own bundle in the context");
    let mut bundle = Bundle::new(td());
    for authority in x509.authorities() {
        bundle.add_x509_authority(authority.as_bytes()).unwrap();
    }
    bundle
}

/// Checks the default SVID of `context` against its bundle at `now`; returns its end of
/// validity and the root that signed it.
fn check_context(context: &X509Context, now: SystemTime) -> (SystemTime, Vec<u8>, Bundle) {
    let svid = context.default_svid().expect("an X.509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://{TD}/soak/web"));
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    let bundle = own_bundle(context);
    let verified = verify_x509_svid(&chain, &bundle, now)
        .unwrap_or_else(|e| panic!("SVID does not verify against the bundle received with it: {e}"));
    let signer = bundle
        .x509_authorities()
        .find(|root| {
            let mut single = Bundle::new(td());
            single.add_x509_authority(root).unwrap();
            verify_x509_svid(&chain, &single, now).is_ok()
        })
        .expect("one root of the bundle signed the SVID")
        .to_vec();
    (verified.not_after(), signer, bundle)
}

impl X509Observations {
    fn record(&mut self, context: &X509Context) {
        let now = SystemTime::now();
        let index = self.messages;
        self.messages += 1;
        if let Some(until) = self.held_until {
            assert!(now < until, "gap: the previous SVID expired at {until:?} before a new one arrived at {now:?}");
        }
        let (not_after, signer, bundle) = check_context(context, now);
        for root in bundle.x509_authorities() {
            self.first_in_bundle.entry(root.to_vec()).or_insert(index);
        }
        self.first_signed.entry(signer).or_insert(index);
        self.held_until = Some(not_after);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_stay_valid_across_three_ca_and_jwt_key_rotations() {
    let dir = tempfile::Builder::new().prefix("rot").tempdir_in("/tmp").unwrap();
    let config = ServerConfig {
        trust_domain: td(),
        data_dir: dir.path().join("server"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.path().join("s.sock"),
        ca_ttl: CA_TTL,
        default_x509_svid_ttl: SVID_TTL,
        default_jwt_svid_ttl: SVID_TTL,
        agent_ttl: SVID_TTL,
        ..ServerConfig::default()
    };
    let server = server::start(config).await.unwrap();
    let store = Arc::clone(server.state().datastore());
    let expires_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    store.create_join_token(&JoinToken { token: "soak".into(), expires_at, alias_spiffe_id: None }).unwrap();
    let agent_id = SpiffeId::parse(&format!("spiffe://{TD}/tessera/agent/join_token/soak")).unwrap();
    let uid = rustix::process::getuid().as_raw();
    let selectors = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()]).unwrap();
    let workload_id = SpiffeId::parse(&format!("spiffe://{TD}/soak/web")).unwrap();
    store.create_entry(&RegistrationEntry::new("soak-web", workload_id, agent_id, selectors)).unwrap();

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
    let manager = tokio::time::timeout(
        Duration::from_secs(30),
        manager::start(&agent_config, Some("soak".into()), Arc::clone(&cache)),
    )
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

    // The streaming workload.
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first_root = server.state().ca().x509_authority_der();
    let started = Instant::now();
    let mut stream_seen = X509Observations::default();
    let mut jwt_kids: Vec<String> = Vec::new();
    let mut polled_roots: Vec<Vec<u8>> = Vec::new();
    let mut first_root_left_bundle = false;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        assert!(
            started.elapsed() < SOAK_LIMIT,
            "not enough rotations seen in {SOAK_LIMIT:?}: {} CAs signed streamed SVIDs, {} JWT keys signed JWT-SVIDs",
            stream_seen.first_signed.len(),
            jwt_kids.len()
        );
        tokio::select! {
            next = contexts.next() => {
                let context = next.expect("the X.509 stream stays open").expect("stream message");
                stream_seen.record(&context);
            }
            _ = poll.tick() => {
                // The fetching workload: X.509 context, JWT-SVID and JWT bundle.
                let now = SystemTime::now();
                let context = client.fetch_x509_context().await.expect("X.509 context fetch");
                let (_, signer, bundle) = check_context(&context, now);
                if !polled_roots.contains(&signer) {
                    polled_roots.push(signer);
                }
                if !bundle.x509_authorities().any(|root| root == first_root.as_slice()) {
                    first_root_left_bundle = true;
                }
                let jwt = client.fetch_jwt_svid([AUDIENCE], None).await.expect("JWT-SVID fetch");
                let jwt_bundles = client.fetch_jwt_bundles().await.expect("JWT bundle fetch");
                let checked = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &[AUDIENCE])
                    .unwrap_or_else(|e| panic!("JWT-SVID does not validate against the JWT bundle: {e}"));
                assert_eq!(checked.spiffe_id().to_string(), format!("spiffe://{TD}/soak/web"));
                let kid = checked.key_id().to_owned();
                if !jwt_kids.contains(&kid) {
                    jwt_kids.push(kid);
                }
            }
        }
        if stream_seen.first_signed.len() >= SIGNERS && jwt_kids.len() >= SIGNERS && polled_roots.len() >= SIGNERS {
            break;
        }
    }
    eprintln!(
        "soak: {} stream messages, {} CAs, {} JWT keys in {:?}",
        stream_seen.messages,
        stream_seen.first_signed.len(),
        jwt_kids.len(),
        started.elapsed()
    );

    // Every new CA reached the workload in a bundle before the first SVID it signed.
    for (root, signed_at) in &stream_seen.first_signed {
        if root == &first_root {
            continue;
        }
        let published_at = stream_seen.first_in_bundle[root];
        assert!(
            published_at < *signed_at,
            "a CA signed an SVID (message {signed_at}) before it was published (message {published_at})"
        );
    }
    assert!(first_root_left_bundle, "the first CA left the bundle after it expired");
    let journal = server.state().ca().journal();
    assert!(journal.slots.len() <= 6, "expired authorities are dropped: {journal:?}");

    let _ = stop_api.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), api_task).await;
    tokio::time::timeout(Duration::from_secs(20), manager.shutdown()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await.unwrap().unwrap();
}

async fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the Workload API socket did not appear");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
