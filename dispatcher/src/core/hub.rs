//! The hub: this replica's live state (its device streams and their queues, the calls it waits
//! for, its credential cache, its stall watch) behind one small synchronous API.
//!
//! Both buses act on a hub: the in-memory bus calls it directly, the NATS bus calls it for
//! what arrives on its subscriptions. It never talks to the network or the database; decisions are made by the
//! tables it holds ([`ConnectionTable`], [`PendingTable`]) and the frames they produce are
//! handed to the streams' queues ([`StreamQueue`]) without waiting.
//!
//! A stream's queue is bounded in frames and in bytes of call JSON; a push beyond either is
//! refused ([`CallAck::Full`]). A stream that does not drain (a frame unwritten, or a write
//! blocked, for two keepalive intervals) is dropped by the stall watch: its queue is emptied at
//! once and its connection closed, so the memory comes back and the device reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use protocol::sse::ReconnectReason;
use protocol::subject::{CallAck, DeliverAck, Holder};
use protocol::{HostCall, HostResult};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::cache::{CachedDevice, TtlCache};
use super::connections::{Accept, Conn, ConnectionTable, Takeover};
use super::pending::PendingTable;
use super::queue::{Admit, QueueLimits, StreamQueue};

/// Frames queued to one device stream before pushes are refused.
pub const STREAM_QUEUE: usize = 256;
/// Bytes of call JSON queued to one device stream before pushes are refused (the default of
/// `--stream-queue-bytes`).
pub const STREAM_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// How long a credential stays cached.
pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(30);
const AUTH_CACHE_CAPACITY: usize = 100_000;
/// How often the stall watch ticks, and how stale its last tick may be before pushes stop.
const TICK: Duration = Duration::from_millis(250);
const PUSH_FENCE: Duration = Duration::from_secs(2);
/// After waking from a stall, how long new streams are refused: stream requests that waited in
/// socket buffers while the process was frozen were given up by their devices long ago, and
/// opening one now would supersede the device's live stream elsewhere.
const WAKE_QUARANTINE: Duration = Duration::from_secs(2);

/// What a device stream is sent.
#[derive(Debug, Clone)]
pub enum Frame {
    Call(CallFrame),
    Close(Close),
}

/// A call as queued to a stream: encoded once, when pushed, so the queue holds its compact
/// JSON text (and counts its bytes) rather than a tree of values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFrame {
    pub call_id: String,
    /// The [`HostCall`] as JSON, one line: the `data` of its `call` event.
    pub json: String,
}

impl CallFrame {
    pub fn encode(call: &HostCall) -> Result<Self, serde_json::Error> {
        Ok(Self { call_id: call.call_id.clone(), json: serde_json::to_string(call)? })
    }

    /// The call back as a value (tests, tools).
    pub fn decode(&self) -> Result<HostCall, serde_json::Error> {
        serde_json::from_str(&self.json)
    }
}

/// Why a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    Superseded,
    Revoked,
    Reconnect(ReconnectReason),
}

/// A stream registered in the hub: its identity and the queue its frames arrive in.
#[derive(Debug)]
pub struct Opened {
    pub conn_id: u64,
    pub epoch: u64,
    pub queue: Arc<StreamQueue>,
    /// False when a newer stream of the device was already here: the receiver holds only a
    /// `superseded` close.
    pub owner: bool,
}

pub struct Hub {
    replica_id: String,
    route_tag: u32,
    conns: Mutex<ConnectionTable>,
    pending: Mutex<PendingTable>,
    next_conn_id: AtomicU64,
    started: Instant,
    /// Milliseconds since `started` of the stall watch's last tick.
    last_tick_ms: AtomicU64,
    /// Milliseconds since `started` until which new streams are refused (after a stall).
    quarantine_until_ms: AtomicU64,
    device_tokens: Mutex<TtlCache<[u8; 32], CachedDevice>>,
    api_tokens: Mutex<TtlCache<[u8; 32], String>>,
    /// Counts the api-token revocations heard here: long-lived api-token streams (events) watch
    /// it and ask again whether their token is still good.
    api_token_revocations: watch::Sender<u64>,
    /// Device id to its owner, for devices seen live in the registry: a dispatch checks
    /// ownership here instead of in the database.
    device_owners: Mutex<TtlCache<String, String>>,
    pushed: Mutex<PushedCalls>,
    queue_limits: QueueLimits,
    /// Bytes of call JSON queued on every stream here.
    queued_bytes: Arc<AtomicUsize>,
    /// Streams dropped because they did not drain.
    stuck_streams: AtomicU64,
    /// Streams being opened under a [`StreamSlot`].
    opening: AtomicUsize,
    /// Devices asked to reconnect elsewhere (rebalance), and when: the bus keeps answering
    /// for them for [`MOVE_LINGER`] so calls meanwhile are retried, not answered offline.
    moving: Mutex<HashMap<String, Instant>>,
}

