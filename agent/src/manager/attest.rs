//! Node attestation over the `AttestAgent` stream, with a join token, an x509pop node
//! certificate, or a token file for `k8s_psat` and `oidc` ([`Evidence`]).
//!
//! The agent generates its key here, sends the evidence and a CSR (answering the server's
//! challenge for x509pop), and checks what comes back
//! before persisting anything: the SVID must be a usable X.509-SVID for the new key, carry a
//! SPIFFE ID of the configured trust domain, and verify against the bundle returned with it.
//!
//! A status that says the token (or the agent) is refused ends attestation with the server's
//! message: a join token is single-use, so retrying cannot help. Transport failures and
//! overload are retried with backoff, since the server may simply not be up yet.

use std::sync::Arc;
use std::time::SystemTime;

use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::TrustDomain;
use tessera_spiffe::x509::verify_x509_svid;
use tessera_wire::tessera::agent::v1::attest_agent_request::Step as RequestStep;
use tessera_wire::tessera::agent::v1::attest_agent_response::Step as ResponseStep;
use tessera_wire::tessera::agent::v1::{AttestAgentRequest, AttestAgentResult, AttestationData, AttestationParams};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::keys::new_key_and_csr;
use super::state::convert_bundle;
use super::{Backoff, ManagerError};
use crate::client::tls::ServerVerifier;
use crate::client::{CALL_TIMEOUT, ServerClient};
use crate::storage::AgentCredential;

/// The attestation type of join tokens.
pub const JOIN_TOKEN_TYPE: &str = "join_token";

/// What the agent attests with.
#[derive(Debug, Clone)]
pub enum Evidence {
    /// A single-use join token.
    JoinToken(String),
    /// A node certificate and its key (re-attestable), read from these files at each attempt.
    X509Pop(crate::config::X509PopConfig),
    /// A token (`k8s_psat`, `oidc`; re-attestable), read from its file at each attempt.
    Token(super::node_token::TokenFile),
}

impl Evidence {
    /// Whether the agent may attest again with this evidence (after an eviction, or when its
    /// SVID expired).
    pub fn can_reattest(&self) -> bool {
        matches!(self, Self::X509Pop(_) | Self::Token(_))
    }
}

/// A successful attestation.
#[derive(Debug)]
pub struct Attested {
    /// The new agent SVID and its key.
    pub credential: AgentCredential,
    /// The server's bundle.
    pub bundle: Bundle,
}

/// How an attempt failed.
#[derive(Debug)]
pub enum AttestFailure {
    /// Final: the server refused.
    Refused(String),
    /// Worth another try.
    Retryable(String),
    /// The server answered with something unusable.
    Invalid(String),
}

/// Whether a status ends attestation for good.
pub fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

fn classify(status: &Status) -> AttestFailure {
    let message =
        if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().to_owned() };
    if is_refusal(status.code()) { AttestFailure::Refused(message) } else { AttestFailure::Retryable(message) }
}

