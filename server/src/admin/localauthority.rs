//! `ShowLocalAuthorities` and `ChangeLocalAuthority`: forced rotation of the server's own
//! X.509 CA and JWT signing key (`tessera-server localauthority x509|jwt ...`).
//!
//! The state machine lives in the CA ([`crate::ca::CertificateAuthority::change_authority`]);
//! this maps requests to it and its refusals to statuses: an unknown authority is
//! `NOT_FOUND`, a step that does not apply to the authority's state (activating the active
//! one, tainting the active one, revoking an untainted one...) is `FAILED_PRECONDITION`.

use std::sync::Arc;
use std::time::SystemTime;

use tessera_wire::tessera::admin::v1 as pb;
use tonic::Status;

use crate::ca::storage::{Slot, SlotKind};
use crate::ca::{AuthorityChange, CaError, state_name};
use crate::server::ServerState;

/// Longest authority ID accepted (IDs are 32 or 43 characters).
const MAX_ID_LEN: usize = 128;

fn kind(value: i32) -> Result<SlotKind, Status> {
    match pb::LocalAuthorityKind::try_from(value) {
        Ok(pb::LocalAuthorityKind::X509) => Ok(SlotKind::X509),
        Ok(pb::LocalAuthorityKind::Jwt) => Ok(SlotKind::Jwt),
        _ => Err(Status::invalid_argument("kind: must be X509 or JWT")),
    }
}

fn to_proto(slot: &Slot) -> pb::LocalAuthority {
    pb::LocalAuthority {
        authority_id: slot.id.clone(),
        kind: match slot.kind {
            SlotKind::X509 => pb::LocalAuthorityKind::X509,
            SlotKind::Jwt => pb::LocalAuthorityKind::Jwt,
        }
        .into(),
        state: state_name(slot.status).to_owned(),
        expires_at: i64::try_from(slot.not_after).unwrap_or(i64::MAX),
        created_at: i64::try_from(slot.created).unwrap_or(i64::MAX),
        tainted: slot.tainted,
        upstream: slot.upstream,
    }
}

fn ca_status(err: CaError) -> Status {
    match err {
        CaError::AuthorityNotFound { .. } => Status::not_found(err.to_string()),
        CaError::AuthorityState { .. } => Status::failed_precondition(err.to_string()),
        CaError::DataStore(_) => Status::unavailable(err.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// `ShowLocalAuthorities`.
pub(crate) fn show(
    state: &ServerState,
    request: pb::ShowLocalAuthoritiesRequest,
) -> Result<pb::ShowLocalAuthoritiesResponse, Status> {
    let kind = kind(request.kind)?;
    let authorities = state.ca().authorities(kind).iter().map(to_proto).collect();
    Ok(pb::ShowLocalAuthoritiesResponse { authorities })
}

/// `ChangeLocalAuthority`.
pub(crate) async fn change(
    state: Arc<ServerState>,
    request: pb::ChangeLocalAuthorityRequest,
    caller: super::AdminCaller,
) -> Result<pb::ChangeLocalAuthorityResponse, Status> {
    let kind = kind(request.kind)?;
    let id = request.authority_id;
    if id.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!("authority_id: longer than {MAX_ID_LEN} characters")));
    }
    let action = pb::LocalAuthorityAction::try_from(request.action).unwrap_or(pb::LocalAuthorityAction::Unspecified);
    let needs_id = |change: fn(String) -> AuthorityChange| {
        if id.is_empty() { Err(Status::invalid_argument("authority_id: must be set")) } else { Ok(change(id.clone())) }
    };
    let step = match action {
        pb::LocalAuthorityAction::Prepare => "prepare",
        pb::LocalAuthorityAction::Activate => "activate",
        pb::LocalAuthorityAction::Taint => "taint",
        pb::LocalAuthorityAction::Revoke => "revoke",
        pb::LocalAuthorityAction::Unspecified => "unspecified",
    };
    let change = match action {
        pb::LocalAuthorityAction::Prepare if id.is_empty() => AuthorityChange::Prepare,
        pb::LocalAuthorityAction::Prepare => {
            return Err(Status::invalid_argument(
                "authority_id: must be empty for PREPARE (a new authority is created)",
            ));
        }
        pb::LocalAuthorityAction::Activate => needs_id(AuthorityChange::Activate)?,
        pb::LocalAuthorityAction::Taint => needs_id(AuthorityChange::Taint)?,
        pb::LocalAuthorityAction::Revoke => needs_id(AuthorityChange::Revoke)?,
        pb::LocalAuthorityAction::Unspecified => {
            return Err(Status::invalid_argument("action: must be PREPARE, ACTIVATE, TAINT or REVOKE"));
        }
    };
    let worker = Arc::clone(&state);
    let slot = tokio::task::spawn_blocking(move || {
        worker.ca().change_authority(kind, change, worker.datastore().as_ref(), SystemTime::now())
    })
    .await
    .map_err(|err| Status::internal(format!("local authority change did not finish: {err}")))?
    .map_err(ca_status)?;
    state.audit().emit(
        caller
            .event("localauthority.change")
            .field("kind", crate::ca::kind_name(kind))
            .field("authority_id", slot.id.clone())
            .field("step", step),
    );
    state.audit().emit(
        tessera_common::audit::AuditEvent::new("ca.rotation")
            .field("kind", crate::ca::kind_name(kind))
            .field("authority_id", slot.id.clone())
            .field("step", step)
            .field("not_after", slot.not_after)
            .field("trigger", "forced"),
    );
    Ok(pb::ChangeLocalAuthorityResponse { authority: Some(to_proto(&slot)) })
}
