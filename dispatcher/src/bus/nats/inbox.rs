//! The bus's own reply inbox: one wildcard subscription (`_INBOX.<id>.*`) for every request
//! this replica makes, and a table of waiters keyed by a per-request token.
//!
//! It replaces async-nats's request multiplexer, which keeps the reply sender of every request
//! that never gets an answer (nats.rs issue 1617): here each request holds a [`Waiter`] whose
//! drop removes its entry, so an entry goes away on every path (reply, timeout, publish error,
//! the caller dropping the future) and [`Inbox::waiting`] counts back to zero.
//!
//! Not here: publishing, timeouts and what a reply means (the bus does that); the task that
//! reads the subscription (it calls [`Inbox::route`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::Message;
use parking_lot::Mutex;
use tokio::sync::mpsc;

#[derive(Debug)]
pub(super) struct Inbox {
    /// `_INBOX.<unique id>.`: every reply subject is this plus a token.
    prefix: String,
    waiters: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    next_token: AtomicU64,
}

/// One request waiting for replies; unregisters itself when dropped.
#[derive(Debug)]
pub(super) struct Waiter<'a> {
    inbox: &'a Inbox,
    token: u64,
    reply_to: String,
    rx: mpsc::Receiver<Message>,
}

impl Inbox {
    /// `base` is a fresh inbox subject (`Client::new_inbox`), unique to this client.
    pub(super) fn new(base: String) -> Self {
        Self { prefix: format!("{base}."), waiters: Mutex::default(), next_token: AtomicU64::new(1) }
    }

    /// The wildcard subject to subscribe to, once, before the first request.
    pub(super) fn subject(&self) -> String {
        format!("{}*", self.prefix)
    }

    /// Registers a request that accepts up to `capacity` replies (1 for a request, more for a
    /// scatter-gather); further replies are dropped.
    pub(super) fn waiter(&self, capacity: usize) -> Waiter<'_> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.waiters.lock().insert(token, tx);
        Waiter { inbox: self, token, reply_to: format!("{}{token}", self.prefix), rx }
    }

    /// Hands a message that arrived on the inbox to its waiter, if it still waits.
    pub(super) fn route(&self, message: Message) {
        let Some(token) = message.subject.as_str().strip_prefix(&self.prefix).and_then(|t| t.parse::<u64>().ok())
        else {
            return;
        };
        let tx = self.waiters.lock().get(&token).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(message);
        }
    }

    /// Requests still waiting for a reply.
    pub(super) fn waiting(&self) -> usize {
        self.waiters.lock().len()
    }
}

impl Waiter<'_> {
    pub(super) fn reply_to(&self) -> &str {
        &self.reply_to
    }

    pub(super) async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.inbox.waiters.lock().remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(subject: &str) -> Message {
        Message {
            subject: subject.into(),
            reply: None,
            payload: bytes::Bytes::from_static(b"x"),
            headers: None,
            status: None,
            description: None,
            length: 1,
        }
    }

    #[tokio::test]
    async fn waiters_get_their_replies_and_leave_on_drop() {
        let inbox = Inbox::new("_INBOX.abc".into());
        assert_eq!(inbox.subject(), "_INBOX.abc.*");
        let mut first = inbox.waiter(1);
        let second = inbox.waiter(1);
        assert_eq!(inbox.waiting(), 2);
        inbox.route(message(first.reply_to()));
        inbox.route(message("_INBOX.abc.not-a-token"));
        inbox.route(message("_INBOX.other.1"));
        assert!(first.recv().await.is_some());
        drop(second);
        assert_eq!(inbox.waiting(), 1);
        drop(first);
        assert_eq!(inbox.waiting(), 0);
        inbox.route(message("_INBOX.abc.1"));
    }
}
