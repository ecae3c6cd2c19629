//! Golden JSON: the wire form of every type, pinned. A change here is a breaking change to
//! devices and apps in the field; see CONTRACT.md.

use chrono::{TimeZone, Utc};
use protocol::sse::{Ready, Reconnect, ReconnectReason};
use protocol::subject::{ApiTokensRevoked, CallAck, DeliverAck, Holder, ReplicaLoad, Takeover};
use protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Serializes `value`, compares with `golden`, and parses `golden` back to the same value.
fn pin<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T, golden: Value) {
    assert_eq!(serde_json::to_value(value).unwrap(), golden);
    let back: T = serde_json::from_value(golden).unwrap();
    assert_eq!(&back, value);
}

#[test]
fn host_call_minimal_omits_optional_fields() {
    let call = HostCall {
        call_id: "c1".into(),
        tool: "read_file".into(),
        input: json!({"path": "a.txt"}),
        mode: None,
        preconditions: None,
        deadline: None,
        traceparent: None,
    };
    pin(&call, json!({"callId": "c1", "tool": "read_file", "input": {"path": "a.txt"}}));
}

#[test]
fn host_call_apply_with_everything() {
    let call = HostCall {
        call_id: "c2".into(),
        tool: "write_file".into(),
        input: json!({"path": "a.txt", "content": "x"}),
        mode: Some(CallMode::Apply),
        preconditions: Some(json!({"a.txt": {"sha256": "00"}})),
        deadline: Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };
    pin(
        &call,
        json!({
            "callId": "c2", "tool": "write_file", "input": {"path": "a.txt", "content": "x"},
            "mode": "apply", "preconditions": {"a.txt": {"sha256": "00"}},
            "deadline": "2026-01-02T03:04:05Z",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        }),
    );
}

#[test]
fn agents_ignore_unknown_fields() {
    let call: HostCall =
        serde_json::from_value(json!({"callId": "c", "tool": "t", "input": null, "future": 1, "mode": "auto"}))
            .unwrap();
    assert_eq!(call.mode, Some(CallMode::Auto));
}

#[test]
fn host_results() {
    pin(&HostResult::success("c", json!({"n": 1})), json!({"callId": "c", "ok": true, "result": {"n": 1}}));
    pin(
        &HostResult::proposal("c", json!({"tool": "t"})),
        json!({"callId": "c", "ok": true, "result": {"tool": "t"}, "proposal": true}),
    );
    pin(&HostResult::offline("c"), json!({"callId": "c", "ok": false, "error": "device offline"}));
    pin(&HostResult::timed_out("c"), json!({"callId": "c", "ok": false, "error": "device timed out"}));
    assert!(HostResult::offline("c").is_offline());
    assert!(HostResult::timed_out("c").is_timed_out());
}

#[test]
fn call_response_flattens_the_result() {
    let response = CallResponse { result: HostResult::proposal("c", json!({})), proposal_id: Some("p".into()) };
    pin(&response, json!({"callId": "c", "ok": true, "result": {}, "proposal": true, "proposalId": "p"}));
}

#[test]
fn tool_descriptor_and_manifest() {
    let tool = ToolDescriptor {
        name: "stat".into(),
        description: "d".into(),
        input_schema: json!({"type": "object"}),
        class: ToolClass::Read,
    };
    pin(&tool, json!({"name": "stat", "description": "d", "inputSchema": {"type": "object"}, "class": "read"}));
    let manifest =
        Manifest { tools: vec![tool], roots: vec!["/home/a".into()], version: "1".into(), platform: "linux".into() };
    let value = serde_json::to_value(&manifest).unwrap();
    assert_eq!(value["roots"], json!(["/home/a"]));
    assert_eq!(value["tools"][0]["class"], "read");
}

#[test]
fn plan() {
    let plan = Plan { tool: "write_file".into(), summary: "s".into(), diff: None, preconditions: json!({}) };
    pin(&plan, json!({"tool": "write_file", "summary": "s", "preconditions": {}}));
}

#[test]
fn enrollment_and_pairing() {
    pin(
        &EnrollRequest { code: "ABCD".into(), name: "laptop".into(), platform: None },
        json!({"code": "ABCD", "name": "laptop"}),
    );
    pin(&EnrollResponse { device_id: "d".into(), token: "t".into() }, json!({"deviceId": "d", "token": "t"}));
    pin(&PairingCodeRequest { ttl_seconds: Some(60) }, json!({"ttlSeconds": 60}));
    pin(
        &PairingCode { code: "X".into(), expires_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() },
        json!({"code": "X", "expiresAt": "2026-01-01T00:00:00Z"}),
    );
    pin(&Delivered { delivered: false }, json!({"delivered": false}));
    pin(&ErrorBody { error: "nope".into() }, json!({"error": "nope"}));
}

#[test]
fn device_offline_omits_replica() {
    let device = Device {
        id: "d".into(),
        name: "n".into(),
        platform: None,
        online: false,
        replica: None,
        created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        last_seen_at: None,
        tools: None,
        roots: None,
        tool_count: None,
    };
    pin(&device, json!({"id": "d", "name": "n", "online": false, "createdAt": "2026-01-01T00:00:00Z"}));
    let listed = Device { roots: Some(vec!["/home/a".into()]), tool_count: Some(16), ..device.clone() };
    pin(
        &DeviceList { devices: vec![listed], next: Some("MTIuYQ".into()) },
        json!({"devices": [{"id": "d", "name": "n", "online": false, "createdAt": "2026-01-01T00:00:00Z",
                            "roots": ["/home/a"], "toolCount": 16}], "next": "MTIuYQ"}),
    );
    pin(&DeviceList { devices: vec![], next: None }, json!({"devices": []}));
    pin(&ProposalList { proposals: vec![], next: None }, json!({"proposals": []}));
}

