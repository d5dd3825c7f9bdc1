//! What unauthenticated callers may cost: a token bucket per source address for every
//! request that fails authentication or needs the API to decide (a TokenReview, a
//! registration), and a cap on registrations in flight. Requests that authenticate
//! from the caches cost nothing and are not limited.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

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

/// The bucket a source address is charged to: an IPv4 address (or an IPv4-mapped IPv6
/// one) on its own, an IPv6 address by its /64 — one host is routinely given a whole /64,
/// and would otherwise get a fresh bucket for every address it picks from it.
pub fn bucket_of(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

pub struct SourceLimiter {
    buckets: DefaultKeyedRateLimiter<IpAddr>,
    registrations: Semaphore,
    registration_reads: parking_lot::Mutex<Readers>,
    registration_readers: parking_lot::Mutex<std::collections::HashMap<IpAddr, usize>>,
    /// TokenReviews the caches could not spare, from every source together: enough for
    /// 5,000 node agents renewing their verdicts each minute, not for a flood from many
    /// addresses.
    reviews: governor::DefaultDirectRateLimiter,
}

/// Registration bodies read at once (see [`SourceLimiter::registration_read`]).
pub const MAX_REGISTRATION_READS: usize = 2048;
/// Registration bodies one source may have read at once.
pub const MAX_REGISTRATION_READS_PER_SOURCE: usize = 4;
/// How long a registration reader keeps its slot before a newer one may cut it off.
const MIN_REGISTRATION_READ: std::time::Duration = std::time::Duration::from_secs(2);

/// The registration bodies being read, oldest first.
#[derive(Default)]
struct Readers {
    next: u64,
    readers: std::collections::BTreeMap<u64, (std::time::Instant, Arc<tokio::sync::Notify>)>,
}

/// One registration body being read; dropping it frees the slot.
pub struct RegistrationRead<'a> {
    id: u64,
    cut: Arc<tokio::sync::Notify>,
    source: IpAddr,
    limiter: &'a SourceLimiter,
}

impl RegistrationRead<'_> {
    /// Resolves when this reader was cut off to make room for another.
    pub async fn cut(&self) {
        self.cut.notified().await;
    }
}

impl Drop for RegistrationRead<'_> {
    fn drop(&mut self) {
        self.limiter
            .registration_reads
            .lock()
            .readers
            .remove(&self.id);
        self.limiter.release_reader(self.source);
    }
}

impl SourceLimiter {
    /// Gives back one of a source's registration readers.
    fn release_reader(&self, source: IpAddr) {
        let mut held = self.registration_readers.lock();
        if let Some(count) = held.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                held.remove(&source);
            }
        }
    }
}

impl SourceLimiter {
    pub fn new(limits: &UnauthenticatedLimits) -> Self {
        let per_second = NonZeroU32::new(limits.per_second.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(limits.burst.max(1)).expect("at least 1");
        Self {
            buckets: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            registrations: Semaphore::new(limits.max_registrations.max(1)),
            registration_reads: Default::default(),
            registration_readers: Default::default(),
            reviews: RateLimiter::direct(
                Quota::per_second(NonZeroU32::new(100).expect("100"))
                    .allow_burst(NonZeroU32::new(500).expect("500")),
            ),
        }
    }

    /// Takes one request from `source`'s bucket; false when it is empty.
    pub fn allow(&self, source: IpAddr) -> bool {
        self.buckets.check_key(&bucket_of(source)).is_ok()
    }

    /// One TokenReview from the budget all sources share; false when it is spent.
    pub fn allow_review(&self) -> bool {
        self.reviews.check().is_ok()
    }

    /// A registration slot, if one is free.
    pub fn registration(&self) -> Option<SemaphorePermit<'_>> {
        self.registrations.try_acquire().ok()
    }

