//! Admin RPCs of federation relationships (issue 6): create, list, get, update, delete,
//! refresh.
//!
//! Relationships created here are stored in the datastore (`put_federation_relationship`, the
//! specification as JSON with file contents inlined) and started at once; the server starts
//! them again at every start. Relationships of the configuration file are listed with source
//! `config` and refused by update and delete (FAILED_PRECONDITION): the file is their source
//! of truth. Deleting a relationship stops its task, then deletes the bundle it fetched, so
//! agents drop it with their next sync message.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tessera_spiffe::TrustDomain;
use tessera_wire::tessera::admin::v1 as pb;
use tonic::{Response, Status};

use super::convert::{FieldError, parse_trust_domain};
use super::datastore_status;
use crate::datastore::{DataStoreError, blocking};
use crate::federation::{Relationship, RelationshipSpec, RelationshipStatus, Source, encode_spec};
use crate::server::ServerState;

fn unix(time: Option<SystemTime>) -> i64 {
    time.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn foreign_trust_domain(state: &ServerState, field: &'static str, input: &str) -> Result<TrustDomain, FieldError> {
    let trust_domain = parse_trust_domain(field, input)?;
    if &trust_domain == state.trust_domain() {
        return Err(FieldError::new(field, format!("{input:?} is this server's own trust domain")));
    }
    Ok(trust_domain)
}

fn text(field: &'static str, bytes: Vec<u8>) -> Result<Option<String>, FieldError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    String::from_utf8(bytes).map(Some).map_err(|_| FieldError::new(field, "must be PEM or JSON text (UTF-8)"))
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// Parses and resolves the request's relationship (blocking work on the blocking pool).
async fn resolve(
    state: &ServerState,
    relationship: Option<pb::FederationRelationship>,
) -> Result<Relationship, Status> {
    let input = relationship.ok_or_else(|| FieldError::new("relationship", "must be set"))?;
    let trust_domain = foreign_trust_domain(state, "relationship.trust_domain", &input.trust_domain)?;
    let spec = RelationshipSpec {
        trust_domain: trust_domain.name().to_owned(),
        bundle_endpoint_url: input.bundle_endpoint_url,
        profile: input.profile,
        endpoint_spiffe_id: non_empty(input.endpoint_spiffe_id),
        trust_bundle: text("relationship.trust_bundle", input.trust_bundle)?,
        ca_bundle: text("relationship.ca_bundle", input.ca_bundle)?,
    };
    tokio::task::spawn_blocking(move || Relationship::from_spec(spec, Source::Api))
        .await
        .map_err(|err| Status::internal(err.to_string()))?
        .map_err(|(field, reason)| Status::invalid_argument(format!("relationship.{field}: {reason}")))
}

async fn to_proto(
    state: &Arc<ServerState>,
    relationship: &Relationship,
    status: &RelationshipStatus,
) -> Result<pb::FederationRelationship, Status> {
    let lookup = relationship.trust_domain.clone();
    let sequence = blocking(state.datastore(), move |store| store.get_bundle(&lookup))
        .await
        .map_err(datastore_status)?
        .map_or(0, |bundle| bundle.sequence);
    let spec = &relationship.spec;
    Ok(pb::FederationRelationship {
        trust_domain: spec.trust_domain.clone(),
        bundle_endpoint_url: spec.bundle_endpoint_url.clone(),
        profile: spec.profile.clone(),
        endpoint_spiffe_id: spec.endpoint_spiffe_id.clone().unwrap_or_default(),
        trust_bundle: spec.trust_bundle.clone().unwrap_or_default().into_bytes(),
        ca_bundle: spec.ca_bundle.clone().unwrap_or_default().into_bytes(),
        source: relationship.source.as_str().to_owned(),
        last_success: unix(status.last_success),
        last_error: status.last_error.clone().unwrap_or_default(),
        next_refresh: unix(status.next_refresh),
        bundle_sequence: sequence,
    })
}

async fn current(state: &Arc<ServerState>, trust_domain: &TrustDomain) -> Result<pb::FederationRelationship, Status> {
    let (relationship, status) = state
        .federation()
        .get(trust_domain)
        .ok_or_else(|| Status::not_found(format!("no federation relationship with {trust_domain}")))?;
    to_proto(state, &relationship, &status).await
}

/// Refuses to change a relationship of the configuration file.
fn check_not_configured(state: &ServerState, trust_domain: &TrustDomain) -> Result<(), Status> {
    match state.federation().get(trust_domain) {
        Some((relationship, _)) if relationship.source == Source::Config => Err(Status::failed_precondition(format!(
            "the relationship with {trust_domain} comes from the configuration file; change it there"
        ))),
        _ => Ok(()),
    }
}

pub(super) async fn create(
    state: &Arc<ServerState>,
    request: pb::CreateFederationRelationshipRequest,
) -> Result<Response<pb::CreateFederationRelationshipResponse>, Status> {
    let relationship = resolve(state, request.relationship).await?;
    let trust_domain = relationship.trust_domain.clone();
    if state.federation().get(&trust_domain).is_some() {
        check_not_configured(state, &trust_domain)?;
    }
    let data = encode_spec(&relationship.spec).map_err(Status::internal)?;
    let td = trust_domain.clone();
    match blocking(state.datastore(), move |store| store.put_federation_relationship(&td, &data, Some(0))).await {
        Ok(_) => {}
        Err(DataStoreError::Conflict { .. }) => {
            return Err(Status::already_exists(format!(
                "a federation relationship with {trust_domain} exists; use update"
            )));
        }
        Err(err) => return Err(datastore_status(err)),
    }
    tracing::info!(trust_domain = %trust_domain, url = %relationship.url, "federation relationship created");
    state.federation().start(Arc::clone(state), relationship).await;
    let relationship = current(state, &trust_domain).await?;
    Ok(Response::new(pb::CreateFederationRelationshipResponse { relationship: Some(relationship) }))
}

pub(super) async fn list(
    state: &Arc<ServerState>,
) -> Result<Response<pb::ListFederationRelationshipsResponse>, Status> {
    let mut relationships = Vec::new();
    for (relationship, status) in state.federation().list() {
        relationships.push(to_proto(state, &relationship, &status).await?);
    }
    Ok(Response::new(pb::ListFederationRelationshipsResponse { relationships }))
}

pub(super) async fn get(
    state: &Arc<ServerState>,
    request: pb::GetFederationRelationshipRequest,
) -> Result<Response<pb::GetFederationRelationshipResponse>, Status> {
    let trust_domain = foreign_trust_domain(state, "trust_domain", &request.trust_domain)?;
    let relationship = current(state, &trust_domain).await?;
    Ok(Response::new(pb::GetFederationRelationshipResponse { relationship: Some(relationship) }))
}

pub(super) async fn update(
    state: &Arc<ServerState>,
    request: pb::UpdateFederationRelationshipRequest,
) -> Result<Response<pb::UpdateFederationRelationshipResponse>, Status> {
    let relationship = resolve(state, request.relationship).await?;
    let trust_domain = relationship.trust_domain.clone();
    check_not_configured(state, &trust_domain)?;
    let td = trust_domain.clone();
    let stored = blocking(state.datastore(), move |store| store.get_federation_relationship(&td))
        .await
        .map_err(datastore_status)?
        .ok_or_else(|| Status::not_found(format!("no federation relationship with {trust_domain}")))?;
    let data = encode_spec(&relationship.spec).map_err(Status::internal)?;
    let td = trust_domain.clone();
    match blocking(state.datastore(), move |store| store.put_federation_relationship(&td, &data, Some(stored.revision)))
        .await
    {
        Ok(_) => {}
        Err(DataStoreError::Conflict { .. }) => {
            return Err(Status::aborted(format!("the relationship with {trust_domain} changed meanwhile; try again")));
        }
        Err(err) => return Err(datastore_status(err)),
    }
    tracing::info!(trust_domain = %trust_domain, url = %relationship.url, "federation relationship updated");
    state.federation().start(Arc::clone(state), relationship).await;
    let relationship = current(state, &trust_domain).await?;
    Ok(Response::new(pb::UpdateFederationRelationshipResponse { relationship: Some(relationship) }))
}

pub(super) async fn delete(
    state: &Arc<ServerState>,
    request: pb::DeleteFederationRelationshipRequest,
) -> Result<Response<pb::DeleteFederationRelationshipResponse>, Status> {
    let trust_domain = foreign_trust_domain(state, "trust_domain", &request.trust_domain)?;
    check_not_configured(state, &trust_domain)?;
    let td = trust_domain.clone();
    blocking(state.datastore(), move |store| store.delete_federation_relationship(&td))
        .await
        .map_err(datastore_status)?;
    state.federation().stop(&trust_domain).await;
    let td = trust_domain.clone();
    match blocking(state.datastore(), move |store| store.delete_bundle(&td)).await {
        Ok(_) | Err(DataStoreError::NotFound { .. }) => {}
        Err(err) => return Err(datastore_status(err)),
    }
    tracing::info!(trust_domain = %trust_domain, "federation relationship and its bundle deleted");
    Ok(Response::new(pb::DeleteFederationRelationshipResponse {}))
}

pub(super) async fn refresh(
    state: &Arc<ServerState>,
    request: pb::RefreshFederationRelationshipRequest,
) -> Result<Response<pb::RefreshFederationRelationshipResponse>, Status> {
    let trust_domain = foreign_trust_domain(state, "trust_domain", &request.trust_domain)?;
    if state.federation().get(&trust_domain).is_none() {
        return Err(Status::not_found(format!("no federation relationship with {trust_domain}")));
    }
    state
        .federation()
        .refresh(&trust_domain)
        .await
        .map_err(|reason| Status::unavailable(format!("fetching the bundle of {trust_domain} failed: {reason}")))?;
    let relationship = current(state, &trust_domain).await?;
    Ok(Response::new(pb::RefreshFederationRelationshipResponse { relationship: Some(relationship) }))
}

/// The trust domain a federation request names, as written (for the audit log).
pub(super) fn audit_trust_domain(request: &impl NamesTrustDomain) -> String {
    request.trust_domain().to_owned()
}

/// Federation requests that name a trust domain.
pub(super) trait NamesTrustDomain {
    fn trust_domain(&self) -> &str;
}

impl NamesTrustDomain for pb::CreateFederationRelationshipRequest {
    fn trust_domain(&self) -> &str {
        self.relationship.as_ref().map_or("", |r| r.trust_domain.as_str())
    }
}

impl NamesTrustDomain for pb::UpdateFederationRelationshipRequest {
    fn trust_domain(&self) -> &str {
        self.relationship.as_ref().map_or("", |r| r.trust_domain.as_str())
    }
}

impl NamesTrustDomain for pb::DeleteFederationRelationshipRequest {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

impl NamesTrustDomain for pb::RefreshFederationRelationshipRequest {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}
