//! Rebalancing after a scale-out: a replica that holds far more device streams than the
//! cluster's average asks a few of its devices at a time to reconnect, so that the load
//! balancer spreads them and a new replica takes its share.
//!
//! Every replica publishes its stream count on `{p}.load` every [`Policy::publish_every`]
//! ([`protocol::subject::ReplicaLoad`]) and keeps the latest count of every other replica. Once a
//! second, each replica decides alone ([`decide`], pure and table-tested):
//!
//! - the average is the streams of every replica heard within [`Policy::stale_after`], this one
//!   included, over their number;
//! - it **starts** shedding when it holds more than the average by `threshold_percent` (default
//!   25%) and by at least [`Policy::min_excess`] streams;
//! - while shedding, it asks at most `per_second` devices each second (default 5) to reconnect,
//!   never more than its excess over the target, the average plus [`Policy::target_percent`]
//!   (5%) rounded up; it **stops** once at or under that target (hysteresis: it does not start
//!   again until it is over the threshold again);
//! - it sheds only while some other replica is under the average and has room (under its
//!   `--max-streams`): devices sent away from a replica whose peers are all full would only
//!   bounce back.
//!
//! The devices asked are the idlest streams with nothing queued ([`crate::core::Hub::shed_streams`]);
//! a call already written to a device completes (its result is posted to any replica). The
//! bus keeps answering for a shed device ([`crate::core::hub::MOVE_LINGER`], 2 s, or until its
//! new stream announces itself) with "not held", so a call routed while the device
//! reconnects is retried by the dispatcher instead of being answered `device offline`.
//! A draining replica says once that it is leaving (the others forget it at once) and stops;
//! one that hears no other replica does nothing. A replica that dies without a word is
//! forgotten when its last report is older than [`Policy::stale_after`].
//!
//! Not here: how devices find another replica (the load balancer, and the agent's backoff).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::subject::ReplicaLoad;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::core::Hub;

/// When a replica sheds streams, and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Start shedding above the average by this percentage.
    pub threshold_percent: u32,
    /// Devices asked to reconnect per second at most.
    pub per_second: u32,
    /// Stop shedding at the average plus this percentage.
    pub target_percent: u32,
    /// Start only when over the average by at least this many streams.
    pub min_excess: u64,
    /// How often this replica publishes its count.
    pub publish_every: Duration,
    /// A count older than this is not used (its replica stopped or is draining).
    pub stale_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            threshold_percent: 25,
            per_second: 5,
            target_percent: 5,
            min_excess: 2,
            publish_every: Duration::from_secs(2),
            stale_after: Duration::from_secs(7),
        }
    }
}

/// What one tick decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Streams to shed now.
    pub shed: usize,
    /// Whether this replica is (still) shedding.
    pub shedding: bool,
}

/// Another replica as its last report described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub streams: u64,
    /// Under its `--max-streams` (or without one).
    pub room: bool,
}

impl Peer {
    pub fn of(load: &ReplicaLoad) -> Self {
        Self { streams: load.streams, room: load.max_streams.is_none_or(|max| load.streams < max) }
    }
}

/// The cluster's average streams per replica, in hundredths of a stream.
pub fn average_x100(own: u64, peers: &[Peer]) -> u64 {
    let total = own + peers.iter().map(|peer| peer.streams).sum::<u64>();
    total * 100 / (peers.len() as u64 + 1)
}

/// One tick's decision: `own` streams here, `peers` the recent reports of the other replicas,
/// `shedding` whether the previous tick was shedding.
pub fn decide(policy: &Policy, own: u64, peers: &[Peer], shedding: bool) -> Decision {
    const IDLE: Decision = Decision { shed: 0, shedding: false };
    // In hundredths of a stream, to stay in integers.
    let average_x100 = average_x100(own, peers);
    if !peers.iter().any(|peer| peer.room && peer.streams * 100 < average_x100) {
        return IDLE;
    }
    let own_x100 = own * 100;
    let start_x100 = average_x100 * u64::from(100 + policy.threshold_percent) / 100;
    let over_threshold = own_x100 > start_x100 && own_x100 >= average_x100 + policy.min_excess * 100;
    if !shedding && !over_threshold {
        return IDLE;
    }
    let target = (average_x100 * u64::from(100 + policy.target_percent) / 100).div_ceil(100);
    let excess = own.saturating_sub(target);
    if excess == 0 {
        return IDLE;
    }
    let shed = excess.min(u64::from(policy.per_second));
    Decision { shed: usize::try_from(shed).unwrap_or(usize::MAX), shedding: true }
}

