//! The live events of the control API (`GET /api/events`): what is published when a device or
//! a proposal changes, and how this replica's listeners hear it.
//!
//! - One small function per kind of change ([`device_changed`], [`device_row_changed`], [`device_enrolled`],
//!   [`device_revoked`], [`proposal_changed`], [`proposal_reloaded`]) loads the view the control
//!   API would show and publishes it on the bus, so the handlers that change things stay thin.
//!   Device changes are published from a task of their own (presence may take a moment);
//!   proposal changes in order, before the handler answers.
//! - [`EventHub`]: this replica's listeners. One task reads the bus's events (every replica's,
//!   this one's included) and fans each out through the [`listeners::ListenerTable`].
//! - [`snapshot`]: the first frame of a stream.
//!
//! Not here: the HTTP stream (`http::events`), the wire shapes (`protocol::events`), or any
//! decision about devices and proposals themselves.

pub mod listeners;

use std::sync::{Arc, Weak};

use futures::future::join_all;
use parking_lot::Mutex;
use protocol::events::{Change, DeviceChange, Snapshot, UserEvent};
use protocol::{Device, Proposal, ProposalStatus};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use self::listeners::{EncodedFrame, Listener, ListenerTable};
use crate::bus::Bus;
use crate::http::control::device_view;
use crate::http::{ApiError, AppState};
use crate::registry::DeviceRecord;

/// Largest frame an event may make: a bigger change is sent slimmed ([`fit`]), so neither the
/// bus nor a listener carries a file's worth of diff per event.
pub const EVENT_MAX_BYTES: usize = 256 * 1024;

/// This replica's listeners of `GET /api/events`.
#[derive(Debug)]
pub struct EventHub {
    table: Mutex<ListenerTable>,
    /// Cancelled when the replica drains: every stream ends, and its client reconnects to
    /// another replica.
    closing: CancellationToken,
}

/// A listener as its stream holds it; dropping it leaves the table.
#[derive(Debug)]
pub struct Subscription {
    pub listener: Listener,
    user_id: String,
    hub: Weak<EventHub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.table.lock().remove(&self.user_id, self.listener.id);
        }
    }
}

