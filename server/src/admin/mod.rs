//! The operator API (`tessera.admin.v1.AdminService`) served on the admin Unix socket.
//!
//! Who may call is decided before a request reaches this module: the socket's accept loop
//! (`crate::server`) admits only connections whose peer credentials carry the server's own
//! uid or root. Every handler here parses its request into domain types (`convert`), calls
//! the datastore through [`blocking`], and maps errors in one place (`status`).
//!
//! # Bundles
//!
//! `GetBundle` answers from the CA's in-memory bundle (the one it published in the datastore
//! at start-up). Federated bundles live in the datastore as SPIFFE bundle JSON, keyed by trust
//! domain; the server's own trust domain is refused by every federated call, since the CA
//! owns that bundle. `SetFederatedBundle` parses the document with tessera-spiffe's bundle
//! decoder (PEM or SPIFFE JSON), refuses one without authorities, and stores it with
//! `spiffe_sequence` set to the datastore's sequence for that trust domain (compare-and-set,
//! so the sequence grows by one with every set, whatever the document said).
//!
//! # Minting
//!
//! `MintX509Svid` signs over the key of the request's CSR (the CLI's way: the private key never
//! leaves the caller) or, without a CSR, over an EC P-256 key the server generates and returns.
//! Lifetimes default to `default_x509_svid_ttl` / `default_jwt_svid_ttl` and are capped by the
//! CA so no SVID outlives it.
//!
//! # Join tokens with a node alias
//!
//! `GenerateJoinToken` with a `spiffe_id` follows SPIRE: it stores the token (recording the
//! alias) and creates an entry whose parent is the agent ID the token will attest,
//! `spiffe://<td>/tessera/agent/join_token/<token>`, whose SPIFFE ID is the alias, and whose
//! one selector is `spiffe_id:<that agent ID>`. The entry is a direct child of the agent, so
//! the agent is authorized for it, and entries parented to the alias are its descendants and
//! follow the node (server-agent-flow §4).

mod convert;
mod federation;
mod localauthority;
mod status;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use tessera_common::audit::{AuditEvent, redact_agent_id, token_fingerprint};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::keys::{KeyType, SigningKey};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::admin::v1::admin_service_server::{AdminService, AdminServiceServer};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::datastore::{DataStore, DataStoreError, JoinToken, NodeFilter, PageRequest, RegistrationEntry, blocking};
use crate::server::ServerState;

pub(crate) use convert::bundle_from_proto;
use convert::{
    FieldError, agent_to_proto, apply_entry, bundle_to_proto, entry_filter_from_proto, entry_from_proto,
    entry_to_proto, parse_trust_domain,
};
pub(crate) use status::datastore_status;

/// Lifetime of a join token when the request gives none.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// Listing page size when the request gives none, and the most a request may ask for.
const DEFAULT_PAGE_SIZE: usize = 500;
const MAX_PAGE_SIZE: usize = 1000;

/// How often an update retries its read-modify-write after losing a race.
const UPDATE_ATTEMPTS: usize = 5;

/// The admin API implementation.
#[derive(Debug, Clone)]
pub struct AdminApi {
    state: Arc<ServerState>,
}

impl AdminApi {
    /// An admin API answering from `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// The tonic service to add to a server.
    pub fn into_service(self) -> AdminServiceServer<Self> {
        AdminServiceServer::new(self)
    }

    async fn store<T, F>(&self, call: F) -> Result<T, Status>
    where
        F: FnOnce(&dyn DataStore) -> Result<T, DataStoreError> + Send + 'static,
        T: Send + 'static,
    {
        blocking(self.state.datastore(), call).await.map_err(datastore_status)
    }
}

