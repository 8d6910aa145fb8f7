//! A real in-process server and simulated agents that talk to it over real mTLS.
//!
//! [`SimServer::start`] runs `tessera_server::server::start` on a sled datastore in a fresh
//! temporary directory, with the agent API on `127.0.0.1:<ephemeral>`. [`SimAgent::attest`]
//! does what an agent does the first time: a join-token attestation over server-authenticated
//! TLS, then a new connection presenting the agent X.509-SVID it got (mTLS, verified by
//! `tessera_spiffe::tls`). The simulated agent is a plain tonic client: load generation needs
//! the raw RPCs, not the agent's manager.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{DataStore, JoinToken, RegistrationEntry};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::tls::{BundleSource, SpiffeServerVerifier, SvidResolver, certified_key, client_config};
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::tessera::agent::v1::agent_service_client::AgentServiceClient;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// The trust domain of every simulated deployment.
pub const TRUST_DOMAIN: &str = "loadgen.example";

/// An agent API client.
pub type AgentClient = AgentServiceClient<Channel>;

/// A running server in its own temporary directory.
#[derive(Debug)]
pub struct SimServer {
    server: RunningServer,
    dir: tempfile::TempDir,
}

impl SimServer {
    /// Starts a server on a sled datastore in a new temporary directory.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tlg").tempdir_in("/tmp").context("temporary directory")?;
        Self::start_in(dir).await
    }

    /// Starts a server whose data directory is `dir/data` (reused when it exists).
    pub async fn start_in(dir: tempfile::TempDir) -> anyhow::Result<Self> {
        Self::start_configured(dir, |_| {}).await
    }

    /// Starts a server in `dir` with the simulated deployment's [`config`], changed by `adjust`
    /// (a signing rate limit, say) first.
    pub async fn start_configured(
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Self> {
        let mut config = config(dir.path())?;
        adjust(&mut config);
        let server = server::start(config).await.context("starting the server")?;
        Ok(Self { server, dir })
    }

    /// Starts a server for a signing-throughput figure: as [`Self::start`], but without the
    /// per-agent rate limit (`agent_svid_rate_limit = 0`), which would otherwise measure the
    /// limiter (100 SVIDs/s per agent by default) instead of the server. The server-wide
    /// overload limits keep their defaults.
    pub async fn start_for_throughput() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tlg").tempdir_in("/tmp").context("temporary directory")?;
        let config = ServerConfig { agent_svid_rate_limit: 0, ..config(dir.path())? };
        let server = server::start(config).await.context("starting the server")?;
        Ok(Self { server, dir })
    }

    /// The temporary directory (data directory and admin socket are inside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The running server.
    pub fn server(&self) -> &RunningServer {
        &self.server
    }

    /// The server's datastore.
    pub fn store(&self) -> Arc<dyn DataStore> {
        Arc::clone(self.server.state().datastore())
    }

    /// The trust domain's current bundle.
    pub fn bundle(&self) -> Bundle {
        self.server.state().ca().bundle()
    }

    /// The agent API address.
    pub fn addr(&self) -> SocketAddr {
        self.server.agent_api_addr()
    }

    /// The server's SPIFFE ID, which agents expect on its TLS certificate.
    pub fn server_id(&self) -> SpiffeId {
        self.server.state().server_id().clone()
    }

    /// Registers a join token valid for an hour.
    pub fn new_join_token(&self, token: &str) -> anyhow::Result<()> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.store().create_join_token(&JoinToken {
            token: token.to_owned(),
            expires_at: now + 3600,
            alias_spiffe_id: None,
        })?;
        Ok(())
    }

    /// Creates `count` workload entries parented to `parent`, IDs `<prefix>-<n>`, selector
    /// `unix:uid:<uid>`; returns their entry IDs.
    pub fn create_entries(
        &self,
        parent: &SpiffeId,
        prefix: &str,
        count: usize,
        uid: u32,
    ) -> anyhow::Result<Vec<String>> {
        let store = self.store();
        let selectors = SelectorSet::parse_all(&[format!("unix:uid:{uid}").as_str()])?;
        let mut ids = Vec::with_capacity(count);
        for n in 0..count {
            let entry = workload_entry(&format!("{prefix}-{n}"), parent, selectors.clone())?;
            ids.push(store.create_entry(&entry)?.id);
        }
        Ok(ids)
    }

    /// Starts `writers` blocking tasks that create `count` workload entries under `parent`
    /// together, entry `n` being `<prefix>-<n>` with the selectors
    /// `selectors(n)` gives; join them with [`join_entry_writers`], or poll the set while they
    /// write.
    pub fn spawn_entry_writers(
        &self,
        parent: &SpiffeId,
        prefix: &str,
        count: usize,
        writers: usize,
        selectors: impl Fn(usize) -> anyhow::Result<SelectorSet> + Send + Sync + 'static,
    ) -> tokio::task::JoinSet<anyhow::Result<()>> {
        let writers = writers.clamp(1, count.max(1));
        let selectors = Arc::new(selectors);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let (store, parent, prefix, selectors) =
                (self.store(), parent.clone(), prefix.to_owned(), Arc::clone(&selectors));
            tasks.spawn_blocking(move || -> anyhow::Result<()> {
                for n in (w..count).step_by(writers) {
                    store.create_entry(&workload_entry(&format!("{prefix}-{n}"), &parent, selectors(n)?)?)?;
                }
                Ok(())
            });
        }
        tasks
    }

    /// Stops the server.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.server.shutdown().await.context("server shutdown")?;
        Ok(())
    }

    /// Stops the server and returns its directory, to start another on the same data.
    pub async fn stop_keeping_data(self) -> anyhow::Result<tempfile::TempDir> {
        self.server.shutdown().await.context("server shutdown")?;
        Ok(self.dir)
    }
}

