//! Per-agent signing rate limit (`agent_svid_rate_limit`): a token bucket per agent SPIFFE ID.
//!
//! Each signed SVID costs one token (a batch costs its item count); the bucket refills at the
//! configured rate and holds at most `max(rate, MAX_BATCH)` tokens, so an idle agent can always
//! send one full batch. A call that finds too few tokens is refused as a whole with
//! `RESOURCE_EXHAUSTED` (retryable: agents back off and retry). The map is bounded: when it
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
        Err(Status::resource_exhausted(format!(
            "agent_svid_rate_limit: this agent may have {} SVIDs signed per second; retry in {wait:.1} s",
            self.rate
        )))
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
        limit.take(&other, 1, t0).unwrap();
        limit.take(&agent, 10, t0 + Duration::from_secs(1)).unwrap();
        assert!(limit.take(&agent, 1, t0 + Duration::from_secs(1)).is_err());
        assert!(SigningRateLimit::new(0).take(&agent, 1_000_000, t0).is_ok());
    }
}
