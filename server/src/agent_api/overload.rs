//! Overload protection: server-wide bounds on the agent API's attestation and signing work
//! (spec: server-agent-flow §10; keys `max_concurrent_attestations`, `max_concurrent_signing`,
//! `overload_wait`).
//!
//! Each kind of work has one [`WorkLimit`]:
//!
//! - at most `permits` calls do the work at once (a permit is held until the call's work is
//!   done);
//! - a call that finds every permit taken waits at most `overload_wait` for one, and at most
//!   [`QUEUE_FACTOR`] × `permits` calls wait at the same time;
//! - a call that finds the queue full, or whose wait runs out, is refused with `UNAVAILABLE`
//!   and a message naming the configuration key, before doing any work. Agents treat
//!   `UNAVAILABLE` as retryable and back off with jitter.
//!
//! So the work in progress, and the requests held while waiting, are bounded whatever the
//! number of agents calling: a reconnect storm after an outage is served at the rate the
//! server can sustain, and the excess is told to come back later instead of piling up in
//! memory. Refusals are logged at most once per [`LOG_EVERY`] per kind of work, with the
//! number refused since the previous line, so a storm does not flood the log.
//!
//! The per-agent rate (`agent_svid_rate_limit`, [`super::rate`]) is a different limit: it
//! answers `RESOURCE_EXHAUSTED` to one agent asking for too much, whatever the server's load.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Calls allowed to wait for a permit, per permit.
pub(crate) const QUEUE_FACTOR: usize = 8;
/// Shortest interval between two log lines about refusals of one kind of work.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(1);

/// How every overload refusal's message starts.
pub(crate) const OVERLOADED: &str = "server overloaded: ";

/// Whether `status` is an overload refusal of a [`WorkLimit`].
pub(crate) fn is_overload(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().starts_with(OVERLOADED)
}

/// The permit a call holds while it does limited work; dropping it frees the slot.
pub(crate) type WorkPermit = OwnedSemaphorePermit;

/// The bound on one kind of work (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct WorkLimit {
    /// What the work is, for messages: "attestation", "signing".
    work: &'static str,
    /// The configuration key that sets `permits`.
    key: &'static str,
    permits: usize,
    semaphore: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    wait: Duration,
    refused: AtomicU64,
    log: Mutex<RefusalLog>,
}

#[derive(Debug)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

/// Leaves the queue when dropped, also when the waiting call is cancelled.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WorkLimit {
    /// A limit of `permits` concurrent calls (at least 1), each waiting at most `wait`.
    pub(crate) fn new(work: &'static str, key: &'static str, permits: usize, wait: Duration) -> Self {
        let permits = permits.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            work,
            key,
            permits,
            semaphore: Arc::new(Semaphore::new(permits)),
            waiting: AtomicUsize::new(0),
            max_waiting: permits.saturating_mul(QUEUE_FACTOR),
            wait,
            refused: AtomicU64::new(0),
            log: Mutex::new(RefusalLog { last: None, unlogged: 0 }),
        }
    }

    /// A permit for one call's work, or `UNAVAILABLE` when the server is saturated.
    pub(crate) async fn acquire(&self) -> Result<WorkPermit, Status> {
        if let Ok(permit) = Arc::clone(&self.semaphore).try_acquire_owned() {
            return Ok(permit);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        let queued = Queued(&self.waiting);
        if self.wait.is_zero() || ahead >= self.max_waiting {
            drop(queued);
            return Err(self.refuse(format!(
                "{OVERLOADED}all {} {} slots are busy and {ahead} calls are waiting ({} = {}); retry with backoff",
                self.permits, self.work, self.key, self.permits
            )));
        }
        let acquired = tokio::time::timeout(self.wait, Arc::clone(&self.semaphore).acquire_owned()).await;
        drop(queued);
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; answer as for a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(self.refuse(format!(
                "{OVERLOADED}no {} slot became free within overload_wait ({}; {} = {}); retry with backoff",
                self.work,
                humantime::format_duration(self.wait),
                self.key,
                self.permits
            ))),
        }
    }

    /// Up to `wanted` more permits among those free right now, without waiting and without
    /// counting a refusal: a call that already holds its permit spreads its work over more
    /// threads with them. None are free while calls wait (the semaphore hands released permits
    /// to the waiters first), so under load the call works on its one permit.
    pub(crate) fn try_acquire_free(&self, wanted: usize) -> Vec<WorkPermit> {
        (0..wanted).map_while(|_| Arc::clone(&self.semaphore).try_acquire_owned().ok()).collect()
    }

    /// Calls refused so far.
    #[cfg(test)]
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Counts and (rate-limited) logs a refusal; returns its status.
    fn refuse(&self, message: String) -> Status {
        let total = self.refused.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let now = Instant::now();
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.unlogged += 1;
        if log.last.is_none_or(|last| now.duration_since(last) >= LOG_EVERY) {
            tracing::warn!(
                work = self.work,
                refused = log.unlogged,
                refused_total = total,
                limit = self.permits,
                "agent API overloaded: {} {} call(s) refused with UNAVAILABLE since the last report; raise {} or \
                 overload_wait if this persists",
                log.unlogged,
                self.work,
                self.key
            );
            log.last = Some(now);
            log.unlogged = 0;
        }
        Status::unavailable(message)
    }
}

