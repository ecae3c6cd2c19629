//! One async function per operator subcommand: build the request, send it through [`Api`], and
//! print the answer, as text ([`render`]) or, with `--json`, as the API's own JSON (one
//! document on stdout). Offline, timed-out and failed tool answers are printed first, then
//! returned as the [`CliError`] that sets the exit code.
//!
//! Not here: what a status means ([`super::exit`]), which device a name is
//! ([`super::resolve`]), whether to ask ([`super::prompt`]), or how anything looks
//! ([`super::render`]). Nothing here decides what the server decides: a proposal that is no
//! longer pending is still sent, and the server's 409 is the answer.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use chrono::Utc;
use protocol::{CallRecord, CallResponse, Device, HostResult, PairingCode, Proposal, CALL_TIMEOUT_DEFAULT_MS};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::api::{Api, DEVICE_MARGIN, REQUEST_TIMEOUT};
use super::args::{OperatorCommand, ServerArgs};
use super::exit::{self, Answer, CliError};
use super::prompt::{self, Confirmation};
use super::render::{self, Style};
use super::resolve;

/// What every command needs: the client, the server as the operator wrote it (for the commands
/// printed back), and how to print.
struct Context {
    api: Api,
    server: String,
    json: bool,
    style: Style,
}

impl Context {
    fn new(args: &ServerArgs) -> Result<Self, CliError> {
        let color = !args.json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Ok(Self {
            api: Api::new(args)?,
            server: args.server.trim().to_owned(),
            json: args.json,
            style: Style { color },
        })
    }
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly instead of panicking.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Writes to stderr, quietly ignoring a closed stream.
fn note(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
}

/// One JSON document on stdout.
fn out_json(value: &Value) {
    out(&format!("{}\n", render::pretty_json(value)));
}

fn parse<T: DeserializeOwned>(value: Value, what: &str) -> Result<T, CliError> {
    serde_json::from_value(value).map_err(|e| CliError::Unexpected(format!("{what}: {e}")))
}

/// Runs `command`.
pub async fn run(command: OperatorCommand) -> Result<(), CliError> {
    match command {
        OperatorCommand::Pair { ttl_secs, server } => pair(&Context::new(&server)?, ttl_secs).await,
        OperatorCommand::Devices { server } => devices(&Context::new(&server)?).await,
        OperatorCommand::Call { device, tool, input, timeout_ms, server } => {
            // Bad input is a usage error before anything is sent.
            let input = parse_input(input.as_deref())?;
            call(&Context::new(&server)?, &device, &tool, input, timeout_ms).await
        }
        OperatorCommand::Proposals { all, server } => proposals(&Context::new(&server)?, all).await,
        OperatorCommand::Approve { proposal, yes, server } => {
            let confirmation = prompt::confirmation(yes, std::io::stdin().is_terminal(), "apply it")?;
            approve(&Context::new(&server)?, &proposal, confirmation).await
        }
        OperatorCommand::Reject { proposal, server } => reject(&Context::new(&server)?, &proposal).await,
        OperatorCommand::Calls { call_id, device, tool, outcome, limit, server } => match call_id {
            Some(_) if device.is_some() || tool.is_some() || outcome.is_some() => Err(CliError::Usage(
                "a call id shows that one call; --device, --tool and --outcome filter the list (give no id)".into(),
            )),
            Some(id) => call_record(&Context::new(&server)?, &id).await,
            None => {
                let filter = CallLogFilter { device, tool, outcome: outcome.map(|o| o.replace('-', " ")) };
                calls(&Context::new(&server)?, &filter, limit).await
            }
        },
        OperatorCommand::Revoke { device, yes, server } => {
            let confirmation = prompt::confirmation(yes, std::io::stdin().is_terminal(), "revoke it")?;
            revoke(&Context::new(&server)?, &device, confirmation).await
        }
    }
}

/// The tool input argument: JSON, `{}` when absent.
pub fn parse_input(input: Option<&str>) -> Result<Value, CliError> {
    match input {
        None => Ok(json!({})),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            CliError::Usage(format!(
                "the tool input is not valid JSON ({e}); write it like '{{\"path\":\"notes.md\"}}'"
            ))
        }),
    }
}

/// `dispatcher pair`.
async fn pair(ctx: &Context, ttl_secs: Option<u64>) -> Result<(), CliError> {
    let body = match ttl_secs {
        Some(ttl) => json!({"ttlSeconds": ttl}),
        None => json!({}),
    };
    let reply = ctx.api.request(Method::POST, &["api", "pairing-codes"], &[], Some(&body), REQUEST_TIMEOUT).await?;
    let value = reply.success()?;
    if ctx.json {
        out_json(&value);
        return Ok(());
    }
    let code: PairingCode = parse(value, "pairing code")?;
    out(&render::pairing(&code, &ctx.server, Utc::now()));
    Ok(())
}