/// Attests, retrying transport failures with backoff; returns on success or refusal.
pub async fn attest_with_retry(
    server_address: &str,
    verifier: &Arc<ServerVerifier>,
    trust_domain: &TrustDomain,
    evidence: &Evidence,
) -> Result<Attested, ManagerError> {
    let client = ServerClient::new(server_address, Arc::clone(verifier), None).map_err(ManagerError::Other)?;
    let rng = ring::rand::SystemRandom::new();
    let mut backoff = Backoff::new();
    loop {
        match attest_once(&client, trust_domain, evidence).await {
            Ok(attested) => return Ok(attested),
            Err(AttestFailure::Refused(reason)) => return Err(ManagerError::AttestationRefused(reason)),
            Err(AttestFailure::Invalid(reason)) => {
                return Err(ManagerError::Other(format!("the server's attestation answer is unusable: {reason}")));
            }
            Err(AttestFailure::Retryable(reason)) => {
                let delay = backoff.next_delay(&rng);
                tracing::warn!("attestation with {server_address} failed: {reason}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One attestation attempt.
pub async fn attest_once(
    client: &ServerClient,
    trust_domain: &TrustDomain,
    evidence: &Evidence,
) -> Result<Attested, AttestFailure> {
    let generated = new_key_and_csr().map_err(AttestFailure::Invalid)?;
    let (data, node) = match evidence {
        Evidence::JoinToken(token) => {
            (AttestationData { r#type: JOIN_TOKEN_TYPE.to_owned(), payload: token.as_bytes().to_vec() }, None)
        }
        Evidence::X509Pop(config) => {
            // A node credential that cannot be read is the operator's to fix: final.
            let node = super::x509pop::NodeCredential::load(config).map_err(AttestFailure::Refused)?;
            let data = AttestationData { r#type: tessera_common::x509pop::TYPE.to_owned(), payload: node.payload() };
            (data, Some(node))
        }
        Evidence::Token(file) => {
            // Read now: the file may hold a newer token than at the last attempt. A file that
            // holds no token is the operator's (or the token's issuer's) to fix: final.
            let token = file.read().map_err(AttestFailure::Refused)?;
            (AttestationData { r#type: file.attestor.to_owned(), payload: token.into_bytes() }, None)
        }
    };
    let (sender, receiver) = mpsc::channel(2);
    let params = AttestAgentRequest {
        step: Some(RequestStep::Params(AttestationParams { data: Some(data), csr: generated.csr_der.clone() })),
    };
    sender.send(params).await.map_err(|_| AttestFailure::Retryable("request stream closed".to_owned()))?;
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request.set_timeout(CALL_TIMEOUT);
    let call = async {
        let mut responses =
            client.agent().attest_agent(request).await.map_err(|status| classify(&status))?.into_inner();
        let mut challenged = false;
        loop {
            let Some(response) = responses.message().await.map_err(|status| classify(&status))? else {
                return Err(AttestFailure::Retryable("the server closed the stream without a result".to_owned()));
            };
            match response.step {
                Some(ResponseStep::Result(result)) => return Ok(result),
                Some(ResponseStep::Challenge(nonce)) => {
                    let Some(node) = node.as_ref().filter(|_| !challenged) else {
                        return Err(AttestFailure::Invalid("the server sent an unexpected challenge".to_owned()));
                    };
                    challenged = true;
                    let signature = node.sign_challenge(&nonce, &generated.csr_der).map_err(AttestFailure::Invalid)?;
                    let answer = AttestAgentRequest { step: Some(RequestStep::ChallengeResponse(signature)) };
                    sender
                        .send(answer)
                        .await
                        .map_err(|_| AttestFailure::Retryable("request stream closed".to_owned()))?;
                }
                None => return Err(AttestFailure::Invalid("an empty attestation response".to_owned())),
            }
        }
    };
    let result = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| AttestFailure::Retryable("attestation timed out".to_owned()))??;
    drop(sender);
    check_result(trust_domain, result, generated.private_key_pkcs8).map_err(AttestFailure::Invalid)
}

/// Attests again with the agent's re-attestable evidence (x509pop, a token file) after the server refused
/// the agent SVID (evicted) or it expired, and switches to the new SVID. A new agent ID (a new
/// node certificate named by its fingerprint, a token mapped to another ID) starts the entry
/// sync from scratch.
pub(crate) async fn reattest(shared: &super::Shared) -> Result<(), String> {
    let Some(evidence) = &shared.reattest else {
        return Err("join-token agents attest once: attest it again with a new join token".to_owned());
    };
    let client = shared.client.without_credential()?;
    let attested = attest_once(&client, &shared.trust_domain, evidence).await.map_err(|failure| match failure {
        AttestFailure::Refused(reason) => format!("refused: {reason}"),
        AttestFailure::Retryable(reason) | AttestFailure::Invalid(reason) => reason,
    })?;
    let previous = shared.credential().spiffe_id;
    if attested.credential.spiffe_id != previous {
        tracing::warn!(old = %previous, new = %attested.credential.spiffe_id, "re-attested under a new agent ID");
        shared.state().revision = 0;
    }
    shared.install_credential(attested.credential.clone()).await?;
    tracing::info!(agent_id = %attested.credential.spiffe_id, "re-attested; agent SVID persisted");
    Ok(())
}

/// Checks an attestation result for the key that was just generated.
pub fn check_result(
    trust_domain: &TrustDomain,
    result: AttestAgentResult,
    private_key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
) -> Result<Attested, String> {
    let svid = result.svid.ok_or("no agent SVID in the result")?;
    let bundle = convert_bundle(result.bundle.ok_or("no bundle in the result")?)?;
    if bundle.trust_domain() != trust_domain {
        return Err(format!("the bundle is for {}, expected {trust_domain}", bundle.trust_domain()));
    }
    let credential = AgentCredential::new(svid.cert_chain, private_key_pkcs8)?;
    if !credential.spiffe_id.is_member_of(trust_domain) {
        return Err(format!("the agent SVID is for {}, outside {trust_domain}", credential.spiffe_id));
    }
    check_against_bundle(&credential, &bundle)?;
    Ok(Attested { credential, bundle })
}

/// The credential must chain to the bundle now.
pub fn check_against_bundle(credential: &AgentCredential, bundle: &Bundle) -> Result<(), String> {
    let chain: Vec<&[u8]> = credential.cert_chain.iter().map(Vec::as_slice).collect();
    verify_x509_svid(&chain, bundle, SystemTime::now())
        .map_err(|error| format!("the agent SVID does not verify against the bundle: {error}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::keys::{test_issuer, test_svid};
    use tessera_wire::tessera::agent::v1::AgentSvid;
    use tessera_wire::tessera::common::v1 as common;

    #[test]
    fn refusals_are_final_and_outages_are_retried() {
        assert!(
            matches!(classify(&Status::permission_denied("join token already used")), AttestFailure::Refused(m) if m == "join token already used")
        );
        assert!(matches!(classify(&Status::unavailable("down")), AttestFailure::Retryable(_)));
        assert!(matches!(classify(&Status::resource_exhausted("busy")), AttestFailure::Retryable(_)));
    }

    #[test]
    fn result_must_match_the_key_and_the_bundle() {
        let td = TrustDomain::new("example.org").unwrap();
        let issuer = test_issuer("example.org");
        let (chain, key) = test_svid(&issuer, "spiffe://example.org/tessera/agent/join_token/t");
        let wire_bundle = common::Bundle {
            trust_domain: "example.org".to_owned(),
            x509_authorities: vec![issuer.certificate_der().to_vec()],
            ..Default::default()
        };
        let result = |chain: Vec<Vec<u8>>, bundle: common::Bundle| AttestAgentResult {
            svid: Some(AgentSvid { spiffe_id: String::new(), cert_chain: chain, expires_at: 0 }),
            bundle: Some(bundle),
            selectors: vec![],
        };
        let ok = check_result(&td, result(chain.clone(), wire_bundle.clone()), key.clone()).unwrap();
        assert_eq!(ok.credential.spiffe_id.as_str(), "spiffe://example.org/tessera/agent/join_token/t");

        let (_, other_key) = test_svid(&issuer, "spiffe://example.org/x");
        assert!(check_result(&td, result(chain.clone(), wire_bundle.clone()), other_key).is_err());

        let stranger = test_issuer("example.org");
        let stranger_bundle =
            common::Bundle { x509_authorities: vec![stranger.certificate_der().to_vec()], ..wire_bundle.clone() };
        let error = check_result(&td, result(chain.clone(), stranger_bundle), key.clone()).unwrap_err();
        assert!(error.contains("does not verify"), "{error}");

        let other_td = TrustDomain::new("other.org").unwrap();
        assert!(check_result(&other_td, result(chain, wire_bundle), key).is_err());
    }
}
