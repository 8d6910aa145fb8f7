//! Workload X.509-SVID minting and rotation: one scheduler for every entry.
//!
//! The task sleeps until the earliest of: a wake-up from the sync task (entries changed), the
//! next renewal point, the next retry, or the next expiry. It then waits a short batching
//! window ([`BATCH_WINDOW`]) so a burst of upserts goes out together, collects every entry
//! that needs an SVID ([`super::state::State::mint_work`]), generates a key and CSR per entry
//! and calls `BatchNewX509Svid` with at most [`BATCH_SIZE`] items per call.
//!
//! The batches of a pass are pipelined: up to [`BATCHES_IN_FLIGHT`] are under way at once,
//! each going through its keys, its call, its check and the update of the state on its own, so
//! the next batches' keys are made while earlier calls are in flight and a batch's SVIDs are
//! checked while the next call is signed. Keys and checks are CPU work: they run on blocking
//! threads, a batch split into one task per core ([`on_cores`]). Each batch's results are
//! applied under the state lock at once and published, whatever the order the batches end in.
//!
//! Each returned SVID is checked before it is served: a usable X.509-SVID for the generated
//! key, with the entry's SPIFFE ID, verifying against the current bundle, in one parse
//! ([`verify_issued_x509_svid`]: the leaf's signature is checked for every SVID; the signature
//! of an intermediate CA over the same intermediates is checked once per check task). A per-item error
//! (or an unusable SVID) is logged and the entry retried after [`ITEM_RETRY`]; a failed call
//! backs the whole scheduler off (exponential, with jitter) while the cache keeps serving,
//! except a refusal by the server's per-agent signing rate limit (`RESOURCE_EXHAUSTED`), after
//! which the scheduler waits the time the server names ([`rate_limit_wait`]) and goes on: a
//! burst of thousands of new entries is then minted at the configured rate, where an
//! exponential backoff (up to 30 s between calls, against a bucket that holds 5 s of tokens)
//! made the rate decay the longer the burst lasted. Once a call has failed, no further batch
//! of the pass starts and batches whose keys are ready do not call; the calls already in flight
//! finish and their results are kept. When several calls failed, a failure other than the rate
//! limit wins (back off), else the longest wait named.
//! A result for an entry that was deleted or changed while the call was in flight is dropped
//! (the changed entry is minted again).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tessera_spiffe::bundle::BundleSet;
use tessera_spiffe::x509::{SignatureMemo, verify_issued_x509_svid};
use tessera_wire::tessera::agent::v1::new_x509_svid_result::Result as ItemResult;
use tessera_wire::tessera::agent::v1::{BatchNewX509SvidRequest, NewX509SvidParams, NewX509SvidResult};
use tokio::sync::watch;
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use super::keys::{KeyAndCsr, new_key_and_csr};
use super::state::{Minted, State};
use super::{Backoff, Shared, renew_at, sleep_or_stop, until};
use crate::cache::{CachedEntry, Deadline, X509Svid};
use crate::client::CALL_TIMEOUT;

/// Most entries per `BatchNewX509Svid` call.
pub const BATCH_SIZE: usize = 100;
/// Batches of one pass under way at once (keys, call, check): at most this many calls are in
/// flight per agent.
pub const BATCHES_IN_FLIGHT: usize = 3;
/// Fewest items one blocking task makes keys for or checks: smaller batches use fewer tasks.
const MIN_CHUNK: usize = 16;
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
    /// The failure to act on when both happened in one pass: one that is not the rate limit
    /// (back off), else the longer wait.
    fn or(self, other: Self) -> Self {
        match (self.retry_after, other.retry_after) {
            (None, _) => self,
            (Some(_), None) => other,
            (Some(mine), Some(theirs)) => {
                if theirs > mine {
                    other
                } else {
                    self
                }
            }
        }
    }

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

/// Set once a call of the pass failed: batches not yet calling leave their entries to the
/// next pass.
pub(crate) type Halt = Arc<AtomicBool>;

