//! The control API, for an app backend acting for one user: pairing codes, devices, calls and
//! proposals. Owner scoping is enforced by the registry queries: another user's device or
//! proposal is not found, exactly like one that does not exist. Lists come in pages
//! (`limit`, `cursor`, answered with `next`); caps and quotas are the registry's, answered 413
//! and 429 through [`ApiError`].

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::join_all;
use protocol::{
    CallRequest, CallResponse, Device, DeviceList, HostResult, PairingCodeRequest, Proposal, ProposalDecision,
    ProposalList, ProposalStatus, CALL_TIMEOUT_DEFAULT_MS, CALL_TIMEOUT_MAX_MS, PAIRING_TTL_DEFAULT_SECS,
    PAIRING_TTL_MAX_SECS,
};
use protocol::{ErrorBody, PairingCode};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::UserCaller;
use super::{ApiError, AppState, JsonBody};
use crate::events;
use crate::registry::{DeviceRecord, PageRequest};
use crate::service::{self, ApproveOutcome, CallOutcome};

const MAX_TOOL_NAME_LEN: usize = 128;

/// `POST /api/pairing-codes`. The body is optional.
#[utoipa::path(
    post,
    path = "/api/pairing-codes",
    tag = "control",
    security(("apiToken" = [])),
    request_body(content = Option<PairingCodeRequest>, description = "Optional; an empty body takes the defaults"),
    responses(
        (status = 201, description = "A new single-use pairing code", body = PairingCode),
        (status = 400, description = "Malformed body, or ttlSeconds out of range", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "The user holds too many live pairing codes", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before asking again"))),
    ),
)]
pub async fn create_pairing_code(
    State(state): State<AppState>,
    caller: UserCaller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // No body at all, and a JSON `null`, take the defaults; otherwise an object. A body of
    // whitespace alone is not JSON, so it is malformed, not absent.
    let request: PairingCodeRequest = if body.is_empty() {
        PairingCodeRequest::default()
    } else if !super::is_json_object(&body) && body.trim_ascii() != b"null" {
        return Err(ApiError::BadRequest("expected a JSON object {ttlSeconds?}, or no body".into()));
    } else {
        serde_json::from_slice::<Option<PairingCodeRequest>>(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
            .unwrap_or_default()
    };
    let ttl = request.ttl_seconds.unwrap_or(PAIRING_TTL_DEFAULT_SECS);
    if !(1..=PAIRING_TTL_MAX_SECS).contains(&ttl) {
        return Err(ApiError::BadRequest(format!("ttlSeconds: between 1 and {PAIRING_TTL_MAX_SECS}")));
    }
    let code = state
        .registry
        .create_pairing_code(&caller.user_id, Duration::from_secs(ttl), Some(&caller.token_hash_hex()))
        .await?;
    Ok((StatusCode::CREATED, Json(code)).into_response())
}

/// A registry record with its cluster-wide presence.
pub(crate) async fn device_view(state: &AppState, record: DeviceRecord) -> Device {
    let holder = match state.dispatcher.is_online(&record.id).await {
        Ok(holder) => holder,
        Err(error) => {
            tracing::warn!(device_id = %record.id, %error, "presence unavailable");
            None
        }
    };
    let tools = record.manifest.map(|manifest| manifest.tools);
    Device {
        id: record.id,
        name: record.name,
        platform: record.platform,
        online: holder.is_some(),
        replica: holder.map(|h| h.replica),
        created_at: record.created_at,
        last_seen_at: record.last_seen_at,
        tools,
        roots: record.roots,
        tool_count: record.tool_count,
    }
}

async fn owned_device(state: &AppState, caller: &UserCaller, id: &str) -> Result<DeviceRecord, ApiError> {
    Ok(service::owned_device(state, &caller.user_id, id).await?)
}

/// `tools`: the only thing a device list may include.
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum DeviceInclude {
    Tools,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceListQuery {
    /// Devices per page, 1 to 500 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The previous page's `next`, as it was handed out.
    cursor: Option<String>,
    /// `tools` to include each device's tool descriptors.
    #[param(value_type = Option<DeviceInclude>)]
    include: Option<String>,
}

/// `GET /api/devices?limit=&cursor=&include=tools`: a page, oldest first. Tools only when
/// `include=tools`; roots and tool counts always.
#[utoipa::path(
    get,
    path = "/api/devices",
    tag = "control",
    security(("apiToken" = [])),
    params(DeviceListQuery),
    responses(
        (status = 200, description = "A page of the user's devices, oldest first", body = DeviceList),
        (status = 400, description = "A bad limit, cursor or include", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
    ),
)]
pub async fn list_devices(
    State(state): State<AppState>,
    caller: UserCaller,
    Query(query): Query<DeviceListQuery>,
) -> Result<Json<DeviceList>, ApiError> {
    let request = PageRequest::parse(query.limit.as_deref(), query.cursor.as_deref())?;
    let with_tools = match query.include.as_deref() {
        None | Some("") => false,
        Some("tools") => true,
        Some(_) => return Err(ApiError::BadRequest("include: only `tools`".into())),
    };
    let page = state.registry.devices_page(&caller.user_id, &request, with_tools).await?;
    let devices = join_all(page.items.into_iter().map(|record| device_view(&state, record))).await;
    Ok(Json(DeviceList { devices, next: page.next.map(|cursor| cursor.encode()) }))
}

/// `GET /api/devices/{id}`.
#[utoipa::path(
    get,
    path = "/api/devices/{id}",
    tag = "control",
    security(("apiToken" = [])),
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such device or proposal of this user", body = ErrorBody),
    ),
)]
pub async fn get_device(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    let record = owned_device(&state, &caller, &id).await?;
    Ok(Json(device_view(&state, record).await))
}

