//! Lifetime maths: capping SVID lifetimes by their issuer and choosing renewal points.
//!
//! These are the only places where validity windows are computed, so the invariant "no SVID
//! outlives its issuing CA" is enforced in one function ([`cap_not_after`]).

use std::time::{Duration, SystemTime};

/// How far `notBefore` is back-dated to absorb clock skew between parties.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(10);

/// Renewal jitter as a fraction of the lifetime, in each direction (±10%).
pub const RENEWAL_JITTER_FRACTION: f64 = 0.10;

/// The validity window of a certificate or token about to be issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity (back-dated by [`NOT_BEFORE_SKEW`], never after the issuer's end).
    pub not_before: SystemTime,
    /// End of validity, capped by the issuer.
    pub not_after: SystemTime,
}

/// Caps a requested expiry so the credential never outlives its issuer.
pub fn cap_not_after(requested: SystemTime, issuer_not_after: SystemTime) -> SystemTime {
    requested.min(issuer_not_after)
}

/// The validity window for a credential issued at `now` for `ttl`, capped by the issuer's
/// expiry when there is an issuer (a self-signed root has none).
pub fn validity(now: SystemTime, ttl: Duration, issuer_not_after: Option<SystemTime>) -> Validity {
    let requested = now.checked_add(ttl).unwrap_or(now);
    let not_after = match issuer_not_after {
        Some(limit) => cap_not_after(requested, limit),
        None => requested,
    };
    let not_before = now.checked_sub(NOT_BEFORE_SKEW).unwrap_or(now).min(not_after);
    Validity { not_before, not_after }
}

/// When a credential valid over `[issued_at, expires_at]` should be renewed: at half its
/// lifetime, moved by up to ±10% of the lifetime according to `jitter`.
///
/// `jitter` is a number in `[-1.0, 1.0]` drawn by the caller from its own random source
/// (values outside are clamped, NaN counts as 0), so fleets renew spread out rather than in
/// one burst, and tests can pin the result.
pub fn renewal_point(issued_at: SystemTime, expires_at: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = expires_at.duration_since(issued_at).unwrap_or(Duration::ZERO);
    let jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(-1.0, 1.0) };
    let fraction = 0.5 + jitter * RENEWAL_JITTER_FRACTION;
    issued_at + lifetime.mul_f64(fraction)
}

/// Maps 8 random bytes to a jitter value in `[-1.0, 1.0]` for [`renewal_point`].
pub fn jitter_from_bytes(bytes: [u8; 8]) -> f64 {
    // 53 random mantissa bits give a uniform value in [0, 1).
    let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    unit * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn lifetime_is_capped_by_the_issuer() {
        let v = validity(t(1000), Duration::from_secs(3600), Some(t(2000)));
        assert_eq!(v.not_after, t(2000));
        assert_eq!(v.not_before, t(990));
        let v = validity(t(1000), Duration::from_secs(60), Some(t(2000)));
        assert_eq!(v.not_after, t(1060));
        let v = validity(t(1000), Duration::from_secs(60), None);
        assert_eq!(v.not_after, t(1060));
    }

    #[test]
    fn not_before_never_passes_not_after() {
        // An issuer that expires within the skew cushion.
        let v = validity(t(1000), Duration::from_secs(60), Some(t(995)));
        assert_eq!(v.not_after, t(995));
        assert!(v.not_before <= v.not_after);
    }

    #[test]
    fn renewal_is_at_half_life_within_ten_percent() {
        assert_eq!(renewal_point(t(0), t(1000), 0.0), t(500));
        assert_eq!(renewal_point(t(0), t(1000), 1.0), t(600));
        assert_eq!(renewal_point(t(0), t(1000), -1.0), t(400));
        assert_eq!(renewal_point(t(0), t(1000), 7.0), t(600));
        assert_eq!(renewal_point(t(0), t(1000), f64::NAN), t(500));
        // Already expired or inverted windows renew immediately.
        assert_eq!(renewal_point(t(10), t(5), 0.5), t(10));
    }

    proptest! {
        #[test]
        fn jitter_bytes_map_into_range(bytes in any::<[u8; 8]>()) {
            let j = jitter_from_bytes(bytes);
            prop_assert!((-1.0..1.0).contains(&j));
        }

        #[test]
        fn renewal_stays_inside_the_jitter_window(life in 1u64..10_000_000, jitter in -2.0f64..2.0) {
            let at = renewal_point(t(0), t(life), jitter);
            let secs = at.duration_since(t(0)).unwrap().as_secs_f64();
            prop_assert!(secs >= life as f64 * 0.4 - 1e-6 && secs <= life as f64 * 0.6 + 1e-6);
        }

        #[test]
        fn capped_expiry_never_exceeds_the_issuer(now in 0u64..1_000_000, ttl in 0u64..1_000_000, issuer in 0u64..2_000_000) {
            let v = validity(t(now), Duration::from_secs(ttl), Some(t(issuer)));
            prop_assert!(v.not_after <= t(issuer));
            prop_assert!(v.not_before <= v.not_after);
        }
    }
}
