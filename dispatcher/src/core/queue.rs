//! A device stream's queue: the frames waiting for the stream's writer, bounded in frames and in
//! bytes of call JSON, and the writer's progress, from which the hub tells a stream that does not
//! drain (a device that stopped reading: its socket is full and the writer cannot write).
//!
//! The hub pushes; the stream's writer (the SSE response body) pulls with [`StreamQueue::recv`].
//! A close frame is always accepted and is the last: nothing is queued after it. Abandoning a
//! queue drops what it holds at once and ends the writer, and cancels the connection's abort
//! token when one was attached, so the socket closes and the device reconnects.
//!
//! Not here: writing frames (the HTTP layer), and deciding when a stream is dropped (the hub
//! asks [`StreamQueue::stuck_for`] on its stall-watch tick).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::hub::{Close, Frame};

/// How much one stream may hold before pushes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Frames queued.
    pub frames: usize,
    /// Bytes of call JSON queued. A call larger than this is still taken into an empty queue,
    /// so no call is refused for its size alone.
    pub bytes: usize,
}

/// What a push decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Accepted,
    /// Over the frame or byte budget: refused, nothing queued.
    Full,
    /// The stream is ending (a close frame is queued, or the queue was abandoned).
    Closed,
}

/// Whether a call of `bytes` fits a queue holding `frames` frames and `queued` bytes.
pub fn admit(limits: QueueLimits, frames: usize, queued: usize, bytes: usize) -> Admit {
    if frames >= limits.frames || (frames > 0 && queued.saturating_add(bytes) > limits.bytes) {
        Admit::Full
    } else {
        Admit::Accepted
    }
}

/// What the writer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Parked in [`StreamQueue::recv`], waiting for a frame: it can write.
    Waiting,
    /// Writing what it took at `since` (or, before its first pull, the stream's first event).
    Busy { since: Instant },
}

#[derive(Debug)]
struct Queued {
    frame: Frame,
    bytes: usize,
    at: Instant,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Queued>,
    bytes: usize,
    closed: bool,
    /// Dropped by the hub: what was queued is gone, and the connection is to be closed.
    abandoned: bool,
    writer: Writer,
    abort: Option<CancellationToken>,
    /// When the last call was queued (or the stream opened, before any).
    last_call: Instant,
}

/// One stream's queue, shared by the hub (pushing) and the stream's writer (pulling).
#[derive(Debug)]
pub struct StreamQueue {
    state: Mutex<State>,
    notify: Notify,
    limits: QueueLimits,
    /// Bytes queued on every stream of the hub (the metric).
    total: Arc<AtomicUsize>,
}

impl StreamQueue {
    pub fn new(limits: QueueLimits, total: Arc<AtomicUsize>) -> Self {
        let state = State {
            frames: VecDeque::new(),
            bytes: 0,
            closed: false,
            abandoned: false,
            writer: Writer::Busy { since: Instant::now() },
            abort: None,
            last_call: Instant::now(),
        };
        Self { state: Mutex::new(state), notify: Notify::new(), limits, total }
    }

    /// Queues a call of `bytes` bytes of JSON, within the limits.
    pub fn push_call(&self, frame: Frame, bytes: usize) -> Admit {
        let mut state = self.state.lock();
        if state.closed {
            return Admit::Closed;
        }
        let admitted = admit(self.limits, state.frames.len(), state.bytes, bytes);
        if admitted == Admit::Accepted {
            let now = Instant::now();
            state.frames.push_back(Queued { frame, bytes, at: now });
            state.bytes += bytes;
            state.last_call = now;
            self.total.fetch_add(bytes, Ordering::Relaxed);
            drop(state);
            self.notify.notify_one();
        }
        admitted
    }