/// Waits for every writer of [`SimServer::spawn_entry_writers`]; the first failure is the error.
pub async fn join_entry_writers(tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(result) = tasks.join_next().await {
        result.context("entry writer task")??;
    }
    Ok(())
}

/// Selectors `unix:uid:<base + n>`: entry `n` of a run for a workload of its own.
pub fn uid_selectors(base: usize) -> impl Fn(usize) -> anyhow::Result<SelectorSet> + Send + Sync + 'static {
    move |n| Ok(SelectorSet::parse_all(&[format!("unix:uid:{}", base + n).as_str()])?)
}

/// A workload entry `spiffe://<td>/workload/<entry_id>` under `parent`.
pub fn workload_entry(entry_id: &str, parent: &SpiffeId, selectors: SelectorSet) -> anyhow::Result<RegistrationEntry> {
    let spiffe_id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/workload/{entry_id}"))?;
    Ok(RegistrationEntry::new(entry_id, spiffe_id, parent.clone(), selectors))
}

/// The server configuration of a simulated deployment rooted at `dir`.
pub fn config(dir: &Path) -> anyhow::Result<ServerConfig> {
    Ok(ServerConfig {
        trust_domain: TrustDomain::new(TRUST_DOMAIN)?,
        data_dir: dir.join("data"),
        bind_address: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_socket: dir.join("adm.sock"),
        ..ServerConfig::default()
    })
}

/// Connects to the agent API at `addr`, verifying the server's certificate against `bundle`
/// and `server_id`, presenting `identity` (certificate chain, PKCS#8 key) when given.
pub async fn connect(
    addr: SocketAddr,
    bundle: Bundle,
    server_id: SpiffeId,
    identity: Option<(&[Vec<u8>], &[u8])>,
) -> anyhow::Result<AgentClient> {
    let resolver = match identity {
        Some((chain, key)) => SvidResolver::new(certified_key(chain, key).map_err(|e| anyhow!("agent SVID: {e}"))?),
        None => SvidResolver::empty(),
    };
    let verifier = SpiffeServerVerifier::new(BundleSource::fixed(bundle), server_id);
    let tls = client_config(Arc::new(verifier), Arc::new(resolver)).map_err(|e| anyhow!("TLS configuration: {e}"))?;
    let connector = TlsConnector::from(Arc::new(tls));
    let channel = Endpoint::from_shared(format!("http://tessera-server:{}", addr.port()))?
        .connect_timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("tessera-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .context("connecting to the agent API")?;
    Ok(AgentServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// A fresh P-256 key's DER PKCS#10 CSR (no subject, no extensions: the server takes only the key).
pub fn new_csr() -> anyhow::Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// An attested simulated agent with an mTLS client.
#[derive(Debug, Clone)]
pub struct SimAgent {
    /// The agent's SPIFFE ID.
    pub id: SpiffeId,
    /// A client presenting the agent SVID (clone it for concurrent calls on one connection).
    pub client: AgentClient,
    /// The agent SVID's certificate chain.
    pub chain: Vec<Vec<u8>>,
    /// The agent SVID's PKCS#8 private key.
    pub key: Vec<u8>,
}

impl SimAgent {
    /// Registers `token`, attests with it and connects again with the agent SVID.
    pub async fn attest(server: &SimServer, token: &str) -> anyhow::Result<Self> {
        server.new_join_token(token)?;
        Self::attest_to(server.addr(), server.bundle(), server.server_id(), token).await
    }

    /// Attests with an already registered `token` to the server at `addr` (which may run in
    /// another process), then connects again with the agent SVID.
    pub async fn attest_to(addr: SocketAddr, bundle: Bundle, server_id: SpiffeId, token: &str) -> anyhow::Result<Self> {
        let mut anonymous = connect(addr, bundle.clone(), server_id.clone(), None).await?;
        let (key, csr) = new_csr()?;
        let params = pb::AttestationParams {
            data: Some(pb::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() }),
            csr,
        };
        let message = pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) };
        let mut responses = anonymous.attest_agent(tokio_stream::iter(vec![message])).await?.into_inner();
        let first = responses.message().await?.ok_or_else(|| anyhow!("attestation ended without a result"))?;
        let Some(pb::attest_agent_response::Step::Result(result)) = first.step else {
            bail!("attestation answered with an unexpected step");
        };
        let svid = result.svid.ok_or_else(|| anyhow!("attestation result without an agent SVID"))?;
        let key = key.serialize_der();
        let client = connect(addr, bundle, server_id, Some((&svid.cert_chain, &key))).await?;
        Ok(Self { id: SpiffeId::parse(&svid.spiffe_id)?, client, chain: svid.cert_chain, key })
    }

    /// Connects again with the same agent SVID, to `server` (a restarted server on the same
    /// data directory keeps its CA, so the SVID stays valid).
    pub async fn reconnect(&mut self, server: &SimServer) -> anyhow::Result<()> {
        self.client =
            connect(server.addr(), server.bundle(), server.server_id(), Some((&self.chain, &self.key))).await?;
        Ok(())
    }
}
