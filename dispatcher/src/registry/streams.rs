//! Stream opens: a device token verified and the stream's epoch issued in one statement, and
//! concurrent opens grouped into one statement (a group commit).
//!
//! When a replica dies, every device it held reconnects to the others within a second or two
//! (the agents' jittered backoff spreads them over about a second). Verifying each token on its
//! own, issuing each epoch on its own and reading each device back for its event made that
//! thousands of database round trips a second per replica, each waiting for a pooled
//! connection. Here one conditional UPDATE, keyed by the token's hash, does all three: it
//! refuses an unknown or revoked token (no row), increments the device's epoch and stamps it as
//! seen, and returns the device's row. Opens that arrive while a statement is in flight wait
//! for the next one, which takes them all (up to [`MAX_BATCH`]); a lone open goes at once, so
//! nothing waits on a timer. Under a herd the statements per open fall towards
//! 1 / [`MAX_BATCH`].
//!
//! Exactness is kept statement by statement, as with the UPDATE of one device: the counter
//! only grows, and a batch holds each token at most once (a second open of the same device
//! waits for the next statement), so two streams never share an epoch. On PostgreSQL the rows
//! are locked in id order before they are updated, so two batches that share devices (two
//! replicas, or two statements in flight here) wait for each other instead of deadlocking;
//! SQLite has one writer at a time.

use std::collections::{HashMap, HashSet, VecDeque};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::secret::{self, DEVICE_TOKEN_PREFIX};
use super::{DeviceRecord, Engine, Registry, RegistryError};

/// Most opens one statement serves. Their hashes travel as one text parameter of 65 bytes
/// each; a batch this size updates in a few milliseconds.
pub const MAX_BATCH: usize = 256;
/// Statements in flight at once, per registry. Two keep the database busy while a batch's
/// answers are sent, and leave the rest of the pool to everything else.
const MAX_IN_FLIGHT: usize = 2;

/// A stream the registry agreed to open.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedStream {
    /// Larger than every epoch issued before for this device, by any replica.
    pub epoch: u64,
    /// The device, as stored after the open (its last-seen time is now), with its manifest.
    pub device: DeviceRecord,
}

type Answer = Result<Option<OpenedStream>, RegistryError>;

/// An open waiting for its statement.
#[derive(Debug)]
struct Waiter {
    /// SHA-256 hex of the token.
    token_hash: String,
    /// The route tag of the replica opening the stream.
    route: u32,
    reply: oneshot::Sender<Answer>,
}

/// The opens waiting for a statement, and how many statements are in flight.
#[derive(Debug, Default)]
pub(super) struct OpenQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: VecDeque<Waiter>,
    in_flight: usize,
}

impl QueueState {
    /// The next batch: the oldest waiters, at most [`MAX_BATCH`], each token once, all of the
    /// oldest waiter's route (one process is one replica, but a test may run several on one
    /// registry). A token met again, or another route, stays queued, in order, for a later
    /// statement.
    fn take_batch(&mut self) -> Vec<Waiter> {
        let mut batch: Vec<Waiter> = Vec::new();
        let mut seen = HashSet::new();
        let mut kept = VecDeque::new();
        while let Some(waiter) = self.waiting.pop_front() {
            if batch.len() == MAX_BATCH {
                self.waiting.push_front(waiter);
                break;
            }
            let same_route = batch.first().is_none_or(|first| first.route == waiter.route);
            if same_route && seen.insert(waiter.token_hash.clone()) {
                batch.push(waiter);
            } else {
                kept.push_back(waiter);
            }
        }
        kept.append(&mut self.waiting);
        self.waiting = kept;
        batch
    }
}

/// Gives back a statement's place if its task ends by a panic, so the queue is not left with
/// fewer statements than it counts (or none at all).
struct InFlight<'a> {
    queue: &'a OpenQueue,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.queue.state.lock().in_flight -= 1;
        }
    }
}

