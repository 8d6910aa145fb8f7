//! Authentication of every agent call after attestation (spec: server-agent-flow §3).
//!
//! The TLS layer already checked that a presented client chain verifies against the bundle at
//! handshake time; connections are long-lived, so [`authenticate`] checks everything again on
//! every call:
//!
//! 1. a client certificate was presented (else `UNAUTHENTICATED`);
//! 2. it is a valid X.509-SVID chaining to the *current* bundle, unexpired *now*
//!    (else `UNAUTHENTICATED`);
//! 3. its SPIFFE ID is an agent ID of this trust domain (`/tessera/agent/...`) and the
//!    attested node exists (else `UNAUTHENTICATED`: evicted agents must attest again);
//! 4. the node is not banned (else `PERMISSION_DENIED`);
//! 5. the leaf serial is the node's current serial, or the serial of the renewal just issued,
//!    which then becomes current (compare-and-set in the datastore). Any other serial, such as
//!    an agent SVID that was superseded by a renewal, is refused with `UNAUTHENTICATED`.
//!
//! Every refusal is logged with the peer address and the agent ID when known.
//!
//! Step 2 costs a chain parse and a P-256 signature check (about three signatures' worth of
//! CPU), more than minting a JWT-SVID, so each connection remembers its last successful
//! verification ([`VerifiedPeer`]) and reuses it while the bundle's X.509 authorities are
//! unchanged and for at most [`REVERIFY_AFTER`]; the leaf's expiry and steps 3-5 are still
//! checked on every call. A connection's chain cannot change, so only the bundle and the
//! clock can invalidate the result: a bundle change re-verifies at once, and the validity
//! period of intermediates is re-checked within [`REVERIFY_AFTER`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tessera_spiffe::SpiffeId;
use tessera_spiffe::tls::{PeerSvid, verify_peer_svid};
use tonic::{Request, Status};

use tessera_spiffe::bundle::Bundle;

use super::authz::AgentIdentity;
use super::tls::AgentConnInfo;
use crate::datastore::{AttestedNode, DataStoreError, NodeSerials, blocking};
use crate::server::ServerState;

/// An agent whose call passed [`authenticate`].
#[derive(Debug, Clone)]
pub(crate) struct AuthenticatedAgent {
    /// The agent and its node selectors.
    pub(crate) identity: AgentIdentity,
    /// The presented SVID's serial (the node's current one after the handover).
    pub(crate) serial: String,
    /// The presented SVID's notAfter.
    pub(crate) svid_expires_at: SystemTime,
    /// The node as recorded (after any handover).
    pub(crate) node: AttestedNode,
}

impl AuthenticatedAgent {
    pub(crate) fn id(&self) -> &SpiffeId {
        &self.identity.agent_id
    }
}

/// The connection info of a request (always there on the agent API listener).
pub(crate) fn conn_info<T>(request: &Request<T>) -> Option<&AgentConnInfo> {
    request.extensions().get::<AgentConnInfo>()
}

fn refuse(status: Status, call: &'static str, peer: Option<&AgentConnInfo>, agent: Option<&SpiffeId>) -> Status {
    let addr = peer.and_then(|p| p.remote_addr).map(|a| a.to_string()).unwrap_or_default();
    let agent = agent.map(ToString::to_string).unwrap_or_default();
    tracing::warn!(call, peer = %addr, agent = %agent, code = ?status.code(), reason = %status.message(), "agent call refused");
    status
}

/// How long a connection reuses its last chain verification (see the [module docs](self)).
pub(crate) const REVERIFY_AFTER: Duration = Duration::from_secs(30);

/// The bundle's X.509 authorities a verification was checked against, its result, and when.
type Verification = (Vec<Vec<u8>>, PeerSvid, Instant);

/// One connection's last successful chain verification.
#[derive(Debug, Default)]
pub(crate) struct VerifiedPeer(Mutex<Option<Verification>>);

impl VerifiedPeer {
    /// The remembered result, if it was verified against `bundle`'s current X.509
    /// authorities less than [`REVERIFY_AFTER`] ago.
    fn get(&self, bundle: &Bundle) -> Option<PeerSvid> {
        let guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (authorities, peer, at) = guard.as_ref()?;
        let same = authorities.len() == bundle.x509_authorities().len()
            && authorities.iter().zip(bundle.x509_authorities()).all(|(a, b)| a.as_slice() == b);
        (same && at.elapsed() < REVERIFY_AFTER).then(|| peer.clone())
    }

    fn remember(&self, bundle: &Bundle, peer: &PeerSvid) {
        let authorities = bundle.x509_authorities().map(<[u8]>::to_vec).collect();
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((authorities, peer.clone(), Instant::now()));
    }
}

/// Whether `id` has the shape of an agent ID of the server's trust domain.
pub(crate) fn is_agent_id(state: &ServerState, id: &SpiffeId) -> bool {
    id.is_member_of(state.trust_domain()) && id.path().starts_with("/tessera/agent/")
}

