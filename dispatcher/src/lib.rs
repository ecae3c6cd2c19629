//! The dispatcher: routes tool calls from an app's backend to devices' Server-Sent-Events
//! streams and awaits their results, as one replica (in-memory bus) or many (NATS).
//!
//! Layout:
//! - [`core`]: the decisions (connection table, pending calls, takeover, credential cache)
//!   and the [`core::Dispatcher`] API: connect, dispatch, deliver, is_online, online_devices,
//!   drop_device. No I/O of its own.
//! - [`bus`]: how replicas reach each other: in-memory, or NATS.
//! - [`registry`]: api tokens, pairing codes, devices and proposals in SQLite or PostgreSQL.
//! - [`http`]: the axum handlers of the contract, one [`http::ApiError`].
//! - [`app`]: `app(state) -> Router`, composing the handlers with limits and timeouts.
//! - [`config`]: the command line and environment.
//! - [`telemetry`]: logging, tracing and Prometheus metrics.
//! - [`revocation`]: the watch that evicts api tokens revoked in the database from the cache.
//! - [`server`]: `run(config, listener, shutdown)`: builds the state, serves, drains.
//!
//! The core is also a library: an app can build a [`core::Dispatcher`] over its own bus and
//! serve its own routes; the `dispatcher` binary is one composition of these parts.

pub mod app;
pub mod bus;
pub mod config;
pub mod core;
pub mod http;
pub mod registry;
pub mod revocation;
pub mod server;
pub mod telemetry;