/// How long the bus of a replica keeps answering for a device shed by the rebalancer, with
/// "not held" (the dispatcher tries again) instead of "absent" (offline), until its new stream
/// is up elsewhere. A takeover from its new replica ends it early.
pub const MOVE_LINGER: Duration = Duration::from_secs(2);

/// A place for one more stream under a cap, held while the stream opens
/// ([`Hub::reserve_stream`]); dropping it gives the place back.
#[derive(Debug)]
pub struct StreamSlot(Arc<Hub>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.opening.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long the id of a call without a deadline is remembered after its push (the longest
/// call timeout).
const PUSHED_TTL: chrono::Duration = chrono::Duration::seconds(300);
/// Entries below which the pushed-call log is never swept.
const PUSHED_SWEEP_MIN: usize = 1024;

/// The ids of the calls this replica pushed, each until its deadline: the dispatcher retries a
/// call whose acknowledgement did not come in time, and the retry must not push it twice.
#[derive(Debug, Default)]
struct PushedCalls {
    until: HashMap<String, chrono::DateTime<chrono::Utc>>,
    /// Size at which entries past their deadline are next swept.
    sweep_at: usize,
}

impl PushedCalls {
    fn contains(&self, call_id: &str) -> bool {
        self.until.contains_key(call_id)
    }

    /// Records a push; sweeps the entries past their time when the log has doubled.
    fn insert(&mut self, call_id: String, until: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) {
        if self.until.len() >= self.sweep_at.max(PUSHED_SWEEP_MIN) {
            self.until.retain(|_, kept| *kept > now);
            self.sweep_at = self.until.len() * 2;
        }
        self.until.insert(call_id, until);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("replica_id", &self.replica_id)
            .field("streams", &self.connected())
            .field("pending", &self.pending_calls())
            .finish()
    }
}

impl Hub {
    /// A hub for one replica. Start [`Hub::spawn_stall_watch`] beside it: without its ticks the hub
    /// soon counts itself frozen and refuses pushes and new streams.
    pub fn new(replica_id: impl Into<String>, route_tag: u32) -> Arc<Self> {
        Self::with_stream_queue_bytes(replica_id, route_tag, STREAM_QUEUE_BYTES)
    }

    /// A hub whose streams each queue at most `queue_bytes` bytes of call JSON.
    pub fn with_stream_queue_bytes(replica_id: impl Into<String>, route_tag: u32, queue_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            replica_id: replica_id.into(),
            route_tag,
            conns: Mutex::default(),
            pending: Mutex::default(),
            next_conn_id: AtomicU64::new(1),
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            quarantine_until_ms: AtomicU64::new(0),
            device_tokens: Mutex::new(TtlCache::new(AUTH_CACHE_TTL, AUTH_CACHE_CAPACITY)),
            api_tokens: Mutex::new(TtlCache::new(AUTH_CACHE_TTL, AUTH_CACHE_CAPACITY)),
            api_token_revocations: watch::Sender::new(0),
            device_owners: Mutex::new(TtlCache::new(AUTH_CACHE_TTL, AUTH_CACHE_CAPACITY)),
            pushed: Mutex::default(),
            queue_limits: QueueLimits { frames: STREAM_QUEUE, bytes: queue_bytes },
            queued_bytes: Arc::default(),
            stuck_streams: AtomicU64::new(0),
            opening: AtomicUsize::new(0),
            moving: Mutex::default(),
        })
    }

    /// How much longer the bus should keep answering for `device_id`, shed here a moment ago;
    /// `None` when it is not moving.
    pub fn moving_for(&self, device_id: &str) -> Option<Duration> {
        let mut moving = self.moving.lock();
        let since = *moving.get(device_id)?;
        match MOVE_LINGER.checked_sub(since.elapsed()) {
            Some(left) if !left.is_zero() => Some(left),
            _ => {
                moving.remove(device_id);
                None
            }
        }
    }

    /// A place for one more stream when the streams here, with those being opened, stay within
    /// `max`; `None` when full. Concurrent openers count each other, so the cap is never passed
    /// (a stream that registered before its opener dropped the slot counts twice for a moment:
    /// near the cap, a refusal may come one stream early).
    pub fn reserve_stream(self: &Arc<Self>, max: usize) -> Option<StreamSlot> {
        let opening = self.opening.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = StreamSlot(self.clone());
        (self.connected() + opening <= max).then_some(slot)
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// The 32-bit tag that prefixes this replica's call ids (see `protocol::subject`).
    pub fn route_tag(&self) -> u32 {
        self.route_tag
    }

    pub fn connected(&self) -> usize {
        self.conns.lock().len()
    }

    pub fn pending_calls(&self) -> usize {
        self.pending.lock().len()
    }

    /// Bytes of call JSON queued on the streams here, not yet handed to their connections.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Streams dropped so far because they did not drain.
    pub fn stuck_streams(&self) -> u64 {
        self.stuck_streams.load(Ordering::Relaxed)
    }

    // ---- streams ----

    /// Registers a new stream of `device_id` with `epoch`; an older local stream of the device
    /// is told it was superseded.
    pub fn open(&self, device_id: &str, epoch: u64) -> Opened {
        let queue = Arc::new(StreamQueue::new(self.queue_limits, self.queued_bytes.clone()));
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let decision = self.conns.lock().accept(device_id, Conn { conn_id, epoch, queue: queue.clone() });
        let owner = match decision {
            Accept::Owner { superseded } => {
                if let Some(old) = superseded {
                    old.queue.close(Close::Superseded);
                }
                true
            }
            Accept::Stale => {
                queue.close(Close::Superseded);
                false
            }
        };
        Opened { conn_id, epoch, queue, owner }
    }

    /// Forgets a stream that ended. True when the device has no stream here any more.
    pub fn release(&self, device_id: &str, conn_id: u64) -> bool {
        self.conns.lock().release(device_id, conn_id)
    }

    /// Pushes a call to the device's stream here, if it has one and this replica can vouch
    /// for it: not expired, and not frozen since the stream may have moved.
    /// A call pushed here already (the dispatcher asked again because the acknowledgement was
    /// late or lost) is acknowledged again and not pushed a second time. A stream whose queue
    /// is over its frame or byte budget takes nothing: [`CallAck::Full`].
    pub fn push(&self, device_id: &str, call: &HostCall) -> CallAck {
        // The cheap refusals first: a large call is not encoded for nothing.
        if let Some(refused) = self.refuse_push(device_id, &call.call_id, call.deadline) {
            return refused;
        }
        // Encoded outside the locks: a large call takes a while.
        match CallFrame::encode(call) {
            Ok(frame) => self.push_frame(device_id, frame, call.deadline),
            Err(error) => {
                tracing::error!(%error, device_id, call_id = %call.call_id, "cannot encode a call");
                CallAck::NotHeld
            }
        }
    }

    /// [`Hub::push`] of a call already encoded as its frame (a call that arrived from another
    /// replica as the same JSON), with the call's deadline.
    pub fn push_frame(&self, device_id: &str, frame: CallFrame, deadline: Option<DateTime<Utc>>) -> CallAck {
        if let Some(refused) = self.refuse_push(device_id, &frame.call_id, deadline) {
            return refused;
        }
        let now = chrono::Utc::now();
        let mut pushed = self.pushed.lock();
        if pushed.contains(&frame.call_id) {
            return CallAck::Accepted;
        }
        let queue = match self.conns.lock().get(device_id) {
            Some(conn) => conn.queue.clone(),
            None => return CallAck::NotHeld,
        };
        let bytes = frame.json.len();
        let call_id = frame.call_id.clone();
        match queue.push_call(Frame::Call(frame), bytes) {
            Admit::Accepted => {
                pushed.insert(call_id, deadline.unwrap_or(now + PUSHED_TTL), now);
                CallAck::Accepted
            }
            Admit::Full => CallAck::Full,
            Admit::Closed => CallAck::NotHeld,
        }
    }

    /// Why a call cannot be pushed here, checked before any work: expired, a frozen replica, no
    /// stream of the device; or [`CallAck::Accepted`] for a call pushed already (asked again
    /// because the acknowledgement was late or lost). `None`: go ahead.
    fn refuse_push(&self, device_id: &str, call_id: &str, deadline: Option<DateTime<Utc>>) -> Option<CallAck> {
        if deadline.is_some_and(|deadline| chrono::Utc::now() >= deadline) {
            return Some(CallAck::Expired);
        }
        if self.is_stalled() {
            return Some(CallAck::NotHeld);
        }
        if self.pushed.lock().contains(call_id) {
            return Some(CallAck::Accepted);
        }
        if self.conns.lock().get(device_id).is_none() {
            return Some(CallAck::NotHeld);
        }
        None
    }

    /// Another replica opened a stream of the device with `epoch`. Returns the epoch to
    /// re-announce when the local stream is the newer one.
    pub fn takeover(&self, device_id: &str, epoch: u64) -> Option<u64> {
        // A device that moved away is up elsewhere: nothing to linger for.
        self.moving.lock().remove(device_id);
        let mut conns = self.conns.lock();
        match conns.takeover(device_id, epoch) {
            Takeover::Close(conn_id) => {
                if let Some(conn) = conns.remove_conn(device_id, conn_id) {
                    conn.queue.close(Close::Superseded);
                }
                None
            }
            Takeover::Reassert(mine) => Some(mine),
            Takeover::Nothing => None,
        }
    }

    pub fn holder(&self, device_id: &str) -> Option<Holder> {
        self.conns.lock().get(device_id).map(|conn| Holder { replica: self.replica_id.clone(), epoch: conn.epoch })
    }

    pub fn held_devices(&self) -> Vec<String> {
        self.conns.lock().device_ids()
    }

    /// Closes every stream here with `close` (shutdown, lost broker, stall).
    pub fn close_all(&self, close: Close) -> usize {
        let drained = self.conns.lock().drain();
        for (_, conn) in &drained {
            conn.queue.close(close);
        }
        drained.len()
    }

    /// Asks up to `count` devices to reconnect elsewhere (`reconnect`, `rebalance`): the
    /// streams with nothing queued, idlest first. A call already written to a device is not
    /// affected (the device posts its result to any replica); calls routed here meanwhile find
    /// no stream and the dispatcher tries again. Returns the devices asked.
    pub fn shed_streams(&self, count: usize) -> Vec<String> {
        if count == 0 {
            return Vec::new();
        }
        let mut conns = self.conns.lock();
        let mut idle: Vec<(Instant, String, u64)> = conns
            .iter()
            .filter_map(|(device_id, conn)| Some((conn.queue.idle_since()?, device_id.clone(), conn.conn_id)))
            .collect();
        idle.sort();
        let now = Instant::now();
        let mut moving = self.moving.lock();
        moving.retain(|_, since| now.duration_since(*since) < MOVE_LINGER);
        idle.into_iter()
            .take(count)
            .filter_map(|(_, device_id, conn_id)| {
                let conn = conns.remove_conn(&device_id, conn_id)?;
                conn.queue.close(Close::Reconnect(ReconnectReason::Rebalance));
                moving.insert(device_id.clone(), now);
                Some(device_id)
            })
            .collect()
    }

    /// Drops the streams here that have not drained for longer than `limit` (a frame waiting,
    /// or a write blocked, that long: the device stopped reading). Each one's queue is emptied
    /// and its connection closed; the calls that were queued resolve as unanswered calls do.
    /// Returns the devices dropped and how long each was stuck.
    pub fn drop_stuck_streams(&self, limit: Duration) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let stuck: Vec<(String, Arc<StreamQueue>, Duration)> = {
            let mut conns = self.conns.lock();
            let found: Vec<(String, u64, Duration)> = conns
                .iter()
                .filter_map(|(device_id, conn)| {
                    let stuck_for = conn.queue.stuck_for(now)?;
                    (stuck_for > limit).then(|| (device_id.clone(), conn.conn_id, stuck_for))
                })
                .collect();
            found
                .into_iter()
                .filter_map(|(device_id, conn_id, stuck_for)| {
                    let conn = conns.remove_conn(&device_id, conn_id)?;
                    Some((device_id, conn.queue, stuck_for))
                })
                .collect()
        };
        stuck
            .into_iter()
            .map(|(device_id, queue, stuck_for)| {
                let dropped = queue.abandon();
                self.stuck_streams.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    %device_id,
                    stuck_ms = stuck_for.as_millis() as u64,
                    dropped_bytes = dropped,
                    "stream dropped: the device is not reading it"
                );
                (device_id, stuck_for)
            })
            .collect()
    }

    /// A device was revoked: close its stream here, fail the calls this replica waits for on
    /// it, and forget its cached token.
    pub fn revoke(&self, device_id: &str) {
        if let Some(conn) = self.conns.lock().remove(device_id) {
            conn.queue.close(Close::Revoked);
        }
        self.pending.lock().fail_device(device_id, |id| HostResult::offline(id));
        self.device_tokens.lock().retain(|cached| cached.device_id != device_id);
        self.device_owners.lock().remove(&device_id.to_owned());
    }

    // ---- pending calls ----

    /// Registers a dispatch; `None` if the id is already pending.
    pub fn register_call(&self, call_id: &str, device_id: &str) -> Option<oneshot::Receiver<HostResult>> {
        self.pending.lock().insert(call_id, device_id)
    }

    pub fn cancel_call(&self, call_id: &str) {
        self.pending.lock().cancel(call_id);
    }

    pub fn resolve(&self, from_device: &str, result: HostResult) -> DeliverAck {
        self.pending.lock().resolve(from_device, result)
    }

    /// True while a dispatch of this replica waits for `call_id`.
    pub fn is_pending(&self, call_id: &str) -> bool {
        self.pending.lock().contains(call_id)
    }

    // ---- credential cache ----

    pub fn cached_device(&self, token_hash: &[u8; 32]) -> Option<CachedDevice> {
        self.device_tokens.lock().get(token_hash, Instant::now())
    }

    pub fn cache_device(&self, token_hash: [u8; 32], device: CachedDevice) {
        self.device_tokens.lock().insert(token_hash, device, Instant::now());
    }

    pub fn cached_user(&self, token_hash: &[u8; 32]) -> Option<String> {
        self.api_tokens.lock().get(token_hash, Instant::now())
    }

    pub fn cache_user(&self, token_hash: [u8; 32], user_id: String) {
        self.api_tokens.lock().insert(token_hash, user_id, Instant::now());
    }

    /// Api tokens were revoked: forget them, so their next request asks the registry (and is
    /// refused). Returns how many were cached here.
    pub fn revoke_api_tokens<'a>(&self, token_hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> usize {
        let evicted = {
            let mut cache = self.api_tokens.lock();
            token_hashes
                .into_iter()
                .filter(|hash| {
                    let cached = cache.contains(hash);
                    cache.remove(hash);
                    cached
                })
                .count()
        };
        self.api_token_revocations.send_modify(|count| *count += 1);
        evicted
    }

    /// Changes after every api-token revocation heard here (and every flush of the caches).
    pub fn api_token_revocations(&self) -> watch::Receiver<u64> {
        self.api_token_revocations.subscribe()
    }

    /// The owner of a live device, if this replica looked it up recently.
    pub fn cached_owner(&self, device_id: &str) -> Option<String> {
        self.device_owners.lock().get(&device_id.to_owned(), Instant::now())
    }

    pub fn cache_owner(&self, device_id: String, owner: String) {
        self.device_owners.lock().insert(device_id, owner, Instant::now());
    }

    /// Forgets every cached credential and owner (the replica may have missed revocations).
    pub fn flush_credentials(&self) {
        self.device_tokens.lock().clear();
        self.api_tokens.lock().clear();
        self.device_owners.lock().clear();
        self.api_token_revocations.send_modify(|count| *count += 1);
    }

    // ---- stall watch ----

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records that the process is running; returns how long since the previous tick.
    pub fn tick(&self) -> Duration {
        let now = self.now_ms();
        let last = self.last_tick_ms.swap(now, Ordering::AcqRel);
        Duration::from_millis(now.saturating_sub(last))
    }

    /// True when the stall watch has not ticked for a while: the process was frozen, and its
    /// streams may have moved to another replica meanwhile.
    pub fn is_stalled(&self) -> bool {
        let last = self.last_tick_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(last)) > PUSH_FENCE
    }

    /// Starts the stall watch on a thread of its own, ticking until `cancel`. A gap longer than
    /// `stall_after` (the process was frozen past the devices' patience) gives up every stream
    /// with `reconnect`: they may have moved. Each tick also drops the streams that have not
    /// drained for twice `stall_after` (the keepalive interval): [`Hub::drop_stuck_streams`].
    ///
    /// Its own thread, not a task: what it detects is the whole process stopped (SIGSTOP, a paused
    /// VM), which stops this thread too, whereas an async runtime merely busy with requests
    /// (thousands of calls on a starved CPU) delays a task's timer and would pass for a freeze,
    /// giving up every stream of a replica that is working.
    pub fn spawn_stall_watch(
        self: Arc<Self>,
        stall_after: Duration,
        cancel: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("stall-watch".into()).spawn(move || self.watch_stalls(stall_after, &cancel))
    }

    fn watch_stalls(&self, stall_after: Duration, cancel: &CancellationToken) {
        self.tick();
        while !cancel.is_cancelled() {
            std::thread::sleep(TICK);
            if let Some((gap, closed)) = self.check_stall(stall_after) {
                tracing::warn!(gap_ms = gap.as_millis() as u64, closed, "replica was frozen; gave up its streams");
                continue;
            }
            self.drop_stuck_streams(stall_after * 2);
        }
    }

    /// One tick of the stall watch. After a gap longer than `stall_after`, every stream is
    /// closed *before* the tick is recorded: until then the push fence holds, so a replica
    /// that wakes up pushes nothing into a stream whose device may have moved. Returns the gap
    /// and how many streams were closed when it gave them up.
    pub fn check_stall(&self, stall_after: Duration) -> Option<(Duration, usize)> {
        let now = self.now_ms();
        let last = self.last_tick_ms.load(Ordering::Acquire);
        let gap = Duration::from_millis(now.saturating_sub(last));
        let closed = (gap > stall_after).then(|| {
            let until = now.saturating_add(u64::try_from(WAKE_QUARANTINE.as_millis()).unwrap_or(u64::MAX));
            self.quarantine_until_ms.store(until, Ordering::Release);
            self.close_all(Close::Reconnect(ReconnectReason::Stalled))
        });
        self.tick();
        closed.map(|closed| (gap, closed))
    }

    /// False while the replica may be stale: frozen (the stall watch has not ticked), or just
    /// woken from a stall. A stream request handled then may be a ghost its device gave up.
    pub fn accepts_streams(&self) -> bool {
        !self.is_stalled() && self.now_ms() >= self.quarantine_until_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(id: &str) -> HostCall {
        HostCall {
            call_id: id.into(),
            tool: "t".into(),
            input: json!({}),
            mode: None,
            preconditions: None,
            deadline: None,
            traceparent: None,
        }
    }

    fn next_frame(queue: &mut Arc<StreamQueue>) -> Option<Frame> {
        queue.try_recv()
    }

    #[test]
    fn push_reaches_the_newest_stream_only() {
        let hub = Hub::new("r", 1);
        hub.tick();
        let mut first = hub.open("d", 1);
        let mut second = hub.open("d", 2);
        assert!(matches!(next_frame(&mut first.queue), Some(Frame::Close(Close::Superseded))));
        assert_eq!(hub.push("d", &call("c")), CallAck::Accepted);
        assert!(matches!(next_frame(&mut second.queue), Some(Frame::Call(c)) if c.call_id == "c"));
        assert!(next_frame(&mut first.queue).is_none());
        assert!(!hub.release("d", first.conn_id));
        assert!(hub.release("d", second.conn_id));
        assert_eq!(hub.push("d", &call("c2")), CallAck::NotHeld);
    }

    #[test]
    fn a_call_asked_again_is_acknowledged_but_pushed_once() {
        let hub = Hub::new("r", 1);
        hub.tick();
        let mut opened = hub.open("d", 1);
        let mut again = call("c");
        again.deadline = Some(chrono::Utc::now() + chrono::Duration::seconds(30));
        assert_eq!(hub.push("d", &again), CallAck::Accepted);
        assert_eq!(hub.push("d", &again), CallAck::Accepted);
        assert!(matches!(next_frame(&mut opened.queue), Some(Frame::Call(c)) if c.call_id == "c"));
        assert!(next_frame(&mut opened.queue).is_none(), "pushed twice");
        // Not even to a newer stream of the device.
        let mut newer = hub.open("d", 2);
        assert_eq!(hub.push("d", &again), CallAck::Accepted);
        assert!(next_frame(&mut newer.queue).is_none(), "pushed to a second stream");
        // A call that was never pushed (no stream) is not remembered.
        assert_eq!(hub.push("e", &call("x")), CallAck::NotHeld);
        let _e = hub.open("e", 1);
        assert_eq!(hub.push("e", &call("x")), CallAck::Accepted);
    }

    #[test]
    fn pushed_calls_are_forgotten_after_their_deadline() {
        let now = chrono::Utc::now();
        let mut log = PushedCalls::default();
        for i in 0..PUSHED_SWEEP_MIN {
            log.insert(format!("old-{i}"), now - chrono::Duration::seconds(1), now);
        }
        log.insert("live".into(), now + chrono::Duration::seconds(30), now);
        // The insert that found the log full swept the expired entries first.
        assert_eq!(log.len(), 1);
        assert!(log.contains("live") && !log.contains("old-0"));
    }

    #[test]
    fn a_stale_open_is_closed_at_once() {
        let hub = Hub::new("r", 1);
        let _newer = hub.open("d", 5);
        let mut older = hub.open("d", 4);
        assert!(!older.owner);
        assert!(matches!(next_frame(&mut older.queue), Some(Frame::Close(Close::Superseded))));
        assert_eq!(hub.holder("d").map(|h| h.epoch), Some(5));
    }

    #[test]
    fn expired_calls_are_not_pushed() {
        let hub = Hub::new("r", 1);
        hub.tick();
        let mut opened = hub.open("d", 1);
        let mut expired = call("c");
        expired.deadline = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(hub.push("d", &expired), CallAck::Expired);
        assert!(next_frame(&mut opened.queue).is_none());
    }

    #[test]
    fn a_stalled_hub_pushes_nothing() {
        let hub = Hub::new("r", 1);
        hub.tick();
        assert!(hub.accepts_streams());
        let mut opened = hub.open("d", 1);
        hub.last_tick_ms.store(0, Ordering::Release);
        std::thread::sleep(PUSH_FENCE + Duration::from_millis(50));
        assert!(hub.is_stalled());
        assert!(!hub.accepts_streams(), "a frozen replica takes no new streams");
        assert_eq!(hub.push("d", &call("c")), CallAck::NotHeld);
        assert!(next_frame(&mut opened.queue).is_none());
        hub.tick();
        assert_eq!(hub.push("d", &call("c")), CallAck::Accepted);
    }

    #[test]
    fn waking_from_a_stall_closes_streams_before_pushing_again() {
        let hub = Hub::new("r", 1);
        let mut opened = hub.open("d", 1);
        hub.last_tick_ms.store(0, Ordering::Release);
        std::thread::sleep(PUSH_FENCE + Duration::from_millis(50));
        // Woken, before the watch ran: fenced.
        assert_eq!(hub.push("d", &call("early")), CallAck::NotHeld);
        let (gap, closed) = hub.check_stall(Duration::from_secs(1)).expect("a stall");
        assert!(gap > PUSH_FENCE && closed == 1, "{gap:?} {closed}");
        assert!(matches!(
            next_frame(&mut opened.queue),
            Some(Frame::Close(Close::Reconnect(ReconnectReason::Stalled)))
        ));
        // The fence is lifted only with the stream gone: nothing reaches it.
        assert!(!hub.is_stalled());
        assert_eq!(hub.push("d", &call("late")), CallAck::NotHeld);
        assert!(next_frame(&mut opened.queue).is_none());
        // Stream requests that queued up while frozen are refused for a while.
        assert!(!hub.accepts_streams());
        // A short gap closes nothing.
        let _new = hub.open("d", 2);
        assert_eq!(hub.check_stall(Duration::from_secs(1)), None);
        assert_eq!(hub.push("d", &call("next")), CallAck::Accepted);
    }

    #[test]
    fn takeover_closes_older_and_reasserts_newer() {
        let hub = Hub::new("r", 1);
        let mut opened = hub.open("d", 3);
        assert_eq!(hub.takeover("d", 2), Some(3));
        assert_eq!(hub.takeover("d", 4), None);
        assert!(matches!(next_frame(&mut opened.queue), Some(Frame::Close(Close::Superseded))));
        assert!(hub.holder("d").is_none());
    }

    #[test]
    fn revoke_closes_fails_and_evicts() {
        let hub = Hub::new("r", 1);
        let mut opened = hub.open("d", 1);
        let mut waiting = hub.register_call("c", "d").expect("fresh");
        hub.cache_device([7; 32], CachedDevice { device_id: "d".into(), owner: "u".into() });
        hub.cache_owner("d".into(), "u".into());
        hub.cache_owner("other".into(), "u".into());
        assert_eq!(hub.cached_owner("d").as_deref(), Some("u"));
        hub.revoke("d");
        assert!(matches!(next_frame(&mut opened.queue), Some(Frame::Close(Close::Revoked))));
        assert!(waiting.try_recv().expect("failed").is_offline());
        assert!(hub.cached_device(&[7; 32]).is_none());
        assert!(hub.cached_owner("d").is_none(), "a revoked device's owner is forgotten");
        assert_eq!(hub.cached_owner("other").as_deref(), Some("u"));
        hub.flush_credentials();
        assert!(hub.cached_owner("other").is_none());
        assert_eq!(hub.pending_calls(), 0);
    }

    #[test]
    fn a_queue_over_its_byte_budget_refuses_pushes() {
        let hub = Hub::with_stream_queue_bytes("r", 1, 1000);
        hub.tick();
        let opened = hub.open("d", 1);
        let big = |id: &str| {
            let mut call = call(id);
            call.input = json!("x".repeat(400));
            call
        };
        assert_eq!(hub.push("d", &big("a")), CallAck::Accepted);
        assert_eq!(hub.push("d", &big("b")), CallAck::Accepted);
        assert!(hub.queued_bytes() > 800);
        assert_eq!(hub.push("d", &big("c")), CallAck::Full, "over 1000 bytes queued");
        assert_eq!(hub.push("d", &call("small")), CallAck::Accepted, "a small one still fits");
        // The writer takes one: room again, and the figure follows.
        assert!(matches!(opened.queue.try_recv(), Some(Frame::Call(c)) if c.call_id == "a"));
        assert_eq!(hub.push("d", &big("c")), CallAck::Accepted);
        assert!(matches!(opened.queue.try_recv(), Some(Frame::Call(c)) if c.decode().is_ok_and(|c| c.call_id == "b")));
        drop(opened);
        hub.release("d", 1);
        assert_eq!(hub.queued_bytes(), 0, "a released stream's queue gives its bytes back");
    }

    #[test]
    fn streams_that_do_not_drain_are_dropped() {
        let hub = Hub::new("r", 1);
        hub.tick();
        let stuck = hub.open("stuck", 1);
        let reading = hub.open("reading", 1);
        let abort = CancellationToken::new();
        stuck.queue.set_abort(abort.clone());
        // Both writers wrote their first event and asked for more.
        assert!(stuck.queue.try_recv().is_none() && reading.queue.try_recv().is_none());
        assert_eq!(hub.push("stuck", &call("a")), CallAck::Accepted);
        assert_eq!(hub.push("reading", &call("b")), CallAck::Accepted);
        assert!(reading.queue.try_recv().is_some() && reading.queue.try_recv().is_none());
        std::thread::sleep(Duration::from_millis(30));
        let dropped = hub.drop_stuck_streams(Duration::from_millis(20));
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0, "stuck");
        assert!(abort.is_cancelled(), "its connection is closed");
        assert!(stuck.queue.try_recv().is_none() && stuck.queue.is_empty(), "its frames are gone");
        assert_eq!((hub.queued_bytes(), hub.stuck_streams(), hub.connected()), (0, 1, 1));
        assert!(hub.holder("stuck").is_none());
        assert_eq!(hub.push("stuck", &call("c")), CallAck::NotHeld);
        assert!(hub.drop_stuck_streams(Duration::from_millis(20)).is_empty(), "the reading one stays");
    }

    #[test]
    fn stream_slots_never_pass_the_cap() {
        let hub = Hub::new("r", 1);
        let first = hub.reserve_stream(2).expect("room");
        let second = hub.reserve_stream(2).expect("room");
        assert!(hub.reserve_stream(2).is_none(), "two opening fill a cap of two");
        let _a = hub.open("a", 1);
        drop(first);
        assert!(hub.reserve_stream(2).is_none(), "one open, one opening");
        drop(second);
        let third = hub.reserve_stream(2).expect("room again");
        drop(third);
        let _b = hub.open("b", 1);
        assert!(hub.reserve_stream(2).is_none());
    }

    #[test]
    fn shedding_takes_the_idlest_streams_with_nothing_queued() {
        let hub = Hub::new("r", 1);
        hub.tick();
        let oldest = hub.open("oldest", 1);
        std::thread::sleep(Duration::from_millis(5));
        let busy = hub.open("busy", 1);
        std::thread::sleep(Duration::from_millis(5));
        let recent = hub.open("recent", 1);
        // A call waits on `busy`: it is never shed.
        assert_eq!(hub.push("busy", &call("c")), CallAck::Accepted);
        assert_eq!(hub.shed_streams(1), vec!["oldest".to_owned()]);
        assert!(matches!(oldest.queue.try_recv(), Some(Frame::Close(Close::Reconnect(ReconnectReason::Rebalance)))));
        assert!(hub.holder("oldest").is_none(), "a shed stream takes no more calls");
        assert_eq!(hub.shed_streams(5), vec!["recent".to_owned()]);
        assert!(matches!(recent.queue.try_recv(), Some(Frame::Close(_))));
        assert!(matches!(busy.queue.try_recv(), Some(Frame::Call(_))), "the busy stream keeps its call");
        assert_eq!(hub.connected(), 1);
        assert!(hub.shed_streams(0).is_empty());
        // Both linger until their new stream announces itself.
        assert!(hub.moving_for("oldest").is_some_and(|left| left <= MOVE_LINGER));
        assert_eq!(hub.takeover("oldest", 9), None);
        assert!(hub.moving_for("oldest").is_none());
        assert!(hub.moving_for("recent").is_some());
        assert!(hub.moving_for("busy").is_none());
    }

    #[test]
    fn revoked_api_tokens_are_evicted() {
        let hub = Hub::new("r", 1);
        hub.cache_user([1; 32], "alice".into());
        hub.cache_user([2; 32], "bob".into());
        // (hashes revoked, how many were cached, alice still cached, bob still cached)
        let cases: [(&[[u8; 32]], usize, bool, bool); 3] = [
            (&[[9; 32]], 0, true, true),
            (&[[1; 32], [9; 32]], 1, false, true),
            (&[[1; 32], [2; 32]], 1, false, false),
        ];
        for (revoked, evicted, alice, bob) in cases {
            assert_eq!(hub.revoke_api_tokens(revoked), evicted, "{revoked:?}");
            assert_eq!(hub.cached_user(&[1; 32]).is_some(), alice);
            assert_eq!(hub.cached_user(&[2; 32]).is_some(), bob);
        }
    }
}