/// `DELETE /api/devices/{id}`: revoke, cluster-wide.
#[utoipa::path(
    delete,
    path = "/api/devices/{id}",
    tag = "control",
    security(("apiToken" = [])),
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 204, description = "Revoked: its token is refused and its stream closed, wherever it is"),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such device or proposal of this user", body = ErrorBody),
    ),
)]
pub async fn delete_device(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let record = owned_device(&state, &caller, &id).await?;
    if !protocol::subject::is_uuid(&id) || !state.registry.revoke_device(&caller.user_id, &id).await? {
        return Err(ApiError::NotFound);
    }
    // The token is refused from now on (the registry says revoked); closing the stream and
    // failing calls everywhere is the bus's part.
    if let Err(error) = state.dispatcher.drop_device(&id).await {
        tracing::error!(device_id = %id, %error, "revoked in the registry, but the cluster could not be told");
    }
    tracing::info!(device_id = %id, "device revoked");
    events::device_revoked(&state, &caller.user_id, record);
    Ok(StatusCode::NO_CONTENT)
}

/// The status of a dispatch's answer: 503 offline, 504 timed out, 200 otherwise.
fn result_status(result: &HostResult) -> StatusCode {
    if result.is_offline() {
        StatusCode::SERVICE_UNAVAILABLE
    } else if result.is_timed_out() {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::OK
    }
}

/// The caller's `traceparent` header, if any.
fn caller_traceparent(headers: &HeaderMap) -> Option<String> {
    headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// `POST /api/devices/{id}/calls`: run a tool; a mutation's proposal is stored.
#[utoipa::path(
    post,
    path = "/api/devices/{id}/calls",
    tag = "control",
    security(("apiToken" = [])),
    params(("id" = String, Path, description = "The device id")),
    request_body = CallRequest,
    responses(
        (status = 200, description = "The device's answer; a mutation's proposal carries `proposalId`", body = CallResponse),
        (status = 400, description = "Malformed body, a `mode` field, or tool or timeoutMs out of range", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such device or proposal of this user", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit, input too large for the bus, or a proposal too large to store", body = ErrorBody),
        (status = 503, description = "`device offline`: the device holds no stream anywhere", body = CallResponse),
        (status = 504, description = "`device timed out`: no answer before timeoutMs", body = CallResponse),
    ),
)]
pub async fn call_device(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let Value::Object(fields) = &body else {
        return Err(ApiError::BadRequest("expected a JSON object {tool, input, timeoutMs?}".into()));
    };
    if fields.contains_key("mode") {
        return Err(ApiError::BadRequest("mode is set by the server only; approve a proposal to apply it".into()));
    }
    let request: CallRequest =
        serde_json::from_value(body).map_err(|e| ApiError::BadRequest(format!("invalid call: {e}")))?;
    if !(1..=MAX_TOOL_NAME_LEN).contains(&request.tool.chars().count()) {
        return Err(ApiError::BadRequest(format!("tool: 1 to {MAX_TOOL_NAME_LEN} characters")));
    }
    let timeout_ms = request.timeout_ms.unwrap_or(CALL_TIMEOUT_DEFAULT_MS);
    if !(1..=CALL_TIMEOUT_MAX_MS).contains(&timeout_ms) {
        return Err(ApiError::BadRequest(format!("timeoutMs: between 1 and {CALL_TIMEOUT_MAX_MS}")));
    }
    let timeout = Duration::from_millis(timeout_ms);
    let traceparent = caller_traceparent(&headers);
    let CallOutcome { result, proposal_id } = service::call_device(
        &state,
        &caller.user_id,
        &id,
        &request.tool,
        request.input,
        timeout,
        traceparent.as_deref(),
    )
    .await?;
    let status = result_status(&result);
    Ok((status, Json(CallResponse { result, proposal_id })).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProposalQuery {
    /// Only proposals in this state.
    #[param(value_type = Option<ProposalStatus>)]
    status: Option<String>,
    /// Proposals per page, 1 to 500 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The previous page's `next`, as it was handed out.
    cursor: Option<String>,
}

/// `GET /api/proposals?status=&limit=&cursor=`: a page, newest first.
#[utoipa::path(
    get,
    path = "/api/proposals",
    tag = "control",
    security(("apiToken" = [])),
    params(ProposalQuery),
    responses(
        (status = 200, description = "A page of the user's proposals, newest first", body = ProposalList),
        (status = 400, description = "A bad status, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
    ),
)]
pub async fn list_proposals(
    State(state): State<AppState>,
    caller: UserCaller,
    Query(query): Query<ProposalQuery>,
) -> Result<Json<ProposalList>, ApiError> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(text) => Some(ProposalStatus::parse(text).ok_or_else(|| {
            ApiError::BadRequest("status: one of pending, applying, applied, failed, rejected".into())
        })?),
    };
    let request = PageRequest::parse(query.limit.as_deref(), query.cursor.as_deref())?;
    let page = state.registry.proposals_page(&caller.user_id, status, &request).await?;
    Ok(Json(ProposalList { proposals: page.items, next: page.next.map(|cursor| cursor.encode()) }))
}

