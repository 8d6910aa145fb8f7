//! Node attestation (spec: server-agent-flow §2): join tokens (always on) and, when
//! configured, `x509pop` (see [`super::x509pop`]) and the token attestors `k8s_psat` and
//! `oidc` (see [`super::node_token`]).
//!
//! Order of the join-token checks, chosen so that bad input never burns a token:
//!
//! 1. the first message is `params` with type `join_token`, a UTF-8 token that is a valid
//!    SPIFFE ID path segment (`INVALID_ARGUMENT` otherwise); from here on the call holds an
//!    attestation slot (`max_concurrent_attestations`; `UNAVAILABLE` when the server is
//!    saturated, see [`super::overload`]);
//! 2. the CSR parses and its signature verifies (`INVALID_ARGUMENT`);
//! 3. the agent ID `spiffe://<td>/tessera/agent/join_token/<token>` is not recorded already:
//!    banned -> `PERMISSION_DENIED` "agent is banned"; present -> `ALREADY_EXISTS` (a join
//!    token attests once; evict the node to let it attest again with a new token);
//! 4. the token is consumed, expiry checked, in one datastore transaction
//!    (`PERMISSION_DENIED` for unknown/used/expired): of concurrent attestations with one
//!    token, exactly one gets past this point;
//! 5. the agent SVID is signed from the CSR (`agent_ttl`) and the node recorded with its
//!    serial, expiry and node selectors.
//!
//! # Node selectors
//!
//! A join token proves nothing about the machine, so its node carries one selector:
//! `spiffe_id:<agent ID>`. A node-alias entry (parent `spiffe://<td>/tessera/server`) with
//! that selector therefore matches exactly this agent; aliases spanning several join-token
//! agents are not expressible, as with SPIRE's join tokens.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_spiffe::{Selector, SelectorSet, SpiffeId};
use tessera_wire::tessera::agent::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::BoxStream;
use super::convert::{bundle_to_proto, selector_to_proto, unix_seconds};
use super::node_token::TokenRefused;
use super::overload::WorkLimit;
use crate::datastore::{AttestedNode, DataStoreError, NodeSerials, blocking};
use crate::server::ServerState;
use crate::token_exchange::validate::FailedCheck;
use tessera_common::node_token::{K8S_PSAT, OIDC};

/// The join-token node attestor.
pub(crate) const JOIN_TOKEN: &str = "join_token";
/// How long the agent may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest CSR accepted, in bytes.
pub(crate) const MAX_CSR_LEN: usize = 16 * 1024;

/// Runs one attestation: reads the parameters and answers with the result, or, for attestors
/// with a challenge, with the challenge and then (from a task reading the agent's answer) the
/// result. Refusals before the stream opens are the call's status; later ones end the stream.
///
/// The work after the first message runs under a permit of `limit`
/// (`max_concurrent_attestations`, held until the result for challenges); a saturated server
/// answers `UNAVAILABLE` before the token is looked at, so an overload refusal never burns a
/// token.
pub(crate) async fn attest(
    state: &Arc<ServerState>,
    limit: &WorkLimit,
    stream: Streaming<pb::AttestAgentRequest>,
    peer: String,
) -> Result<BoxStream<pb::AttestAgentResponse>, Status> {
    // The attestation type as the agent named it (bounded: it is only echoed to the audit log).
    let mut kind = String::new();
    attest_inner(state, limit, stream, peer.clone(), &mut kind).await.map_err(|refusal| {
        record_refusal(state, &peer, &kind, &refusal.status, refusal.check);
        refusal.status
    })
}

/// A refused attestation: the agent's status and, for the token attestors, the check that
/// refused it (for the audit line only).
#[derive(Debug)]
pub(crate) struct Refusal {
    status: Status,
    check: Option<FailedCheck>,
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        Self { status, check: None }
    }
}

/// Counts and audits a refused attestation.
fn record_refusal(state: &ServerState, peer: &str, kind: &str, status: &Status, check: Option<FailedCheck>) {
    state.metrics().attestation(false);
    let kind = if kind.is_empty() { "unknown" } else { kind };
    state.audit().emit(super::audit::attestation_refused(peer, kind, status, check.map(FailedCheck::as_str)));
}

/// Counts and audits a successful attestation.
fn record_success(state: &ServerState, peer: &str, kind: &str, result: &pb::AttestAgentResult) {
    state.metrics().attestation(true);
    state.audit().emit(super::audit::attested(peer, kind, result));
}