/// Mints for `work` in batches, [`BATCHES_IN_FLIGHT`] at a time; `Err` when a call failed as a
/// whole. Dropping the future abandons the batches under way (their blocking work finishes
/// unseen; nothing of them reaches the state).
async fn mint(shared: &Arc<Shared>, work: Vec<Arc<CachedEntry>>) -> Result<(), Failure> {
    let batches = work.chunks(BATCH_SIZE).map(<[_]>::to_vec).collect();
    run_batches(batches, BATCHES_IN_FLIGHT, |batch, halt| mint_batch(Arc::clone(shared), batch, halt)).await
}

/// Runs `start(batch, halt)` for every batch, at most `in_flight` at once, each as a task of
/// its own. After the first failure no batch starts and `halt` is set; the batches under way
/// finish. Returns the failure to act on ([`Failure::or`]). Dropping the future aborts the
/// tasks.
pub(crate) async fn run_batches<B, F, Fut>(batches: Vec<B>, in_flight: usize, mut start: F) -> Result<(), Failure>
where
    F: FnMut(B, Halt) -> Fut,
    Fut: Future<Output = Result<(), Failure>> + Send + 'static,
{
    let halt: Halt = Arc::new(AtomicBool::new(false));
    let mut batches = batches.into_iter();
    let mut running = JoinSet::new();
    let mut failure: Option<Failure> = None;
    loop {
        while failure.is_none() && running.len() < in_flight.max(1) {
            let Some(batch) = batches.next() else { break };
            running.spawn(start(batch, Arc::clone(&halt)));
        }
        let Some(joined) = running.join_next().await else { break };
        let outcome = joined.unwrap_or_else(|error| Err(format!("minting task: {error}").into()));
        if let Err(failed) = outcome {
            halt.store(true, Ordering::SeqCst);
            failure = Some(match failure.take() {
                Some(earlier) => earlier.or(failed),
                None => failed,
            });
        }
    }
    failure.map_or(Ok(()), Err)
}

/// One batch: keys, the call, the check, the update of the state.
async fn mint_batch(shared: Arc<Shared>, entries: Vec<Arc<CachedEntry>>, halt: Halt) -> Result<(), Failure> {
    let count = entries.len();
    let keys =
        on_cores(entries, |chunk| chunk.into_iter().map(|entry| new_key_and_csr().map(|key| (entry, key))).collect())
            .await?;
    let keyed = keys.into_iter().collect::<Result<Vec<_>, _>>().map_err(Failure::from)?;
    if halt.load(Ordering::SeqCst) {
        // Another call of this pass failed: these entries wait for the next pass.
        return Ok(());
    }
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
    // The bundle current when the answer came: the SVIDs are checked against it outside the lock.
    let bundles = shared.state().shared_bundles();
    let items: Vec<_> =
        keyed.into_iter().zip(response.results).map(|((entry, key), result)| (entry, key, result)).collect();
    let checker = Arc::clone(&shared);
    let checked = on_cores(items, move |chunk| {
        let mut memo = SignatureMemo::new();
        chunk
            .into_iter()
            .map(|(entry, key, result)| {
                let outcome = check_result(&entry, key, result, &bundles, now, checker.jitter(), &mut memo);
                (entry, outcome)
            })
            .collect()
    })
    .await?;
    let mut state = shared.state();
    if apply(&mut state, checked, now) {
        shared.publish(&mut state);
    }
    Ok(())
}

/// The cores to spread CPU work over.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// `work` over `items` on blocking threads: the items split in order into one chunk per core
/// (chunks of at least [`MIN_CHUNK`]), the results joined back in order.
async fn on_cores<T, R, W>(items: Vec<T>, work: W) -> Result<Vec<R>, Failure>
where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(Vec<T>) -> Vec<R> + Send + Sync + 'static,
{
    let tasks = cores().min(items.len().div_ceil(MIN_CHUNK)).max(1);
    let size = items.len().div_ceil(tasks).max(1);
    let work = Arc::new(work);
    let mut items = items.into_iter();
    let mut handles = Vec::with_capacity(tasks);
    loop {
        let chunk: Vec<T> = items.by_ref().take(size).collect();
        if chunk.is_empty() {
            break;
        }
        let work = Arc::clone(&work);
        handles.push(tokio::task::spawn_blocking(move || work(chunk)));
    }
    let mut results = Vec::new();
    for handle in handles {
        results.extend(handle.await.map_err(|error| format!("minting work on a blocking thread: {error}"))?);
    }
    Ok(results)
}

