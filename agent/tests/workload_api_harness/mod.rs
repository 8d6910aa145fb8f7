//! Shared by the Workload API test files: a test CA and JWT key, a cache of identities whose
//! selectors match the test process, a fake JWT-SVID source that really signs, and the
//! Workload API served on a real Unix socket in a short temporary directory.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rcgen::PublicKeyData as _;
use ring::rand::SystemRandom;
use tessera_agent::attestor::{UnixAttestor, UnixAttestorConfig};
use tessera_agent::cache::{
    AgentSnapshot, BoxFuture, Cache, CachedEntry, Identity, JwtSvid, JwtSvidError, JwtSvidSource, X509Svid,
};
use tessera_agent::workload_api::{WorkloadApi, WorkloadApiLimits, bind_socket};
use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::jwt::{self, JwtSvidClaims};
use tessera_spiffe::keys::{KeyType, SigningKey};
use tessera_spiffe::selector::SelectorSet;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_spiffe::x509::{CaTemplate, X509Issuer, X509SvidTemplate};
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};
use zeroize::Zeroizing;

pub const TRUST_DOMAIN: &str = "example.org";
pub const FEDERATED: &str = "partner.test";
pub const JWT_KEY_ID: &str = "jwt-key-1";

/// Generous deadline for anything the tests wait for.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// `unix:uid:<uid of this process>`: matches the test process and any child it spawns.
pub fn my_uid_selector() -> String {
    format!("unix:uid:{}", rustix::process::getuid().as_raw())
}

/// A uid selector no test process has.
pub fn other_uid_selector() -> String {
    format!("unix:uid:{}", rustix::process::getuid().as_raw().wrapping_add(4242))
}

/// A self-signed CA of a trust domain, signing X.509-SVIDs for the tests.
pub struct TestCa {
    issuer: X509Issuer,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let rng = SystemRandom::new();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let template = CaTemplate::new(td(trust_domain), Duration::from_secs(3600)).unwrap();
        let der = template.self_signed(&key, SystemTime::now(), &rng).unwrap();
        Self { issuer: X509Issuer::new(der, key).unwrap() }
    }

    pub fn der(&self) -> &[u8] {
        self.issuer.certificate_der()
    }

    pub fn svid(&self, spiffe_id: &SpiffeId) -> Arc<X509Svid> {
        let rng = SystemRandom::new();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let template = X509SvidTemplate::new(spiffe_id.clone(), Duration::from_secs(600)).unwrap();
        let now = SystemTime::now();
        let leaf = self.issuer.sign_x509_svid(&template, &key.subject_public_key_info(), now, &rng).unwrap();
        let key = Zeroizing::new(key.serialize_der());
        Arc::new(X509Svid::from_chain(&[leaf], &key, now + Duration::from_secs(600)))
    }
}

/// Called once at the start of the next JWT-SVID fetch.
pub type FetchHook = Box<dyn FnOnce() + Send>;

/// Signs JWT-SVIDs with a real key; counts calls.
pub struct FakeJwtSource {
    key: SigningKey,
    pub calls: AtomicUsize,
    /// Runs during the next fetch (between the Workload API's attestation and its answer).
    pub during_next_fetch: std::sync::Mutex<Option<FetchHook>>,
}

impl JwtSvidSource for FakeJwtSource {
    fn fetch_jwt_svid<'a>(
        &'a self,
        entry: &'a CachedEntry,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<JwtSvid, JwtSvidError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let hook = self.during_next_fetch.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            let now = SystemTime::now();
            let claims = JwtSvidClaims {
                subject: entry.spiffe_id.clone(),
                audience: audiences.to_vec(),
                issued_at: now,
                expires_at: now + Duration::from_secs(300),
                issuer: None,
                jwt_id: None,
            };
            let token = jwt::sign(&claims, &self.key, JWT_KEY_ID, &SystemRandom::new())
                .map_err(|err| JwtSvidError::Refused(err.to_string()))?;
            Ok(JwtSvid {
                spiffe_id: entry.spiffe_id.clone(),
                token,
                expires_at: now + Duration::from_secs(300),
                hint: String::new(),
            })
        })
    }
}

/// The trust bundles the tests start with: the own CA and JWT key, and a federated CA.
pub struct Trust {
    pub ca: TestCa,
    pub federated_ca: TestCa,
    pub jwt_key: SigningKey,
}

impl Trust {
    pub fn new() -> Self {
        Self {
            ca: TestCa::new(TRUST_DOMAIN),
            federated_ca: TestCa::new(FEDERATED),
            jwt_key: SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap(),
        }
    }

