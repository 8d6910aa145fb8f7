//! Per-agent signing rate limit (`agent_svid_rate_limit`): a token bucket per agent SPIFFE ID.
//!
//! Each signed SVID costs one token (a batch costs its item count); the bucket refills at the
//! configured rate and holds at most `max(rate, MAX_BATCH)` tokens, so an idle agent can always
//! send one full batch. A call that finds too few tokens is refused as a whole with
//! `RESOURCE_EXHAUSTED` (retryable), which carries the wait until the call would be accepted in
//! the `tessera-retry-after-ms` metadata ([`tessera_wire::RETRY_AFTER_MS_METADATA`]): the agent
//! waits exactly that long rather than backing off exponentially, so a burst of new entries is
//! signed at the configured rate instead of ever more slowly. The map is bounded: when it
//! grows past [`MAX_TRACKED`], buckets that have refilled completely (idle agents) are dropped.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use tessera_spiffe::SpiffeId;
use tonic::Status;

use super::MAX_BATCH;

/// Agents tracked before idle buckets are pruned.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limiter of one server; rate 0 = unlimited.
#[derive(Debug)]
pub(crate) struct SigningRateLimit {
    rate: f64,
    capacity: f64,
    buckets: Mutex<HashMap<SpiffeId, Bucket>>,
}

impl SigningRateLimit {
    pub(crate) fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second);
        let capacity = rate.max(MAX_BATCH as f64);
        Self { rate, capacity, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes `cost` tokens for `agent` at `now`, or refuses with `RESOURCE_EXHAUSTED`.
    pub(crate) fn take(&self, agent: &SpiffeId, cost: usize, now: Instant) -> Result<(), Status> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let cost = (cost as f64).min(self.capacity);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(agent) {
            let (rate, capacity) = (self.rate, self.capacity);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < capacity);
        }
        let bucket = buckets.entry(agent.clone()).or_insert(Bucket { tokens: self.capacity, at: now });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.capacity);
        bucket.at = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            return Ok(());
        }
        let wait = (cost - bucket.tokens) / self.rate;
        tracing::warn!(agent = %agent, cost, "per-agent signing rate limit reached; asking the agent to retry");
        let mut status = Status::resource_exhausted(format!(
            "agent_svid_rate_limit: this agent may have {} SVIDs signed per second; retry in {wait:.1} s",
            self.rate
        ));
        // The same wait in machine-readable form, rounded up so the retry finds the tokens.
        let millis = (wait * 1000.0).ceil().clamp(1.0, 3_600_000.0) as u64;
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(millis.to_string()) {
            status.metadata_mut().insert(tessera_wire::RETRY_AFTER_MS_METADATA, value);
        }
        Err(status)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_refuses_bursts_beyond_capacity_and_refills() {
        let limit = SigningRateLimit::new(10);
        let agent = SpiffeId::parse("spiffe://example.org/tessera/agent/a").unwrap();
        let other = SpiffeId::parse("spiffe://example.org/tessera/agent/b").unwrap();
        let t0 = Instant::now();
        limit.take(&agent, MAX_BATCH, t0).unwrap();
        let err = limit.take(&agent, 1, t0).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("agent_svid_rate_limit"), "{}", err.message());
        // One token short at 10/s: the call is accepted again 100 ms later, and says so.
        let hint: u64 =
            err.metadata().get(tessera_wire::RETRY_AFTER_MS_METADATA).unwrap().to_str().unwrap().parse().unwrap();
        assert!((100..=101).contains(&hint), "{hint}");
        limit.take(&other, 1, t0).unwrap();
        limit.take(&agent, 10, t0 + Duration::from_secs(1)).unwrap();
        assert!(limit.take(&agent, 1, t0 + Duration::from_secs(1)).is_err());
        assert!(SigningRateLimit::new(0).take(&agent, 1_000_000, t0).is_ok());
    }
}
