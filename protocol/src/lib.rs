//! The wire: every type that crosses a process boundary between the app backend, the
//! `dispatcher` replicas and the `host-agent`, and the NATS subject scheme the replicas meet on.
//!
//! No I/O and no runtime here: serde types, names and pure helpers only, so both binaries (and
//! any app embedding the dispatcher) agree on one definition. `tests/wire.rs` pins the JSON
//! form with golden documents: field names are camelCase and optional fields are omitted when
//! absent.
//!
//! Layout:
//! - [`call`]: [`HostCall`], [`HostResult`], [`CallMode`] and the two server-made error texts.
//! - [`api`]: request and response bodies of the HTTP API (enrollment, devices, calls,
//!   proposals, pairing codes, errors).
//! - [`tool`]: [`ToolDescriptor`], [`ToolClass`], [`Manifest`] and the mutation [`Plan`].
//! - [`sse`]: event names and payloads of the device stream.
//! - [`grant`]: enrollment by link (RFC 8628): the OAuth forms, answers and error codes, and
//!   the control API's view of a device authorization.
//! - [`events`]: frames of the control API's live events and the message carrying them.
//! - [`subject`]: the NATS subject scheme and message headers of cluster mode.

pub mod api;
pub mod call;
pub mod events;
pub mod grant;
pub mod sse;
pub mod subject;
pub mod tool;

pub use api::*;
pub use call::*;
pub use grant::*;
pub use tool::*;
