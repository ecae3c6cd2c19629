//! `GET /openapi.json` against the real `dispatcher` binary (embedded, SQLite): the document
//! validates as OpenAPI 3.1 (`openapi-spec-validator`), names exactly the routes `app.rs`
//! serves, and Schemathesis, run against the live replica with an api token, finds no server
//! error and no response that differs from the document.
//!
//! The Python tools come from `tests/openapi/requirements.txt` (scripts/test.sh installs them);
//! when they are missing the tests fail saying how to install them, they never skip.
//!
//! Not here: what each endpoint does (the embedded and cluster suites).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;

use e2e::bin::workspace_root;
use e2e::Dispatcher;
use serde_json::Value;

/// How Schemathesis is started: its console entry point, through the same `python3` that
/// installed it, so no `bin` directory need be on PATH.
const SCHEMATHESIS: &str =
    "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'schemathesis'; schemathesis()";

fn requirements() -> PathBuf {
    workspace_root().join("tests/openapi/requirements.txt")
}

/// Runs `python3 args…` in `dir` (where the tools leave their caches), failing the test with a
/// clear message when python or the module is not there.
async fn python(dir: &std::path::Path, args: &[&str], module: &str) -> Output {
    let output = tokio::process::Command::new("python3").args(args).current_dir(dir).output().await.unwrap_or_else(|e| {
        panic!("python3 is needed for the OpenAPI checks and could not be run ({e}); install python3, then `python3 -m pip install -r {}`", requirements().display())
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named") {
        panic!(
            "the Python module `{module}` is missing: `python3 -m pip install -r {}` (scripts/test.sh does it)\n{stderr}",
            requirements().display()
        );
    }
    output
}

fn show(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every `(method, path)` that `dispatcher/src/app.rs` routes: its `.route("…", get(…).delete(…))`
/// lines, read from the source so that a route added without documentation fails here.
fn routes_of_app() -> BTreeSet<(String, String)> {
    let source = std::fs::read_to_string(workspace_root().join("dispatcher/src/app.rs")).expect("read app.rs");
    let mut routes = BTreeSet::new();
    for line in source.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
        let rest = &line[".route(\"".len()..];
        let (path, handlers) = rest.split_once('"').expect("a quoted path");
        let methods: Vec<&str> = ["get", "post", "put", "delete", "patch"]
            .into_iter()
            .filter(|m| handlers.contains(&format!(" {m}(")) || handlers.contains(&format!(".{m}(")))
            .collect();
        assert!(!methods.is_empty(), "no method found in app.rs line {line:?}");
        routes.extend(methods.into_iter().map(|m| (m.to_owned(), path.to_owned())));
    }
    assert!(routes.len() >= 16, "app.rs parsed to too few routes: {routes:?}");
    routes
}

fn routes_of_document(document: &Value) -> BTreeSet<(String, String)> {
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().expect("path item").keys().map(move |method| (method.clone(), path.clone()))
        })
        .collect()
}

#[tokio::test]
async fn document_validates_and_names_every_route() {
    let dispatcher = Dispatcher::start().await.expect("dispatcher starts");
    let response = reqwest::get(format!("{}/openapi.json", dispatcher.base_url())).await.expect("GET /openapi.json");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("ascii").to_owned();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let text = response.text().await.expect("body");
    let document: Value = serde_json::from_str(&text).expect("JSON");

    assert_eq!(document["openapi"], "3.1.0");
    let schemes = &document["components"]["securitySchemes"];
    for scheme in ["apiToken", "deviceToken"] {
        assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}: {schemes}");
    }
    assert_eq!(routes_of_document(&document), routes_of_app(), "documented routes (left) differ from app.rs (right)");
    // Spot checks that the document says what the handlers do.
    let call = &document["paths"]["/api/devices/{id}/calls"]["post"];
    for status in ["200", "400", "401", "404", "413", "503", "504"] {
        assert!(call["responses"][status].is_object(), "calls: no {status}");
    }
    assert_eq!(call["security"][0]["apiToken"], serde_json::json!([]));
    let stream = &document["paths"]["/api/host/stream"]["get"];
    assert!(stream["responses"]["200"]["content"]["text/event-stream"].is_object(), "{stream}");
    assert_eq!(stream["security"][0]["deviceToken"], serde_json::json!([]));
    let params: BTreeSet<&str> = document["paths"]["/api/devices"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(params, BTreeSet::from(["limit", "cursor", "include"]));
    let timeout = &document["components"]["schemas"]["CallRequest"]["properties"]["timeoutMs"];
    assert_eq!(timeout["maximum"].as_u64(), Some(protocol::CALL_TIMEOUT_MAX_MS), "{timeout}");
    let ttl = &document["components"]["schemas"]["PairingCodeRequest"]["properties"]["ttlSeconds"];
    assert_eq!(ttl["maximum"].as_u64(), Some(protocol::PAIRING_TTL_MAX_SECS), "{ttl}");
    let limit = &document["paths"]["/api/proposals"]["get"]["parameters"][1]["schema"]["maximum"];
    assert_eq!(limit.as_u64(), Some(protocol::PAGE_LIMIT_MAX as u64));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &text).expect("write");
    let file = file.display().to_string();
    let output = python(dir.path(), &["-m", "openapi_spec_validator", &file], "openapi_spec_validator").await;
    assert!(output.status.success(), "openapi-spec-validator refused the document:\n{}", show(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"), "{}", show(&output));
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_drift() {
    let dispatcher = Dispatcher::start().await.expect("dispatcher starts");
    let token = dispatcher.mint_token("schemathesis").await.expect("token");
    let config = workspace_root().join("tests/openapi/schemathesis.toml").display().to_string();
    let url = format!("{}/openapi.json", dispatcher.base_url());
    let header = format!("Authorization: Bearer {token}");
    let examples = std::env::var("OPENAPI_MAX_EXAMPLES").unwrap_or_else(|_| "50".into());
    let report = tempfile::tempdir().expect("tempdir");
    let args = [
        "-c",
        SCHEMATHESIS,
        "--config-file",
        &config,
        "run",
        &url,
        "-H",
        &header,
        "--max-examples",
        &examples,
        "--request-timeout",
        "20",
        // With a valid api token the events stream never ends.
        "--exclude-path",
        "/api/events",
        // One worker: the tool's parallel workers share Python's parser across threads, which
        // CPython 3.11 can trip over ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--report-dir",
        &report.path().display().to_string(),
    ];
    let output = python(report.path(), &args, "schemathesis").await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "Schemathesis found failures:\n{}\n--- dispatcher log (tail)\n{}",
        show(&output),
        dispatcher.log_tail(40)
    );
    // The summary line proves it ran: "N generated, N passed" (and how many were skipped).
    let summary = stdout.lines().find(|l| l.contains(" generated, ")).unwrap_or_default();
    assert!(summary.contains("passed"), "no summary of generated cases:\n{}", show(&output));
    let count = |label: &str| {
        let line = stdout.lines().map(str::trim).find(|l| l.starts_with(label)).unwrap_or_default();
        line[label.len()..].trim().to_owned()
    };
    let (selected, tested) = (count("Selected:"), count("Tested:"));
    eprintln!("schemathesis: {tested} operations tested of {selected} selected; {}", summary.trim());
    // Every operation but the document's own route, which Schemathesis leaves out, and the
    // events stream, excluded above.
    let operations = routes_of_app().len() - 1;
    assert_eq!(selected, format!("{}/{operations}", operations - 1), "{}", show(&output));
    assert_eq!(tested, (operations - 1).to_string(), "{}", show(&output));
}
