//! The service layer under every door (REST control API, MCP): "dispatch this call for this
//! user on this device" and "approve this proposal for this user". Each does the owner check,
//! the proposal bookkeeping, the call log and the tracing once, so every door behaves the same; a door only
//! validates its own protocol's input and translates the typed outcome.
//!
//! It does not decide statuses or wire shapes (that is each door's part), and it does not
//! parse requests.

use std::time::Duration;

use protocol::{CallMode, HostResult, Plan, ProposalStatus};
use serde_json::Value;
use tracing::Instrument;

use crate::core::DispatchRequest;
use crate::http::AppState;
use crate::registry::{DeviceRecord, NewProposal, RegistryError};

/// Why a service call could not be carried out (an answer from the device, even a failure,
/// is an outcome, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The device or proposal does not exist, or belongs to another user.
    #[error("not found")]
    NotFound,
    /// The call's input could not be carried to any replica in one bus message.
    #[error("call input larger than the bus can carry")]
    TooLarge,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What a dispatch came to: the device's answer (or `device offline` / `device timed out`),
/// and the stored proposal's id when the answer was a mutation's proposal.
#[derive(Debug, Clone, PartialEq)]
pub struct CallOutcome {
    pub result: HostResult,
    pub proposal_id: Option<String>,
}

/// What an approval came to.
#[derive(Debug, Clone, PartialEq)]
pub enum ApproveOutcome {
    /// This approval pushed the apply; its result (which may be offline, timed out or the
    /// tool's failure). An offline apply left the proposal pending.
    Applied { result: HostResult, proposal: protocol::Proposal },
    /// The proposal was not pending (decided before, or being applied by another approval):
    /// nothing was pushed. `proposal.result` is the recorded outcome of an earlier apply, if any.
    NotPending { status: ProposalStatus, proposal: protocol::Proposal },
}

/// The device `id` of user `user_id`, from the registry (owner scoped: another user's device
/// is not found).
pub async fn owned_device(state: &AppState, user_id: &str, id: &str) -> Result<DeviceRecord, ServiceError> {
    if !protocol::subject::is_uuid(id) {
        return Err(ServiceError::NotFound);
    }
    state.registry.device(user_id, id).await?.ok_or(ServiceError::NotFound)
}

/// The id of `user_id`'s live device `id`: from the hub's owner cache when it was looked up
/// recently, so a dispatch touches no database (ARCHITECTURE.md, Storage); revocations evict
/// it on every replica with the device's cached token.
pub async fn owned_device_id(state: &AppState, user_id: &str, id: &str) -> Result<String, ServiceError> {
    let hub = state.dispatcher.hub();
    if hub.cached_owner(id).is_some_and(|owner| owner == user_id) {
        return Ok(id.to_owned());
    }
    let record = owned_device(state, user_id, id).await?;
    hub.cache_owner(record.id.clone(), record.owner);
    Ok(record.id)
}

/// A call must fit in one bus message (in cluster mode, NATS `max_payload`), with room to
/// spare for the call's other fields: otherwise no replica could carry it to the device.
fn fits_the_bus(state: &AppState, input: &Value) -> Result<(), ServiceError> {
    const ENVELOPE: usize = 4096;
    let Some(limit) = state.dispatcher.bus().max_message_bytes() else {
        return Ok(());
    };
    let size = serde_json::to_vec(input).map_or(usize::MAX, |bytes| bytes.len());
    if size.saturating_add(ENVELOPE) > limit {
        return Err(ServiceError::TooLarge);
    }
    Ok(())
}

/// Dispatches in a span parented on the caller's trace; the call carries the span's context
/// (or, when spans are not exported, the caller's own, or a new one) to the device, whose
/// result POST comes back under it. The call log hears of the dispatch before it is sent, and
/// of its answer when this replica made it (`device offline`, `device timed out`); the device's
/// own answer is logged by the replica that receives it.
async fn traced_dispatch(
    state: &AppState,
    kind: &'static str,
    owner: &str,
    device_id: &str,
    traceparent: Option<&str>,
    proposal_id: Option<&str>,
    mut request: DispatchRequest,
) -> HostResult {
    let span = tracing::info_span!("api.dispatch", kind, device_id = %device_id, tool = %request.tool);
    crate::telemetry::set_parent(&span, traceparent);
    request.traceparent = Some(crate::telemetry::traceparent_of(&span, traceparent));
    let call_id = request.call_id.get_or_insert_with(|| state.dispatcher.new_call_id()).clone();
    state.call_log.dispatched(crate::calllog::Dispatch {
        call_id: &call_id,
        device_id,
        owner,
        tool: &request.tool,
        mode: request.mode.unwrap_or(CallMode::Auto),
        proposal_id,
        timeout: request.timeout,
    });
    let result = state.metrics.observe_dispatch(state.dispatcher.dispatch(device_id, request)).instrument(span).await;
    state.call_log.answered_by_server(device_id, owner, &result);
    result
}

