//! Agent SVID renewal: at half its lifetime ± 10%, `RenewAgent` with a new key; the new SVID
//! is checked, persisted (atomically, with its key) and then used for every new connection.
//! The server refuses the old serial once the new one is in use, so the channel is rebuilt and
//! the sync stream reopened over it.
//!
//! A failed renewal is retried with backoff (capped at a tenth of the remaining lifetime, at
//! least a second). If the agent SVID expires anyway (a long server outage), the agent cannot
//! authenticate any more and needs a new join token; this is logged as an error.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_wire::tessera::agent::v1::RenewAgentRequest;
use tokio::sync::watch;

use super::attest::check_against_bundle;
use super::keys::new_key_and_csr;
use super::{Backoff, Shared, not_before, renew_at, sleep_or_stop, until};
use crate::client::CALL_TIMEOUT;
use crate::storage::AgentCredential;

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    let mut expiry_logged = false;
    loop {
        let credential = shared.credential();
        let issued = credential.cert_chain.first().and_then(|leaf| not_before(leaf)).unwrap_or_else(SystemTime::now);
        let mut at = renew_at(issued, credential.expires_at, shared.jitter());
        let now = SystemTime::now();
        let tainted = {
            let chain: Vec<&[u8]> = credential.cert_chain.iter().map(Vec::as_slice).collect();
            let state = shared.state();
            super::state::signed_by_any(&chain, &state.tainted_x509, &shared.trust_domain, now)
        };
        if tainted {
            // Signed by an authority the server tainted: renew soon, spread across agents.
            let soon = now + super::state::spread(credential.spiffe_id.as_str(), super::state::TAINT_SPREAD);
            if soon < at {
                tracing::warn!("the agent SVID was signed by a tainted authority; renewing it early");
                at = soon;
            }
        }
        tracing::debug!(agent_id = %credential.spiffe_id, "agent SVID renewal in {:?}", until(at));
        tokio::select! {
            () = shared.renew_wakeup.notified() => continue,
            stopped = sleep_or_stop(until(at), &mut stop) => if stopped { return },
        }
        loop {
            let renewed = tokio::select! {
                renewed = renew_once(&shared) => renewed,
                _ = stop.changed() => return,
            };
            match renewed {
                Ok(renewed) => {
                    tracing::info!(agent_id = %renewed.spiffe_id, "agent SVID renewed");
                    backoff.reset();
                    expiry_logged = false;
                    break;
                }
                Err(reason) => {
                    let remaining = until(credential.expires_at);
                    if remaining.is_zero() && shared.reattest.is_some() {
                        match super::attest::reattest(&shared).await {
                            Ok(()) => {
                                backoff.reset();
                                break;
                            }
                            Err(reason) => tracing::error!("re-attestation after expiry failed: {reason}"),
                        }
                    } else if remaining.is_zero() && !expiry_logged {
                        expiry_logged = true;
                        tracing::error!(
                            "the agent SVID expired before it could be renewed: the agent must be attested again \
                             with a new join token"
                        );
                        shared.status.send_modify(|status| status.attested = false);
                    }
                    let delay = backoff.next_delay(&shared.rng).min((remaining / 10).max(Duration::from_secs(1)));
                    shared.server_errors.inc();
                    tracing::warn!("agent SVID renewal failed: {reason}; retrying in {delay:?}");
                    if sleep_or_stop(delay, &mut stop).await {
                        return;
                    }
                }
            }
        }
    }
}

async fn renew_once(shared: &Shared) -> Result<AgentCredential, String> {
    let generated = tokio::task::spawn_blocking(new_key_and_csr).await.map_err(|error| error.to_string())??;
    let mut request = tonic::Request::new(RenewAgentRequest { csr: generated.csr_der });
    request.set_timeout(CALL_TIMEOUT);
    let response = shared
        .client
        .agent()
        .renew_agent(request)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    let svid = response.svid.ok_or("the server sent no SVID")?;
    let renewed = AgentCredential::new(svid.cert_chain, generated.private_key_pkcs8)?;
    let current = shared.credential();
    if renewed.spiffe_id != current.spiffe_id {
        return Err(format!("the renewed SVID is for {}, expected {}", renewed.spiffe_id, current.spiffe_id));
    }
    let bundle = shared.state().bundles.own().clone();
    check_against_bundle(&renewed, &bundle)?;
    shared.install_credential(renewed.clone()).await?;
    Ok(renewed)
}