/// Every device of the user, every page.
async fn device_rows(ctx: &Context) -> Result<Vec<Value>, CliError> {
    ctx.api.list(&["api", "devices"], &[], "devices").await
}

fn typed_devices(rows: Vec<Value>) -> Result<Vec<Device>, CliError> {
    rows.into_iter().map(|row| parse(row, "device")).collect()
}

/// `dispatcher devices`.
async fn devices(ctx: &Context) -> Result<(), CliError> {
    let rows = device_rows(ctx).await?;
    if ctx.json {
        out_json(&json!({ "devices": rows }));
        return Ok(());
    }
    out(&render::devices(&typed_devices(rows)?, Utc::now(), ctx.style));
    Ok(())
}

/// The id for a device argument: used as it is when shaped like an id, else looked up by name
/// in the user's device list.
async fn device_id(ctx: &Context, argument: &str) -> Result<String, CliError> {
    if resolve::is_device_id(argument) {
        return Ok(argument.to_owned());
    }
    let devices = typed_devices(device_rows(ctx).await?)?;
    resolve::resolve_device(argument, &devices)
}

/// A 404 about a device names what the operator typed.
fn device_failure(argument: &str, status: StatusCode, body: &Value) -> CliError {
    if status == StatusCode::NOT_FOUND {
        return CliError::Refused {
            status: status.as_u16(),
            message: format!("no device {:?} (by id or by name)", render::cell(argument)),
        };
    }
    exit::failure(status.as_u16(), body)
}

fn offline(device: &str) -> CliError {
    CliError::Offline(format!("device offline: {:?} is not connected to any replica", render::cell(device)))
}

/// `dispatcher call`.
async fn call(ctx: &Context, device: &str, tool: &str, input: Value, timeout_ms: Option<u64>) -> Result<(), CliError> {
    let id = device_id(ctx, device).await?;
    let mut body = json!({"tool": tool, "input": input});
    if let Some(ms) = timeout_ms {
        body["timeoutMs"] = json!(ms);
    }
    let wait = Duration::from_millis(timeout_ms.unwrap_or(CALL_TIMEOUT_DEFAULT_MS)) + DEVICE_MARGIN;
    let reply = ctx.api.request(Method::POST, &["api", "devices", &id, "calls"], &[], Some(&body), wait).await?;
    let answer = reply.answer();
    if matches!(answer, Answer::Refused | Answer::Failed) {
        return Err(device_failure(device, reply.status, &reply.body));
    }
    if ctx.json {
        out_json(&reply.body);
    }
    let response: CallResponse = parse(reply.body, "call result")?;
    let result = response.result;
    match answer {
        Answer::Offline => return Err(offline(device)),
        Answer::TimedOut => {
            let waited = timeout_ms.unwrap_or(CALL_TIMEOUT_DEFAULT_MS);
            return Err(CliError::TimedOut(format!("device timed out: no answer from the device within {waited} ms")));
        }
        _ => {}
    }
    if !result.ok {
        return Err(CliError::ToolFailed(format!("{tool} failed: {}", result.error.as_deref().unwrap_or("no reason"))));
    }
    if ctx.json {
        return Ok(());
    }
    if result.is_proposal() {
        let plan = result.result.unwrap_or(Value::Null);
        match &response.proposal_id {
            Some(id) => out(&render::proposed(&plan, id, &ctx.server, ctx.style)),
            None => out(&render::plan(&plan, ctx.style)),
        }
        return Ok(());
    }
    let shown = render::tool_result(tool, result.result.as_ref());
    out(&shown.text);
    if let Some(text) = shown.note {
        note(&format!("note: {text}\n"));
    }
    Ok(())
}

/// `dispatcher proposals`.
async fn proposals(ctx: &Context, all: bool) -> Result<(), CliError> {
    let query: &[(&str, &str)] = if all { &[] } else { &[("status", "pending")] };
    let rows = ctx.api.list(&["api", "proposals"], query, "proposals").await?;
    if ctx.json {
        out_json(&json!({ "proposals": rows }));
        return Ok(());
    }
    let proposals: Vec<Proposal> = rows.into_iter().map(|row| parse(row, "proposal")).collect::<Result<_, _>>()?;
    let names: HashMap<String, String> = if proposals.is_empty() {
        HashMap::new()
    } else {
        typed_devices(device_rows(ctx).await?)?.into_iter().map(|device| (device.id, device.name)).collect()
    };
    out(&render::proposals(&proposals, &names, all, Utc::now(), ctx.style));
    Ok(())
}

