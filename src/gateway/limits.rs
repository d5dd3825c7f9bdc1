//! What unauthenticated callers may cost: a token bucket per source address for every
//! request that fails authentication or needs the API to decide (a TokenReview, a
//! registration), and a cap on registrations in flight. Requests that authenticate
//! from the caches cost nothing and are not limited.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Rates and caps for callers who have not proven who they are.
#[derive(Clone, Debug)]
pub struct UnauthenticatedLimits {
    /// Sustained requests per second per source address.
    pub per_second: u32,
    /// Requests a source may send at once after being quiet.
    pub burst: u32,
    /// Registrations handled at once (the rest get 503 and retry).
    pub max_registrations: usize,
}

impl Default for UnauthenticatedLimits {
    fn default() -> Self {
        Self {
            per_second: 20,
            burst: 100,
            max_registrations: 32,
        }
    }
}

pub struct SourceLimiter {
    buckets: DefaultKeyedRateLimiter<IpAddr>,
    registrations: Semaphore,
}

impl SourceLimiter {
    pub fn new(limits: &UnauthenticatedLimits) -> Self {
        let per_second = NonZeroU32::new(limits.per_second.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(limits.burst.max(1)).expect("at least 1");
        Self {
            buckets: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            registrations: Semaphore::new(limits.max_registrations.max(1)),
        }
    }

    /// Takes one request from `source`'s bucket; false when it is empty.
    pub fn allow(&self, source: IpAddr) -> bool {
        self.buckets.check_key(&source).is_ok()
    }

    /// A registration slot, if one is free.
    pub fn registration(&self) -> Option<SemaphorePermit<'_>> {
        self.registrations.try_acquire().ok()
    }

    /// Forgets sources whose buckets are full again, so the map does not grow with every
    /// address ever seen. Run every few minutes.
    pub fn prune(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limiter = SourceLimiter::new(&UnauthenticatedLimits {
            per_second: 1,
            burst: 3,
            max_registrations: 1,
        });
        let noisy: IpAddr = "192.0.2.1".parse().unwrap();
        let quiet: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| limiter.allow(noisy)));
        assert!(!limiter.allow(noisy), "the burst is spent");
        assert!(limiter.allow(quiet), "buckets are per source");
        let slot = limiter.registration().expect("one slot");
        assert!(
            limiter.registration().is_none(),
            "one registration at a time"
        );
        drop(slot);
        assert!(limiter.registration().is_some());
    }
}
