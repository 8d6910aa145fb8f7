//! Node attestation (spec: server-agent-flow §2). Only the `join_token` attestor exists.
//!
//! Order of the checks, chosen so that bad input never burns a token:
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
use tonic::{Status, Streaming};

use super::convert::{bundle_to_proto, selector_to_proto, unix_seconds};
use super::overload::WorkLimit;
use crate::datastore::{AttestedNode, DataStoreError, blocking};
use crate::server::ServerState;

/// The only node attestor.
pub(crate) const JOIN_TOKEN: &str = "join_token";
/// How long the agent may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest CSR accepted, in bytes.
pub(crate) const MAX_CSR_LEN: usize = 16 * 1024;

/// Runs one attestation to its result. The work after the first message runs under a permit
/// of `limit` (`max_concurrent_attestations`); a saturated server answers `UNAVAILABLE` before
/// the token is looked at, so an overload refusal never burns a token.
pub(crate) async fn attest(
    state: &Arc<ServerState>,
    limit: &WorkLimit,
    mut stream: Streaming<pb::AttestAgentRequest>,
) -> Result<pb::AttestAgentResult, Status> {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no attestation parameters received in time"))??;
    let Some(pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) }) = first else {
        return Err(Status::invalid_argument("the first message must be `params`"));
    };
    let _permit = limit.acquire().await?;
    let data = params.data.ok_or_else(|| Status::invalid_argument("params.data is required"))?;
    if data.r#type != JOIN_TOKEN {
        return Err(Status::invalid_argument(format!(
            "params.data.type: unsupported attestation type {:?}; supported: {JOIN_TOKEN}",
            data.r#type
        )));
    }
    let token = String::from_utf8(data.payload)
        .map_err(|_| Status::invalid_argument("params.data.payload: join token is not UTF-8"))?;
    if token.is_empty() || token.len() > crate::datastore::MAX_KEY_LEN {
        return Err(Status::invalid_argument("params.data.payload: join token must be 1 to 255 bytes"));
    }
    let agent_id = state
        .join_token_agent_id(&token)
        .map_err(|err| Status::invalid_argument(format!("params.data.payload: invalid join token: {err}")))?;
    if params.csr.len() > MAX_CSR_LEN {
        return Err(Status::invalid_argument(format!("params.csr: larger than {MAX_CSR_LEN} bytes")));
    }
    tessera_spiffe::x509::verify_csr(&params.csr)
        .map_err(|err| Status::invalid_argument(format!("params.csr: {err}")))?;

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

    let (state2, id, csr) = (Arc::clone(state), agent_id.clone(), params.csr);
    let ttl = state.config().agent_ttl;
    let svid = tokio::task::spawn_blocking(move || state2.ca().sign_agent_svid(&id, ttl, &csr, now))
        .await
        .map_err(|err| Status::internal(format!("signing task: {err}")))?
        .map_err(|err| Status::internal(format!("cannot sign the agent SVID: {err}")))?;
    let leaf = svid.chain.first().ok_or_else(|| Status::internal("empty agent SVID chain"))?;
    let serial = tessera_spiffe::tls::certificate_serial_hex(leaf)
        .map_err(|err| Status::internal(format!("agent SVID serial: {err}")))?;
    let node = AttestedNode {
        spiffe_id: agent_id.clone(),
        attestation_type: JOIN_TOKEN.to_owned(),
        serial,
        new_serial: None,
        expires_at: u64::try_from(unix_seconds(svid.expires_at)).unwrap_or(0),
        banned: false,
        selectors: node_selectors.clone(),
        can_reattest: false,
    };
    blocking(state.datastore(), move |store| store.create_attested_node(&node))
        .await
        .map_err(|err| Status::internal(format!("cannot record the attested node: {err}")))?;
    tracing::info!(agent = %agent_id, expires_at = ?svid.expires_at, "agent attested with a join token");

    Ok(pb::AttestAgentResult {
        svid: Some(agent_svid(&agent_id, svid.chain, svid.expires_at)),
        bundle: Some(bundle_to_proto(&state.ca().bundle())),
        selectors: node_selectors.iter().map(selector_to_proto).collect(),
    })
}

pub(crate) fn agent_svid(agent_id: &SpiffeId, chain: Vec<Vec<u8>>, expires_at: SystemTime) -> pb::AgentSvid {
    pb::AgentSvid { spiffe_id: agent_id.to_string(), cert_chain: chain, expires_at: unix_seconds(expires_at) }
}