#[test]
fn proposal() {
    let proposal = Proposal {
        id: "p".into(),
        device_id: "d".into(),
        tool: "delete".into(),
        input: json!({"path": "x"}),
        proposal: json!({"summary": "delete x"}),
        status: ProposalStatus::Pending,
        created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        decided_at: None,
        result: None,
    };
    pin(
        &proposal,
        json!({"id": "p", "deviceId": "d", "tool": "delete", "input": {"path": "x"},
               "proposal": {"summary": "delete x"}, "status": "pending", "createdAt": "2026-01-01T00:00:00Z"}),
    );
    for status in [
        ProposalStatus::Pending,
        ProposalStatus::Applying,
        ProposalStatus::Applied,
        ProposalStatus::Failed,
        ProposalStatus::Rejected,
    ] {
        assert_eq!(ProposalStatus::parse(status.as_str()), Some(status));
        assert_eq!(serde_json::to_value(status).unwrap(), json!(status.as_str()));
    }
    pin(&ProposalDecision { proposal_id: "p".into() }, json!({"proposalId": "p"}));
}

#[test]
fn sse_payloads() {
    pin(&Ready { device_id: "d".into(), replica: "r".into() }, json!({"deviceId": "d", "replica": "r"}));
    pin(&Reconnect { reason: ReconnectReason::Shutdown }, json!({"reason": "shutdown"}));
    pin(&Reconnect { reason: ReconnectReason::BrokerLost }, json!({"reason": "broker-lost"}));
    pin(&Reconnect { reason: ReconnectReason::Rebalance }, json!({"reason": "rebalance"}));
}

#[test]
fn nats_bodies() {
    pin(&CallAck::NotHeld, json!("not-held"));
    pin(&CallAck::Full, json!("full"));
    pin(&CallAck::Absent, json!("absent"));
    pin(&DeliverAck::Forbidden, json!("forbidden"));
    pin(
        &Takeover { device_id: "d".into(), epoch: 7, replica: "b".into(), route: 0xdead_beef },
        json!({"deviceId": "d", "epoch": 7, "replica": "b", "route": 3_735_928_559u32}),
    );
    pin(&Holder { replica: "b".into(), epoch: 7 }, json!({"replica": "b", "epoch": 7}));
    pin(&None::<Holder>, json!(null));
    pin(&ApiTokensRevoked { token_hashes: vec!["ab01".into()] }, json!({"tokenHashes": ["ab01"]}));
    pin(
        &ReplicaLoad { replica: "a".into(), streams: 60, max_streams: None, leaving: false },
        json!({"replica": "a", "streams": 60}),
    );
    pin(
        &ReplicaLoad { replica: "a".into(), streams: 0, max_streams: Some(100), leaving: true },
        json!({"replica": "a", "streams": 0, "maxStreams": 100, "leaving": true}),
    );
}

#[test]
fn call_records_minimal_and_complete() {
    let at = |s| Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, s).unwrap();
    let pending = CallRecord {
        call_id: "c1".into(),
        device_id: "d1".into(),
        tool: "stat".into(),
        mode: CallMode::Auto,
        class: None,
        proposal_id: None,
        dispatched_at: at(5),
        dispatched_by: "a".into(),
        pushed_at: None,
        pushed_by: None,
        finished_at: None,
        outcome: CallOutcome::Pending,
        error: None,
        duration_ms: None,
        result_bytes: None,
    };
    pin(
        &pending,
        json!({"callId": "c1", "deviceId": "d1", "tool": "stat", "mode": "auto",
               "dispatchedAt": "2026-01-02T03:04:05Z", "dispatchedBy": "a", "outcome": "pending"}),
    );
    let done = CallRecord {
        mode: CallMode::Apply,
        class: Some(ToolClass::Mutate),
        proposal_id: Some("p1".into()),
        pushed_at: Some(at(6)),
        pushed_by: Some("b".into()),
        finished_at: Some(at(9)),
        outcome: CallOutcome::TimedOut,
        error: Some("device timed out".into()),
        duration_ms: Some(4000),
        result_bytes: Some(12),
        ..pending
    };
    pin(
        &CallList { calls: vec![done], next: Some("n".into()) },
        json!({"calls": [{"callId": "c1", "deviceId": "d1", "tool": "stat", "mode": "apply", "class": "mutate",
               "proposalId": "p1", "dispatchedAt": "2026-01-02T03:04:05Z", "dispatchedBy": "a",
               "pushedAt": "2026-01-02T03:04:06Z", "pushedBy": "b", "finishedAt": "2026-01-02T03:04:09Z",
               "outcome": "timed out", "error": "device timed out", "durationMs": 4000, "resultBytes": 12}],
               "next": "n"}),
    );
    for outcome in CallOutcome::ALL {
        assert_eq!(serde_json::to_value(outcome).unwrap(), json!(outcome.as_str()));
        assert_eq!(CallOutcome::parse(outcome.as_str()), Some(outcome));
    }
    assert_eq!(CallOutcome::parse("timed_out"), None);
}
