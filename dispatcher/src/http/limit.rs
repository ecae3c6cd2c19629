//! A keyed token-bucket rate limiter, used on enrollment so pairing codes cannot be guessed
//! at speed, and on enrollment by link so device and user codes cannot either. Pure and
//! synchronous; keys are client addresses (or, for the control API, user ids). Per replica:
//! with N replicas a client gets N times the rate, which the codes' entropy and short lives
//! absorb many times over.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `burst` attempts at once, refilled at one per `every`.
    pub fn new(burst: u32, every: Duration) -> Self {
        Self {
            burst: f64::from(burst),
            per_second: 1.0 / every.as_secs_f64().max(f64::MIN_POSITIVE),
            buckets: Mutex::default(),
            capacity: 100_000,
        }
    }

    /// Takes one attempt for `key` at `now`; false when the key is over its rate.
    pub fn try_acquire(&self, key: K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock();
        if buckets.len() >= self.capacity && !buckets.contains_key(&key) {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether `key` has an attempt left at `now`, without taking it: for limits that charge
    /// only failed attempts (a wrong code), checked before the attempt.
    pub fn allows(&self, key: &K, now: Instant) -> bool {
        let buckets = self.buckets.lock();
        match buckets.get(key) {
            None => self.burst >= 1.0,
            Some((tokens, at)) => {
                (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.burst) >= 1.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(3, Duration::from_secs(1));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.try_acquire(ip, t0)));
        assert!(!limiter.try_acquire(ip, t0));
        assert!(limiter.try_acquire(other, t0), "keys are independent");
        assert!(!limiter.try_acquire(ip, t0 + Duration::from_millis(500)));
        assert!(limiter.try_acquire(ip, t0 + Duration::from_millis(1600)));
        assert!(!limiter.try_acquire(ip, t0 + Duration::from_millis(1600)));
    }

    #[test]
    fn ten_thousand_attempts_mostly_refused() {
        let limiter = RateLimiter::new(10, Duration::from_secs(3));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let now = Instant::now();
        let allowed = (0..10_000).filter(|_| limiter.try_acquire(ip, now)).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn allows_looks_without_taking() {
        let limiter: RateLimiter<String> = RateLimiter::new(2, Duration::from_secs(1));
        let key = "alice".to_owned();
        let t0 = Instant::now();
        assert!(limiter.allows(&key, t0));
        assert!(limiter.allows(&key, t0), "looking takes nothing");
        assert!(limiter.try_acquire(key.clone(), t0));
        assert!(limiter.try_acquire(key.clone(), t0));
        assert!(!limiter.allows(&key, t0));
        assert!(limiter.allows(&key, t0 + Duration::from_millis(1100)));
    }
}
