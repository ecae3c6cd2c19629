//! A tool call going down to a device and the result coming back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `error` text of a dispatch to a device that holds no stream anywhere.
pub const ERROR_DEVICE_OFFLINE: &str = "device offline";
/// The `error` text of a dispatch whose device did not answer before the timeout.
pub const ERROR_DEVICE_TIMED_OUT: &str = "device timed out";

/// How a device runs a call. Absent means [`CallMode::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CallMode {
    /// Reads and actions run; a mutation answers with its proposal and changes nothing.
    Auto,
    /// Run the mutation for real. Sent only by the server, with the input it stored.
    Apply,
}

/// A tool call dispatched from the server down to one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HostCall {
    /// Generated server-side per call; opaque to the device.
    pub call_id: String,
    pub tool: String,
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<CallMode>,
    /// Copied from the stored proposal; travels only with [`CallMode::Apply`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preconditions: Option<Value>,
    /// When the caller stops waiting: nobody pushes or runs the call after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// W3C trace context of the dispatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl HostCall {
    /// True once `now` is past the call's deadline (a call without one never expires).
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.deadline.is_some_and(|deadline| now >= deadline)
    }

    /// True when the call asks for a mutation to be applied.
    pub fn is_apply(&self) -> bool {
        self.mode == Some(CallMode::Apply)
    }
}

/// A device's answer to a [`HostCall`], or one of the two server-made failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HostResult {
    pub call_id: String,
    pub ok: bool,
    /// The tool's output when `ok`, or a [`crate::Plan`] when `proposal` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HostResult {
    pub fn success(call_id: impl Into<String>, result: Value) -> Self {
        Self { call_id: call_id.into(), ok: true, result: Some(result), proposal: None, error: None }
    }

    /// A mutation's dry run: `result` holds the plan, nothing changed on the device.
    pub fn proposal(call_id: impl Into<String>, plan: Value) -> Self {
        Self { proposal: Some(true), ..Self::success(call_id, plan) }
    }

    pub fn failure(call_id: impl Into<String>, error: impl Into<String>) -> Self {
        Self { call_id: call_id.into(), ok: false, result: None, proposal: None, error: Some(error.into()) }
    }

    pub fn offline(call_id: impl Into<String>) -> Self {
        Self::failure(call_id, ERROR_DEVICE_OFFLINE)
    }

    pub fn timed_out(call_id: impl Into<String>) -> Self {
        Self::failure(call_id, ERROR_DEVICE_TIMED_OUT)
    }

    pub fn is_proposal(&self) -> bool {
        self.proposal == Some(true)
    }

    pub fn is_offline(&self) -> bool {
        !self.ok && self.error.as_deref() == Some(ERROR_DEVICE_OFFLINE)
    }

    pub fn is_timed_out(&self) -> bool {
        !self.ok && self.error.as_deref() == Some(ERROR_DEVICE_TIMED_OUT)
    }
}