/// One row of the stream-open statement: the token hash, the new epoch, then the device's
/// columns in the order of `device_of_row`.
type OpenRow = (
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

/// The returned columns, qualified (the PostgreSQL statement joins `devices` with itself).
const RETURNING: &str = "devices.token_hash, devices.stream_epoch, devices.id, devices.owner, devices.name, \
     devices.platform, devices.created_at, devices.last_seen_at, devices.manifest, devices.revoked_at, devices.roots, \
     devices.tool_count";

impl Registry {
    /// Opens a stream for the device whose token this is: `None` when the token is unknown, is
    /// revoked or is not a device token; otherwise the stream's epoch (larger than every epoch
    /// issued before for this device, by any replica sharing the database) and the device as
    /// stored, now marked as seen. The same statement records `route`, the route tag of the
    /// replica opening the stream, beside the epoch (see [`Registry::last_stream`]). One
    /// statement, shared with the opens that arrive meanwhile (see the module's notes).
    pub async fn open_stream(&self, token: &str, route: u32) -> Result<Option<OpenedStream>, RegistryError> {
        if !secret::is_token_shaped(token, DEVICE_TOKEN_PREFIX) {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        let batch = {
            let mut state = self.opens.state.lock();
            state.waiting.push_back(Waiter { token_hash: secret::hash_secret(token), route, reply });
            if state.in_flight < MAX_IN_FLIGHT {
                state.in_flight += 1;
                Some(state.take_batch())
            } else {
                None
            }
        };
        if let Some(batch) = batch {
            // A task of its own: the caller may go away (its client hung up) while the
            // statement serves others.
            let registry = self.clone();
            tokio::spawn(async move { registry.run_open_batches(batch).await });
        }
        answer.await.unwrap_or_else(|_| Err(RegistryError::Batch("the stream open was abandoned".into())))
    }

    /// Runs `batch`, then whatever queued meanwhile, until nothing waits.
    async fn run_open_batches(self, mut batch: Vec<Waiter>) {
        let mut place = InFlight { queue: &self.opens, armed: true };
        loop {
            self.open_batch(batch).await;
            let mut state = self.opens.state.lock();
            if state.waiting.is_empty() {
                // In the same critical section as the look at the queue: an open queued after
                // it starts a statement of its own.
                state.in_flight -= 1;
                place.armed = false;
                return;
            }
            batch = state.take_batch();
        }
    }

    /// One statement for `batch`; every waiter gets its answer.
    async fn open_batch(&self, batch: Vec<Waiter>) {
        let Some(route) = batch.first().map(|waiter| waiter.route) else {
            return;
        };
        let hashes: Vec<&str> = batch.iter().map(|waiter| waiter.token_hash.as_str()).collect();
        match self.issue_epochs(&hashes, route).await {
            Ok(rows) => {
                let mut by_hash: HashMap<String, OpenRow> = rows.into_iter().map(|row| (row.0.clone(), row)).collect();
                for waiter in batch {
                    let answer = by_hash.remove(&waiter.token_hash).map(opened_of_row).transpose();
                    let _ = waiter.reply.send(answer);
                }
            }
            Err(error) => {
                // Counted once (as a database error) when it was made; each waiter gets its text.
                let text = error.to_string();
                for waiter in batch {
                    let _ = waiter.reply.send(Err(RegistryError::Batch(text.clone())));
                }
            }
        }
    }

    /// Increments the epoch of every live device whose token hash is in `hashes` (distinct),
    /// records `route` beside it, stamps them as seen, and returns their rows.
    async fn issue_epochs(&self, hashes: &[&str], route: u32) -> Result<Vec<OpenRow>, RegistryError> {
        // One text parameter whatever the batch's size, so each engine prepares one statement.
        let (sql, list) = match self.engine {
            // Hex hashes hold no comma.
            Engine::Postgres => (
                format!(
                    "UPDATE devices SET stream_epoch = devices.stream_epoch + 1, stream_route = $3, last_seen_at = $1 \
                     FROM (SELECT id FROM devices WHERE token_hash = ANY(string_to_array($2, ',')) \
                         AND revoked_at IS NULL ORDER BY id FOR UPDATE) AS locked \
                     WHERE devices.id = locked.id RETURNING {RETURNING}"
                ),
                hashes.join(","),
            ),
            Engine::Sqlite => (
                format!(
                    "UPDATE devices SET stream_epoch = stream_epoch + 1, stream_route = $3, last_seen_at = $1 \
                     WHERE token_hash IN (SELECT value FROM json_each($2)) AND revoked_at IS NULL \
                     RETURNING {RETURNING}"
                ),
                serde_json::to_string(hashes)
                    .map_err(|_| RegistryError::InvalidArgument("token hashes cannot be encoded as JSON"))?,
            ),
        };
        let rows = sqlx::query_as::<_, OpenRow>(&sql)
            .bind(self.now_ms())
            .bind(list)
            .bind(i64::from(route))
            .fetch_all(&self.pool)
            .await?;
        OPEN_STATEMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(rows)
    }
}

fn opened_of_row(row: OpenRow) -> Result<OpenedStream, RegistryError> {
    let (_, epoch, id, owner, name, platform, created_at, last_seen_at, manifest, revoked_at, roots, tool_count) = row;
    let epoch = u64::try_from(epoch).map_err(|_| RegistryError::Corrupt(format!("negative stream epoch {epoch}")))?;
    let device = super::devices::device_of_row((
        id,
        owner,
        name,
        platform,
        created_at,
        last_seen_at,
        manifest,
        revoked_at,
        roots,
        tool_count,
    ))?;
    Ok(OpenedStream { epoch, device })
}

/// Stream-open statements this process has run (each served one or more opens), for
/// `/metrics`.
static OPEN_STATEMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn stream_open_statements() -> u64 {
    OPEN_STATEMENTS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(hash: &str) -> (Waiter, oneshot::Receiver<Answer>) {
        on_route(hash, 7)
    }

    fn on_route(hash: &str, route: u32) -> (Waiter, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        (Waiter { token_hash: hash.to_owned(), route, reply }, answer)
    }

    fn hashes(batch: &[Waiter]) -> Vec<&str> {
        batch.iter().map(|w| w.token_hash.as_str()).collect()
    }

    #[test]
    fn a_batch_takes_each_token_once_and_keeps_the_order_of_the_rest() {
        let mut state = QueueState::default();
        for hash in ["a", "b", "a", "c", "b", "a"] {
            state.waiting.push_back(waiter(hash).0);
        }
        let first = state.take_batch();
        assert_eq!(hashes(&first), ["a", "b", "c"]);
        let second = state.take_batch();
        assert_eq!(hashes(&second), ["a", "b"]);
        let third = state.take_batch();
        assert_eq!(hashes(&third), ["a"]);
        assert!(state.take_batch().is_empty());
    }

    #[test]
    fn a_batch_is_of_one_route() {
        let mut state = QueueState::default();
        for (hash, route) in [("a", 1), ("b", 2), ("c", 1), ("a", 2)] {
            state.waiting.push_back(on_route(hash, route).0);
        }
        let first = state.take_batch();
        assert_eq!(hashes(&first), ["a", "c"]);
        assert!(first.iter().all(|w| w.route == 1));
        let second = state.take_batch();
        assert_eq!(hashes(&second), ["b", "a"]);
        assert!(second.iter().all(|w| w.route == 2));
        assert!(state.take_batch().is_empty());
    }

    #[test]
    fn a_batch_stops_at_its_maximum() {
        let mut state = QueueState::default();
        for n in 0..MAX_BATCH + 10 {
            state.waiting.push_back(waiter(&format!("{n}")).0);
        }
        let first = state.take_batch();
        assert_eq!(first.len(), MAX_BATCH);
        assert_eq!(first[0].token_hash, "0");
        let second = state.take_batch();
        assert_eq!(hashes(&second), (MAX_BATCH..MAX_BATCH + 10).map(|n| format!("{n}")).collect::<Vec<_>>());
    }
}