    pub fn bundles(&self) -> BundleSet {
        let mut own = Bundle::new(td(TRUST_DOMAIN));
        own.add_x509_authority(self.ca.der()).unwrap();
        own.add_jwt_authority(JWT_KEY_ID, self.jwt_key.public_key().clone()).unwrap();
        let mut bundles = BundleSet::new(own);
        let mut federated = Bundle::new(td(FEDERATED));
        federated.add_x509_authority(self.federated_ca.der()).unwrap();
        bundles.insert_federated(federated).unwrap();
        bundles
    }
}

pub fn entry(id: &str, path: &str, selectors: &[&str], federates_with: &[&str]) -> Arc<CachedEntry> {
    Arc::new(CachedEntry {
        id: id.into(),
        spiffe_id: td(TRUST_DOMAIN).workload_id(path).unwrap(),
        selectors: SelectorSet::parse_all(selectors).unwrap(),
        federates_with: federates_with.iter().map(|name| td(name)).collect(),
        hint: String::new(),
        revision: 1,
    })
}

/// A Workload API served on a real socket.
pub struct Agent {
    pub cache: Arc<Cache>,
    pub api: WorkloadApi,
    pub socket: PathBuf,
    pub trust: Trust,
    pub jwt_source: Arc<FakeJwtSource>,
    dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tessera_agent::workload_api::ServeError>>>,
}

impl Agent {
    /// A ready agent without entries.
    pub async fn start() -> Self {
        Self::start_with(WorkloadApiLimits::default(), true).await
    }

    pub async fn start_with(limits: WorkloadApiLimits, ready: bool) -> Self {
        Self::start_with_attestor(limits, ready, UnixAttestor::new(&UnixAttestorConfig::default())).await
    }

    pub async fn start_with_attestor(limits: WorkloadApiLimits, ready: bool, attestor: UnixAttestor) -> Self {
        let trust = Trust::new();
        let mut snapshot = AgentSnapshot::empty(trust.bundles());
        snapshot.ready = ready;
        let cache = Arc::new(Cache::new(snapshot));
        let attestor = Arc::new(attestor);
        let jwt_key = SigningKey::from_pkcs8_der(trust.jwt_key.pkcs8_der(), &SystemRandom::new()).unwrap();
        let jwt_source = Arc::new(FakeJwtSource {
            key: jwt_key,
            calls: AtomicUsize::new(0),
            during_next_fetch: std::sync::Mutex::new(None),
        });
        let api = WorkloadApi::with_limits(
            Arc::clone(&cache),
            attestor,
            Arc::clone(&jwt_source) as Arc<dyn JwtSvidSource>,
            td(TRUST_DOMAIN),
            limits,
        );
        let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
        let socket = dir.path().join("public").join("api.sock");
        let listener = bind_socket(&socket).unwrap();
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(api.clone().serve_listener(listener, async {
            let _ = shutdown_rx.await;
        }));
        Self { cache, api, socket, trust, jwt_source, dir, shutdown: Some(shutdown), task: Some(task) }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `entry` with a fresh SVID.
    pub fn add_identity(&self, entry: Arc<CachedEntry>) {
        let svid = self.trust.ca.svid(&entry.spiffe_id);
        self.cache.update(|snapshot| {
            snapshot.revision += 1;
            snapshot.insert_identity(Identity { entry, svid });
        });
    }

    /// Adds `entry` without an SVID (minting pending).
    pub fn add_entry_only(&self, entry: Arc<CachedEntry>) {
        self.cache.update(|snapshot| {
            snapshot.revision += 1;
            snapshot.insert_entry(entry);
        });
    }

    /// Re-mints the SVID of entry `id`.
    pub fn rotate(&self, id: &str) {
        self.cache.update(|snapshot| {
            snapshot.revision += 1;
            if let Some(identity) = snapshot.identity(id) {
                let svid = self.trust.ca.svid(&identity.entry.spiffe_id);
                snapshot.insert_identity(Identity { entry: identity.entry, svid });
            }
        });
    }

    pub fn remove_entry(&self, id: &str) {
        self.cache.update(|snapshot| {
            snapshot.revision += 1;
            snapshot.remove_entry(id);
        });
    }

    /// Stops serving and returns the server's result.
    pub async fn stop(&mut self) -> Result<(), tessera_agent::workload_api::ServeError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let task = self.task.take().expect("stopped twice");
        tokio::time::timeout(DEADLINE, task).await.expect("server did not stop").unwrap()
    }
}

/// A raw tonic channel over the socket (one connection).
pub async fn channel(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

/// A raw client that adds no header by itself.
pub async fn raw_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(channel(socket).await)
}

/// A request with the security header.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    request
}

/// Polls `condition` until it holds or the deadline passes.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raises the soft limit on open files to the hard limit: a test process that is client and
/// server of many connections at once needs more than a CI box's default 1024.
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}