impl EventHub {
    /// A hub fed by `bus`'s events until `cancel` fires.
    pub fn start(bus: &Arc<dyn Bus>, cancel: CancellationToken) -> Arc<Self> {
        let hub = Arc::new(Self { table: Mutex::default(), closing: CancellationToken::new() });
        let mut events = bus.subscribe_events();
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = cancel.cancelled() => break,
                    received = events.recv() => received,
                };
                let Some(hub) = weak.upgrade() else { break };
                match received {
                    Ok(event) => hub.deliver(&event),
                    Err(RecvError::Lagged(missed)) => {
                        // Listeners would silently miss events: let them all reconnect for a
                        // fresh snapshot instead.
                        let dropped = hub.table.lock().drop_all();
                        tracing::warn!(missed, dropped, "event fan-out fell behind; listeners dropped");
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        hub
    }

    /// A new listener of `user_id`'s events.
    pub fn listen(self: &Arc<Self>, user_id: &str) -> Subscription {
        let listener = self.table.lock().add(user_id);
        Subscription { listener, user_id: user_id.to_owned(), hub: Arc::downgrade(self) }
    }

    /// Ends every stream (the replica is draining); new ones are refused by the handler.
    pub fn close_all(&self) {
        self.closing.cancel();
        self.table.lock().drop_all();
    }

    /// Fires when the replica drains.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Listeners on this replica.
    pub fn listeners(&self) -> usize {
        self.table.lock().len()
    }

    fn deliver(&self, event: &UserEvent) {
        let frame = Arc::new(EncodedFrame { event: event.change.event_name(), data: event.change.data_json() });
        let delivery = self.table.lock().deliver(&event.user_id, &frame);
        if delivery.dropped > 0 {
            tracing::info!(dropped = delivery.dropped, "event listeners fell behind; their streams end");
        }
    }
}

/// The first frame of `user_id`'s stream: their devices and their pending proposals.
pub async fn snapshot(state: &AppState, user_id: &str) -> Result<Snapshot, ApiError> {
    let records = state.registry.devices(user_id).await?;
    // As `GET /api/devices` lists them: roots and a tool count, the tools on request elsewhere.
    let devices = join_all(
        records.into_iter().map(|record| async move { Device { tools: None, ..device_view(state, record).await } }),
    )
    .await;
    // Each pending proposal as an event would carry it: a large one without its input and diff.
    let proposals = state.registry.proposals(user_id, Some(ProposalStatus::Pending)).await?;
    let proposals = proposals
        .into_iter()
        .filter_map(|proposal| match fit(Change::Proposal(proposal), EVENT_MAX_BYTES) {
            Change::Proposal(proposal) => Some(proposal),
            Change::Device(_) => None,
        })
        .collect();
    Ok(Snapshot { devices, proposals })
}

/// `owner`'s device `device_id` changed (stream opened or closed, manifest): its view, with
/// cluster-wide presence, goes to the owner's listeners. A revoked or unknown device is not
/// announced (its revocation was).
pub fn device_changed(state: &AppState, owner: &str, device_id: &str) {
    let (state, owner, device_id) = (state.clone(), owner.to_owned(), device_id.to_owned());
    tokio::spawn(async move {
        match state.registry.device(&owner, &device_id).await {
            Ok(Some(record)) => publish_device(&state, record).await,
            Ok(None) => {}
            Err(error) => tracing::warn!(%device_id, %error, "device event not published"),
        }
    });
}

/// [`device_changed`] for a device whose stored row is at hand (a stream just opened: the
/// statement that opened it returned the row), so it is not read again.
pub fn device_row_changed(state: &AppState, record: DeviceRecord) {
    let state = state.clone();
    tokio::spawn(async move { publish_device(&state, record).await });
}

async fn publish_device(state: &AppState, record: DeviceRecord) {
    let owner = record.owner.clone();
    let device = device_view(state, record).await;
    publish(state, &owner, Change::Device(DeviceChange { device, revoked: false })).await;
}

/// A device enrolled with `token`: announced to the owner of the pairing code it used.
pub fn device_enrolled(state: &AppState, token: &str) {
    let (state, token) = (state.clone(), token.to_owned());
    tokio::spawn(async move {
        match state.registry.device_for_token(&token).await {
            Ok(Some(auth)) => device_changed(&state, &auth.owner, &auth.device_id),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "enrollment event not published"),
        }
    });
}

/// `owner`'s device, as it was before its revocation, is revoked: offline, and gone from lists.
pub fn device_revoked(state: &AppState, owner: &str, record: DeviceRecord) {
    let (state, owner) = (state.clone(), owner.to_owned());
    tokio::spawn(async move {
        let device = Device {
            id: record.id,
            name: record.name,
            platform: record.platform,
            online: false,
            replica: None,
            created_at: record.created_at,
            last_seen_at: record.last_seen_at,
            tools: None,
            roots: record.roots,
            tool_count: record.tool_count,
        };
        publish(&state, &owner, Change::Device(DeviceChange { device, revoked: true })).await;
    });
}

/// `owner`'s proposal is as given (just created, or just read back).
pub async fn proposal_changed(state: &AppState, owner: &str, proposal: &Proposal) {
    publish(state, owner, Change::Proposal(proposal.clone())).await;
}

/// `owner`'s proposal `proposal_id` changed status: read back and published.
pub async fn proposal_reloaded(state: &AppState, owner: &str, proposal_id: &str) {
    match state.registry.proposal(owner, proposal_id).await {
        Ok(Some(stored)) => proposal_changed(state, owner, &stored.proposal).await,
        Ok(None) => {}
        Err(error) => tracing::warn!(%proposal_id, %error, "proposal event not published"),
    }
}