/// Who called the admin API: the kernel's peer credentials of the admin socket connection
/// (recorded in every `admin.action` audit event).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AdminCaller {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl AdminCaller {
    fn of<T>(request: &Request<T>) -> Self {
        let cred = request.extensions().get::<UdsConnectInfo>().and_then(|info| info.peer_cred);
        Self { uid: cred.map(|cred| cred.uid()), pid: cred.and_then(|cred| cred.pid()) }
    }

    /// An `admin.action` event for `action` by this caller.
    pub(crate) fn event(self, action: &'static str) -> AuditEvent {
        AuditEvent::new("admin.action")
            .field("action", action)
            .field("caller_uid", self.uid)
            .field("caller_pid", self.pid)
    }
}

fn selector_strings(selectors: &SelectorSet) -> Vec<String> {
    selectors.iter().map(ToString::to_string).collect()
}

/// How often a federated bundle write retries its compare-and-set after losing a race.
const BUNDLE_ATTEMPTS: usize = 5;

/// Longest list of audiences a minted JWT-SVID may carry, and longest audience.
const MAX_AUDIENCES: usize = 32;
const MAX_AUDIENCE_LEN: usize = 1024;

/// Most DNS names a minted X.509-SVID may carry.
const MAX_DNS_NAMES: usize = 64;

/// Now, in unix seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 128 random bits formatted like a UUID (`8-4-4-4-12` lowercase hex), for entry IDs and
/// join tokens. Valid as a SPIFFE ID path segment.
pub(crate) fn random_id() -> Result<String, Status> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).map_err(|_| Status::internal("the system random number generator failed"))?;
    let hex = hex::encode(bytes);
    Ok(format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]))
}