    /// A slot for reading one unauthenticated registration body: at most
    /// [`MAX_REGISTRATION_READS`] bodies (each at most a few KiB) are held at once,
    /// however many connections send them, and at most
    /// [`MAX_REGISTRATION_READS_PER_SOURCE`] by one source. When all are taken, the
    /// oldest reader is cut off to make room: a real host's body arrives within
    /// milliseconds, so only readers that dawdle lose their slot.
    pub fn registration_read(&self, source: IpAddr) -> Option<RegistrationRead<'_>> {
        let source = bucket_of(source);
        let mut held = self.registration_readers.lock();
        let count = held.entry(source).or_insert(0);
        if *count >= MAX_REGISTRATION_READS_PER_SOURCE {
            return None;
        }
        *count += 1;
        drop(held);
        let mut reads = self.registration_reads.lock();
        if reads.readers.len() >= MAX_REGISTRATION_READS {
            // Only a reader that has had its time may be cut off: a real host's body
            // arrives within it, so new strangers cannot cut a host off.
            let now = std::time::Instant::now();
            let oldest = reads
                .readers
                .first_key_value()
                .filter(|(_, (started, _))| now.duration_since(*started) >= MIN_REGISTRATION_READ)
                .map(|(id, _)| *id);
            let Some(oldest) = oldest else {
                drop(reads);
                self.release_reader(source);
                return None;
            };
            let (_, cut) = reads.readers.remove(&oldest).expect("just found");
            cut.notify_one();
        }
        let id = reads.next;
        reads.next += 1;
        let cut = Arc::new(tokio::sync::Notify::new());
        reads
            .readers
            .insert(id, (std::time::Instant::now(), cut.clone()));
        Some(RegistrationRead {
            id,
            cut,
            source,
            limiter: self,
        })
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

/// What an authenticated agent may cost in API calls the caches cannot spare: a token
/// bucket per agent, so a host with a valid credential cannot turn its requests into a
/// stream of API calls — reports about made-up jobs into GETs, reboot polls into Node
/// reads, announcements with ever-changing labels into Agent writes.
pub struct AgentBudget {
    buckets: DefaultKeyedRateLimiter<String>,
}

impl AgentBudget {
    pub fn new(quota: Quota) -> Self {
        Self {
            buckets: RateLimiter::keyed(quota),
        }
    }

    /// Reads: 50 at once, then 5 a second.
    pub fn reads() -> Self {
        Self::new(
            Quota::per_second(NonZeroU32::new(5).expect("5"))
                .allow_burst(NonZeroU32::new(50).expect("50")),
        )
    }

    /// Writes of an agent's own Agent: 5 at once, then one a minute.
    pub fn writes() -> Self {
        Self::new(
            Quota::per_minute(NonZeroU32::new(1).expect("1"))
                .allow_burst(NonZeroU32::new(5).expect("5")),
        )
    }

    /// Takes one call from `agent`'s bucket; false when it is empty.
    pub fn allow(&self, agent: &str) -> bool {
        self.buckets.check_key(&agent.to_string()).is_ok()
    }

    pub fn prune(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_source_is_one_bucket_per_64_prefix() {
        let limiter = SourceLimiter::new(&UnauthenticatedLimits {
            per_second: 1,
            burst: 2,
            max_registrations: 1,
        });
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.allow(a) && limiter.allow(b));
        assert!(
            !limiter.allow("2001:db8:1:2::99".parse().unwrap()),
            "every address of a /64 draws on the same bucket"
        );
        assert!(limiter.allow(other), "the next /64 has its own");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(bucket_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

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

    /// Attack (the network, one IPv6 /48 — 65,536 sources as the limits count them):
    /// when all 256 registration readers are taken, the oldest is cut off. A stranger
    /// does not need to hold the slots, only to open 256 new readers while a host's
    /// body is in flight: at 20 registrations/s per /64, 256 of them come from 13 /64s
    /// in a second, from 256 /64s in a twentieth of one — faster than a host's body
    /// crosses a slow or lossy link (the deadline allows 10 s). Each host's reader is
    /// cut, and its registration answered 503, as long as the strangers keep at it.
    /// A reader should be cut only for one that has held its slot longer (a minimum age
    /// before it may be cut, or cut the reader with the fewest bytes per second).
    #[tokio::test]
    async fn new_strangers_cannot_cut_off_a_hosts_registration_body() {
        let limiter = SourceLimiter::new(&UnauthenticatedLimits::default());
        let host: IpAddr = "10.0.0.7".parse().unwrap();
        let reading = limiter.registration_read(host).expect("a slot");
        let mut strangers = Vec::new();
        for i in 0..MAX_REGISTRATION_READS as u16 {
            let source: IpAddr = format!("2001:db8:1:{i:x}::1").parse().unwrap();
            strangers.push(limiter.registration_read(source));
        }
        let cut = tokio::time::timeout(std::time::Duration::from_millis(50), reading.cut())
            .await
            .is_ok();
        assert!(
            !cut,
            "256 strangers' brand-new readers cut off the host's registration body mid-read"
        );
    }
}
