//! The agent API's audit events (docs/audit-log.md): attestations and issued SVIDs. Join
//! tokens never appear: agent IDs that embed one are redacted to its fingerprint.

use std::time::SystemTime;

use tessera_common::audit::{AuditEvent, redact_agent_id, token_fingerprint};
use tessera_spiffe::SpiffeId;
use tessera_wire::tessera::agent::v1 as pb;
use tonic::Status;

use super::convert::unix_seconds;
use crate::ca::X509SvidChain;
use crate::datastore::RegistrationEntry;

/// The serial number of a chain's leaf, hex, when it parses.
fn serial(chain: &[Vec<u8>]) -> Option<String> {
    chain.first().and_then(|leaf| tessera_spiffe::tls::certificate_serial_hex(leaf).ok())
}

/// `agent.attested`.
pub(super) fn attested(peer: &str, attestation_type: &str, result: &pb::AttestAgentResult) -> AuditEvent {
    let svid = result.svid.as_ref();
    let agent_id = svid.map_or("", |svid| svid.spiffe_id.as_str());
    AuditEvent::new("agent.attested")
        .field("agent_id", redact_agent_id(agent_id))
        .field("attestation_type", attestation_type)
        .field("serial", svid.and_then(|svid| serial(&svid.cert_chain)))
        .field("expires_at", svid.map_or(0, |svid| svid.expires_at))
        .field("peer", peer)
}

/// `agent.attestation_refused`, with the status the agent got and, for the token attestors
/// (`k8s_psat`, `oidc`), the check that refused the token (which the agent is not told).
pub(super) fn attestation_refused(
    peer: &str,
    attestation_type: &str,
    status: &Status,
    failed_check: Option<&str>,
) -> AuditEvent {
    let event = AuditEvent::new("agent.attestation_refused")
        .field("attestation_type", attestation_type)
        .field("code", format!("{:?}", status.code()))
        .field("reason", status.message())
        .field("peer", peer);
    match failed_check {
        Some(check) => event.field("failed_check", check),
        None => event,
    }
}

/// `svid.issued` for an X.509-SVID signed for `entry` at `agent`'s request.
pub(super) fn x509_issued(svid: &X509SvidChain, entry: &RegistrationEntry, agent: &SpiffeId) -> AuditEvent {
    AuditEvent::new("svid.issued")
        .field("type", "x509")
        .field("serial", serial(&svid.chain))
        .field("spiffe_id", entry.spiffe_id.as_str())
        .field("entry_id", entry.id.as_str())
        .field("agent_id", redact_agent_id(agent.as_str()))
        .field("expires_at", unix_seconds(svid.expires_at))
}

/// `svid.issued` for a JWT-SVID. JWT-SVIDs carry no `jti`, so the token is identified by its
/// fingerprint.
pub(super) fn jwt_issued(
    token: &str,
    spiffe_id: &SpiffeId,
    request: &pb::NewJwtSvidRequest,
    agent: &SpiffeId,
    expires_at: SystemTime,
) -> AuditEvent {
    AuditEvent::new("svid.issued")
        .field("type", "jwt")
        .field("token_fingerprint", token_fingerprint(token))
        .field("spiffe_id", spiffe_id.as_str())
        .field("entry_id", request.entry_id.as_str())
        .field("audiences", request.audiences.clone())
        .field("agent_id", redact_agent_id(agent.as_str()))
        .field("expires_at", unix_seconds(expires_at))
}