    /// Queues the stream's last frame (whatever the limits). False when it is already ending.
    pub fn close(&self, close: Close) -> bool {
        let mut state = self.state.lock();
        if state.closed {
            return false;
        }
        state.closed = true;
        state.frames.push_back(Queued { frame: Frame::Close(close), bytes: 0, at: Instant::now() });
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Drops every queued frame and ends the stream at once; cancels the connection's abort
    /// token when one is attached. Returns the bytes of call JSON dropped.
    pub fn abandon(&self) -> usize {
        let mut state = self.state.lock();
        state.closed = true;
        state.abandoned = true;
        let dropped = std::mem::take(&mut state.bytes);
        let frames = std::mem::take(&mut state.frames);
        let abort = state.abort.take();
        drop(state);
        self.total.fetch_sub(dropped, Ordering::Relaxed);
        drop(frames);
        if let Some(abort) = abort {
            abort.cancel();
        }
        self.notify.notify_one();
        dropped
    }

    /// Since when the stream has had nothing to write and no new call: `None` while a frame
    /// waits or once it is ending. The rebalancer moves the idlest streams first.
    pub fn idle_since(&self) -> Option<Instant> {
        let state = self.state.lock();
        (!state.closed && state.frames.is_empty()).then_some(state.last_call)
    }

    /// Attaches the token that closes the stream's connection, cancelled if the queue is
    /// abandoned (at once, if it already was).
    pub fn set_abort(&self, abort: CancellationToken) {
        let mut state = self.state.lock();
        if state.abandoned {
            abort.cancel();
        } else {
            state.abort = Some(abort);
        }
    }

    /// The next frame for the writer; `None` once the queue was abandoned or its close frame
    /// taken.
    pub async fn recv(&self) -> Option<Frame> {
        loop {
            match self.try_take() {
                Taken::Frame(frame) => return Some(frame),
                Taken::Ended => return None,
                Taken::Empty => self.notify.notified().await,
            }
        }
    }

    /// The next frame if one is queued now (tests).
    pub fn try_recv(&self) -> Option<Frame> {
        match self.try_take() {
            Taken::Frame(frame) => Some(frame),
            Taken::Ended | Taken::Empty => None,
        }
    }

    fn try_take(&self) -> Taken {
        let mut state = self.state.lock();
        match state.frames.pop_front() {
            Some(queued) => {
                state.bytes -= queued.bytes;
                state.writer = Writer::Busy { since: Instant::now() };
                if matches!(queued.frame, Frame::Close(_)) {
                    // The last frame: whatever is written next ends the stream.
                    state.abort = None;
                }
                drop(state);
                self.total.fetch_sub(queued.bytes, Ordering::Relaxed);
                Taken::Frame(queued.frame)
            }
            None if state.closed => Taken::Ended,
            None => {
                state.writer = Writer::Waiting;
                Taken::Empty
            }
        }
    }

    /// How long the stream has not drained at `now`: the age of the oldest frame still queued,
    /// or how long the writer has been writing what it took, whichever is longer. `None` while
    /// the writer waits with nothing queued.
    pub fn stuck_for(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock();
        let oldest = state.frames.front().map(|queued| now.saturating_duration_since(queued.at));
        let writing = match state.writer {
            Writer::Busy { since } => Some(now.saturating_duration_since(since)),
            Writer::Waiting => None,
        };
        oldest.max(writing)
    }

    /// Bytes of call JSON queued.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.state.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum Taken {
    Frame(Frame),
    Ended,
    Empty,
}

impl Drop for StreamQueue {
    fn drop(&mut self) {
        let bytes = self.state.get_mut().bytes;
        self.total.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hub::CallFrame;

    const LIMITS: QueueLimits = QueueLimits { frames: 3, bytes: 100 };

    fn call(id: &str) -> Frame {
        Frame::Call(CallFrame { call_id: id.into(), json: String::new() })
    }

    #[test]
    fn admission() {
        // (frames queued, bytes queued, bytes of the call, decision)
        let cases = [
            (0, 0, 10, Admit::Accepted),
            (0, 0, 1000, Admit::Accepted), // larger than the budget, but alone
            (1, 50, 50, Admit::Accepted),
            (1, 50, 51, Admit::Full),
            (2, 10, 10, Admit::Accepted),
            (3, 0, 0, Admit::Full),
            (1, 100, 0, Admit::Accepted),
        ];
        for (frames, queued, bytes, want) in cases {
            assert_eq!(admit(LIMITS, frames, queued, bytes), want, "{frames} {queued} {bytes}");
        }
    }

    #[test]
    fn bytes_are_counted_in_and_out() {
        let total = Arc::new(AtomicUsize::new(0));
        let queue = StreamQueue::new(LIMITS, total.clone());
        assert_eq!(queue.push_call(call("a"), 60), Admit::Accepted);
        assert_eq!(queue.push_call(call("b"), 60), Admit::Full, "over the byte budget");
        assert_eq!(queue.push_call(call("b"), 40), Admit::Accepted);
        assert_eq!((queue.queued_bytes(), total.load(Ordering::Relaxed)), (100, 100));
        assert!(matches!(queue.try_recv(), Some(Frame::Call(c)) if c.call_id == "a"));
        assert_eq!((queue.queued_bytes(), total.load(Ordering::Relaxed)), (40, 40));
        drop(queue);
        assert_eq!(total.load(Ordering::Relaxed), 0, "a dropped queue gives its bytes back");
    }

    #[test]
    fn close_is_last_and_always_taken() {
        let queue = StreamQueue::new(LIMITS, Arc::default());
        for id in ["a", "b", "c"] {
            assert_eq!(queue.push_call(call(id), 1), Admit::Accepted);
        }
        assert_eq!(queue.push_call(call("d"), 1), Admit::Full);
        assert!(queue.close(Close::Superseded), "taken over the frame limit");
        assert!(!queue.close(Close::Revoked), "only one close");
        assert_eq!(queue.push_call(call("e"), 1), Admit::Closed);
        let ids: Vec<String> = std::iter::from_fn(|| queue.try_recv())
            .map(|frame| match frame {
                Frame::Call(c) => c.call_id,
                Frame::Close(close) => format!("{close:?}"),
            })
            .collect();
        assert_eq!(ids, ["a", "b", "c", "Superseded"]);
    }

    #[test]
    fn abandoning_drops_everything_and_aborts_the_connection() {
        let total = Arc::new(AtomicUsize::new(0));
        let queue = StreamQueue::new(LIMITS, total.clone());
        let abort = CancellationToken::new();
        queue.set_abort(abort.clone());
        queue.push_call(call("a"), 30);
        queue.push_call(call("b"), 30);
        assert_eq!(queue.abandon(), 60);
        assert!(abort.is_cancelled());
        assert_eq!((queue.len(), total.load(Ordering::Relaxed)), (0, 0));
        assert!(queue.try_recv().is_none());
        assert_eq!(queue.push_call(call("c"), 1), Admit::Closed);
        let late = CancellationToken::new();
        queue.set_abort(late.clone());
        assert!(late.is_cancelled(), "a token attached after the abandon fires at once");
    }

    #[test]
    fn stuck_is_the_oldest_frame_or_the_write_in_hand() {
        let queue = StreamQueue::new(LIMITS, Arc::default());
        let start = Instant::now();
        // Before the first pull the writer is busy with the stream's first event.
        assert!(queue.stuck_for(start + Duration::from_secs(5)).is_some_and(|d| d >= Duration::from_secs(4)));
        // Waiting with nothing queued: not stuck, however long.
        assert!(queue.try_recv().is_none());
        assert_eq!(queue.stuck_for(start + Duration::from_secs(60)), None);
        // A frame that is not taken ages.
        queue.push_call(call("a"), 1);
        let later = Instant::now() + Duration::from_secs(7);
        assert!(queue.stuck_for(later).is_some_and(|d| d >= Duration::from_secs(7)));
        // Taken: the writer is busy with it until it comes back.
        assert!(queue.try_recv().is_some());
        assert!(queue.stuck_for(later).is_some_and(|d| d >= Duration::from_secs(6)));
        assert!(queue.try_recv().is_none());
        assert_eq!(queue.stuck_for(later), None);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_push_and_ends_on_abandon() {
        let queue = Arc::new(StreamQueue::new(LIMITS, Arc::default()));
        let writer = tokio::spawn({
            let queue = queue.clone();
            async move {
                let mut seen = Vec::new();
                while let Some(frame) = queue.recv().await {
                    seen.push(frame);
                }
                seen.len()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.push_call(call("a"), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.abandon();
        let seen = tokio::time::timeout(Duration::from_secs(2), writer).await.expect("ends").expect("task");
        assert_eq!(seen, 1);
    }
}