/// A 404 about a proposal names the id.
fn proposal_failure(argument: &str, status: StatusCode, body: &Value) -> CliError {
    if status == StatusCode::NOT_FOUND {
        return CliError::Refused {
            status: status.as_u16(),
            message: format!("no proposal {:?}", render::cell(argument)),
        };
    }
    exit::failure(status.as_u16(), body)
}

/// `dispatcher approve`.
async fn approve(ctx: &Context, id: &str, confirmation: Confirmation) -> Result<(), CliError> {
    let reply = ctx.api.request(Method::GET, &["api", "proposals", id], &[], None, REQUEST_TIMEOUT).await?;
    if reply.answer() != Answer::Success {
        return Err(proposal_failure(id, reply.status, &reply.body));
    }
    let proposal: Proposal = parse(reply.body, "proposal")?;
    // The device's name is for the person reading; without it the id is shown.
    let name = match ctx
        .api
        .request(Method::GET, &["api", "devices", &proposal.device_id], &[], None, REQUEST_TIMEOUT)
        .await
    {
        Ok(reply) if reply.answer() == Answer::Success => {
            reply.body.get("name").and_then(Value::as_str).map(str::to_owned)
        }
        _ => None,
    };
    let preview = render::proposal(&proposal, name.as_deref(), Utc::now(), ctx.style);
    // With --json stdout holds the answer alone; the preview goes to stderr.
    if ctx.json {
        note(&preview);
    } else {
        out(&preview);
    }
    let pending = proposal.status == protocol::ProposalStatus::Pending;
    if pending && confirmation == Confirmation::Ask && !prompt::ask("Apply?").await {
        note("Not applied; the proposal stays pending.\n");
        return Ok(());
    }
    let body = json!({"proposalId": proposal.id});
    let wait = Duration::from_millis(CALL_TIMEOUT_DEFAULT_MS) + DEVICE_MARGIN;
    let reply = ctx.api.request(Method::POST, &["api", "host", "approve"], &[], Some(&body), wait).await?;
    let answer = reply.answer();
    if matches!(answer, Answer::Refused | Answer::Failed) {
        return Err(proposal_failure(id, reply.status, &reply.body));
    }
    if ctx.json {
        out_json(&reply.body);
    }
    let result: HostResult = parse(reply.body, "apply result")?;
    match answer {
        Answer::Offline => Err(CliError::Offline(
            "device offline: nothing was sent; the proposal stays pending, approve it again when the device is online"
                .into(),
        )),
        Answer::TimedOut => Err(CliError::TimedOut(
            "device timed out: the proposal is marked failed (the device may or may not have applied it)".into(),
        )),
        _ if !result.ok => Err(CliError::ToolFailed(format!(
            "the apply failed: {}; the proposal is marked failed",
            result.error.as_deref().unwrap_or("no reason")
        ))),
        _ => {
            if !ctx.json {
                out(&render::applied(&result));
            }
            Ok(())
        }
    }
}

/// `dispatcher reject`.
async fn reject(ctx: &Context, id: &str) -> Result<(), CliError> {
    let body = json!({"proposalId": id});
    let reply = ctx.api.request(Method::POST, &["api", "host", "reject"], &[], Some(&body), REQUEST_TIMEOUT).await?;
    if reply.answer() != Answer::Success {
        return Err(proposal_failure(id, reply.status, &reply.body));
    }
    if ctx.json {
        out_json(&reply.body);
        return Ok(());
    }
    let proposal: Proposal = parse(reply.body, "proposal")?;
    out(&format!(
        "Rejected proposal {} ({} on {}); its status is now {}.\n",
        render::cell(&proposal.id),
        render::cell(&proposal.tool),
        render::cell(&proposal.device_id),
        proposal.status.as_str()
    ));
    Ok(())
}

/// What `dispatcher calls` lists.
struct CallLogFilter {
    device: Option<String>,
    tool: Option<String>,
    outcome: Option<String>,
}