async fn attest_inner(
    state: &Arc<ServerState>,
    limit: &WorkLimit,
    mut stream: Streaming<pb::AttestAgentRequest>,
    peer: String,
    kind: &mut String,
) -> Result<BoxStream<pb::AttestAgentResponse>, Refusal> {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no attestation parameters received in time"))??;
    let Some(pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) }) = first else {
        return Err(Status::invalid_argument("the first message must be `params`").into());
    };
    let permit = limit.acquire().await?;
    let data = params.data.ok_or_else(|| Status::invalid_argument("params.data is required"))?;
    *kind = data.r#type.chars().take(64).collect();
    if params.csr.len() > MAX_CSR_LEN {
        return Err(Status::invalid_argument(format!("params.csr: larger than {MAX_CSR_LEN} bytes")).into());
    }
    match data.r#type.as_str() {
        JOIN_TOKEN => {
            let result = join_token(state, data.payload, params.csr).await?;
            drop(permit);
            record_success(state, &peer, JOIN_TOKEN, &result);
            Ok(Box::pin(tokio_stream::once(Ok(result_response(result)))))
        }
        tessera_common::x509pop::TYPE if state.x509pop().is_some() => {
            let Some(x509pop) = state.x509pop() else {
                return Err(Status::internal("x509pop is not configured").into());
            };
            tessera_spiffe::x509::verify_csr(&params.csr)
                .map_err(|err| Status::invalid_argument(format!("params.csr: {err}")))?;
            let pending = x509pop.verify_chain(state.trust_domain(), &data.payload, SystemTime::now())?;
            let (sender, receiver) = mpsc::channel(2);
            let challenge = pb::AttestAgentResponse {
                step: Some(pb::attest_agent_response::Step::Challenge(pending.nonce.to_vec())),
            };
            sender.send(Ok(challenge)).await.map_err(|_| Status::cancelled("the agent went away"))?;
            let state = Arc::clone(state);
            tokio::spawn(async move {
                let outcome = finish_x509pop(&state, pending, params.csr, stream).await;
                drop(permit);
                let kind = tessera_common::x509pop::TYPE;
                match &outcome {
                    Ok(result) => record_success(&state, &peer, kind, result),
                    Err(status) => {
                        tracing::warn!(peer = %peer, code = ?status.code(), reason = %status.message(), "agent attestation refused");
                        record_refusal(&state, &peer, kind, status, None);
                    }
                }
                let _ = sender.send(outcome.map(result_response)).await;
            });
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
        }
        attestor @ (K8S_PSAT | OIDC) if state.node_tokens().enabled(attestor) => {
            let attestor = if attestor == K8S_PSAT { K8S_PSAT } else { OIDC };
            let result = node_token(state, attestor, &data.payload, params.csr, &peer).await?;
            drop(permit);
            record_success(state, &peer, attestor, &result);
            Ok(Box::pin(tokio_stream::once(Ok(result_response(result)))))
        }
        other => {
            let mut supported = vec![JOIN_TOKEN];
            if state.x509pop().is_some() {
                supported.push(tessera_common::x509pop::TYPE);
            }
            supported.extend([K8S_PSAT, OIDC].into_iter().filter(|attestor| state.node_tokens().enabled(attestor)));
            Err(Status::invalid_argument(format!(
                "params.data.type: unsupported attestation type {other:?}; supported: {}",
                supported.join(", ")
            ))
            .into())
        }
    }
}

