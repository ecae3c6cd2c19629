//! The call's deadline as the tools see it: when the caller stops waiting, so that long work
//! (hashing, reading, walking, searching, copying) stops too instead of burning a core for a
//! result nobody will read.
//!
//! Owns: turning the call's wall-clock `deadline` into a monotonic instant once, at the start of
//! the call ([`Deadline::from_wall`], pure and table-tested); the check itself (one clock read);
//! the error it gives ([`Expired`], carried inside an `io::Error` through readers and walks);
//! and [`Watched`], a reader that checks before each read.
//!
//! Does not: decide what a tool does when stopped (it answers `deadline exceeded`, see
//! `tools/mod.rs`), or abandon the call in the runtime (`crate::runtime` does that at the same
//! deadline and posts nothing).

use std::io::{self, Read};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// When the current call's caller stops waiting; `None` when it has no deadline (a local
/// `host-agent call`). `Copy`: every loop holds its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

/// The deadline has passed: the work was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline exceeded")]
pub struct Expired;

impl Deadline {
    /// No deadline: never expires.
    pub const NONE: Deadline = Deadline(None);

    /// The monotonic instant of a wall-clock `deadline`, read against `now` (wall) and `at`
    /// (monotonic), both taken at the same moment. A deadline already passed is `at` itself.
    pub fn from_wall(deadline: Option<DateTime<Utc>>, now: DateTime<Utc>, at: Instant) -> Deadline {
        Deadline(deadline.map(|deadline| at + (deadline - now).to_std().unwrap_or(Duration::ZERO)))
    }

    /// The deadline of a call arriving now.
    pub fn of(deadline: Option<DateTime<Utc>>) -> Deadline {
        Self::from_wall(deadline, Utc::now(), Instant::now())
    }

    /// True once `now` is at or past the deadline.
    pub fn is_past_at(&self, now: Instant) -> bool {
        self.0.is_some_and(|deadline| now >= deadline)
    }

    /// `Err(Expired)` once the deadline has passed. Costs one clock read (none without one).
    pub fn check(&self) -> Result<(), Expired> {
        match self.0 {
            Some(_) if self.is_past_at(Instant::now()) => Err(Expired),
            _ => Ok(()),
        }
    }
}

impl From<Expired> for io::Error {
    fn from(expired: Expired) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, expired)
    }
}

/// True when an I/O error is a deadline that passed (made by `From<Expired>`).
pub fn is_expired(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Expired>())
}

/// A reader that fails with [`Expired`] (as an `io::Error`) once the deadline has passed,
/// checked before every read: a 64 KiB read costs far more than the clock read.
pub struct Watched<R> {
    inner: R,
    deadline: Deadline,
}

impl<R> Watched<R> {
    pub fn new(inner: R, deadline: Deadline) -> Self {
        Watched { inner, deadline }
    }
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.deadline.check()?;
        self.inner.read(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_deadlines_become_instants() {
        let now = Utc::now();
        let at = Instant::now();
        let ms = |ms: i64| Some(now + chrono::Duration::milliseconds(ms));
        let later = |ms: u64| at + Duration::from_millis(ms);
        // (deadline, the moment asked about, past?)
        let cases = [
            (None, later(10_000_000), false),
            (ms(200), at, false),
            (ms(200), later(199), false),
            (ms(200), later(200), true),
            (ms(200), later(5_000), true),
            (ms(0), at, true),
            (ms(-5_000), at, true),
        ];
        for (deadline, moment, past) in cases {
            let deadline = Deadline::from_wall(deadline, now, at);
            assert_eq!(deadline.is_past_at(moment), past, "{deadline:?} at {:?}", moment - at);
        }
        assert_eq!(Deadline::NONE.check(), Ok(()));
        assert_eq!(Deadline::from_wall(ms(-1), now, at).check(), Err(Expired));
    }

    #[test]
    fn a_watched_reader_stops_once_expired() {
        let mut open = Watched::new(&b"abc"[..], Deadline::NONE);
        let mut text = String::new();
        open.read_to_string(&mut text).expect("read");
        assert_eq!(text, "abc");
        let past = Deadline::from_wall(Some(Utc::now() - chrono::Duration::seconds(1)), Utc::now(), Instant::now());
        let error = Watched::new(&b"abc"[..], past).read(&mut [0u8; 3]).expect_err("expired");
        assert!(is_expired(&error), "{error}");
        assert!(!is_expired(&io::Error::other("other")));
    }
}