async fn owned_proposal(
    state: &AppState,
    caller: &UserCaller,
    id: &str,
) -> Result<crate::registry::StoredProposal, ApiError> {
    if !protocol::subject::is_uuid(id) {
        return Err(ApiError::NotFound);
    }
    state.registry.proposal(&caller.user_id, id).await?.ok_or(ApiError::NotFound)
}

/// `GET /api/proposals/{id}`.
#[utoipa::path(
    get,
    path = "/api/proposals/{id}",
    tag = "control",
    security(("apiToken" = [])),
    params(("id" = String, Path, description = "The proposal id")),
    responses(
        (status = 200, description = "The proposal", body = Proposal),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such device or proposal of this user", body = ErrorBody),
    ),
)]
pub async fn get_proposal(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(id): Path<String>,
) -> Result<Json<Proposal>, ApiError> {
    Ok(Json(owned_proposal(&state, &caller, &id).await?.proposal))
}

fn not_pending(status: ProposalStatus) -> ApiError {
    ApiError::Conflict(format!("proposal is {}, not pending", status.as_str()))
}

/// `POST /api/host/approve`: apply a pending proposal once, with the stored input.
#[utoipa::path(
    post,
    path = "/api/host/approve",
    tag = "control",
    security(("apiToken" = [])),
    request_body = ProposalDecision,
    responses(
        (status = 200, description = "The device's answer to the apply", body = HostResult),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such device or proposal of this user", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "The proposal is not pending (applying, applied, failed or rejected)", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 503, description = "`device offline`: nothing was pushed, the proposal stays pending", body = HostResult),
        (status = 504, description = "`device timed out`: the proposal is failed and never pushed again", body = HostResult),
    ),
)]
pub async fn approve(
    State(state): State<AppState>,
    caller: UserCaller,
    headers: HeaderMap,
    JsonBody(decision): JsonBody<ProposalDecision>,
) -> Result<Response, ApiError> {
    let traceparent = caller_traceparent(&headers);
    let result = match service::approve_proposal(&state, &caller.user_id, &decision.proposal_id, traceparent.as_deref())
        .await?
    {
        ApproveOutcome::Applied { result, .. } => result,
        ApproveOutcome::NotPending { status, .. } => return Err(not_pending(status)),
    };
    Ok((result_status(&result), Json(result)).into_response())
}

/// `POST /api/host/reject`.
#[utoipa::path(
    post,
    path = "/api/host/reject",
    tag = "control",
    security(("apiToken" = [])),
    request_body = ProposalDecision,
    responses(
        (status = 200, description = "The rejected proposal", body = Proposal),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such device or proposal of this user", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "The proposal is not pending", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
    ),
)]
pub async fn reject(
    State(state): State<AppState>,
    caller: UserCaller,
    JsonBody(decision): JsonBody<ProposalDecision>,
) -> Result<Json<Proposal>, ApiError> {
    let stored = owned_proposal(&state, &caller, &decision.proposal_id).await?;
    if stored.proposal.status != ProposalStatus::Pending {
        return Err(not_pending(stored.proposal.status));
    }
    if !state
        .registry
        .transition_proposal(&stored.proposal.id, ProposalStatus::Pending, ProposalStatus::Rejected, None)
        .await?
    {
        let now = owned_proposal(&state, &caller, &decision.proposal_id).await?;
        return Err(not_pending(now.proposal.status));
    }
    state.metrics.proposal("rejected");
    let rejected = owned_proposal(&state, &caller, &decision.proposal_id).await?.proposal;
    events::proposal_changed(&state, &caller.user_id, &rejected).await;
    Ok(Json(rejected))
}
