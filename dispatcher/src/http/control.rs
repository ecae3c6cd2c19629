//! The control API, for an app backend acting for one user: pairing codes, devices, calls and
//! proposals. Owner scoping is enforced by the registry queries: another user's device or
//! proposal is not found, exactly like one that does not exist.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::join_all;
use protocol::{
    CallMode, CallRequest, CallResponse, Device, DeviceList, HostResult, PairingCodeRequest, Plan, Proposal,
    ProposalDecision, ProposalList, ProposalStatus, CALL_TIMEOUT_DEFAULT_MS, CALL_TIMEOUT_MAX_MS,
    PAIRING_TTL_DEFAULT_SECS, PAIRING_TTL_MAX_SECS,
};
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument;

use super::auth::UserCaller;
use super::{ApiError, AppState, JsonBody};
use crate::core::DispatchRequest;
use crate::registry::{DeviceRecord, NewProposal};

const MAX_TOOL_NAME_LEN: usize = 128;

/// `POST /api/pairing-codes`. The body is optional.
pub async fn create_pairing_code(
    State(state): State<AppState>,
    caller: UserCaller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: PairingCodeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PairingCodeRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
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
async fn device_view(state: &AppState, record: DeviceRecord) -> Device {
    let holder = match state.dispatcher.is_online(&record.id).await {
        Ok(holder) => holder,
        Err(error) => {
            tracing::warn!(device_id = %record.id, %error, "presence unavailable");
            None
        }
    };
    let (tools, roots) = match record.manifest {
        Some(manifest) => (Some(manifest.tools), Some(manifest.roots)),
        None => (None, None),
    };
    Device {
        id: record.id,
        name: record.name,
        platform: record.platform,
        online: holder.is_some(),
        replica: holder.map(|h| h.replica),
        created_at: record.created_at,
        last_seen_at: record.last_seen_at,
        tools,
        roots,
    }
}

async fn owned_device(state: &AppState, caller: &UserCaller, id: &str) -> Result<DeviceRecord, ApiError> {
    if !protocol::subject::is_uuid(id) {
        return Err(ApiError::NotFound);
    }
    state.registry.device(&caller.user_id, id).await?.ok_or(ApiError::NotFound)
}

/// The id of `caller`'s live device `id`: from the hub's owner cache when it was looked up
/// recently, so a dispatch touches no database (ARCHITECTURE.md, Storage); revocations evict
/// it on every replica with the device's cached token.
async fn owned_device_id(state: &AppState, caller: &UserCaller, id: &str) -> Result<String, ApiError> {
    let hub = state.dispatcher.hub();
    if hub.cached_owner(id).is_some_and(|owner| owner == caller.user_id) {
        return Ok(id.to_owned());
    }
    let record = owned_device(state, caller, id).await?;
    hub.cache_owner(record.id.clone(), record.owner);
    Ok(record.id)
}

/// `GET /api/devices`.
pub async fn list_devices(State(state): State<AppState>, caller: UserCaller) -> Result<Json<DeviceList>, ApiError> {
    let records = state.registry.devices(&caller.user_id).await?;
    let devices = join_all(records.into_iter().map(|record| device_view(&state, record))).await;
    Ok(Json(DeviceList { devices }))
}

/// `GET /api/devices/{id}`.
pub async fn get_device(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    let record = owned_device(&state, &caller, &id).await?;
    Ok(Json(device_view(&state, record).await))
}

/// `DELETE /api/devices/{id}`: revoke, cluster-wide.
pub async fn delete_device(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !protocol::subject::is_uuid(&id) || !state.registry.revoke_device(&caller.user_id, &id).await? {
        return Err(ApiError::NotFound);
    }
    // The token is refused from now on (the registry says revoked); closing the stream and
    // failing calls everywhere is the bus's part.
    if let Err(error) = state.dispatcher.drop_device(&id).await {
        tracing::error!(device_id = %id, %error, "revoked in the registry, but the cluster could not be told");
    }
    tracing::info!(device_id = %id, "device revoked");
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

/// Dispatches in a span parented on the caller's trace; the call carries the span's context
/// (or, when spans are not exported, the caller's own, or a new one) to the device, whose
/// result POST comes back under it.
async fn traced_dispatch(
    state: &AppState,
    kind: &'static str,
    device_id: &str,
    headers: &HeaderMap,
    mut request: DispatchRequest,
) -> HostResult {
    let caller = caller_traceparent(headers);
    let span = tracing::info_span!("api.dispatch", kind, device_id = %device_id, tool = %request.tool);
    crate::telemetry::set_parent(&span, caller.as_deref());
    request.traceparent = Some(crate::telemetry::traceparent_of(&span, caller.as_deref()));
    state.metrics.observe_dispatch(state.dispatcher.dispatch(device_id, request)).instrument(span).await
}

/// A call must fit in one bus message (in cluster mode, NATS `max_payload`), with room to
/// spare for the call's other fields: otherwise no replica could carry it to the device.
fn fits_the_bus(state: &AppState, input: &Value) -> Result<(), ApiError> {
    const ENVELOPE: usize = 4096;
    let Some(limit) = state.dispatcher.bus().max_message_bytes() else {
        return Ok(());
    };
    let size = serde_json::to_vec(input).map_or(usize::MAX, |bytes| bytes.len());
    if size.saturating_add(ENVELOPE) > limit {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(())
}

/// `POST /api/devices/{id}/calls`: run a tool; a mutation's proposal is stored.
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
    if request.tool.is_empty() || request.tool.len() > MAX_TOOL_NAME_LEN {
        return Err(ApiError::BadRequest(format!("tool: 1 to {MAX_TOOL_NAME_LEN} characters")));
    }
    let timeout_ms = request.timeout_ms.unwrap_or(CALL_TIMEOUT_DEFAULT_MS);
    if !(1..=CALL_TIMEOUT_MAX_MS).contains(&timeout_ms) {
        return Err(ApiError::BadRequest(format!("timeoutMs: between 1 and {CALL_TIMEOUT_MAX_MS}")));
    }
    let device_id = owned_device_id(&state, &caller, &id).await?;
    fits_the_bus(&state, &request.input)?;
    let dispatch = DispatchRequest::new(request.tool.clone(), request.input.clone(), Duration::from_millis(timeout_ms));
    let result = traced_dispatch(&state, "call", &device_id, &headers, dispatch).await;

    let mut proposal_id = None;
    if result.ok && result.is_proposal() {
        let plan = result.result.clone().unwrap_or(Value::Null);
        let preconditions =
            serde_json::from_value::<Plan>(plan.clone()).map(|p| p.preconditions).unwrap_or(Value::Null);
        let stored = state
            .registry
            .create_proposal(NewProposal {
                id: uuid::Uuid::new_v4().to_string(),
                device_id: device_id.clone(),
                owner: caller.user_id.clone(),
                tool: request.tool,
                input: request.input,
                plan,
                preconditions,
            })
            .await?;
        proposal_id = Some(stored.id);
    }
    let status = result_status(&result);
    Ok((status, Json(CallResponse { result, proposal_id })).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ProposalQuery {
    status: Option<String>,
}

/// `GET /api/proposals?status=…`, newest first.
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
    let proposals = state.registry.proposals(&caller.user_id, status).await?;
    Ok(Json(ProposalList { proposals }))
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
pub async fn approve(
    State(state): State<AppState>,
    caller: UserCaller,
    headers: HeaderMap,
    JsonBody(decision): JsonBody<ProposalDecision>,
) -> Result<Response, ApiError> {
    let stored = owned_proposal(&state, &caller, &decision.proposal_id).await?;
    let proposal = stored.proposal;
    if proposal.status != ProposalStatus::Pending {
        return Err(not_pending(proposal.status));
    }
    // The conditional UPDATE is the lock: of any number of racing approvals, on any replicas,
    // exactly one moves pending -> applying and pushes the call.
    if !state
        .registry
        .transition_proposal(&proposal.id, ProposalStatus::Pending, ProposalStatus::Applying, None)
        .await?
    {
        let now = state.registry.proposal(&caller.user_id, &proposal.id).await?;
        return Err(not_pending(now.map_or(ProposalStatus::Applying, |p| p.proposal.status)));
    }
    let mut dispatch = DispatchRequest::new(
        proposal.tool.clone(),
        proposal.input.clone(),
        Duration::from_millis(CALL_TIMEOUT_DEFAULT_MS),
    );
    dispatch.mode = Some(CallMode::Apply);
    dispatch.preconditions = Some(stored.preconditions);
    let result = traced_dispatch(&state, "apply", &proposal.device_id, &headers, dispatch).await;

    let next = if result.is_offline() {
        // Nothing was pushed: the proposal may be approved again later.
        ProposalStatus::Pending
    } else if result.ok {
        ProposalStatus::Applied
    } else {
        // Failed on the device, or timed out: it may or may not have applied, so it is
        // never pushed a second time.
        ProposalStatus::Failed
    };
    let recorded = if next == ProposalStatus::Pending { None } else { Some(&result) };
    state.registry.transition_proposal(&proposal.id, ProposalStatus::Applying, next, recorded).await?;
    Ok((result_status(&result), Json(result)).into_response())
}

/// `POST /api/host/reject`.
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
    Ok(Json(owned_proposal(&state, &caller, &decision.proposal_id).await?.proposal))
}
