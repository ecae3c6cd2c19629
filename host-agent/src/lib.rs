//! `host-agent`: the device runtime. It dials out to the dispatcher (it never listens), holds an
//! SSE stream, runs the tool calls pushed down it inside its allowed roots, and POSTs each
//! result back.
//!
//! Layout:
//! - [`config`]: the command line (clap, `env =` on every flag) and its pure validation.
//! - [`runtime`]: enrollment, the stream loop, dispatch of calls, reconnects, shutdown; the
//!   exit codes.
//! - [`transport`]: the HTTP client (rustls, `--ca-cert`), the device-facing endpoints, SSE
//!   frames and the keepalive watchdog.
//! - [`grant`]: enrollment by link (RFC 8628) when there is neither a cached credential nor
//!   a `--code`: the link, the polling, the confirmation.
//! - [`credentials`]: the per-origin credential cache (mode 0600, atomic writes).
//! - [`backoff`]: capped exponential backoff with full jitter.
//! - [`dedup`]: the bounded set of recently seen call ids.
//! - [`scope`]: the allowed roots and confined file access.
//! - [`tools`]: the built-in tools, the [`tools::Toolbox`] that runs them, the [`tools::Tool`]
//!   seam through which an app adds its own tools in Rust, and [`tools::domain`], the tools a
//!   `--tools-file` declares (named shell-outs with typed, scoped arguments).

pub mod backoff;
pub mod config;
pub mod credentials;
pub mod dedup;
pub mod grant;
pub mod runtime;
pub mod scope;
pub mod tools;
pub mod transport;