/// Authenticates the agent behind `request`. See the [module docs](self).
pub(crate) async fn authenticate<T>(
    state: &Arc<ServerState>,
    request: &Request<T>,
    call: &'static str,
) -> Result<AuthenticatedAgent, Status> {
    let info = conn_info(request);
    let Some(chain) = info.and_then(|i| i.peer_chain.clone()) else {
        return Err(refuse(
            Status::unauthenticated("this call requires the agent's X.509-SVID as TLS client certificate"),
            call,
            info,
            None,
        ));
    };
    let now = SystemTime::now();
    let bundle = state.ca().bundle();
    let peer = match info.and_then(|i| i.verified.get(&bundle)) {
        Some(peer) => peer,
        None => {
            let peer = verify_peer_svid(&chain, &bundle, now).map_err(|err| {
                refuse(Status::unauthenticated(format!("agent SVID rejected: {err}")), call, info, None)
            })?;
            if let Some(info) = info {
                info.verified.remember(&bundle, &peer);
            }
            peer
        }
    };
    check_node(state, &peer, now).await.map_err(|status| refuse(status, call, info, Some(&peer.spiffe_id)))
}

/// Checks steps 3-5 for a verified peer SVID, doing the serial handover when needed.
pub(crate) async fn check_node(
    state: &Arc<ServerState>,
    peer: &PeerSvid,
    now: SystemTime,
) -> Result<AuthenticatedAgent, Status> {
    if peer.not_after <= now {
        return Err(Status::unauthenticated("agent SVID has expired"));
    }
    if !is_agent_id(state, &peer.spiffe_id) {
        return Err(Status::permission_denied(format!("{} is not an agent ID", peer.spiffe_id)));
    }
    let id = peer.spiffe_id.clone();
    let serial = peer.serial_hex.clone();
    let expires_at = u64::try_from(super::convert::unix_seconds(peer.not_after)).unwrap_or(0);
    let node = blocking(state.datastore(), move |store| {
        // Two rounds at most: a lost handover race is re-read once.
        for _ in 0..2 {
            let Some(node) = store.get_attested_node(&id)? else {
                return Ok(Err(Status::unauthenticated("agent is not attested (evicted or unknown); attest again")));
            };
            if node.banned {
                return Ok(Err(Status::permission_denied("agent is banned")));
            }
            if node.serial == serial {
                return Ok(Ok(node));
            }
            if node.new_serial.as_deref() != Some(serial.as_str()) {
                return Ok(Err(Status::unauthenticated("agent SVID is no longer current (superseded by a renewal)")));
            }
            // spec: first use of the renewed SVID makes its serial the current one.
            let serials = NodeSerials { serial: serial.clone(), new_serial: None, expires_at };
            match store.update_attested_node_serials(&id, &node.serial, &serials) {
                Ok(node) => return Ok(Ok(node)),
                Err(DataStoreError::Conflict { .. }) => continue,
                Err(DataStoreError::NodeBanned { .. }) => return Ok(Err(Status::permission_denied("agent is banned"))),
                Err(DataStoreError::NotFound { .. }) => {
                    return Ok(Err(Status::unauthenticated(
                        "agent is not attested (evicted or unknown); attest again",
                    )));
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Err(Status::aborted("agent serial changed concurrently; retry")))
    })
    .await
    .map_err(|err| Status::unavailable(format!("datastore: {err}")))??;
    Ok(AuthenticatedAgent {
        identity: AgentIdentity { agent_id: peer.spiffe_id.clone(), node_selectors: node.selectors.clone() },
        serial: peer.serial_hex.clone(),
        svid_expires_at: peer.not_after,
        node,
    })
}

/// Re-checks an agent that holds a stream open: still attested, not banned, its serial still
/// current or pending, its SVID unexpired.
pub(crate) async fn recheck(state: &Arc<ServerState>, agent: &AuthenticatedAgent) -> Result<AttestedNode, Status> {
    if agent.svid_expires_at <= SystemTime::now() {
        return Err(Status::unauthenticated("agent SVID has expired"));
    }
    let id = agent.id().clone();
    let node = blocking(state.datastore(), move |store| store.get_attested_node(&id))
        .await
        .map_err(|err| Status::unavailable(format!("datastore: {err}")))?;
    let Some(node) = node else {
        return Err(Status::unauthenticated("agent is not attested (evicted); attest again"));
    };
    if node.banned {
        return Err(Status::permission_denied("agent is banned"));
    }
    if node.serial != agent.serial && node.new_serial.as_deref() != Some(agent.serial.as_str()) {
        return Err(Status::unauthenticated("agent SVID is no longer current (superseded by a renewal)"));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::TrustDomain;

    fn self_signed() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_remembered_verification_is_reused_only_while_the_authorities_are_the_same() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut bundle = Bundle::new(td.clone());
        bundle.add_x509_authority(&self_signed()).unwrap();
        let peer = PeerSvid {
            spiffe_id: SpiffeId::parse("spiffe://example.org/tessera/agent/join_token/t").unwrap(),
            serial_hex: "01".into(),
            not_after: SystemTime::now() + Duration::from_secs(600),
        };
        let verified = VerifiedPeer::default();
        assert!(verified.get(&bundle).is_none(), "nothing verified yet");
        verified.remember(&bundle, &peer);
        assert_eq!(verified.get(&bundle), Some(peer.clone()));

        let mut rotated = bundle.clone();
        rotated.add_x509_authority(&self_signed()).unwrap();
        assert!(verified.get(&rotated).is_none(), "a new authority re-verifies");
        assert!(verified.get(&Bundle::new(td)).is_none(), "a removed authority re-verifies");
    }
}
