//! The dispatcher: routes tool calls from an app's backend to devices' Server-Sent-Events
//! streams and awaits their results, as one replica (in-memory bus) or many (NATS).
//!
//! Layout:
//! - [`core`]: the decisions (connection table, pending calls, takeover, credential cache)
//!   and the [`core::Dispatcher`] API: connect, dispatch, deliver, is_online, online_devices,
//!   drop_device. No I/O of its own.
//! - [`bus`]: how replicas reach each other: in-memory, or NATS.
//! - [`registry`]: api tokens, pairing codes, devices and proposals in SQLite or PostgreSQL.
//! - [`calllog`]: every dispatch's record, written off the hot path by a batched writer.
//! - [`janitor`]: each replica's periodic upkeep of the database (stuck applies, expiry).
//! - [`http`]: the axum handlers of the contract, one [`http::ApiError`].
//! - [`service`]: what every door (REST, MCP) calls: dispatch a call for a user on a device,
//!   approve a proposal for a user.
//! - [`mcp`]: the MCP door, `/mcp/devices/{id}` (Streamable HTTP, JSON-RPC).
//! - [`events`]: the live events of the control API: what is published when a device or a
//!   proposal changes, and this replica's listeners.
//! - [`ui`]: the admin page at `/ui`, its assets compiled in.
//! - [`app`]: `app(state) -> Router`, composing the handlers with limits and timeouts.
//! - [`listener`]: the serving loop: connection caps, timeouts, eviction and refusals.
//! - [`config`]: the command line and environment.
//! - [`cli`]: the operator CLI (`dispatcher pair | devices | call | …`), a client of the
//!   control API.
//! - [`telemetry`]: logging, tracing and Prometheus metrics.
//! - [`rebalance`]: after a scale-out, a replica far above the cluster's average streams asks
//!   a few devices at a time to reconnect elsewhere.
//! - [`revocation`]: the watch that evicts api tokens revoked in the database from the cache.
//! - [`server`]: `run(config, listener, shutdown)`: builds the state, serves, drains.
//! - [`readiness`]: the rule of `/readyz` and the watch that times dependency outages.
//!
//! The core is also a library: an app can build a [`core::Dispatcher`] over its own bus and
//! serve its own routes; the `dispatcher` binary is one composition of these parts.

pub mod app;
pub mod bus;
pub mod calllog;
pub mod cli;
pub mod config;
pub mod core;
pub mod events;
pub mod http;
pub mod janitor;
pub mod listener;
pub mod mcp;
pub mod readiness;
pub mod rebalance;
pub mod registry;
pub mod revocation;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod ui;