/// What the rebalancer counted, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Devices asked to reconnect elsewhere.
    pub shed: AtomicU64,
    /// The cluster's average streams per replica at the last tick, in hundredths.
    pub average_x100: AtomicU64,
}

/// Publishes this replica's count and sheds streams by [`decide`], until `cancel`.
pub async fn run(
    policy: Policy,
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
    max_streams: Option<usize>,
    draining: Arc<AtomicBool>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    const TICK: Duration = Duration::from_secs(1);
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_published: Option<tokio::time::Instant> = None;
    let mut shedding = false;
    let report = |streams: u64, leaving: bool| ReplicaLoad {
        replica: hub.replica_id().to_owned(),
        streams,
        max_streams: max_streams.map(|m| m as u64),
        leaving,
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        if draining.load(Ordering::Acquire) {
            // Once: the others stop counting this replica (it takes no more streams).
            if let Err(error) = bus.publish_load(&report(0, true)).await {
                tracing::debug!(%error, "leaving report not published");
            }
            return;
        }
        let own = hub.connected() as u64;
        if last_published.is_none_or(|at| at.elapsed() >= policy.publish_every) {
            let load = report(own, false);
            if let Err(error) = bus.publish_load(&load).await {
                tracing::debug!(%error, "load report not published");
            }
            last_published = Some(tokio::time::Instant::now());
        }
        let peers: Vec<Peer> = bus
            .peer_loads()
            .into_iter()
            .filter(|(_, age)| *age <= policy.stale_after)
            .map(|(load, _)| Peer::of(&load))
            .collect();
        let average_x100 = average_x100(own, &peers);
        stats.average_x100.store(average_x100, Ordering::Relaxed);
        let decision = decide(&policy, own, &peers, shedding);
        if decision.shedding != shedding {
            tracing::info!(
                streams = own,
                replicas = peers.len() + 1,
                average = average_x100 as f64 / 100.0,
                "{}",
                if decision.shedding {
                    "far above the cluster's average streams: asking devices to reconnect elsewhere"
                } else {
                    "back near the cluster's average streams: rebalancing stops"
                }
            );
        }
        shedding = decision.shedding;
        if decision.shed > 0 {
            let shed = hub.shed_streams(decision.shed);
            stats.shed.fetch_add(shed.len() as u64, Ordering::Relaxed);
            tracing::debug!(count = shed.len(), devices = ?shed, "asked devices to reconnect (rebalance)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let policy = Policy::default();
        let open = |counts: &[u64]| counts.iter().map(|&streams| Peer { streams, room: true }).collect::<Vec<_>>();
        // (own, peers, shedding before) -> (shed, shedding after)
        let cases: &[(u64, &[u64], bool, usize, bool)] = &[
            // Alone: nothing to compare with.
            (100, &[], false, 0, false),
            // Balanced.
            (40, &[40, 40], false, 0, false),
            // A new replica joined two loaded ones: average 40, start over 50.
            (60, &[60, 0], false, 5, true),
            // Over the average but under the threshold: not started.
            (48, &[36, 36], false, 0, false),
            // Already shedding: goes on down to the target, ceil(40 * 1.05) = 42.
            (48, &[36, 36], true, 5, true),
            (44, &[38, 38], true, 2, true),
            (42, &[39, 39], true, 0, false),
            // The new replica itself never sheds.
            (0, &[60, 60], false, 0, false),
            // Small numbers: 3 against 1 is 50% over an average of 2, but only 1 stream over.
            (3, &[1], false, 0, false),
            (5, &[1], false, 1, true),
            // The per-second cap.
            (1000, &[0, 0, 0], false, 5, true),
        ];
        for &(own, peers, before, shed, after) in cases {
            let decision = decide(&policy, own, &open(peers), before);
            assert_eq!((decision.shed, decision.shedding), (shed, after), "{own} {peers:?} {before}");
        }
        let faster = Policy { per_second: 50, ..policy };
        assert_eq!(decide(&faster, 1000, &open(&[0, 0, 0]), false).shed, 50);
        // The only replica under the average is full: shedding would only bounce devices.
        let full = [Peer { streams: 10, room: false }];
        assert_eq!(decide(&policy, 20, &full, true), Decision { shed: 0, shedding: false });
        let reports = [
            (ReplicaLoad { replica: "a".into(), streams: 10, max_streams: Some(10), leaving: false }, false),
            (ReplicaLoad { replica: "b".into(), streams: 9, max_streams: Some(10), leaving: false }, true),
            (ReplicaLoad { replica: "c".into(), streams: 900, max_streams: None, leaving: false }, true),
        ];
        for (load, room) in reports {
            assert_eq!(Peer::of(&load).room, room, "{load:?}");
        }
    }
}