/// `k8s_psat` and `oidc` attestation (see [`super::node_token`]): the payload decodes, the CSR
/// verifies (`INVALID_ARGUMENT` otherwise), the token passes every check of its attestor,
/// the agent is not banned, and, for a single-use attestor, the `jti` is recorded for the
/// first time; then the node is created or re-attested.
async fn node_token(
    state: &Arc<ServerState>,
    attestor: &'static str,
    payload: &[u8],
    csr: Vec<u8>,
    peer: &str,
) -> Result<pb::AttestAgentResult, Refusal> {
    let token = super::node_token::decode_payload(payload).map_err(|message| Refusal {
        status: Status::invalid_argument(message),
        check: Some(FailedCheck::Malformed),
    })?;
    tessera_spiffe::x509::verify_csr(&csr).map_err(|err| Status::invalid_argument(format!("params.csr: {err}")))?;
    let refuse = |refused: TokenRefused| {
        tracing::warn!(
            peer,
            attestor,
            failed_check = refused.check.as_str(),
            issuer = %bounded(&token.issuer),
            subject = %bounded(token.claimed("sub").unwrap_or("-")),
            reason = %refused.reason,
            "agent attestation refused"
        );
        let status = match refused.check {
            FailedCheck::Banned => Status::permission_denied("agent is banned"),
            FailedCheck::Internal => Status::unavailable("the server cannot check node tokens right now; try again"),
            _ => Status::permission_denied(super::node_token::NOT_ACCEPTED),
        };
        Refusal { status, check: Some(refused.check) }
    };
    let node = state.node_tokens().check(attestor, state.trust_domain(), &token).await.map_err(refuse)?;

    let id = node.agent_id.clone();
    let existing = blocking(state.datastore(), move |store| store.get_attested_node(&id))
        .await
        .map_err(|err| Status::unavailable(format!("datastore: {err}")))?;
    if existing.as_ref().is_some_and(|node| node.banned) {
        return Err(refuse(TokenRefused {
            check: FailedCheck::Banned,
            reason: format!("{} is banned", node.agent_id),
        }));
    }
    if let Some(single_use) = &node.single_use {
        single_use.consume(state).await.map_err(|check| {
            refuse(TokenRefused { check, reason: format!("jti {:?}: {}", bounded(&single_use.jti), check.as_str()) })
        })?;
    }
    let new_node =
        NewNode { agent_id: node.agent_id, attestation_type: attestor, selectors: node.selectors, can_reattest: true };
    Ok(issue(state, new_node, csr, existing, SystemTime::now()).await?)
}

/// A value from a token, for one log line: bounded, control characters replaced.
fn bounded(text: &str) -> String {
    text.chars().take(256).map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn result_response(result: pb::AttestAgentResult) -> pb::AttestAgentResponse {
    pb::AttestAgentResponse { step: Some(pb::attest_agent_response::Step::Result(result)) }
}

/// Join-token attestation, in the order of the module documentation.
async fn join_token(state: &Arc<ServerState>, payload: Vec<u8>, csr: Vec<u8>) -> Result<pb::AttestAgentResult, Status> {
    let token = String::from_utf8(payload)
        .map_err(|_| Status::invalid_argument("params.data.payload: join token is not UTF-8"))?;
    if token.is_empty() || token.len() > crate::datastore::MAX_KEY_LEN {
        return Err(Status::invalid_argument("params.data.payload: join token must be 1 to 255 bytes"));
    }
    let agent_id = state
        .join_token_agent_id(&token)
        .map_err(|err| Status::invalid_argument(format!("params.data.payload: invalid join token: {err}")))?;
    tessera_spiffe::x509::verify_csr(&csr).map_err(|err| Status::invalid_argument(format!("params.csr: {err}")))?;

    let node_selectors: SelectorSet = [Selector::new("spiffe_id", agent_id.as_str())
        .map_err(|err| Status::internal(format!("node selector: {err}")))?]
    .into_iter()
    .collect();

    let id = agent_id.clone();
    let now = SystemTime::now();
    let now_secs = u64::try_from(unix_seconds(now)).unwrap_or(0);
    blocking(state.datastore(), move |store| {
        if let Some(node) = store.get_attested_node(&id)? {
            return Ok(Err(if node.banned {
                Status::permission_denied("agent is banned")
            } else {
                Status::already_exists("agent is already attested; a join token attests once (evict the agent first)")
            }));
        }
        Ok(match store.consume_join_token(&token, now_secs) {
            Ok(_) => Ok(()),
            Err(DataStoreError::TokenNotFound) => {
                Err(Status::permission_denied("join token does not exist or has already been used"))
            }
            Err(DataStoreError::TokenExpired { .. }) => Err(Status::permission_denied("join token has expired")),
            Err(err) => return Err(err),
        })
    })
    .await
    .map_err(|err| Status::unavailable(format!("datastore: {err}")))??;

    issue(
        state,
        NewNode { agent_id, attestation_type: JOIN_TOKEN, selectors: node_selectors, can_reattest: false },
        csr,
        None,
        now,
    )
    .await
}

/// x509pop step 3 and the result: waits for the signed challenge, then issues.
async fn finish_x509pop(
    state: &Arc<ServerState>,
    pending: super::x509pop::PendingNode,
    csr: Vec<u8>,
    mut stream: Streaming<pb::AttestAgentRequest>,
) -> Result<pb::AttestAgentResult, Status> {
    let answer = tokio::time::timeout(super::x509pop::RESPONSE_TIMEOUT, stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no challenge response received in time"))??;
    let Some(pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::ChallengeResponse(signature)) }) =
        answer
    else {
        return Err(Status::invalid_argument("the second message must be `challenge_response`"));
    };
    pending.verify_response(&csr, &signature)?;

    let id = pending.agent_id.clone();
    let existing = blocking(state.datastore(), move |store| store.get_attested_node(&id))
        .await
        .map_err(|err| Status::unavailable(format!("datastore: {err}")))?;
    if existing.as_ref().is_some_and(|node| node.banned) {
        return Err(Status::permission_denied("agent is banned"));
    }
    let node = NewNode {
        agent_id: pending.agent_id,
        attestation_type: tessera_common::x509pop::TYPE,
        selectors: pending.selectors,
        can_reattest: true,
    };
    issue(state, node, csr, existing, SystemTime::now()).await
}

