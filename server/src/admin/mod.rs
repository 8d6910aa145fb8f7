//! The operator API (`tessera.admin.v1.AdminService`) served on the admin Unix socket.
//!
//! Who may call is decided before a request reaches this module: the socket's accept loop
//! (`crate::server`) admits only connections whose peer credentials carry the server's own
//! uid or root. Every handler here parses its request into domain types (`convert`), calls
//! the datastore through [`blocking`], and maps errors in one place (`status`).
//!
//! # Parts that need the CA
//!
//! `GetBundle`, the federated bundle calls, `MintX509Svid` and `MintJwtSvid` answer
//! `UNIMPLEMENTED` with [`CA_PENDING`] until the CA module exists; search for
//! `requires_ca` to find them. `Healthcheck` checks the datastore only so far.
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
mod status;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId};
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::admin::v1::admin_service_server::{AdminService, AdminServiceServer};
use tonic::{Request, Response, Status};

use crate::datastore::{DataStore, DataStoreError, JoinToken, NodeFilter, PageRequest, RegistrationEntry, blocking};
use crate::server::ServerState;

use convert::{FieldError, agent_to_proto, apply_entry, entry_filter_from_proto, entry_from_proto, entry_to_proto};
pub(crate) use status::datastore_status;

/// The message of every admin call that needs the CA, until the CA module lands.
pub const CA_PENDING: &str = "requires the CA, which this build does not have yet";

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

/// The `UNIMPLEMENTED` answer of calls that need the CA.
fn requires_ca() -> Status {
    Status::unimplemented(CA_PENDING)
}

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
        // The CA check joins here once the CA exists (see `ServerState::readiness`).
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
        let request = request.into_inner();
        let td = self.state.trust_domain().clone();
        let alias = match request.spiffe_id.as_str() {
            "" => None,
            id => Some(convert::parse_member_id("spiffe_id", id, &td)?),
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
        let proto = request.into_inner().entry.ok_or_else(|| FieldError::new("entry", "must be set"))?;
        let id = if proto.id.is_empty() { random_id()? } else { proto.id.clone() };
        let entry = entry_from_proto(id, &proto, self.state.trust_domain())?;
        let stored = self.store(move |store| store.create_entry(&entry)).await?;
        tracing::info!(entry_id = %stored.id, spiffe_id = %stored.spiffe_id, "entry created");
        Ok(Response::new(pb::CreateEntryResponse { entry: Some(entry_to_proto(&stored)) }))
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::UpdateEntryResponse>, Status> {
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
        let id = request.into_inner().id;
        required("id", &id)?;
        let deleted = self.store(move |store| store.delete_entry(&id)).await?;
        tracing::info!(entry_id = %deleted.id, "entry deleted");
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
        Err(requires_ca())
    }

    async fn list_federated_bundles(
        &self,
        _: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        // Needs the bundle codec (SPIFFE bundle JSON <-> structured bundle) of the CA work.
        Err(requires_ca())
    }

    async fn set_federated_bundle(
        &self,
        _: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::SetFederatedBundleResponse>, Status> {
        Err(requires_ca())
    }

    async fn delete_federated_bundle(
        &self,
        _: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        Err(requires_ca())
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
        let id = self.agent_id(&request.into_inner().spiffe_id)?;
        let node = self.store(move |store| store.ban_attested_node(&id)).await?;
        tracing::info!(agent = %node.spiffe_id, "agent banned");
        Ok(Response::new(pb::BanAgentResponse {}))
    }

    async fn evict_agent(
        &self,
        request: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let id = self.agent_id(&request.into_inner().spiffe_id)?;
        let node = self.store(move |store| store.delete_attested_node(&id)).await?;
        tracing::info!(agent = %node.spiffe_id, "agent evicted");
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn mint_x509_svid(
        &self,
        _: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        Err(requires_ca())
    }

    async fn mint_jwt_svid(
        &self,
        _: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        Err(requires_ca())
    }
}

impl AdminApi {
    fn agent_id(&self, input: &str) -> Result<SpiffeId, FieldError> {
        convert::parse_member_id("spiffe_id", input, self.state.trust_domain())
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
    fn page_sizes_are_capped() {
        assert_eq!(page_request(0, String::new()).size, DEFAULT_PAGE_SIZE);
        assert_eq!(page_request(5, "t".into()), PageRequest { token: Some("t".into()), size: 5 });
        assert_eq!(page_request(u32::MAX, String::new()).size, MAX_PAGE_SIZE);
    }
}