/// A returned SVID that passed the checks, to be kept if its entry did not change meanwhile.
pub(crate) struct Checked {
    leaf: Vec<u8>,
    /// The presented certificates after the leaf, served with it.
    intermediates: Vec<Vec<u8>>,
    private_key_pkcs8: Zeroizing<Vec<u8>>,
    expires_at: SystemTime,
    renew_at: SystemTime,
}

/// The outcome of one item of a call: an SVID to keep or why there is none.
fn check_result(
    entry: &CachedEntry,
    key: KeyAndCsr,
    result: NewX509SvidResult,
    bundles: &BundleSet,
    now: SystemTime,
    jitter: f64,
    memo: &mut SignatureMemo,
) -> Result<Checked, String> {
    if *result.entry_id != *entry.id {
        return Err(format!("result for entry {:?} in its place", result.entry_id));
    }
    match result.result {
        Some(ItemResult::Svid(svid)) => check_svid(entry, svid.cert_chain, key, bundles, now, jitter, memo),
        Some(ItemResult::Error(status)) => {
            Err(format!("the server refused (code {}): {}", status.code, status.message))
        }
        None => Err("an empty result".to_owned()),
    }
}

/// Checks a returned chain for the generated key and the entry, against `bundles`: one parse
/// of each certificate ([`verify_issued_x509_svid`]).
fn check_svid(
    entry: &CachedEntry,
    mut chain: Vec<Vec<u8>>,
    key: KeyAndCsr,
    bundles: &BundleSet,
    now: SystemTime,
    jitter: f64,
    memo: &mut SignatureMemo,
) -> Result<Checked, String> {
    if chain.is_empty() {
        return Err("an empty certificate chain".to_owned());
    }
    let verified = {
        let ders: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
        verify_issued_x509_svid(&ders, bundles, now, &key.public_key, memo)
            .map_err(|error| format!("unusable X.509-SVID: {error}"))?
    };
    if verified.spiffe_id() != &entry.spiffe_id {
        return Err(format!("the SVID is for {}, the entry for {}", verified.spiffe_id(), entry.spiffe_id));
    }
    let expires_at = verified.not_after();
    let issued_at = verified.not_before();
    let renew = renew_at(issued_at, expires_at, jitter);
    // Never schedule a renewal in the past (a clock far off, a tiny lifetime): that would spin.
    let renew = renew.max(now + Duration::from_millis(500)).min(expires_at.max(now));
    let leaf = chain.remove(0);
    Ok(Checked { leaf, intermediates: chain, private_key_pkcs8: key.private_key_pkcs8, expires_at, renew_at: renew })
}

