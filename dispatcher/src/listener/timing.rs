//! When a connection is closed for holding a descriptor without using it, how long accepting
//! waits after a failure, and how often a repeated failure is logged.
//!
//! Pure: every function takes `now`. Not here: the table of connections (see
//! [`super::admission`]) or the sleeping (see [`super`]).

use std::time::{Duration, Instant};

use super::admission::Activity;

/// The connection timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the accept to the first request's headers, whatever the protocol.
    pub first_request: Duration,
    /// With no request in flight.
    pub idle: Duration,
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// No request within [`Timeouts::first_request`] of the accept.
    NoRequest,
    /// No request in flight for [`Timeouts::idle`].
    Idle,
    /// Evicted to make room (see [`super::admission`]).
    Evicted,
}

impl Closing {
    /// The label of the `dispatcher_connections_closed_total` metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoRequest => "no_request",
            Self::Idle => "idle",
            Self::Evicted => "evicted",
        }
    }
}

/// What to do with a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Look again at this instant.
    CheckAt(Instant),
    Close(Closing),
}

/// The verdict on a connection. A connection serving a request is never timed out here (the
/// request has its own limits; a device stream lives as long as it writes), only looked at
/// again an idle period later.
pub fn verdict(activity: &Activity, now: Instant, timeouts: Timeouts) -> Verdict {
    if activity.in_flight > 0 {
        return Verdict::CheckAt(now + timeouts.idle);
    }
    let (deadline, closing) = if activity.requests == 0 {
        (activity.accepted + timeouts.first_request, Closing::NoRequest)
    } else {
        (activity.idle_since + timeouts.idle, Closing::Idle)
    };
    if now >= deadline {
        Verdict::Close(closing)
    } else {
        Verdict::CheckAt(deadline)
    }
}

/// Exponential backoff after failed accepts: `min`, doubling up to `max`, back to `min` after
/// a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    /// A failure: how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub fn succeeded(&mut self) {
        self.next = self.min;
    }
}

/// One log line per interval for a repeated event, with how many were left out.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: None, suppressed: 0 }
    }

    /// The event happened at `now`: `Some(left out since the last line)` when it may be
    /// logged, `None` when it is left out.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts { first_request: Duration::from_secs(10), idle: Duration::from_secs(60) };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn verdicts() {
        let t0 = Instant::now();
        let fresh = Activity { accepted: t0, requests: 0, in_flight: 0, idle_since: t0 };
        let serving = Activity { requests: 1, in_flight: 1, ..fresh };
        let served = Activity { requests: 3, in_flight: 0, idle_since: t0 + secs(100), ..fresh };
        let cases = [
            // A connection that never sent a request: closed 10 s after the accept.
            (fresh, t0, Verdict::CheckAt(t0 + secs(10))),
            (fresh, t0 + secs(9), Verdict::CheckAt(t0 + secs(10))),
            (fresh, t0 + secs(10), Verdict::Close(Closing::NoRequest)),
            // Serving a request (a device stream): never closed here, however old.
            (serving, t0 + secs(5000), Verdict::CheckAt(t0 + secs(5060))),
            // Between requests: closed 60 s after the last response ended.
            (served, t0 + secs(120), Verdict::CheckAt(t0 + secs(160))),
            (served, t0 + secs(160), Verdict::Close(Closing::Idle)),
        ];
        for (activity, now, expected) in cases {
            assert_eq!(verdict(&activity, now, TIMEOUTS), expected, "{activity:?} at +{:?}", now - t0);
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), secs(1));
        let waits: Vec<u128> = (0..9).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(10));
    }

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let mut limiter = LogLimiter::new(secs(5));
        let t0 = Instant::now();
        assert_eq!(limiter.allow(t0), Some(0));
        // Twenty failures a second for ten seconds: one line every five seconds.
        let lines: Vec<(u64, u64)> = (1..=200u64)
            .filter_map(|i| {
                let at = t0 + Duration::from_millis(i * 50);
                limiter.allow(at).map(|left_out| (i * 50, left_out))
            })
            .collect();
        assert_eq!(lines, [(5000, 99), (10_000, 99)]);
    }
}
