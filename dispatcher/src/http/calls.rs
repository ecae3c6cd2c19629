//! The call log's door: `GET /api/calls` (a page of the caller's calls, newest first, filtered
//! by device, tool and outcome) and `GET /api/calls/{callId}`. Owner scoped by the registry
//! query: another user's call is absent from lists and answers 404, like one that does not
//! exist.
//!
//! This door validates the query and maps the answer; it decides nothing about what a record
//! holds (the [`crate::calllog`] writer and the registry's merge rules do).

use axum::extract::{Path, Query, State};
use axum::Json;
use protocol::{CallList, CallOutcome, CallRecord, ErrorBody, CALL_LOG_LIMIT_DEFAULT, CALL_LOG_LIMIT_MAX};
use serde::Deserialize;
use utoipa::IntoParams;

use super::auth::UserCaller;
use super::{ApiError, AppState};
use crate::registry::{CallFilter, PageError, PageRequest};

/// Longest tool name a filter may name (as a call may).
const MAX_TOOL_NAME_LEN: usize = 128;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct CallLogQuery {
    /// Only calls to this device.
    #[param(value_type = Option<String>)]
    device_id: Option<String>,
    /// Only calls of this tool.
    #[param(value_type = Option<String>, max_length = 128)]
    tool: Option<String>,
    /// Only calls with this outcome.
    #[param(value_type = Option<CallOutcome>)]
    outcome: Option<String>,
    /// The previous page's `next`, as it was handed out: the calls dispatched before it.
    before: Option<String>,
    /// Calls per page, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    limit: Option<String>,
}

/// An empty query value is the same as none.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|text| !text.is_empty())
}

impl CallLogQuery {
    /// The filter and the page asked for, or what is wrong with them.
    fn parse(&self) -> Result<(CallFilter, PageRequest), ApiError> {
        let device_id = match given(&self.device_id) {
            Some(id) if protocol::subject::is_uuid(id) => Some(id.to_owned()),
            Some(_) => return Err(ApiError::BadRequest("deviceId: not a device id".into())),
            None => None,
        };
        let tool = match given(&self.tool) {
            Some(tool) if tool.chars().count() <= MAX_TOOL_NAME_LEN => Some(tool.to_owned()),
            Some(_) => return Err(ApiError::BadRequest(format!("tool: at most {MAX_TOOL_NAME_LEN} characters"))),
            None => None,
        };
        let outcome = match given(&self.outcome) {
            Some(text) => Some(CallOutcome::parse(text).ok_or_else(|| {
                ApiError::BadRequest("outcome: one of pending, ok, error, offline, timed out, unknown".into())
            })?),
            None => None,
        };
        let mut page = PageRequest::parse(given(&self.limit), given(&self.before)).map_err(|error| match error {
            PageError::Limit => ApiError::BadRequest(format!("limit: a whole number from 1 to {CALL_LOG_LIMIT_MAX}")),
            PageError::Cursor => ApiError::BadRequest(
                "before: not a cursor this server handed out (pass the previous page's `next` as it is)".into(),
            ),
        })?;
        if given(&self.limit).is_none() {
            page.limit = CALL_LOG_LIMIT_DEFAULT;
        }
        Ok((CallFilter { device_id, tool, outcome }, page))
    }
}

/// `GET /api/calls?deviceId=&tool=&outcome=&before=&limit=`: a page of the caller's calls,
/// newest first.
#[utoipa::path(
    get,
    path = "/api/calls",
    tag = "control",
    security(("apiToken" = [])),
    params(CallLogQuery),
    responses(
        (status = 200, description = "A page of the user's calls, newest first; `next` goes back as `before`", body = CallList),
        (status = 400, description = "A bad deviceId, tool, outcome, before or limit", body = ErrorBody),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
    ),
)]
pub async fn list_calls(
    State(state): State<AppState>,
    caller: UserCaller,
    Query(query): Query<CallLogQuery>,
) -> Result<Json<CallList>, ApiError> {
    let (filter, page) = query.parse()?;
    let page = state.registry.calls_page(&caller.user_id, &filter, &page).await?;
    Ok(Json(CallList { calls: page.items, next: page.next.map(|cursor| cursor.encode()) }))
}

/// `GET /api/calls/{callId}`.
#[utoipa::path(
    get,
    path = "/api/calls/{callId}",
    tag = "control",
    security(("apiToken" = [])),
    params(("callId" = String, Path, description = "The call id (a dispatch's `callId`)")),
    responses(
        (status = 200, description = "The call's record", body = CallRecord),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such call of this user", body = ErrorBody),
    ),
)]
pub async fn get_call(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(call_id): Path<String>,
) -> Result<Json<CallRecord>, ApiError> {
    let record = state.registry.call_record(&caller.user_id, &call_id).await?;
    record.map(Json).ok_or(ApiError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> CallLogQuery {
        let text = pairs.iter().map(|(k, v)| format!("{k}={}", v.replace(' ', "%20"))).collect::<Vec<_>>().join("&");
        let uri: axum::http::Uri = format!("/api/calls?{text}").parse().expect("uri");
        Query::<CallLogQuery>::try_from_uri(&uri).expect("query").0
    }

    #[test]
    fn queries() {
        let device = "7a04dbde-1c2f-4e4b-9a51-0d5b8f1e2a3c";
        let (filter, page) = query(&[]).parse().expect("empty");
        assert_eq!(filter, CallFilter::default());
        assert_eq!((page.limit, page.after), (50, None));
        let (filter, page) =
            query(&[("deviceId", device), ("tool", "stat"), ("outcome", "timed out"), ("limit", "500")])
                .parse()
                .expect("full");
        assert_eq!(filter.device_id.as_deref(), Some(device));
        assert_eq!(filter.tool.as_deref(), Some("stat"));
        assert_eq!(filter.outcome, Some(CallOutcome::TimedOut));
        assert_eq!(page.limit, 500);
        let (filter, page) = query(&[("deviceId", ""), ("limit", ""), ("before", "")]).parse().expect("empty values");
        assert_eq!((filter, page.limit), (CallFilter::default(), 50));
        let long_tool = "t".repeat(129);
        for bad in [
            vec![("deviceId", "laptop")],
            vec![("outcome", "timed_out")],
            vec![("outcome", "OK")],
            vec![("limit", "0")],
            vec![("limit", "501")],
            vec![("limit", "ten")],
            vec![("before", "garbage")],
            vec![("tool", long_tool.as_str())],
        ] {
            assert!(matches!(query(&bad).parse(), Err(ApiError::BadRequest(_))), "{bad:?}");
        }
    }
}
