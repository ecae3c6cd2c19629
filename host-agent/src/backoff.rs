//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! After the `n`th consecutive failure the agent sleeps a uniformly random time in
//! `[0, min(cap, base * 2^n)]` ("full jitter"), so thousands of devices that lost the same
//! replica at the same instant spread their reconnects over the whole window instead of
//! arriving together. The delay computation is a pure function ([`full_jitter`]) so it is
//! table-tested; [`Backoff`] only counts attempts and draws the random number.
//!
//! Not here: deciding *when* to back off or reset (the runtime does that: a stream that stayed
//! up for [`Backoff::stable_after`] resets the count, a `reconnect` frame skips the backoff).

use std::time::Duration;

use rand::Rng;

/// Default first delay window. One second: when a replica dies, its devices' first reconnects
/// spread evenly over it (1,000 devices: about 10% in any 100 ms), and 99% are back within about
/// a second.
pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
/// Default largest delay.
pub const DEFAULT_CAP: Duration = Duration::from_secs(30);
/// Largest pause before answering a `reconnect` frame: a replica shutting down sends it to all
/// its devices at once, and they should not land on the next replica in the same instant.
pub const RECONNECT_JITTER: Duration = Duration::from_secs(1);

/// The delay window after `attempt` consecutive failures (0-based): `min(cap, base * 2^attempt)`.
pub fn window(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// The full-jitter delay for `attempt`, given `unit` drawn uniformly from `[0, 1]`.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32, unit: f64) -> Duration {
    window(base, cap, attempt).mul_f64(unit.clamp(0.0, 1.0))
}

/// Counts consecutive failures and hands out jittered delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap` (a `cap` below `base` wins).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base: base.min(cap), cap, attempt: 0 }
    }

    /// The delay to sleep before the next attempt; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let unit: f64 = rand::rng().random_range(0.0..=1.0);
        let delay = full_jitter(self.base, self.cap, self.attempt, unit);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Forget past failures: the next delay is drawn from the first window again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Consecutive failures counted so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How long a stream must stay up before its end counts as a fresh start (the backoff is
    /// reset): the larger of the cap and ten seconds, so a server that accepts and then drops
    /// every stream at once is still backed off.
    pub fn stable_after(&self) -> Duration {
        self.cap.max(Duration::from_secs(10))
    }

    /// A short random pause in `[0, min(base, 1 s)]`: used where the protocol says "go now"
    /// (a `reconnect` frame), so a whole replica's devices do not land on the next one in the
    /// same instant.
    pub fn jitter_only(&self) -> Duration {
        let unit: f64 = rand::rng().random_range(0.0..=1.0);
        self.base.min(RECONNECT_JITTER).mul_f64(unit)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, DEFAULT_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn window_doubles_then_caps() {
        let cases = [(0, 250), (1, 500), (2, 1000), (3, 2000), (6, 16_000), (7, 30_000), (8, 30_000), (40, 30_000)];
        for (attempt, want) in cases {
            assert_eq!(window(MS(250), MS(30_000), attempt), MS(want), "attempt {attempt}");
        }
    }

    #[test]
    fn window_never_overflows() {
        assert_eq!(window(Duration::from_secs(u64::MAX / 2), MS(5), u32::MAX), MS(5));
        assert_eq!(window(MS(1), MS(5), u32::MAX), MS(5));
    }

    #[test]
    fn full_jitter_spans_zero_to_window() {
        assert_eq!(full_jitter(MS(250), MS(30_000), 3, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(MS(250), MS(30_000), 3, 1.0), MS(2000));
        assert_eq!(full_jitter(MS(250), MS(30_000), 3, 0.5), MS(1000));
        assert_eq!(full_jitter(MS(250), MS(30_000), 3, 7.0), MS(2000), "unit is clamped");
        assert_eq!(full_jitter(MS(250), MS(30_000), 3, -1.0), Duration::ZERO, "unit is clamped");
    }

    #[test]
    fn delays_respect_the_cap() {
        let mut backoff = Backoff::new(MS(250), MS(1000));
        for _ in 0..200 {
            assert!(backoff.next_delay() <= MS(1000));
        }
        assert_eq!(backoff.attempt(), 200);
    }

    #[test]
    fn delays_are_spread_not_synchronized() {
        // Full jitter: at a window of 30 s, a thousand draws must cover the range, not cluster.
        let mut delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut backoff = Backoff::new(MS(250), MS(30_000));
                for _ in 0..10 {
                    backoff.next_delay();
                }
                backoff.next_delay()
            })
            .collect();
        delays.sort();
        let (low, high) = (delays[0], delays[999]);
        assert!(low < MS(3000), "some delays near zero, got min {low:?}");
        assert!(high > MS(27_000), "some delays near the cap, got max {high:?}");
        let below_half = delays.iter().filter(|d| **d < MS(15_000)).count();
        assert!((350..650).contains(&below_half), "roughly uniform: {below_half} of 1000 below half");
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(MS(100), MS(10_000));
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.attempt(), 0);
        assert!(backoff.next_delay() <= MS(100));
    }

    #[test]
    fn cap_below_base_wins() {
        let mut backoff = Backoff::new(MS(500), MS(100));
        assert!(backoff.next_delay() <= MS(100));
        assert!(backoff.jitter_only() <= MS(100));
    }

    #[test]
    fn going_now_waits_at_most_a_quarter_second() {
        let backoff = Backoff::new(MS(5000), MS(60_000));
        for _ in 0..100 {
            assert!(backoff.jitter_only() <= RECONNECT_JITTER);
        }
    }
}
