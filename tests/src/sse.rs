//! A minimal, incremental Server-Sent-Events parser for the device stream. Unlike general SSE
//! clients it keeps comment lines, because the contract's keepalive is one (`: keepalive`).
//!
//! Not here: reconnecting, `retry:`, or anything about the HTTP request.

/// The event name given to a keepalive comment line.
pub const KEEPALIVE: &str = "keepalive";
/// The event name given to any other comment line (its text is the data).
pub const COMMENT: &str = "comment";

/// One dispatched event, or one comment line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The `event:` name (`message` when absent), or [`KEEPALIVE`] / [`COMMENT`].
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` line, if any.
    pub id: Option<String>,
}

/// Feed it bytes as they arrive; it hands back complete frames.
#[derive(Debug, Default)]
pub struct Parser {
    buffer: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` and returns every frame they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.buffer.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n' || b == b'\r') {
            // A "\r\n" pair is one line break; wait for the byte after a trailing '\r'.
            let mut skip = 1;
            if self.buffer[end] == b'\r' {
                match self.buffer.get(end + 1) {
                    Some(b'\n') => skip = 2,
                    Some(_) => {}
                    None => break,
                }
            }
            let line: Vec<u8> = self.buffer.drain(..end + skip).take(end).collect();
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(frame) = self.line(&line) {
                frames.push(frame);
            }
        }
        frames
    }

    fn line(&mut self, line: &str) -> Option<Frame> {
        if line.is_empty() {
            if self.data.is_empty() && self.event.is_none() {
                self.id = None;
                return None;
            }
            let frame = Frame {
                event: self.event.take().unwrap_or_else(|| "message".into()),
                data: std::mem::take(&mut self.data).join("\n"),
                id: self.id.take(),
            };
            return Some(frame);
        }
        if let Some(comment) = line.strip_prefix(':') {
            let text = comment.strip_prefix(' ').unwrap_or(comment);
            return Some(if text == KEEPALIVE {
                Frame { event: KEEPALIVE.into(), data: String::new(), id: None }
            } else {
                Frame { event: COMMENT.into(), data: text.into(), id: None }
            });
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.into()),
            "data" => self.data.push(value.into()),
            "id" => self.id = Some(value.into()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_comments_and_split_chunks() {
        let mut parser = Parser::new();
        let mut frames = parser.push(b"event: ready\ndata: {\"a\":1}\n\n: keepalive\n\nevent: call\nid: x");
        frames.extend(parser.push(b"1\r\ndata: {}\r\n\r\n: other\n"));
        assert_eq!(
            frames,
            vec![
                Frame { event: "ready".into(), data: "{\"a\":1}".into(), id: None },
                Frame { event: "keepalive".into(), data: String::new(), id: None },
                Frame { event: "call".into(), data: "{}".into(), id: Some("x1".into()) },
                Frame { event: "comment".into(), data: "other".into(), id: None },
            ]
        );
    }
}
