//! Workload X.509-SVID minting and rotation: one scheduler for every entry.
//!
//! The task sleeps until the earliest of: a wake-up from the sync task (entries changed), the
//! next renewal point, the next retry, or the next expiry. It then waits a short batching
//! window ([`BATCH_WINDOW`]) so a burst of upserts goes out together, collects every entry
//! that needs an SVID ([`super::state::State::mint_work`]), generates a key and CSR per entry
//! and calls `BatchNewX509Svid` with at most [`BATCH_SIZE`] items per call.
//!
//! Each returned SVID is checked before it is served: a usable X.509-SVID for the generated
//! key, with the entry's SPIFFE ID, verifying against the current bundle. A per-item error
//! (or an unusable SVID) is logged and the entry retried after [`ITEM_RETRY`]; a failed call
//! backs the whole scheduler off (exponential, with jitter) while the cache keeps serving,
//! except a refusal by the server's per-agent signing rate limit (`RESOURCE_EXHAUSTED`), after
//! which the scheduler waits the time the server names ([`rate_limit_wait`]) and goes on: a
//! burst of thousands of new entries is then minted at the configured rate, where an
//! exponential backoff (up to 30 s between calls, against a bucket that holds 5 s of tokens)
//! made the rate decay the longer the burst lasted.
//! A result for an entry that was deleted or changed while the call was in flight is dropped
//! (the changed entry is minted again).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_spiffe::x509::{X509Svid as ParsedSvid, concat_der_certificates, verify_x509_svid};
use tessera_wire::tessera::agent::v1::new_x509_svid_result::Result as ItemResult;
use tessera_wire::tessera::agent::v1::{BatchNewX509SvidRequest, NewX509SvidParams};
use tokio::sync::watch;

use super::keys::{KeyAndCsr, new_key_and_csr};
use super::state::Minted;
use super::{Backoff, Shared, not_before, renew_at, sleep_or_stop, until};
use crate::cache::{CachedEntry, Deadline, X509Svid};
use crate::client::CALL_TIMEOUT;