/// Applies one batch's outcomes to the state at `now`: keeps the SVIDs of entries still held
/// at the revision they were minted for (a result for an entry deleted or changed while the
/// call was in flight is dropped), marks the failed ones for a retry after [`ITEM_RETRY`].
/// Returns whether an SVID was kept (the state is to be published).
pub(crate) fn apply(
    state: &mut State,
    outcomes: Vec<(Arc<CachedEntry>, Result<Checked, String>)>,
    now: SystemTime,
) -> bool {
    let mut changed = false;
    for (entry, outcome) in outcomes {
        match outcome {
            Ok(checked) => {
                // Deleted or changed while the call was in flight: dropped.
                if state.entry(&entry.id).is_none_or(|current| current.revision != entry.revision) {
                    continue;
                }
                tracing::debug!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "X.509-SVID minted");
                // One copy of an intermediate CA for all the SVIDs it signed. The leaf and key
                // are copied into one exact-size buffer; the decoded message and the generated
                // key (zeroed on drop) are freed with the batch.
                let intermediates = state.share_intermediates(&checked.intermediates);
                let svid = X509Svid::new(&checked.leaf, intermediates, &checked.private_key_pkcs8, checked.expires_at);
                let minted = Minted {
                    entry: Arc::clone(&entry),
                    svid: Arc::new(svid),
                    renew_at: Deadline::at(checked.renew_at),
                };
                state.set_minted(&entry.id, minted, now);
                changed = true;
            }
            Err(reason) => {
                tracing::warn!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "cannot mint an X.509-SVID: {reason}");
                state.set_retry(&entry.id, now + ITEM_RETRY, now);
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use tessera_spiffe::SpiffeId;
    use tessera_spiffe::bundle::Bundle;
    use tessera_spiffe::spiffe_id::TrustDomain;
    use tessera_spiffe::x509::{X509Issuer, X509SvidTemplate};
    use tessera_wire::tessera::agent::v1::sync_entries_response::Event;
    use tessera_wire::tessera::agent::v1::{EntryDeleted, EntrySnapshotPage, EntryUpserted};
    use tessera_wire::tessera::common::v1 as common;

    use super::*;
    use crate::manager::keys::test_issuer;

    fn wire_entry(id: &str, revision: u64) -> common::Entry {
        common::Entry {
            id: id.to_owned(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            parent_id: "spiffe://example.org/tessera/agent/join_token/t".to_owned(),
            selectors: vec![common::Selector { r#type: "unix".to_owned(), value: "uid:1000".to_owned() }],
            revision,
            ..common::Entry::default()
        }
    }

    /// A state holding `ids` (revision 1 each) and `issuer` as the own bundle.
    fn state_with(ids: &[&str], issuer: &X509Issuer, now: SystemTime) -> State {
        let trust_domain = TrustDomain::new("example.org").unwrap();
        let bundle = Bundle::from_x509_authorities_der(trust_domain.clone(), issuer.certificate_der()).unwrap();
        let mut state = State::new(trust_domain, Some(bundle));
        let entries = ids.iter().map(|id| wire_entry(id, 1)).collect();
        let page = EntrySnapshotPage { revision: 1, page: 0, entries, last_page: true };
        state.apply(Event::SnapshotPage(page), now).unwrap();
        state
    }

    /// A fresh key and the server's answer for it: an SVID for `spiffe_id` signed by `issuer`.
    fn answer(issuer: &X509Issuer, entry_id: &str, spiffe_id: &str, now: SystemTime) -> (KeyAndCsr, NewX509SvidResult) {
        let key = new_key_and_csr().unwrap();
        let template = X509SvidTemplate::new(SpiffeId::parse(spiffe_id).unwrap(), Duration::from_secs(600)).unwrap();
        let leaf =
            issuer.sign_x509_svid_from_csr(&template, &key.csr_der, now, &ring::rand::SystemRandom::new()).unwrap();
        let svid = tessera_wire::tessera::agent::v1::X509Svid {
            cert_chain: vec![leaf, issuer.certificate_der().to_vec()],
            ..Default::default()
        };
        (key, NewX509SvidResult { entry_id: entry_id.to_owned(), result: Some(ItemResult::Svid(svid)) })
    }

    /// Checks the answers for `ids` as the minter does, against the state's bundle.
    fn checked(
        state: &State,
        issuer: &X509Issuer,
        ids: &[&str],
        now: SystemTime,
    ) -> Vec<(Arc<CachedEntry>, Result<Checked, String>)> {
        let bundles = state.shared_bundles();
        let mut memo = SignatureMemo::new();
        ids.iter()
            .map(|id| {
                let entry = Arc::clone(state.entry(id).unwrap());
                let (key, result) = answer(issuer, id, entry.spiffe_id.as_str(), now);
                let outcome = check_result(&entry, key, result, &bundles, now, 0.0, &mut memo);
                (entry, outcome)
            })
            .collect()
    }

    #[test]
    fn results_for_entries_changed_or_deleted_while_batches_were_in_flight_are_dropped() {
        let now = SystemTime::now();
        let issuer = test_issuer("example.org");
        let mut state = state_with(&["a", "b", "c", "d"], &issuer, now);
        assert_eq!(state.mint_work(now).len(), 4);
        // Two batches in flight at once, both checked before either is applied.
        let first = checked(&state, &issuer, &["a", "b"], now);
        let mut second = checked(&state, &issuer, &["c", "d"], now);
        assert!(first.iter().chain(&second).all(|(_, outcome)| outcome.is_ok()));
        second[1].1 = Err("the server refused (code 3): no".to_owned());
        // Meanwhile b changes and c is deleted.
        let upsert = EntryUpserted { entry: Some(wire_entry("b", 2)), revision: 2 };
        state.apply(Event::EntryUpserted(upsert), now).unwrap();
        state.apply(Event::EntryDeleted(EntryDeleted { entry_id: "c".to_owned(), revision: 3 }), now).unwrap();

        // The second batch ends first.
        assert!(!apply(&mut state, second, now), "nothing kept: c is gone, d failed");
        assert!(apply(&mut state, first, now));
        assert!(state.minted("a").is_some());
        assert!(state.minted("b").is_none(), "minted for revision 1, the entry is at revision 2");
        assert!(state.entry("c").is_none() && state.minted("c").is_none());
        assert!(state.minted("d").is_none());
        let due: Vec<_> = state.mint_work(now).iter().map(|entry| entry.id.to_string()).collect();
        assert_eq!(due, ["b"], "b is minted again at once, d waits for its retry");
        let later: Vec<_> = state
            .mint_work(now + ITEM_RETRY + Duration::from_secs(1))
            .iter()
            .map(|entry| entry.id.to_string())
            .collect();
        assert_eq!(later, ["b", "d"]);
        let kept = state.minted("a").unwrap();
        assert_eq!(kept.svid.intermediates().len(), 1);
        assert!(kept.renew_at.time() > now && kept.renew_at.time() < now + Duration::from_secs(600));
    }

    #[test]
    fn returned_svids_are_checked_for_the_key_the_entry_and_the_bundle() {
        let now = SystemTime::now();
        let issuer = test_issuer("example.org");
        let state = state_with(&["a", "b"], &issuer, now);
        let bundles = state.shared_bundles();
        let mut memo = SignatureMemo::new();
        let entry = Arc::clone(state.entry("a").unwrap());
        let check = |key, result, memo: &mut SignatureMemo| check_result(&entry, key, result, &bundles, now, 0.0, memo);

        let (key, result) = answer(&issuer, "a", "spiffe://example.org/a", now);
        assert!(check(key, result, &mut memo).is_ok());
        // An SVID for another key than the one generated.
        let (_, result) = answer(&issuer, "a", "spiffe://example.org/a", now);
        let other_key = new_key_and_csr().unwrap();
        let error = check(other_key, result, &mut memo).err().unwrap();
        assert!(error.contains("private key does not match") || error.contains("key"), "{error}");
        // An SVID for another SPIFFE ID.
        let (key, result) = answer(&issuer, "a", "spiffe://example.org/b", now);
        assert!(check(key, result, &mut memo).err().unwrap().contains("the SVID is for spiffe://example.org/b"));
        // Signed by a CA that is not in the bundle.
        let stranger = test_issuer("example.org");
        let (key, result) = answer(&stranger, "a", "spiffe://example.org/a", now);
        assert!(check(key, result, &mut memo).err().unwrap().starts_with("unusable X.509-SVID"));
        // The result of another entry in its place, a refusal, an empty result.
        let (key, result) = answer(&issuer, "b", "spiffe://example.org/b", now);
        assert!(check(key, result, &mut memo).err().unwrap().contains("in its place"));
        let (key, mut result) = answer(&issuer, "a", "spiffe://example.org/a", now);
        result.result = None;
        assert_eq!(check(key, result, &mut memo).err().unwrap(), "an empty result");
        let (key, mut result) = answer(&issuer, "a", "spiffe://example.org/a", now);
        result.result = Some(ItemResult::Svid(tessera_wire::tessera::agent::v1::X509Svid::default()));
        assert_eq!(check(key, result, &mut memo).err().unwrap(), "an empty certificate chain");
    }

    fn rate_limited(millis: u64) -> Failure {
        Failure { reason: format!("rate limit {millis}"), retry_after: Some(Duration::from_millis(millis)) }
    }

    #[tokio::test]
    async fn batches_run_at_most_in_flight_at_once_and_all_run() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Mutex::new(Vec::new()));
        let result = run_batches((0..10).collect(), 3, |batch: usize, _halt| {
            let (running, most, done) = (Arc::clone(&running), Arc::clone(&most), Arc::clone(&done));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                for _ in 0..5 {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                done.lock().unwrap().push(batch);
                Ok(())
            }
        })
        .await;
        assert!(result.is_ok());
        let mut done = done.lock().unwrap().clone();
        done.sort_unstable();
        assert_eq!(done, (0..10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 3, "three batches under way at once, never more");
    }

    /// Runs 8 batches, 3 at a time; batch `i` ends with `outcomes(i)` once the pass is halted
    /// (or at once if it is the one that fails first). Returns the result, the batches started
    /// and those that saw the halt.
    async fn failing_pass(
        first_failure: usize,
        outcome: impl Fn(usize) -> Result<(), Failure> + Send + Sync + 'static,
    ) -> (Result<(), Failure>, Vec<usize>, Vec<usize>) {
        let outcome = Arc::new(outcome);
        let started = Arc::new(Mutex::new(Vec::new()));
        let halted = Arc::new(Mutex::new(Vec::new()));
        let result = run_batches((0..8).collect(), 3, |batch: usize, halt: Halt| {
            let (outcome, started, halted) = (Arc::clone(&outcome), Arc::clone(&started), Arc::clone(&halted));
            started.lock().unwrap().push(batch);
            async move {
                if batch != first_failure {
                    // In flight until the failing call has been seen by the pass.
                    while !halt.load(Ordering::SeqCst) {
                        tokio::task::yield_now().await;
                    }
                    halted.lock().unwrap().push(batch);
                }
                outcome(batch)
            }
        })
        .await;
        let started = started.lock().unwrap().clone();
        let halted = halted.lock().unwrap().clone();
        (result, started, halted)
    }

    #[tokio::test]
    async fn a_failed_call_among_several_in_flight_stops_the_pass_and_backs_off() {
        // Batch 1's call fails; batches 0 and 2 are in flight and finish; nothing else starts.
        let (result, started, mut halted) =
            failing_pass(1, |batch| if batch == 1 { Err("Unavailable: down".to_owned().into()) } else { Ok(()) }).await;
        let failure = result.unwrap_err();
        assert_eq!((failure.reason.as_str(), failure.retry_after), ("Unavailable: down", None));
        assert_eq!(started, [0, 1, 2]);
        halted.sort_unstable();
        assert_eq!(halted, [0, 2]);

        // A plain failure wins over a rate-limit refusal in the same pass: back off.
        let (result, _, _) = failing_pass(0, |batch| match batch {
            0 => Err(rate_limited(400)),
            2 => Err("Internal: broken".to_owned().into()),
            _ => Ok(()),
        })
        .await;
        assert_eq!(result.unwrap_err().retry_after, None);
        let (result, _, _) = failing_pass(2, |batch| match batch {
            0 => Err("Internal: broken".to_owned().into()),
            2 => Err(rate_limited(400)),
            _ => Ok(()),
        })
        .await;
        assert_eq!(result.unwrap_err().retry_after, None);

        // Only rate-limit refusals: the longest wait named.
        let (result, started, _) = failing_pass(1, |batch| match batch {
            0 => Err(rate_limited(900)),
            1 => Err(rate_limited(200)),
            _ => Ok(()),
        })
        .await;
        assert_eq!(result.unwrap_err().retry_after, Some(Duration::from_millis(900)));
        assert_eq!(started, [0, 1, 2]);
    }

    #[tokio::test]
    async fn work_is_split_over_the_cores_in_order() {
        let items: Vec<usize> = (0..100).collect();
        let chunks = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&chunks);
        let doubled = on_cores(items, move |chunk| {
            counter.fetch_add(1, Ordering::SeqCst);
            chunk.into_iter().map(|n| n * 2).collect()
        })
        .await
        .unwrap();
        assert_eq!(doubled, (0..100).map(|n| n * 2).collect::<Vec<_>>());
        assert_eq!(chunks.load(Ordering::SeqCst), cores().min(100usize.div_ceil(MIN_CHUNK)));
        assert!(on_cores(Vec::<u8>::new(), |chunk| chunk).await.unwrap().is_empty());
    }

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
