//! The call log's writer: every dispatch leaves a record, written off the hot path.
//!
//! The replicas a call crosses each hand their part of its record ([`CallPart`]) to their own
//! [`CallLog`]: the dispatching replica when it sends the call and when it answers `offline` or
//! `timed out` itself, the replica holding the device's stream when it writes the call there,
//! and the replica that receives the device's result (whichever it is: a result posted after its
//! dispatcher died still completes the record). Handing a part over never waits: it goes into a
//! bounded queue, and when the queue is full the part is dropped and counted. One background task
//! per replica drains the queue in batches (a call's parts that meet in one batch become one
//! row), looks up each new call's tool class in the device's manifest, and stores the batch with
//! one upsert per few hundred rows. A batch the database refuses is dropped and counted: a
//! database outage loses log records, never calls.
//!
//! Not here: how parts merge into a row and how rows are listed (the registry's `calls`), and
//! the sweep and retention (the janitor).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use protocol::{CallMode, CallOutcome, HostResult, ToolClass};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::registry::{CallPart, Dispatched, Finished, Pushed, Registry};

/// Parts waiting to be written before further ones are dropped.
pub const QUEUE_CAPACITY: usize = 16_384;
/// Most parts stored by one batch.
const MAX_BATCH: usize = 2_000;
/// How long the writer gathers parts after the first of a batch arrives, so a quick call's
/// parts land in one row.
const LINGER: Duration = Duration::from_millis(100);
/// How long a device's tool classes are kept before its manifest is read again.
const CLASS_TTL: Duration = Duration::from_secs(60);
/// Devices whose classes are kept at once (the cache starts over beyond).
const CLASS_CACHE_DEVICES: usize = 10_000;
/// How long a shutdown waits for the last batch.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// At most one warning about dropped records per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropReason {
    pub reason: &'static str,
}

/// The writer's counters, registered with the replica's metrics
/// (`dispatcher_call_log_written_total`, `dispatcher_call_log_dropped_total{reason}`).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Parts stored.
    pub written: Counter,
    /// Parts lost: `queue_full` (the writer could not keep up) or `database` (the batch was
    /// refused: the database is down or failing).
    pub dropped: Family<DropReason, Counter>,
}

impl Counters {
    fn drop_parts(&self, reason: &'static str, n: usize) {
        self.dropped.get_or_create(&DropReason { reason }).inc_by(n as u64);
    }
}

/// The writer task and the token that stops it.
type RunningWriter = (CancellationToken, JoinHandle<()>);

/// A replica's handle on its call log writer: cheap to clone, never blocks.
#[derive(Clone)]
pub struct CallLog {
    tx: mpsc::Sender<CallPart>,
    replica_id: Arc<str>,
    counters: Counters,
    writer: Arc<Mutex<Option<RunningWriter>>>,
    last_warning: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for CallLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallLog").field("replica_id", &self.replica_id).finish()
    }
}

/// A dispatch as the dispatching replica starts it.
#[derive(Debug, Clone)]
pub struct Dispatch<'a> {
    pub call_id: &'a str,
    pub device_id: &'a str,
    pub owner: &'a str,
    pub tool: &'a str,
    pub mode: CallMode,
    pub proposal_id: Option<&'a str>,
    pub timeout: Duration,
}

impl CallLog {
    /// Starts the writer of replica `replica_id` on `registry`; it stops (after a last batch)
    /// on [`CallLog::close`] or when `cancel` fires.
    pub fn start(registry: Registry, replica_id: &str, counters: Counters, cancel: CancellationToken) -> Self {
        Self::with_capacity(registry, replica_id, counters, cancel, QUEUE_CAPACITY)
    }

    /// [`CallLog::start`] with a queue of `capacity` parts.
    pub fn with_capacity(
        registry: Registry,
        replica_id: &str,
        counters: Counters,
        cancel: CancellationToken,
        capacity: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stop = cancel.child_token();
        let writer = Writer { registry, rx, counters: counters.clone(), classes: HashMap::new(), last_warning: None };
        let handle = tokio::spawn(writer.run(stop.clone()));
        Self {
            tx,
            replica_id: replica_id.into(),
            counters,
            writer: Arc::new(Mutex::new(Some((stop, handle)))),
            last_warning: Arc::default(),
        }
    }