fn page_request(page_size: u32, page_token: String) -> PageRequest {
    let size = match usize::try_from(page_size).unwrap_or(MAX_PAGE_SIZE) {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    PageRequest { token: (!page_token.is_empty()).then_some(page_token), size }
}

fn required(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() { Err(FieldError::new(field, "must be set")) } else { Ok(()) }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn healthcheck(
        &self,
        _: Request<pb::HealthcheckRequest>,
    ) -> Result<Response<pb::HealthcheckResponse>, Status> {
        // Datastore answers and the CA signs and verifies a throwaway SVID of each kind.
        self.state.readiness().await.map_err(Status::unavailable)?;
        Ok(Response::new(pb::HealthcheckResponse {
            trust_domain: self.state.trust_domain().name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn generate_join_token(
        &self,
        request: Request<pb::GenerateJoinTokenRequest>,
    ) -> Result<Response<pb::GenerateJoinTokenResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let td = self.state.trust_domain().clone();
        let alias = match request.spiffe_id.as_str() {
            "" => None,
            id => Some(convert::parse_workload_id("spiffe_id", id, &td)?),
        };
        let ttl = match request.ttl {
            0 => DEFAULT_JOIN_TOKEN_TTL,
            secs => Duration::from_secs(u64::from(secs)),
        };
        let token = random_id()?;
        let expires_at = unix_now().saturating_add(ttl.as_secs());
        let agent_id = self
            .state
            .join_token_agent_id(&token)
            .map_err(|err| Status::internal(format!("join token agent ID: {err}")))?;
        let alias_entry = match &alias {
            Some(alias) => {
                let selector = Selector::new("spiffe_id", agent_id.as_str())
                    .map_err(|err| Status::internal(format!("node-alias selector: {err}")))?;
                let selectors: SelectorSet = [selector].into_iter().collect();
                Some(RegistrationEntry::new(random_id()?, alias.clone(), agent_id.clone(), selectors))
            }
            None => None,
        };
        let record = JoinToken { token: token.clone(), expires_at, alias_spiffe_id: alias };
        let entry_id = self
            .store(move |store| {
                store.create_join_token(&record)?;
                let Some(entry) = alias_entry else {
                    return Ok(String::new());
                };
                match store.create_entry(&entry) {
                    Ok(entry) => Ok(entry.id),
                    Err(err) => {
                        // Do not leave a token whose alias was never registered.
                        let _ = store.consume_join_token(&record.token, 0);
                        Err(err)
                    }
                }
            })
            .await?;
        tracing::info!(expires_at, alias_entry = %entry_id, "join token generated");
        self.state.audit().emit(
            caller
                .event("join_token.generate")
                .field("token_fingerprint", token_fingerprint(&token))
                .field("expires_at", expires_at)
                .field("alias_entry_id", entry_id.clone())
                .field("alias_spiffe_id", request.spiffe_id.clone()),
        );
        Ok(Response::new(pb::GenerateJoinTokenResponse {
            token,
            expires_at: i64::try_from(expires_at).unwrap_or(i64::MAX),
            entry_id,
        }))
    }

    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::CreateEntryResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let proto = request.into_inner().entry.ok_or_else(|| FieldError::new("entry", "must be set"))?;
        let id = if proto.id.is_empty() { random_id()? } else { proto.id.clone() };
        let entry = entry_from_proto(id, &proto, self.state.trust_domain())?;
        let stored = self.store(move |store| store.create_entry(&entry)).await?;
        tracing::info!(entry_id = %stored.id, spiffe_id = %stored.spiffe_id, "entry created");
        self.state.audit().emit(
            caller
                .event("entry.create")
                .field("entry_id", stored.id.clone())
                .field("spiffe_id", stored.spiffe_id.as_str())
                .field("parent_id", redact_agent_id(stored.parent_id.as_str()))
                .field("selectors", selector_strings(&stored.selectors))
                .field("revision", stored.revision),
        );
        Ok(Response::new(pb::CreateEntryResponse { entry: Some(entry_to_proto(&stored)) }))
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::UpdateEntryResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let proto = request.entry.ok_or_else(|| FieldError::new("entry", "must be set"))?;
        required("entry.id", &proto.id)?;
        let mask = request.mask.unwrap_or_else(convert::full_mask);
        let td = self.state.trust_domain().clone();
        let mut last_conflict = None;
        for _ in 0..UPDATE_ATTEMPTS {
            let id = proto.id.clone();
            let current = self
                .store(move |store| store.get_entry(&id))
                .await?
                .ok_or_else(|| Status::not_found(format!("registration entry {:?} not found", proto.id)))?;
            let revision = current.revision;
            let updated = apply_entry(current, &proto, &mask, &td)?;
            match blocking(self.state.datastore(), move |store| store.update_entry(&updated, Some(revision))).await {
                Ok(stored) => {
                    tracing::info!(entry_id = %stored.id, revision = stored.revision, "entry updated");
                    self.state.audit().emit(
                        caller
                            .event("entry.update")
                            .field("entry_id", stored.id.clone())
                            .field("spiffe_id", stored.spiffe_id.as_str())
                            .field("parent_id", redact_agent_id(stored.parent_id.as_str()))
                            .field("selectors", selector_strings(&stored.selectors))
                            .field("revision", stored.revision),
                    );
                    return Ok(Response::new(pb::UpdateEntryResponse { entry: Some(entry_to_proto(&stored)) }));
                }
                Err(err @ DataStoreError::Conflict { .. }) => last_conflict = Some(err),
                Err(err) => return Err(datastore_status(err)),
            }
        }
        Err(last_conflict.map_or_else(|| Status::aborted("entry update lost every race"), datastore_status))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let id = request.into_inner().id;
        required("id", &id)?;
        let deleted = self.store(move |store| store.delete_entry(&id)).await?;
        tracing::info!(entry_id = %deleted.id, "entry deleted");
        self.state.audit().emit(
            caller
                .event("entry.delete")
                .field("entry_id", deleted.id.clone())
                .field("spiffe_id", deleted.spiffe_id.as_str()),
        );
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn get_entry(&self, request: Request<pb::GetEntryRequest>) -> Result<Response<pb::GetEntryResponse>, Status> {
        let id = request.into_inner().id;
        required("id", &id)?;
        let lookup = id.clone();
        let entry = self
            .store(move |store| store.get_entry(&lookup))
            .await?
            .ok_or_else(|| Status::not_found(format!("registration entry {id:?} not found")))?;
        Ok(Response::new(pb::GetEntryResponse { entry: Some(entry_to_proto(&entry)) }))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let request = request.into_inner();
        let filter = entry_filter_from_proto(request.filter.as_ref())?;
        let page = page_request(request.page_size, request.page_token);
        let page = self.store(move |store| store.list_entries(&filter, &page)).await?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: page.items.iter().map(entry_to_proto).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn count_entries(
        &self,
        _: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        let count = self.store(|store| store.count_entries()).await?;
        Ok(Response::new(pb::CountEntriesResponse { count }))
    }

    async fn get_bundle(&self, _: Request<pb::GetBundleRequest>) -> Result<Response<pb::GetBundleResponse>, Status> {
        let bundle = self.state.ca().bundle();
        Ok(Response::new(pb::GetBundleResponse { bundle: Some(bundle_to_proto(&bundle)) }))
    }

    async fn list_federated_bundles(
        &self,
        _: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        let own = self.state.trust_domain().clone();
        let stored = self.store(|store| store.list_bundles()).await?;
        let mut bundles = Vec::with_capacity(stored.len());
        for record in stored.into_iter().filter(|b| b.trust_domain != own) {
            let mut bundle = Bundle::from_json(record.trust_domain.clone(), &record.data).map_err(|err| {
                let message =
                    format!("stored bundle of trust domain {:?} is unreadable: {err}", record.trust_domain.name());
                tracing::error!(error = %message, "datastore holds a bundle this server cannot read");
                Status::data_loss(message)
            })?;
            bundle.set_sequence(record.sequence);
            bundles.push(bundle_to_proto(&bundle));
        }
        // The datastore lists by trust domain already; sort anyway, the API promises it.
        bundles.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
        Ok(Response::new(pb::ListFederatedBundlesResponse { bundles }))
    }

    async fn set_federated_bundle(
        &self,
        request: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::SetFederatedBundleResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let trust_domain = self.federated_trust_domain(&request.trust_domain)?;
        let mut bundle = match pb::BundleFormat::try_from(request.format) {
            Ok(pb::BundleFormat::Pem | pb::BundleFormat::Unspecified) => {
                Bundle::from_x509_authorities_pem(trust_domain.clone(), &request.bundle)
            }
            Ok(pb::BundleFormat::Spiffe) => Bundle::from_json(trust_domain.clone(), &request.bundle),
            Err(_) => return Err(FieldError::new("format", format!("unknown bundle format {}", request.format)).into()),
        }
        .map_err(|err| FieldError::new("bundle", err.to_string()))?;
        if bundle.is_empty() {
            return Err(
                FieldError::new("bundle", "it holds no X.509 or JWT authority, so it would trust nothing").into()
            );
        }
        for _ in 0..BUNDLE_ATTEMPTS {
            let lookup = trust_domain.clone();
            let expected = self.store(move |store| store.get_bundle(&lookup)).await?.map_or(0, |b| b.sequence);
            bundle.set_sequence(expected.saturating_add(1));
            let (td, json) = (trust_domain.clone(), bundle.to_json());
            match blocking(self.state.datastore(), move |store| store.set_bundle(&td, json.as_bytes(), Some(expected)))
                .await
            {
                Ok(stored) => {
                    bundle.set_sequence(stored.sequence);
                    tracing::info!(trust_domain = %trust_domain, sequence = stored.sequence, "federated bundle set");
                    self.state.audit().emit(
                        caller
                            .event("bundle.set")
                            .field("trust_domain", trust_domain.name())
                            .field("sequence", stored.sequence),
                    );
                    self.state.audit().emit(
                        AuditEvent::new("federation.bundle_changed")
                            .field("trust_domain", trust_domain.name())
                            .field("sequence", stored.sequence)
                            .field("x509_authorities", bundle.x509_authorities().count())
                            .field("jwt_authorities", bundle.jwt_authorities().len())
                            .field("source", "admin"),
                    );
                    return Ok(Response::new(pb::SetFederatedBundleResponse {
                        bundle: Some(bundle_to_proto(&bundle)),
                    }));
                }
                Err(DataStoreError::Conflict { .. }) => continue,
                Err(err) => return Err(datastore_status(err)),
            }
        }
        Err(Status::aborted(format!("bundle of trust domain {trust_domain} kept changing; try again")))
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let trust_domain = self.federated_trust_domain(&request.into_inner().trust_domain)?;
        let lookup = trust_domain.clone();
        self.store(move |store| store.delete_bundle(&lookup)).await?;
        tracing::info!(trust_domain = %trust_domain, "federated bundle deleted");
        self.state.audit().emit(caller.event("bundle.delete").field("trust_domain", trust_domain.name()));
        Ok(Response::new(pb::DeleteFederatedBundleResponse {}))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let request = request.into_inner();
        let page = page_request(request.page_size, request.page_token);
        let page = self.store(move |store| store.list_attested_nodes(&NodeFilter::default(), &page)).await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: page.items.iter().map(agent_to_proto).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn get_agent(&self, request: Request<pb::GetAgentRequest>) -> Result<Response<pb::GetAgentResponse>, Status> {
        let id = self.agent_id(&request.into_inner().spiffe_id)?;
        let lookup = id.clone();
        let node = self
            .store(move |store| store.get_attested_node(&lookup))
            .await?
            .ok_or_else(|| Status::not_found(format!("attested node \"{id}\" not found")))?;
        Ok(Response::new(pb::GetAgentResponse { agent: Some(agent_to_proto(&node)) }))
    }

    async fn ban_agent(&self, request: Request<pb::BanAgentRequest>) -> Result<Response<pb::BanAgentResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let id = self.agent_id(&request.into_inner().spiffe_id)?;
        let node = self.store(move |store| store.ban_attested_node(&id)).await?;
        tracing::info!(agent = %node.spiffe_id, "agent banned");
        self.state.audit().emit(caller.event("agent.ban").field("agent_id", redact_agent_id(node.spiffe_id.as_str())));
        Ok(Response::new(pb::BanAgentResponse {}))
    }

    async fn evict_agent(
        &self,
        request: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let id = self.agent_id(&request.into_inner().spiffe_id)?;
        let node = self.store(move |store| store.delete_attested_node(&id)).await?;
        tracing::info!(agent = %node.spiffe_id, "agent evicted");
        self.state
            .audit()
            .emit(caller.event("agent.evict").field("agent_id", redact_agent_id(node.spiffe_id.as_str())));
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn mint_x509_svid(
        &self,
        request: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let spiffe_id = convert::parse_workload_id("spiffe_id", &request.spiffe_id, self.state.trust_domain())?;
        if request.dns_names.len() > MAX_DNS_NAMES {
            return Err(FieldError::new("dns_names", format!("at most {MAX_DNS_NAMES} names")).into());
        }
        let dns_names = convert::parse_dns_names(&request.dns_names)?;
        let ttl = match request.ttl {
            0 => self.state.config().default_x509_svid_ttl,
            secs => Duration::from_secs(u64::from(secs)),
        };
        let ca = Arc::clone(self.state.ca());
        let now = SystemTime::now();
        let (svid, private_key) = if request.csr.is_empty() {
            let key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new())
                .map_err(|err| Status::internal(format!("cannot generate the SVID key: {err}")))?;
            let svid = ca.sign_x509_svid(&spiffe_id, &dns_names, ttl, key.public_key().spki_der(), now);
            (svid, key.pkcs8_der().to_vec())
        } else {
            // Checked here so that a bad CSR is the caller's mistake, not a CA failure.
            tessera_spiffe::x509::verify_csr(&request.csr).map_err(|err| FieldError::new("csr", err.to_string()))?;
            (ca.sign_x509_svid_from_csr(&spiffe_id, &dns_names, ttl, &request.csr, now), Vec::new())
        };
        let svid = svid.map_err(|err| {
            tracing::error!(error = %err, spiffe_id = %spiffe_id, "minting an X.509-SVID failed");
            Status::internal(err.to_string())
        })?;
        let expires_at = unix_seconds(svid.expires_at);
        tracing::info!(spiffe_id = %spiffe_id, expires_at, "X.509-SVID minted");
        let serial = svid.chain.first().and_then(|leaf| tessera_spiffe::tls::certificate_serial_hex(leaf).ok());
        self.state.audit().emit(
            caller
                .event("svid.mint")
                .field("type", "x509")
                .field("spiffe_id", spiffe_id.as_str())
                .field("serial", serial)
                .field("expires_at", expires_at),
        );
        Ok(Response::new(pb::MintX509SvidResponse {
            cert_chain: svid.chain,
            expires_at,
            bundle: Some(bundle_to_proto(&ca.bundle())),
            private_key,
        }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let spiffe_id = convert::parse_workload_id("spiffe_id", &request.spiffe_id, self.state.trust_domain())?;
        check_audiences(&request.audiences)?;
        let ttl = match request.ttl {
            0 => self.state.config().default_jwt_svid_ttl,
            secs => Duration::from_secs(u64::from(secs)),
        };
        let (token, expires_at) =
            self.state.ca().sign_jwt_svid(&spiffe_id, &request.audiences, ttl, SystemTime::now()).map_err(|err| {
                tracing::error!(error = %err, spiffe_id = %spiffe_id, "minting a JWT-SVID failed");
                Status::internal(err.to_string())
            })?;
        let expires_at = unix_seconds(expires_at);
        tracing::info!(spiffe_id = %spiffe_id, expires_at, "JWT-SVID minted");
        self.state.audit().emit(
            caller
                .event("svid.mint")
                .field("type", "jwt")
                .field("spiffe_id", spiffe_id.as_str())
                .field("token_fingerprint", token_fingerprint(&token))
                .field("audiences", request.audiences.clone())
                .field("expires_at", expires_at),
        );
        Ok(Response::new(pb::MintJwtSvidResponse { token, expires_at }))
    }

    async fn create_federation_relationship(
        &self,
        request: Request<pb::CreateFederationRelationshipRequest>,
    ) -> Result<Response<pb::CreateFederationRelationshipResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let trust_domain = federation::audit_trust_domain(&request);
        let answered = federation::create(&self.state, request).await;
        if answered.is_ok() {
            self.state.audit().emit(caller.event("federation.create").field("trust_domain", trust_domain));
        }
        answered
    }

    async fn list_federation_relationships(
        &self,
        _: Request<pb::ListFederationRelationshipsRequest>,
    ) -> Result<Response<pb::ListFederationRelationshipsResponse>, Status> {
        federation::list(&self.state).await
    }

    async fn get_federation_relationship(
        &self,
        request: Request<pb::GetFederationRelationshipRequest>,
    ) -> Result<Response<pb::GetFederationRelationshipResponse>, Status> {
        federation::get(&self.state, request.into_inner()).await
    }

    async fn update_federation_relationship(
        &self,
        request: Request<pb::UpdateFederationRelationshipRequest>,
    ) -> Result<Response<pb::UpdateFederationRelationshipResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let trust_domain = federation::audit_trust_domain(&request);
        let answered = federation::update(&self.state, request).await;
        if answered.is_ok() {
            self.state.audit().emit(caller.event("federation.update").field("trust_domain", trust_domain));
        }
        answered
    }

    async fn delete_federation_relationship(
        &self,
        request: Request<pb::DeleteFederationRelationshipRequest>,
    ) -> Result<Response<pb::DeleteFederationRelationshipResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let trust_domain = federation::audit_trust_domain(&request);
        let answered = federation::delete(&self.state, request).await;
        if answered.is_ok() {
            self.state.audit().emit(caller.event("federation.delete").field("trust_domain", trust_domain));
        }
        answered
    }

    async fn refresh_federation_relationship(
        &self,
        request: Request<pb::RefreshFederationRelationshipRequest>,
    ) -> Result<Response<pb::RefreshFederationRelationshipResponse>, Status> {
        let caller = AdminCaller::of(&request);
        let request = request.into_inner();
        let trust_domain = federation::audit_trust_domain(&request);
        let answered = federation::refresh(&self.state, request).await;
        if answered.is_ok() {
            self.state.audit().emit(caller.event("federation.refresh").field("trust_domain", trust_domain));
        }
        answered
    }

    async fn show_local_authorities(
        &self,
        request: Request<pb::ShowLocalAuthoritiesRequest>,
    ) -> Result<Response<pb::ShowLocalAuthoritiesResponse>, Status> {
        localauthority::show(&self.state, request.into_inner()).map(Response::new)
    }

    async fn change_local_authority(
        &self,
        request: Request<pb::ChangeLocalAuthorityRequest>,
    ) -> Result<Response<pb::ChangeLocalAuthorityResponse>, Status> {
        let caller = AdminCaller::of(&request);
        localauthority::change(Arc::clone(&self.state), request.into_inner(), caller).await.map(Response::new)
    }
}

/// `audiences` of a JWT-SVID request: at least one, each non-empty and printable.
fn check_audiences(audiences: &[String]) -> Result<(), FieldError> {
    if audiences.is_empty() {
        return Err(FieldError::new("audiences", "at least one audience is required"));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(FieldError::new("audiences", format!("at most {MAX_AUDIENCES} audiences")));
    }
    for audience in audiences {
        if audience.is_empty() || audience.len() > MAX_AUDIENCE_LEN || audience.chars().any(char::is_control) {
            return Err(FieldError::new(
                "audiences",
                format!("{audience:?} must be 1 to {MAX_AUDIENCE_LEN} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

/// A time as unix seconds for the wire.
fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl AdminApi {
    fn agent_id(&self, input: &str) -> Result<SpiffeId, FieldError> {
        convert::parse_member_id("spiffe_id", input, self.state.trust_domain())
    }

    /// The `trust_domain` of a federated bundle call: well formed and not the server's own.
    fn federated_trust_domain(&self, input: &str) -> Result<TrustDomain, FieldError> {
        let trust_domain = parse_trust_domain("trust_domain", input)?;
        if &trust_domain == self.state.trust_domain() {
            return Err(FieldError::new(
                "trust_domain",
                format!(
                    "{input:?} is this server's own trust domain; its bundle is managed by the CA (see `bundle show`)"
                ),
            ));
        }
        Ok(trust_domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_look_like_uuids() {
        let id = random_id().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, random_id().unwrap());
    }

    #[test]
    fn audiences() {
        assert!(check_audiences(&["a".into()]).is_ok());
        assert_eq!(check_audiences(&[]).unwrap_err().field, "audiences");
        assert_eq!(check_audiences(&["a".into(), String::new()]).unwrap_err().field, "audiences");
        assert_eq!(check_audiences(&["a\nb".into()]).unwrap_err().field, "audiences");
        assert!(check_audiences(&vec!["a".to_owned(); MAX_AUDIENCES + 1]).is_err());
    }

    #[test]
    fn page_sizes_are_capped() {
        assert_eq!(page_request(0, String::new()).size, DEFAULT_PAGE_SIZE);
        assert_eq!(page_request(5, "t".into()), PageRequest { token: Some("t".into()), size: 5 });
        assert_eq!(page_request(u32::MAX, String::new()).size, MAX_PAGE_SIZE);
    }
}