/// The limits of one server's agent API.
#[derive(Debug)]
pub(crate) struct Limits {
    /// `AttestAgent`.
    pub(crate) attestation: WorkLimit,
    /// `BatchNewX509Svid`, `NewJwtSvid`, `RenewAgent`.
    pub(crate) signing: WorkLimit,
}

impl Limits {
    /// The limits the configuration asks for.
    pub(crate) fn from_config(config: &crate::config::ServerConfig) -> Self {
        Self {
            attestation: WorkLimit::new(
                "attestation",
                "max_concurrent_attestations",
                config.attestation_concurrency(),
                config.overload_wait,
            ),
            signing: WorkLimit::new(
                "signing",
                "max_concurrent_signing",
                config.signing_concurrency(),
                config.overload_wait,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    /// Extra permits come only from free slots, never from a call that waits.
    #[tokio::test]
    async fn free_permits_are_taken_without_waiting_and_never_ahead_of_a_waiting_call() {
        let limit = Arc::new(WorkLimit::new("signing", "max_concurrent_signing", 3, Duration::from_secs(30)));
        let first = limit.acquire().await.unwrap();
        let mut extra = limit.try_acquire_free(5);
        assert_eq!(extra.len(), 2, "the two free slots, no more");
        assert!(limit.try_acquire_free(1).is_empty());
        let waiter = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.acquire().await.map(drop) }
        });
        // Wait (generously) until the call is queued, then free one slot: it goes to the waiter.
        let deadline = Instant::now() + Duration::from_secs(30);
        while limit.waiting.load(Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "the call never queued");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(extra.pop());
        assert!(limit.try_acquire_free(1).is_empty(), "the freed slot belongs to the waiting call");
        waiter.await.unwrap().unwrap();
        assert_eq!(limit.try_acquire_free(5).len(), 1, "the waiter's slot is free again once it is done");
        assert_eq!(limit.refused(), 0, "taking free permits refuses nothing");
        drop(first);
    }

    #[tokio::test]
    async fn a_full_limit_refuses_after_the_wait_and_serves_once_a_permit_is_free() {
        let limit = WorkLimit::new("signing", "max_concurrent_signing", 2, Duration::from_millis(30));
        let (a, b) = (limit.acquire().await.unwrap(), limit.acquire().await.unwrap());
        let started = Instant::now();
        let status = limit.acquire().await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(is_overload(&status));
        assert!(status.message().contains("max_concurrent_signing = 2"), "{}", status.message());
        assert!(status.message().contains("retry with backoff"), "{}", status.message());
        assert_eq!(limit.refused(), 1);
        drop(a);
        let c = limit.acquire().await.unwrap();
        drop((b, c));
        assert_eq!(limit.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_waiting_call_gets_the_permit_released_during_its_wait() {
        let limit = Arc::new(WorkLimit::new("attestation", "max_concurrent_attestations", 1, Duration::from_secs(5)));
        let held = limit.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.acquire().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(limit.refused(), 0);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_excess_is_refused_at_once() {
        let limit = Arc::new(WorkLimit::new("signing", "max_concurrent_signing", 1, Duration::from_secs(30)));
        let held = limit.acquire().await.unwrap();
        let waiters: Vec<_> = (0..QUEUE_FACTOR)
            .map(|_| {
                let limit = Arc::clone(&limit);
                tokio::spawn(async move { limit.acquire().await.map(drop) })
            })
            .collect();
        while limit.waiting.load(Ordering::Acquire) < QUEUE_FACTOR {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let status = limit.acquire().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "refused without waiting");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("8 calls are waiting"), "{}", status.message());
        drop(held);
        for waiter in waiters {
            assert!(waiter.await.unwrap().is_ok(), "every queued call is served in turn");
        }
        assert_eq!(limit.refused(), 1);
        assert_eq!(limit.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_zero_wait_refuses_at_once_and_a_cancelled_waiter_leaves_the_queue() {
        let limit = WorkLimit::new("signing", "max_concurrent_signing", 1, Duration::ZERO);
        let held = limit.acquire().await.unwrap();
        assert_eq!(limit.acquire().await.unwrap_err().code(), Code::Unavailable);
        drop(held);

        let limit = WorkLimit::new("signing", "max_concurrent_signing", 1, Duration::from_secs(30));
        let held = limit.acquire().await.unwrap();
        let cancelled = tokio::time::timeout(Duration::from_millis(10), limit.acquire()).await;
        assert!(cancelled.is_err());
        assert_eq!(limit.waiting.load(Ordering::Acquire), 0);
        drop(held);
    }
}
