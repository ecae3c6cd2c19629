//! A listener of `GET /api/events` as a test drives it: it opens the stream, checks that the
//! first frame is the snapshot, then hands over every later frame (keepalives included) with
//! the time it arrived, so suites assert what was told, to whom, in what order and how fast.
//!
//! Not here: any knowledge of when the server publishes; the suites say what they expect.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::sse;

/// One frame after the snapshot.
#[derive(Debug, Clone)]
pub struct Heard {
    /// `device`, `proposal`, or [`sse::KEEPALIVE`].
    pub event: String,
    /// The data as JSON (`null` for a keepalive).
    pub data: Value,
    pub at: Instant,
}

/// An open events stream.
#[derive(Debug)]
pub struct EventStream {
    /// The data of the first frame.
    pub snapshot: Value,
    frames: mpsc::UnboundedReceiver<Heard>,
    /// Every frame heard so far, for failure messages.
    pub history: Vec<(String, Value)>,
    cancel: CancellationToken,
    closed: watch::Receiver<bool>,
}

impl EventStream {
    /// `GET {base}/api/events` with `token`; fails unless it answers 200 `text/event-stream`,
    /// `X-Accel-Buffering: no`, and a `snapshot` frame first (within 10 s).
    pub async fn open(base: &str, token: &str) -> anyhow::Result<EventStream> {
        let response = reqwest::Client::new()
            .get(format!("{base}/api/events"))
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .context("opening the events stream")?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            bail!("events answered {status}: {}", response.text().await.unwrap_or_default());
        }
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        anyhow::ensure!(content_type.starts_with("text/event-stream"), "content-type {content_type:?}");
        let buffering = response.headers().get("x-accel-buffering").and_then(|v| v.to_str().ok());
        anyhow::ensure!(buffering == Some("no"), "X-Accel-Buffering: {buffering:?}");

        let (frames_tx, mut frames) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(false);
        let cancel = CancellationToken::new();
        let reading = cancel.clone();
        tokio::spawn(async move {
            let mut response = response;
            let mut parser = sse::Parser::new();
            loop {
                let chunk = tokio::select! {
                    _ = reading.cancelled() => break,
                    chunk = response.chunk() => chunk,
                };
                let Ok(Some(bytes)) = chunk else { break };
                let at = Instant::now();
                for frame in parser.push(&bytes) {
                    let data = if frame.event == sse::KEEPALIVE {
                        Value::Null
                    } else {
                        serde_json::from_str(&frame.data).unwrap_or(Value::String(frame.data))
                    };
                    let _ = frames_tx.send(Heard { event: frame.event, data, at });
                }
            }
            let _ = closed_tx.send(true);
        });
        let first = tokio::time::timeout(Duration::from_secs(10), frames.recv())
            .await
            .map_err(|_| anyhow!("no first frame within 10 s"))?
            .ok_or_else(|| anyhow!("the stream ended before its first frame"))?;
        anyhow::ensure!(first.event == "snapshot", "the first frame is {:?}, not snapshot", first.event);
        Ok(EventStream { snapshot: first.data, frames, history: Vec::new(), cancel, closed })
    }

    /// The status `GET {base}/api/events` answers with `authorization` as the header's value
    /// (none when `None`); the stream, if any, is closed at once.
    pub async fn status(base: &str, authorization: Option<&str>) -> anyhow::Result<StatusCode> {
        let mut request = reqwest::Client::new().get(format!("{base}/api/events"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        Ok(request.timeout(Duration::from_secs(10)).send().await?.status())
    }

    /// The next frame, keepalives included; `None` when the stream ended or `timeout` passed.
    pub async fn next(&mut self, timeout: Duration) -> Option<Heard> {
        let heard = tokio::time::timeout(timeout, self.frames.recv()).await.ok().flatten()?;
        self.history.push((heard.event.clone(), heard.data.clone()));
        Some(heard)
    }

    /// Skips frames until one named `event` whose data satisfies `want`.
    pub async fn wait_for(
        &mut self,
        event: &str,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Heard> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(heard) if heard.event == event && want(&heard.data) => return Ok(heard),
                Some(_) => {}
                None => bail!("no matching {event:?} frame within {timeout:?}; heard {:#?}", self.history),
            }
        }
    }

    /// Fails when any frame but a keepalive arrives within `period`.
    pub async fn expect_only_keepalives(&mut self, period: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.next(left).await {
                Some(heard) if heard.event == sse::KEEPALIVE => {}
                Some(heard) => bail!("heard {} {}", heard.event, heard.data),
                None if *self.closed.borrow() => bail!("the stream ended"),
                None => return Ok(()),
            }
        }
    }

    /// Waits for the server to end the stream.
    pub async fn wait_closed(&mut self, timeout: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(timeout, self.closed.wait_for(|closed| *closed))
            .await
            .map_err(|_| anyhow!("the events stream was still open after {timeout:?}"))?
            .map_err(|_| anyhow!("the reader went away"))?;
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
