//! Bodies of the HTTP API, device-facing and control, as in the contract.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{CallMode, HostResult, ToolClass, ToolDescriptor};

/// Default and largest `ttlSeconds` of a pairing code.
pub const PAIRING_TTL_DEFAULT_SECS: u64 = 600;
pub const PAIRING_TTL_MAX_SECS: u64 = 86_400;
/// Default and largest `limit` of a page of a list (`GET /api/devices`, `GET /api/proposals`).
pub const PAGE_LIMIT_DEFAULT: usize = 100;
pub const PAGE_LIMIT_MAX: usize = 500;
/// Default and largest `timeoutMs` of a dispatch.
pub const CALL_TIMEOUT_DEFAULT_MS: u64 = 30_000;
pub const CALL_TIMEOUT_MAX_MS: u64 = 300_000;
/// Every response names the replica that answered it.
pub const REPLICA_HEADER: &str = "x-replica-id";

/// Every error response: `{"error": "<human-readable message>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
}

/// `POST /api/host/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub code: String,
    /// Shown to the user; surrounding blanks are trimmed and it must not be blank.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = r"\S"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 200))]
    pub platform: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub device_id: String,
    pub token: String,
}

/// `POST /api/host/result` answers `{"delivered": bool}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivered {
    pub delivered: bool,
}

/// `POST /api/pairing-codes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PairingCodeRequest {
    /// Lifetime of the code; default [`PAIRING_TTL_DEFAULT_SECS`], at most [`PAIRING_TTL_MAX_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole_number")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PairingCode {
    pub code: String,
    pub expires_at: DateTime<Utc>,
}

/// A device as the control API shows it. `online` and `replica` are cluster-wide truths.
/// `GET /api/devices` leaves `tools` out unless asked (`?include=tools`); `toolCount` and
/// `roots` are always there once the device sent a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolDescriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_count: Option<usize>,
}

/// `GET /api/devices?limit=&cursor=&include=tools`: one page, oldest first; `next` is the
/// cursor of the next page when there is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceList {
    pub devices: Vec<Device>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `POST /api/devices/{id}/calls`. A `mode` field is refused: only the server applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CallRequest {
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub tool: String,
    pub input: Value,
    /// How long to wait for the device; default [`CALL_TIMEOUT_DEFAULT_MS`], at most
    /// [`CALL_TIMEOUT_MAX_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole_number")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 300000))]
    pub timeout_ms: Option<u64>,
}

/// The answer of a dispatch: the [`HostResult`], plus the id of the stored proposal when the
/// result is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CallResponse {
    #[serde(flatten)]
    pub result: HostResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_id: Option<String>,
}

/// Where a proposal is in its life. Only `pending` may be approved or rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ProposalStatus {
    Pending,
    Applying,
    Applied,
    Failed,
    Rejected,
}

impl ProposalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applying => "applying",
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "applying" => Self::Applying,
            "applied" => Self::Applied,
            "failed" => Self::Failed,
            "rejected" => Self::Rejected,
            _ => return None,
        })
    }
}

/// A stored mutation awaiting (or past) its user's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Proposal {
    pub id: String,
    pub device_id: String,
    pub tool: String,
    /// The input that the apply will use: the one stored when the proposal was made.
    pub input: Value,
    /// The device's plan ([`crate::Plan`]).
    pub proposal: Value,
    pub status: ProposalStatus,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<HostResult>,
}

/// `GET /api/proposals?status=&limit=&cursor=`: one page, newest first; `next` is the cursor
/// of the next page when there is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProposalList {
    pub proposals: Vec<Proposal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `POST /api/host/approve` and `POST /api/host/reject`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ProposalDecision {
    pub proposal_id: String,
}

/// Default and largest `limit` of a page of the call log (`GET /api/calls`).
pub const CALL_LOG_LIMIT_DEFAULT: usize = 50;
pub const CALL_LOG_LIMIT_MAX: usize = 500;

/// What became of a logged call. `pending` until an outcome is recorded; `ok` and `error` are
/// the device's own answer; `offline` and `timed out` the two server-made failures; `unknown` a
/// call whose result never came back anywhere (its dispatching replica died, and no device
/// result arrived by well after its deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CallOutcome {
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "ok")]
    Ok,
    #[serde(rename = "error")]
    Error,
    #[serde(rename = "offline")]
    Offline,
    #[serde(rename = "timed out")]
    TimedOut,
    #[serde(rename = "unknown")]
    Unknown,
}

impl CallOutcome {
    pub const ALL: [Self; 6] = [Self::Pending, Self::Ok, Self::Error, Self::Offline, Self::TimedOut, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Offline => "offline",
            Self::TimedOut => "timed out",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|outcome| outcome.as_str() == text)
    }
}

/// One dispatch as the call log keeps it: who ran what where, and what became of it. Neither
/// the input nor the result is stored (they may hold file contents); the tool, the outcome and
/// the result's size are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    pub call_id: String,
    pub device_id: String,
    pub tool: String,
    pub mode: CallMode,
    /// The tool's class, from the device's manifest (absent when it was not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<ToolClass>,
    /// The proposal an apply applied, or the proposal a mutation's dry run stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_id: Option<String>,
    pub dispatched_at: DateTime<Utc>,
    /// The replica that dispatched the call.
    pub dispatched_by: String,
    /// When the replica holding the device's stream wrote the call to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: CallOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From dispatch to finish, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes of the device's result as it posted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_bytes: Option<u64>,
}

/// `GET /api/calls?deviceId=&tool=&outcome=&before=&limit=`: one page, newest first; `next` is
/// the cursor to pass as `before` for the next page when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallList {
    pub calls: Vec<CallRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// An optional whole number that JSON may write either way, `5` or `5.0` (JSON Schema calls
/// both an integer); a fraction, a negative or anything else is refused.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if let Some(whole) = number.as_u64() {
        return Ok(Some(whole));
    }
    match number.as_f64() {
        // Below 2^53 every whole f64 is exact.
        Some(float) if float.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&float) => {
            Ok(Some(float as u64))
        }
        _ => Err(D::Error::custom(format!("expected a whole number from 0, got {number}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_either_way() {
        let cases: &[(&str, Option<Option<u64>>)] = &[
            (r#"{"tool":"t","input":null}"#, Some(None)),
            (r#"{"tool":"t","input":null,"timeoutMs":null}"#, Some(None)),
            (r#"{"tool":"t","input":null,"timeoutMs":5}"#, Some(Some(5))),
            (r#"{"tool":"t","input":null,"timeoutMs":262145.0}"#, Some(Some(262_145))),
            (r#"{"tool":"t","input":null,"timeoutMs":0.5}"#, None),
            (r#"{"tool":"t","input":null,"timeoutMs":-1}"#, None),
            (r#"{"tool":"t","input":null,"timeoutMs":-1.0}"#, None),
            (r#"{"tool":"t","input":null,"timeoutMs":1e300}"#, None),
            (r#"{"tool":"t","input":null,"timeoutMs":"5"}"#, None),
        ];
        for (json, want) in cases {
            let got = serde_json::from_str::<CallRequest>(json).ok().map(|r| r.timeout_ms);
            assert_eq!(got, *want, "{json}");
        }
        let ttl = serde_json::from_str::<PairingCodeRequest>(r#"{"ttlSeconds":60.0}"#).expect("whole float");
        assert_eq!(ttl.ttl_seconds, Some(60));
    }
}
