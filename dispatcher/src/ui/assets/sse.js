// Live events over fetch(): EventSource cannot send an Authorization header, so the page reads
// GET /api/events as a byte stream, parses the Server-Sent-Events frames itself, and
// reconnects with capped, jittered backoff (every reconnection starts with a fresh snapshot).

/** An incremental SSE parser: push text as it arrives, get back complete frames. */
export class SseParser {
  constructor() {
    this.buffer = '';
    this.event = null;
    this.data = [];
  }

  /** @returns {{event: string, data: string}[]} frames; comment lines as event "comment". */
  push(text) {
    this.buffer += text;
    const frames = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
      if (match[0] === '\r' && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const frame = this.line(line);
      if (frame) frames.push(frame);
    }
    return frames;
  }

  line(line) {
    if (line === '') {
      if (this.event === null && this.data.length === 0) return null;
      const frame = { event: this.event ?? 'message', data: this.data.join('\n') };
      this.event = null;
      this.data = [];
      return frame;
    }
    if (line.startsWith(':')) return { event: 'comment', data: line.slice(1).trimStart() };
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    return null;
  }
}

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 15000;
/** Silence after which the stream counts as dead (the server sends a keepalive every 15 s). */
const SILENCE_MS = 45000;

/**
 * Follows /api/events until closed.
 * @param {{token: string, onFrame: (frame) => void, onStatus: (status: string) => void,
 *          onUnauthorized: () => void}} handlers
 * @returns {{close: () => void}}
 */
export function followEvents({ token, onFrame, onStatus, onUnauthorized }) {
  let closed = false;
  let controller = null;
  let failures = 0;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function once() {
    controller = new AbortController();
    const current = controller;
    let silence = setTimeout(() => current.abort(), SILENCE_MS);
    const rearm = () => {
      clearTimeout(silence);
      silence = setTimeout(() => current.abort(), SILENCE_MS);
    };
    try {
      const response = await fetch('/api/events', {
        headers: { Authorization: `Bearer ${token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: current.signal,
      });
      if (response.status === 401) {
        closed = true;
        onUnauthorized();
        return;
      }
      if (!response.ok || !response.body) throw new Error(`the events stream answered ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const parser = new SseParser();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        rearm();
        for (const frame of parser.push(value)) {
          if (frame.event === 'snapshot') {
            failures = 0;
            onStatus('live');
          }
          onFrame(frame);
        }
      }
    } catch (error) {
      if (!closed && error?.name !== 'AbortError') onStatus('reconnecting');
    } finally {
      clearTimeout(silence);
    }
  }

  (async () => {
    while (!closed) {
      onStatus(failures === 0 ? 'connecting' : 'reconnecting');
      await once();
      if (closed) break;
      onStatus('reconnecting');
      const window = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** failures);
      failures += 1;
      await sleep(window / 2 + Math.random() * (window / 2));
    }
  })();

  return {
    close() {
      closed = true;
      controller?.abort();
    },
  };
}