/// Most entries per `BatchNewX509Svid` call.
pub const BATCH_SIZE: usize = 100;
/// How long to wait after a wake-up so that changes arriving together are minted together.
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// When to retry an entry whose SVID could not be minted.
pub const ITEM_RETRY: Duration = Duration::from_secs(5);
/// Shortest wait after a rate-limit refusal, whatever the server says.
pub const RATE_LIMIT_WAIT_MIN: Duration = Duration::from_millis(10);
/// Longest wait after a rate-limit refusal, whatever the server says.
pub const RATE_LIMIT_WAIT_MAX: Duration = Duration::from_secs(30);
/// The wait after a rate-limit refusal that does not say how long to wait.
pub const RATE_LIMIT_WAIT_DEFAULT: Duration = Duration::from_secs(1);
/// Longest sleep without a reason (a safety net; every real event wakes the task).
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    loop {
        // An SVID that expired (say, the server was unreachable for its whole second half)
        // leaves the snapshot at once, whatever else happens.
        {
            let mut state = shared.state();
            if state.drop_expired(SystemTime::now()) {
                tracing::warn!("X.509-SVIDs expired before they could be renewed; they are no longer served");
                shared.publish(&mut state);
            }
        }
        let work = shared.state().mint_work(SystemTime::now());
        if !work.is_empty() {
            // Shutdown does not wait for a slow server; abandoning a batch leaves the state
            // consistent (results are applied under the lock, all at once per batch).
            let minted = tokio::select! {
                minted = mint(&shared, work) => minted,
                _ = stop.changed() => return,
            };
            match minted {
                Ok(()) => backoff.reset(),
                Err(Failure { reason, retry_after: Some(wait) }) => {
                    // The server's signing rate limit: it said when the call will be accepted.
                    // Waiting exactly that long keeps a long burst at the configured rate; an
                    // exponential backoff would let the rate decay to a batch per 30 s.
                    backoff.reset();
                    tracing::debug!("minting paused by the server's rate limit for {wait:?}: {reason}");
                    let expiry = shared.state().next_deadline(SystemTime::now()).map_or(wait, until);
                    if sleep_or_stop(wait.min(expiry), &mut stop).await {
                        return;
                    }
                    continue;
                }
                Err(Failure { reason, retry_after: None }) => {
                    let delay = backoff.next_delay(&shared.rng);
                    shared.server_errors.inc();
                    tracing::warn!("minting X.509-SVIDs failed: {reason}; retrying in {delay:?}");
                    // Sleep for the backoff, but never past the next expiry.
                    let expiry = shared.state().next_deadline(SystemTime::now()).map_or(delay, until);
                    if sleep_or_stop(delay.min(expiry), &mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let deadline = shared.state().next_deadline(SystemTime::now());
        let sleep = deadline.map_or(IDLE_CHECK, until).min(IDLE_CHECK);
        tokio::select! {
            () = shared.mint_wakeup.notified() => {
                tokio::time::sleep(BATCH_WINDOW).await;
            }
            () = tokio::time::sleep(sleep) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Why a minting pass stopped: a call failed as a whole.
#[derive(Debug)]
pub(crate) struct Failure {
    reason: String,
    /// Set when the server's rate limit refused the call: how long until it accepts it.
    retry_after: Option<Duration>,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self { reason, retry_after: None }
    }
}

impl Failure {
    fn from_status(status: &tonic::Status) -> Self {
        let reason = format!("{:?}: {}", status.code(), status.message());
        let retry_after = (status.code() == tonic::Code::ResourceExhausted).then(|| rate_limit_wait(status));
        Self { reason, retry_after }
    }
}

/// The wait a rate-limit refusal asks for ([`tessera_wire::RETRY_AFTER_MS_METADATA`]), within
/// [`RATE_LIMIT_WAIT_MIN`] and [`RATE_LIMIT_WAIT_MAX`]; [`RATE_LIMIT_WAIT_DEFAULT`] when the
/// server sent none or an unreadable one.
pub(crate) fn rate_limit_wait(status: &tonic::Status) -> Duration {
    status
        .metadata()
        .get(tessera_wire::RETRY_AFTER_MS_METADATA)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(RATE_LIMIT_WAIT_DEFAULT, |millis| {
            Duration::from_millis(millis).clamp(RATE_LIMIT_WAIT_MIN, RATE_LIMIT_WAIT_MAX)
        })
}

/// Mints for `work` in batches; `Err` when a call failed as a whole.
async fn mint(shared: &Arc<Shared>, work: Vec<Arc<CachedEntry>>) -> Result<(), Failure> {
    for chunk in work.chunks(BATCH_SIZE) {
        let entries = chunk.to_vec();
        let count = entries.len();
        // Key generation is CPU work: keep it off the async workers.
        let keyed = tokio::task::spawn_blocking(move || {
            entries.into_iter().map(|entry| new_key_and_csr().map(|key| (entry, key))).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|error| format!("key generation task: {error}"))?
        .map_err(Failure::from)?;
        let params = keyed
            .iter()
            .map(|(entry, key)| NewX509SvidParams { entry_id: entry.id.to_string(), csr: key.csr_der.clone() })
            .collect();
        let mut request = tonic::Request::new(BatchNewX509SvidRequest { params });
        request.set_timeout(CALL_TIMEOUT);
        let response = shared
            .client
            .agent()
            .batch_new_x509_svid(request)
            .await
            .map_err(|status| Failure::from_status(&status))?
            .into_inner();
        if response.results.len() != count {
            return Err(format!("the server answered {} results for {count} requests", response.results.len()).into());
        }
        let now = SystemTime::now();
        let mut accepted = Vec::with_capacity(count);
        let mut failed = Vec::new();
        for ((entry, key), result) in keyed.into_iter().zip(response.results) {
            if *result.entry_id != *entry.id {
                failed.push((entry, format!("result for entry {:?} in its place", result.entry_id)));
                continue;
            }
            match result.result {
                Some(ItemResult::Svid(svid)) => match check_svid(shared, &entry, svid.cert_chain, key, now) {
                    Ok(minted) => accepted.push((entry, minted)),
                    Err(reason) => failed.push((entry, reason)),
                },
                Some(ItemResult::Error(status)) => {
                    failed.push((entry, format!("the server refused (code {}): {}", status.code, status.message)));
                }
                None => failed.push((entry, "an empty result".to_owned())),
            }
        }
        let mut state = shared.state();
        let mut changed = false;
        for (entry, minted) in accepted {
            // Drop results for entries deleted or changed while the call was in flight.
            if state.entry(&entry.id).is_some_and(|current| current.revision == entry.revision) {
                tracing::debug!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "X.509-SVID minted");
                state.set_minted(&entry.id, minted, now);
                changed = true;
            }
        }
        for (entry, reason) in failed {
            tracing::warn!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "cannot mint an X.509-SVID: {reason}");
            state.set_retry(&entry.id, now + ITEM_RETRY, now);
        }
        if changed {
            shared.publish(&mut state);
        }
    }
    Ok(())
}

/// Checks a returned chain for the generated key and the entry, against the current bundle.
fn check_svid(
    shared: &Shared,
    entry: &Arc<CachedEntry>,
    chain: Vec<Vec<u8>>,
    key: KeyAndCsr,
    now: SystemTime,
) -> Result<Minted, String> {
    let parsed = ParsedSvid::parse(&concat_der_certificates(&chain), &key.private_key_pkcs8, &shared.rng)
        .map_err(|error| format!("unusable X.509-SVID: {error}"))?;
    if parsed.spiffe_id() != &entry.spiffe_id {
        return Err(format!("the SVID is for {}, the entry for {}", parsed.spiffe_id(), entry.spiffe_id));
    }
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("an empty certificate chain".to_owned());
    };
    let intermediates = {
        let mut state = shared.state();
        let ders: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
        verify_x509_svid(&ders, &state.bundles, now)
            .map_err(|error| format!("the SVID does not verify against the bundle: {error}"))?;
        // One copy of an intermediate CA for all the SVIDs it signed.
        state.share_intermediates(rest)
    };
    let expires_at = parsed.not_after();
    let issued_at = not_before(leaf).unwrap_or(now);
    let renew = renew_at(issued_at, expires_at, shared.jitter());
    // Never schedule a renewal in the past (a clock far off, a tiny lifetime): that would spin.
    let renew = renew.max(now + Duration::from_millis(500)).min(expires_at.max(now));
    // The leaf and key are copied into one exact-size buffer; the decoded message and the
    // generated key (zeroed on drop) are freed with the batch.
    let svid = X509Svid::new(leaf, intermediates, &key.private_key_pkcs8, expires_at);
    Ok(Minted { entry: Arc::clone(entry), svid: Arc::new(svid), renew_at: Deadline::at(renew) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(hint: Option<&str>) -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted("agent_svid_rate_limit: retry in 0.4 s");
        if let Some(hint) = hint {
            status.metadata_mut().insert(tessera_wire::RETRY_AFTER_MS_METADATA, hint.parse().unwrap());
        }
        status
    }

    #[test]
    fn a_rate_limit_refusal_waits_what_the_server_names_within_bounds() {
        assert_eq!(rate_limit_wait(&refusal(Some("400"))), Duration::from_millis(400));
        assert_eq!(rate_limit_wait(&refusal(Some("0"))), RATE_LIMIT_WAIT_MIN);
        assert_eq!(rate_limit_wait(&refusal(Some("99999999999"))), RATE_LIMIT_WAIT_MAX);
        assert_eq!(rate_limit_wait(&refusal(Some("soon"))), RATE_LIMIT_WAIT_DEFAULT);
        assert_eq!(rate_limit_wait(&refusal(None)), RATE_LIMIT_WAIT_DEFAULT);

        let limited = Failure::from_status(&refusal(Some("250")));
        assert_eq!(limited.retry_after, Some(Duration::from_millis(250)));
        // Any other failure backs off exponentially, hint or not.
        let mut unavailable = tonic::Status::unavailable("max_concurrent_signing");
        unavailable.metadata_mut().insert(tessera_wire::RETRY_AFTER_MS_METADATA, "5".parse().unwrap());
        assert_eq!(Failure::from_status(&unavailable).retry_after, None);
    }
}