async fn publish(state: &AppState, owner: &str, change: Change) {
    let event = UserEvent { user_id: owner.to_owned(), change: fit(change, EVENT_MAX_BYTES) };
    if let Err(error) = state.dispatcher.bus().publish_event(&event).await {
        tracing::warn!(%error, event = event.change.event_name(), "event not published");
    }
}

/// A change whose frame would exceed `max_bytes`, slimmed: a device without its tool
/// descriptors, a proposal without its input and diff (`proposal.diffOmitted: true`; the full
/// one is at `GET /api/proposals/{id}`). Smaller changes pass unchanged.
pub fn fit(change: Change, max_bytes: usize) -> Change {
    if change.data_json().len() <= max_bytes {
        return change;
    }
    match change {
        Change::Device(mut device) => {
            device.device.tools = None;
            Change::Device(device)
        }
        Change::Proposal(mut proposal) => {
            let kept = |key: &str| proposal.proposal.get(key).filter(|value| value.to_string().len() <= 4096).cloned();
            let mut plan = json!({ "diffOmitted": true });
            for key in ["tool", "summary"] {
                if let Some(value) = kept(key) {
                    plan[key] = value;
                }
            }
            proposal.proposal = plan;
            proposal.input = Value::Null;
            if let Some(result) =
                proposal.result.as_mut().filter(|r| r.result.as_ref().is_some_and(|v| v.to_string().len() > 4096))
            {
                result.result = None;
            }
            Change::Proposal(proposal)
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use protocol::{HostResult, ToolClass, ToolDescriptor};

    use super::*;

    fn device(tools: usize) -> Change {
        let tool = |n: usize| ToolDescriptor {
            name: format!("tool_{n}"),
            description: "x".repeat(100),
            input_schema: json!({"type": "object"}),
            class: ToolClass::Read,
        };
        Change::Device(DeviceChange {
            device: Device {
                id: "d".into(),
                name: "laptop".into(),
                platform: None,
                online: true,
                replica: Some("a".into()),
                created_at: Utc::now(),
                last_seen_at: None,
                tools: Some((0..tools).map(tool).collect()),
                roots: Some(vec!["/home".into()]),
                tool_count: Some(tools),
            },
            revoked: false,
        })
    }

    fn proposal(diff_bytes: usize) -> Change {
        Change::Proposal(Proposal {
            id: "p".into(),
            device_id: "d".into(),
            tool: "write_file".into(),
            input: json!({"path": "x", "content": "y".repeat(diff_bytes)}),
            proposal: json!({"tool": "write_file", "summary": "write x", "diff": "+".repeat(diff_bytes), "preconditions": {}}),
            status: ProposalStatus::Applied,
            created_at: Utc::now(),
            decided_at: None,
            result: Some(HostResult::success("c", json!({"written": true}))),
        })
    }

    #[test]
    fn small_changes_pass_and_large_ones_are_slimmed() {
        for small in [device(3), proposal(100)] {
            assert_eq!(fit(small.clone(), 10_000), small);
        }
        let Change::Device(slim) = fit(device(200), 10_000) else { panic!("a device") };
        assert_eq!(slim.device.tools, None);
        assert_eq!(slim.device.roots, Some(vec!["/home".into()]), "the rest stays");

        let Change::Proposal(slim) = fit(proposal(50_000), 10_000) else { panic!("a proposal") };
        assert_eq!(slim.proposal, json!({"tool": "write_file", "summary": "write x", "diffOmitted": true}));
        assert_eq!(slim.input, Value::Null);
        assert_eq!(slim.status, ProposalStatus::Applied, "the status, the point of the event, stays");
        assert_eq!(slim.result.and_then(|r| r.result), Some(json!({"written": true})));
        assert!(fit(proposal(50_000), 10_000).data_json().len() < 10_000);
    }
}
