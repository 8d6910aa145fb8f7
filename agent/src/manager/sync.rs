//! The `SyncEntries` stream: one long-lived server-push stream, reopened with the last fully
//! applied revision whenever it ends (server restart, network failure, agent SVID renewal),
//! after an exponential backoff with jitter. While it is down the cache keeps serving.

use std::sync::Arc;
use std::time::SystemTime;

use tessera_wire::tessera::agent::v1::SyncEntriesRequest;
use tokio::sync::watch;
use tonic::Code;

use super::{Backoff, Shared, sleep_or_stop};

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    let mut generation = shared.client.generation();
    loop {
        if *stop.borrow() {
            return;
        }
        generation.borrow_and_update();
        let revision = shared.state().revision;
        let mut client = shared.client.agent();
        let opened = tokio::select! {
            opened = client.sync_entries(SyncEntriesRequest { revision }) => opened,
            _ = stop.changed() => return,
        };
        let mut refused = false;
        match opened {
            Ok(response) => {
                tracing::debug!(revision, "sync stream open");
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        _ = generation.changed() => {
                            tracing::debug!("agent SVID renewed; reopening the sync stream");
                            break;
                        }
                        _ = stop.changed() => return,
                    };
                    match message {
                        Ok(Some(response)) => {
                            let Some(event) = response.event else {
                                tracing::warn!("ignoring an empty sync event");
                                continue;
                            };
                            match apply(&shared, event) {
                                // Only a stream that delivers usable events resets the backoff.
                                Ok(()) => backoff.reset(),
                                Err(reason) => {
                                    tracing::warn!("sync protocol error, reopening the stream: {reason}");
                                    break;
                                }
                            }
                        }
                        Ok(None) => {
                            tracing::info!("the server closed the sync stream");
                            break;
                        }
                        Err(status) => {
                            refused = report_failure(&shared, &status, "sync stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) => refused = report_failure(&shared, &status, "cannot open the sync stream"),
        }
        if refused && shared.reattest.is_some() {
            match super::attest::reattest(&shared).await {
                Ok(()) => {
                    backoff.reset();
                    continue;
                }
                Err(reason) => tracing::error!("re-attestation failed: {reason}"),
            }
        }
        shared.state().stream_reset();
        shared.status.send_modify(|status| status.connected = false);
        let delay = backoff.next_delay(&shared.rng);
        tracing::info!("reconnecting to the server in {delay:?}; serving cached identities meanwhile");
        if sleep_or_stop(delay, &mut stop).await {
            return;
        }
    }
}

/// Applies one event under the state lock, publishes, and wakes the minter.
fn apply(shared: &Shared, event: tessera_wire::tessera::agent::v1::sync_entries_response::Event) -> Result<(), String> {
    let now = SystemTime::now();
    let (applied, revision, own_bundle) = {
        let mut state = shared.state();
        let applied = state.apply(event, now)?;
        if applied.entries_changed || applied.bundles_changed || applied.synced {
            shared.publish(&mut state);
        }
        (applied, state.revision, state.bundles.own().clone())
    };
    if applied.bundles_changed {
        if let Ok(mut trust) = shared.trust.write() {
            trust.bundle = Some(own_bundle.clone());
            trust.insecure_first_use = false;
        }
        if let Err(error) = shared.storage.save_bundle(&own_bundle) {
            tracing::error!("cannot persist the trust bundle: {error}");
        }
    }
    if applied.entries_changed || applied.taint_changed {
        shared.mint_wakeup.notify_one();
    }
    if applied.taint_changed {
        shared.renew_wakeup.notify_one();
    }
    shared.status.send_modify(|status| {
        status.connected = true;
        status.attested = true;
        status.revision = revision;
        if applied.synced || (status.last_sync.is_some() && applied.entries_changed) {
            status.last_sync = Some(now);
        }
    });
    Ok(())
}

/// Logs a failed sync call; true when it is a refusal. A refusal (evicted, banned, or an agent
/// SVID the server no longer accepts) also marks the agent as not attested: retrying keeps the
/// cache serving and picks up an un-ban. A re-attestable agent (x509pop, k8s_psat, oidc) attests again; a
/// join-token agent needs the operator.
fn report_failure(shared: &Shared, status: &tonic::Status, what: &str) -> bool {
    shared.server_errors.inc();
    if matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated) {
        let next = if shared.reattest.is_some() {
            "attesting again"
        } else {
            "if it was evicted, attest it again with a new join token"
        };
        tracing::error!(code = ?status.code(), "{what}: the server refuses this agent: {}; {next}", status.message());
        shared.status.send_modify(|status| status.attested = false);
        true
    } else {
        tracing::warn!(code = ?status.code(), "{what}: {}", status.message());
        false
    }
}