/// `dispatcher calls`: the latest `limit` calls matching `filter`, newest first, following pages.
async fn calls(ctx: &Context, filter: &CallLogFilter, limit: u64) -> Result<(), CliError> {
    let device_id = match &filter.device {
        Some(device) => Some(device_id(ctx, device).await?),
        None => None,
    };
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(id) = &device_id {
        query.push(("deviceId", id.clone()));
    }
    if let Some(tool) = &filter.tool {
        query.push(("tool", tool.clone()));
    }
    if let Some(outcome) = &filter.outcome {
        query.push(("outcome", outcome.clone()));
    }
    let wanted = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut rows: Vec<Value> = Vec::new();
    let mut before: Option<String> = None;
    while rows.len() < wanted {
        let page_limit = (wanted - rows.len()).min(protocol::CALL_LOG_LIMIT_MAX).to_string();
        let mut page_query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        page_query.push(("limit", &page_limit));
        if let Some(cursor) = &before {
            page_query.push(("before", cursor));
        }
        let reply = ctx.api.request(Method::GET, &["api", "calls"], &page_query, None, REQUEST_TIMEOUT).await?;
        let page = reply.success()?;
        match page.get("calls") {
            Some(Value::Array(items)) => rows.extend(items.iter().cloned()),
            _ => return Err(CliError::Unexpected("no \"calls\" list in api/calls".into())),
        }
        match page.get("next").and_then(Value::as_str) {
            Some(next) if before.as_deref() != Some(next) => before = Some(next.to_owned()),
            _ => break,
        }
    }
    rows.truncate(wanted);
    if ctx.json {
        out_json(&json!({ "calls": rows }));
        return Ok(());
    }
    let records: Vec<CallRecord> = rows.into_iter().map(|row| parse(row, "call")).collect::<Result<_, _>>()?;
    let names: HashMap<String, String> = if records.is_empty() {
        HashMap::new()
    } else {
        typed_devices(device_rows(ctx).await?)?.into_iter().map(|device| (device.id, device.name)).collect()
    };
    out(&render::calls(&records, &names, Utc::now(), ctx.style));
    Ok(())
}

/// `dispatcher calls <call id>`.
async fn call_record(ctx: &Context, id: &str) -> Result<(), CliError> {
    let reply = ctx.api.request(Method::GET, &["api", "calls", id], &[], None, REQUEST_TIMEOUT).await?;
    if reply.status == StatusCode::NOT_FOUND {
        return Err(CliError::Refused { status: 404, message: format!("no call {:?}", render::cell(id)) });
    }
    let value = reply.success()?;
    if ctx.json {
        out_json(&value);
        return Ok(());
    }
    let record: CallRecord = parse(value, "call")?;
    let name =
        match ctx.api.request(Method::GET, &["api", "devices", &record.device_id], &[], None, REQUEST_TIMEOUT).await {
            Ok(reply) if reply.answer() == Answer::Success => {
                reply.body.get("name").and_then(Value::as_str).map(str::to_owned)
            }
            _ => None,
        };
    out(&render::call_record(&record, name.as_deref(), Utc::now()));
    Ok(())
}

/// `dispatcher revoke`.
async fn revoke(ctx: &Context, argument: &str, confirmation: Confirmation) -> Result<(), CliError> {
    let id = device_id(ctx, argument).await?;
    let reply = ctx.api.request(Method::GET, &["api", "devices", &id], &[], None, REQUEST_TIMEOUT).await?;
    if reply.answer() != Answer::Success {
        return Err(device_failure(argument, reply.status, &reply.body));
    }
    let device: Device = parse(reply.body, "device")?;
    let shown = format!("{} ({})", render::cell(&device.name), render::cell(&device.id));
    if confirmation == Confirmation::Ask {
        let question = format!("Revoke {shown}? Its stream closes and its token stops working for good.");
        if !prompt::ask(&question).await {
            note("Not revoked.\n");
            return Ok(());
        }
    }
    let reply = ctx.api.request(Method::DELETE, &["api", "devices", &device.id], &[], None, REQUEST_TIMEOUT).await?;
    if reply.answer() != Answer::Success {
        return Err(device_failure(argument, reply.status, &reply.body));
    }
    if ctx.json {
        out_json(&json!({"deviceId": device.id, "revoked": true}));
    } else {
        out(&format!("Revoked {shown}.\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_inputs() {
        assert_eq!(parse_input(None), Ok(json!({})));
        assert_eq!(parse_input(Some(r#"{"path":"a"}"#)), Ok(json!({"path": "a"})));
        assert_eq!(parse_input(Some("[1, 2]")), Ok(json!([1, 2])));
        for bad in ["", "{path: a}", "{\"path\":", "'x'"] {
            let error = parse_input(Some(bad)).expect_err(bad);
            assert_eq!(error.exit_code(), crate::cli::ExitCode::Usage, "{bad}");
            assert!(error.to_string().starts_with("the tool input is not valid JSON"), "{error}");
        }
    }
}
