//! The dispatcher core: the original's API (connect, dispatch, deliver, is_online,
//! online_devices, drop) over a [`Bus`](crate::bus::Bus).
//!
//! - [`connections`], [`pending`], [`cache`]: pure tables and their decisions, table-tested.
//! - [`queue`]: one stream's frame queue, bounded in frames and bytes, and its drain watch.
//! - [`hub`]: this replica's live state; what the buses act on.
//! - [`dispatcher`]: the async orchestration of one dispatch, one stream, one result.
//!
//! Nothing here knows HTTP, SQL or NATS.

pub mod cache;
pub mod connections;
pub mod dispatcher;
pub mod hub;
pub mod pending;
pub mod queue;

pub use cache::CachedDevice;
pub use dispatcher::{Delivery, DeviceStream, DispatchRequest, Dispatcher};
pub use hub::{CallFrame, Close, Frame, Hub};
pub use queue::StreamQueue;
