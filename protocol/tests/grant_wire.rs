//! Golden JSON of enrollment by link (RFC 8628): the OAuth answers keep the RFC's snake_case
//! names, the control API's view is camelCase like the rest of the contract.

use chrono::{TimeZone, Utc};
use protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

fn pin<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T, golden: Value) {
    assert_eq!(serde_json::to_value(value).unwrap(), golden);
    let back: T = serde_json::from_value(golden).unwrap();
    assert_eq!(&back, value);
}

#[test]
fn device_authorization_answer() {
    pin(
        &DeviceAuthorizationResponse {
            device_code: "dac_x".into(),
            user_code: "BCDF-GHJK".into(),
            verification_uri: "https://d.example/ui/activate".into(),
            verification_uri_complete: "https://d.example/ui/activate?code=BCDF-GHJK".into(),
            expires_in: 600,
            interval: 5,
        },
        json!({
            "device_code": "dac_x",
            "user_code": "BCDF-GHJK",
            "verification_uri": "https://d.example/ui/activate",
            "verification_uri_complete": "https://d.example/ui/activate?code=BCDF-GHJK",
            "expires_in": 600,
            "interval": 5
        }),
    );
}

#[test]
fn token_answer_and_errors() {
    pin(
        &TokenResponse { access_token: "dev_x".into(), token_type: "Bearer".into(), device_id: "d1".into() },
        json!({"access_token": "dev_x", "token_type": "Bearer", "device_id": "d1"}),
    );
    pin(
        &OAuthError { error: "authorization_pending".into(), error_description: None, interval: None },
        json!({"error": "authorization_pending"}),
    );
    pin(
        &OAuthError { error: "slow_down".into(), error_description: Some("wait".into()), interval: Some(10) },
        json!({"error": "slow_down", "error_description": "wait", "interval": 10}),
    );
}

#[test]
fn forms_use_the_rfc_names() {
    pin(
        &TokenForm {
            grant_type: Some(DEVICE_CODE_GRANT_TYPE.into()),
            device_code: Some("dac_x".into()),
            client_id: Some(HOST_AGENT_CLIENT_ID.into()),
        },
        json!({
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": "dac_x",
            "client_id": "host-agent"
        }),
    );
    pin(
        &DeviceAuthorizationForm {
            client_id: Some("host-agent".into()),
            name: Some("laptop".into()),
            platform: None,
            roots: Some("[\"/home/a\"]".into()),
        },
        json!({"client_id": "host-agent", "name": "laptop", "roots": "[\"/home/a\"]"}),
    );
}

#[test]
fn the_control_view_is_camel_case() {
    pin(
        &DeviceAuthorizationView {
            user_code: "BCDF-GHJK".into(),
            name: "laptop".into(),
            platform: Some("linux".into()),
            roots: vec!["/home/a".into()],
            expires_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            status: DeviceAuthorizationStatus::Pending,
        },
        json!({
            "userCode": "BCDF-GHJK",
            "name": "laptop",
            "platform": "linux",
            "roots": ["/home/a"],
            "expiresAt": "2026-01-02T03:04:05Z",
            "status": "pending"
        }),
    );
    pin(&DeviceAuthorizationApproved { device_id: "d1".into() }, json!({"deviceId": "d1"}));
    for (status, text) in [
        (DeviceAuthorizationStatus::Approved, "approved"),
        (DeviceAuthorizationStatus::Denied, "denied"),
        (DeviceAuthorizationStatus::Expired, "expired"),
        (DeviceAuthorizationStatus::Used, "used"),
    ] {
        pin(&status, json!(text));
    }
}
