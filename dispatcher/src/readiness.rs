//! Whether this replica should be in the load balancer's rotation (`GET /readyz`).
//!
//! The rule: readiness says whether *this* replica can serve, not whether a dependency every
//! replica shares blinked. It fails at once while the replica drains (shutdown) or is frozen
//! (its stall watch missed ticks, or it just woke from a stall), and when the database or NATS
//! has been unreachable for longer than the readiness grace (`--readiness-grace-secs`). A
//! shorter outage leaves it ready: all replicas see the same blip, and failing them together
//! would empty the Service and turn a blip into a full outage. A longer one takes the replica
//! out, and its devices move anyway through the broker grace.
//!
//! The dependencies are sampled by [`watch`] in the background (NATS every 250 ms, the
//! database every second), so a probe reads memory and answers in microseconds; an outage is
//! timed from the first sample that failed (for the database, from when that ping started).
//!
//! Not here: what an outage does to streams (the bus's broker grace) or to calls.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Health;
use crate::core::Dispatcher;
use crate::registry::Registry;

/// How often NATS's state is read, and how often the database is pinged.
const BUS_SAMPLE: Duration = Duration::from_millis(250);
const DATABASE_SAMPLE: Duration = Duration::from_secs(1);
/// Longest a ping may take before the database counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// A shared dependency of the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Database,
    Broker,
}

impl Dependency {
    fn name(self) -> &'static str {
        match self {
            Dependency::Database => "database",
            Dependency::Broker => "message broker",
        }
    }
}

/// What a probe looks at, at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub draining: bool,
    pub frozen: bool,
    /// How long the database has been unreachable, `None` while it answers.
    pub database_down_for: Option<Duration>,
    /// How long NATS has been unreachable, `None` while connected (or with no broker).
    pub broker_down_for: Option<Duration>,
}

/// Why the replica is not ready: the text of the 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub String);

/// The rule of this module's header, as a pure function.
pub fn verdict(observed: Observed, grace: Duration) -> Result<(), NotReady> {
    if observed.draining {
        return Err(NotReady("draining".into()));
    }
    if observed.frozen {
        return Err(NotReady("frozen: this replica was stalled and is giving up its streams".into()));
    }
    for (dependency, down_for) in
        [(Dependency::Broker, observed.broker_down_for), (Dependency::Database, observed.database_down_for)]
    {
        if let Some(down_for) = down_for.filter(|down_for| *down_for > grace) {
            return Err(NotReady(format!(
                "{} unreachable for {} s (readiness grace {} s)",
                dependency.name(),
                down_for.as_secs(),
                grace.as_secs()
            )));
        }
    }
    Ok(())
}

/// The outage clocks of this replica's dependencies.
#[derive(Debug, Default)]
pub struct Readiness {
    database_down_since: Mutex<Option<Instant>>,
    broker_down_since: Mutex<Option<Instant>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    fn clock(&self, dependency: Dependency) -> &Mutex<Option<Instant>> {
        match dependency {
            Dependency::Database => &self.database_down_since,
            Dependency::Broker => &self.broker_down_since,
        }
    }

    /// Records a sample: `up`, or down as of `at` (an outage keeps its first instant).
    pub fn record(&self, dependency: Dependency, up: bool, at: Instant) {
        let mut since = self.clock(dependency).lock();
        if up {
            *since = None;
        } else if since.is_none() {
            *since = Some(at);
        }
    }

    /// How long `dependency` has been down at `now`, `None` while up.
    pub fn down_for(&self, dependency: Dependency, now: Instant) -> Option<Duration> {
        self.clock(dependency).lock().map(|since| now.saturating_duration_since(since))
    }
}