/// What an attestor established about a node.
struct NewNode {
    agent_id: SpiffeId,
    attestation_type: &'static str,
    selectors: SelectorSet,
    can_reattest: bool,
}

/// Signs the agent SVID and records the node: created, or, for a re-attestation, its serial
/// and selectors replaced (compare-and-set on the serial it had, so of two concurrent
/// re-attestations one wins and the other is told to retry).
async fn issue(
    state: &Arc<ServerState>,
    node: NewNode,
    csr: Vec<u8>,
    existing: Option<AttestedNode>,
    now: SystemTime,
) -> Result<pb::AttestAgentResult, Status> {
    let (state2, id) = (Arc::clone(state), node.agent_id.clone());
    let ttl = state.config().agent_ttl;
    let svid = tokio::task::spawn_blocking(move || state2.ca().sign_agent_svid(&id, ttl, &csr, now))
        .await
        .map_err(|err| Status::internal(format!("signing task: {err}")))?
        .map_err(|err| Status::internal(format!("cannot sign the agent SVID: {err}")))?;
    let leaf = svid.chain.first().ok_or_else(|| Status::internal("empty agent SVID chain"))?;
    let serial = tessera_spiffe::tls::certificate_serial_hex(leaf)
        .map_err(|err| Status::internal(format!("agent SVID serial: {err}")))?;
    let expires_at = u64::try_from(unix_seconds(svid.expires_at)).unwrap_or(0);
    let agent_id = node.agent_id.clone();
    let selectors = node.selectors.clone();
    let reattested = existing.is_some();
    let attestor = node.attestation_type;
    blocking(state.datastore(), move |store| {
        Ok(match existing {
            None => match store.create_attested_node(&AttestedNode {
                spiffe_id: node.agent_id.clone(),
                attestation_type: node.attestation_type.to_owned(),
                serial,
                new_serial: None,
                expires_at,
                banned: false,
                selectors: node.selectors,
                can_reattest: node.can_reattest,
            }) {
                Ok(()) => Ok(()),
                Err(DataStoreError::AlreadyExists { .. }) => {
                    Err(Status::aborted("the agent attested concurrently; attest again"))
                }
                Err(err) => return Err(err),
            },
            Some(previous) => {
                let serials = NodeSerials { serial, new_serial: None, expires_at };
                match store.update_attested_node_serials(&node.agent_id, &previous.serial, &serials) {
                    Ok(_) => store.set_attested_node_selectors(&node.agent_id, &node.selectors).map(|_| Ok(()))?,
                    Err(DataStoreError::NodeBanned { .. }) => Err(Status::permission_denied("agent is banned")),
                    Err(DataStoreError::Conflict { .. } | DataStoreError::NotFound { .. }) => {
                        Err(Status::aborted("the agent attested concurrently; attest again"))
                    }
                    Err(err) => return Err(err),
                }
            }
        })
    })
    .await
    .map_err(|err| Status::internal(format!("cannot record the attested node: {err}")))??;
    tracing::info!(
        agent = %agent_id,
        attestor,
        reattested,
        expires_at = ?svid.expires_at,
        "agent attested"
    );

    Ok(pb::AttestAgentResult {
        svid: Some(agent_svid(&agent_id, svid.chain, svid.expires_at)),
        bundle: Some(bundle_to_proto(&state.ca().bundle())),
        selectors: selectors.iter().map(selector_to_proto).collect(),
    })
}

pub(crate) fn agent_svid(agent_id: &SpiffeId, chain: Vec<Vec<u8>>, expires_at: SystemTime) -> pb::AgentSvid {
    pb::AgentSvid { spiffe_id: agent_id.to_string(), cert_chain: chain, expires_at: unix_seconds(expires_at) }
}