/// Runs `tool` with `input` on `user_id`'s device `device_id` (never in apply mode); a
/// mutation's proposal is stored as pending. The input is assumed already validated by the
/// door (tool name length, timeout range).
pub async fn call_device(
    state: &AppState,
    user_id: &str,
    device_id: &str,
    tool: &str,
    input: Value,
    timeout: Duration,
    traceparent: Option<&str>,
) -> Result<CallOutcome, ServiceError> {
    let device_id = owned_device_id(state, user_id, device_id).await?;
    fits_the_bus(state, &input)?;
    let dispatch = DispatchRequest::new(tool, input.clone(), timeout);
    let result = traced_dispatch(state, "call", user_id, &device_id, traceparent, None, dispatch).await;

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
                owner: user_id.to_owned(),
                tool: tool.to_owned(),
                input,
                plan,
                preconditions,
            })
            .await?;
        state.metrics.proposal("proposed");
        crate::events::proposal_changed(state, user_id, &stored).await;
        state.call_log.proposed(&result.call_id, &device_id, user_id, &stored.id);
        proposal_id = Some(stored.id);
    }
    Ok(CallOutcome { result, proposal_id })
}

/// The proposal `id` of `user_id` (owner scoped).
pub async fn owned_proposal(
    state: &AppState,
    user_id: &str,
    id: &str,
) -> Result<crate::registry::StoredProposal, ServiceError> {
    if !protocol::subject::is_uuid(id) {
        return Err(ServiceError::NotFound);
    }
    state.registry.proposal(user_id, id).await?.ok_or(ServiceError::NotFound)
}

/// Applies `user_id`'s pending proposal `proposal_id` once, with the stored input and
/// preconditions. Of any number of racing approvals, on any replicas, exactly one pushes the
/// apply; the others get [`ApproveOutcome::NotPending`] with what was recorded.
pub async fn approve_proposal(
    state: &AppState,
    user_id: &str,
    proposal_id: &str,
    traceparent: Option<&str>,
) -> Result<ApproveOutcome, ServiceError> {
    let stored = owned_proposal(state, user_id, proposal_id).await?;
    let proposal = stored.proposal;
    if proposal.status != ProposalStatus::Pending {
        return Ok(ApproveOutcome::NotPending { status: proposal.status, proposal });
    }
    // The conditional UPDATE is the lock: of any number of racing approvals, on any replicas,
    // exactly one moves pending -> applying and pushes the call. It records the call's id and
    // deadline first, so that should this replica die waiting, the sweep fails the proposal
    // and the device's late result still finds it.
    let timeout = state.settings.storage.apply_timeout;
    let call_id = state.dispatcher.new_call_id();
    let deadline = chrono::Utc::now() + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    if !state.registry.begin_apply(&proposal.id, &call_id, deadline).await? {
        let now = state.registry.proposal(user_id, &proposal.id).await?.map(|p| p.proposal);
        let now = now.unwrap_or(protocol::Proposal { status: ProposalStatus::Applying, ..proposal });
        return Ok(ApproveOutcome::NotPending { status: now.status, proposal: now });
    }
    state.metrics.proposal("approved");
    crate::events::proposal_reloaded(state, user_id, &proposal.id).await;
    let mut dispatch = DispatchRequest::new(proposal.tool.clone(), proposal.input.clone(), timeout);
    dispatch.mode = Some(CallMode::Apply);
    dispatch.preconditions = Some(stored.preconditions);
    dispatch.call_id = Some(call_id.clone());
    let result =
        traced_dispatch(state, "apply", user_id, &proposal.device_id, traceparent, Some(&proposal.id), dispatch).await;

    // Offline: nothing was pushed, pending again. Timed out: failed, never pushed a second
    // time (the device may have applied it; its late result may still say so). Otherwise the
    // device's answer. A late result or the sweep may have recorded it first: theirs stands.
    match state.registry.finish_apply(&proposal.id, &call_id, &result).await? {
        None => tracing::info!(proposal_id = %proposal.id, %call_id, "apply already recorded elsewhere"),
        // Not pushed (device offline): pending again.
        Some(ProposalStatus::Pending) => state.metrics.proposal("unpushed"),
        Some(status) => state.metrics.proposal(status.as_str()),
    }
    crate::events::proposal_reloaded(state, user_id, &proposal.id).await;
    Ok(ApproveOutcome::Applied { result, proposal })
}