    /// Stops the writer after it stored what is queued (waiting a few seconds at most).
    pub async fn close(&self) {
        let Some((stop, handle)) = self.writer.lock().take() else {
            return;
        };
        stop.cancel();
        if tokio::time::timeout(CLOSE_WAIT, handle).await.is_err() {
            tracing::warn!("call log: the last batch was not stored in time");
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn hand_over(&self, part: CallPart) {
        match self.tx.try_send(part) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.drop_parts("queue_full", 1);
                let mut last = self.last_warning.lock();
                if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    *last = Some(Instant::now());
                    tracing::warn!("call log: queue full, records dropped (see dispatcher_call_log_dropped_total)");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.counters.drop_parts("closed", 1),
        }
    }

    /// The dispatching replica sends a call.
    pub fn dispatched(&self, dispatch: Dispatch<'_>) {
        let now = Utc::now();
        let mut part = CallPart::new(dispatch.call_id, dispatch.device_id, dispatch.owner);
        part.dispatched = Some(Dispatched {
            tool: dispatch.tool.to_owned(),
            mode: dispatch.mode,
            at: now,
            by: self.replica_id.to_string(),
            deadline: now + chrono::Duration::from_std(dispatch.timeout).unwrap_or(chrono::Duration::MAX),
        });
        if dispatch.mode == CallMode::Apply {
            part.class = Some(ToolClass::Mutate);
        }
        part.proposal_id = dispatch.proposal_id.map(str::to_owned);
        self.hand_over(part);
    }

    /// The dispatching replica's answer, when it is its own (`device offline`, `device timed
    /// out`); the device's answers are recorded by the replica that receives them.
    pub fn answered_by_server(&self, device_id: &str, owner: &str, result: &HostResult) {
        let outcome = if result.is_offline() {
            CallOutcome::Offline
        } else if result.is_timed_out() {
            CallOutcome::TimedOut
        } else {
            return;
        };
        let mut part = CallPart::new(&result.call_id, device_id, owner);
        part.finished =
            Some(Finished { outcome, error: result.error.clone(), at: Some(Utc::now()), result_bytes: None });
        self.hand_over(part);
    }

    /// A mutation's dry run was stored as proposal `proposal_id`.
    pub fn proposed(&self, call_id: &str, device_id: &str, owner: &str, proposal_id: &str) {
        let mut part = CallPart::new(call_id, device_id, owner);
        part.proposal_id = Some(proposal_id.to_owned());
        part.class = Some(ToolClass::Mutate);
        self.hand_over(part);
    }

    /// This replica wrote call `call_id` to the device's stream.
    pub fn pushed(&self, call_id: &str, device_id: &str, owner: &str) {
        let mut part = CallPart::new(call_id, device_id, owner);
        part.pushed = Some(Pushed { at: Utc::now(), by: self.replica_id.to_string() });
        self.hand_over(part);
    }

    /// The device posted `result` (`bytes` long) to this replica.
    pub fn answered_by_device(&self, device_id: &str, owner: &str, result: &HostResult, bytes: usize) {
        let mut part = CallPart::new(&result.call_id, device_id, owner);
        let outcome = if result.ok { CallOutcome::Ok } else { CallOutcome::Error };
        part.finished = Some(Finished {
            outcome,
            error: if result.ok { None } else { result.error.clone() },
            at: Some(Utc::now()),
            result_bytes: Some(bytes as u64),
        });
        self.hand_over(part);
    }
}

/// The background task: drains the queue in batches into the registry.
struct Writer {
    registry: Registry,
    rx: mpsc::Receiver<CallPart>,
    counters: Counters,
    /// Device id → when its manifest was read, and its tools' classes.
    classes: HashMap<String, (Instant, HashMap<String, ToolClass>)>,
    last_warning: Option<Instant>,
}

impl Writer {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                part = self.rx.recv() => match part {
                    Some(part) => part,
                    None => return,
                },
            };
            let mut batch = vec![first];
            // Sleep through the linger, then take what came: waiting on the queue part by part
            // instead would wake this task (from another thread, often) for every part, three
            // times per call. The queue holds far more than a linger's worth at full load;
            // parts beyond a full batch start the next one at once.
            tokio::select! {
                _ = tokio::time::sleep(LINGER) => {}
                _ = stop.cancelled() => {}
            }
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(part) => batch.push(part),
                    Err(_) => break,
                }
            }
            self.store(batch).await;
        }
        // Stopping: what is queued goes in a last batch.
        self.rx.close();
        let mut batch = Vec::new();
        while let Ok(part) = self.rx.try_recv() {
            batch.push(part);
        }
        if !batch.is_empty() {
            self.store(batch).await;
        }
    }

    async fn store(&mut self, mut batch: Vec<CallPart>) {
        self.add_classes(&mut batch).await;
        let count = batch.len();
        match self.registry.record_calls(batch).await {
            Ok(_) => {
                self.counters.written.inc_by(count as u64);
            }
            Err(error) => {
                self.counters.drop_parts("database", count);
                if self.last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(%error, records = count, "call log: records dropped, the database refused them");
                }
            }
        }
    }

    /// Fills in the tool class of each dispatch part that has none, from its device's
    /// manifest (read at most once a minute per device; left out when it cannot be read).
    async fn add_classes(&mut self, batch: &mut [CallPart]) {
        for part in batch.iter_mut() {
            let Some(dispatched) = &part.dispatched else { continue };
            if part.class.is_some() {
                continue;
            }
            let fresh = self.classes.get(&part.device_id).is_some_and(|(at, _)| at.elapsed() < CLASS_TTL);
            if !fresh {
                let classes = match self.registry.device(&part.owner, &part.device_id).await {
                    Ok(Some(record)) => record
                        .manifest
                        .map(|manifest| manifest.tools.into_iter().map(|tool| (tool.name, tool.class)).collect())
                        .unwrap_or_default(),
                    Ok(None) => HashMap::new(),
                    // The database is failing: the batch will say so.
                    Err(_) => return,
                };
                if self.classes.len() >= CLASS_CACHE_DEVICES {
                    self.classes.clear();
                }
                self.classes.insert(part.device_id.clone(), (Instant::now(), classes));
            }
            part.class =
                self.classes.get(&part.device_id).and_then(|(_, classes)| classes.get(&dispatched.tool)).copied();
        }
    }
}