/// Samples the broker's state and pings the database until `cancel`, recording both in
/// `readiness`.
pub async fn watch(
    readiness: std::sync::Arc<Readiness>,
    dispatcher: Dispatcher,
    registry: Registry,
    cancel: CancellationToken,
) {
    let bus = async {
        let mut tick = tokio::time::interval(BUS_SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let up = dispatcher.bus().health() == Health::Up;
            readiness.record(Dependency::Broker, up, Instant::now());
        }
    };
    let database = async {
        let mut tick = tokio::time::interval(DATABASE_SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_up = true;
        loop {
            tick.tick().await;
            let started = Instant::now();
            let up = match tokio::time::timeout(PING_TIMEOUT, registry.ping()).await {
                Ok(Ok(())) => true,
                Ok(Err(error)) => {
                    if was_up {
                        tracing::warn!(%error, "database unreachable");
                    }
                    false
                }
                Err(_) => {
                    if was_up {
                        tracing::warn!(timeout_ms = PING_TIMEOUT.as_millis() as u64, "database did not answer a ping");
                    }
                    false
                }
            };
            if up && !was_up {
                tracing::info!("database reachable again");
            }
            was_up = up;
            readiness.record(Dependency::Database, up, started);
        }
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        () = bus => {}
        () = database => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn observed() -> Observed {
        Observed { draining: false, frozen: false, database_down_for: None, broker_down_for: None }
    }

    #[test]
    fn the_rule_in_a_table() {
        let grace = 10 * S;
        let cases: Vec<(&str, Observed, Option<&str>)> = vec![
            ("all well", observed(), None),
            ("draining", Observed { draining: true, ..observed() }, Some("draining")),
            ("frozen", Observed { frozen: true, ..observed() }, Some("frozen")),
            (
                "draining wins over a blip",
                Observed { draining: true, broker_down_for: Some(S), ..observed() },
                Some("draining"),
            ),
            ("a 3 s NATS blip", Observed { broker_down_for: Some(3 * S), ..observed() }, None),
            ("NATS down exactly the grace", Observed { broker_down_for: Some(grace), ..observed() }, None),
            (
                "NATS down past the grace",
                Observed { broker_down_for: Some(11 * S), ..observed() },
                Some("message broker unreachable for 11 s"),
            ),
            ("a database blip", Observed { database_down_for: Some(2 * S), ..observed() }, None),
            (
                "database down past the grace",
                Observed { database_down_for: Some(12 * S), ..observed() },
                Some("database unreachable for 12 s"),
            ),
            (
                "both blipping",
                Observed { database_down_for: Some(9 * S), broker_down_for: Some(9 * S), ..observed() },
                None,
            ),
        ];
        for (name, observed, want) in cases {
            let got = verdict(observed, grace);
            match want {
                None => assert_eq!(got, Ok(()), "{name}"),
                Some(text) => {
                    let NotReady(message) = got.expect_err(name);
                    assert!(message.starts_with(text), "{name}: {message}");
                }
            }
        }
    }

    #[test]
    fn a_zero_grace_fails_at_the_first_failed_sample() {
        let observed = Observed { broker_down_for: Some(Duration::from_millis(1)), ..observed() };
        assert!(verdict(observed, Duration::ZERO).is_err());
    }

    #[test]
    fn an_outage_is_timed_from_its_first_failed_sample() {
        let readiness = Readiness::new();
        let t0 = Instant::now();
        assert_eq!(readiness.down_for(Dependency::Broker, t0), None);
        readiness.record(Dependency::Broker, false, t0);
        readiness.record(Dependency::Broker, false, t0 + 2 * S);
        assert_eq!(readiness.down_for(Dependency::Broker, t0 + 5 * S), Some(5 * S));
        assert_eq!(readiness.down_for(Dependency::Database, t0 + 5 * S), None, "clocks are per dependency");
        readiness.record(Dependency::Broker, true, t0 + 6 * S);
        assert_eq!(readiness.down_for(Dependency::Broker, t0 + 7 * S), None);
        readiness.record(Dependency::Broker, false, t0 + 8 * S);
        assert_eq!(readiness.down_for(Dependency::Broker, t0 + 9 * S), Some(S), "a new outage starts a new clock");
    }
}
