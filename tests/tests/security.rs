//! TLS everywhere it is expected, NATS authentication, and the dispatcher behind a proxy, with
//! the real binaries:
//!
//! - PostgreSQL over TLS (`sslmode=verify-full` with the test CA that `scripts/test.sh` set up):
//!   the replica works and `pg_stat_ssl` shows every one of its connections encrypted; with the
//!   wrong CA it stops with one clear error line.
//! - The HTTPS listener (`--tls-cert`, `--tls-key`): a real `host-agent` with `--ca-cert`
//!   enrolls and answers a call; HTTP/2 through ALPN; a silent TCP client is closed within the
//!   connection timeout.
//! - NATS with TLS and each kind of credentials (user and password, token, nkey, credentials
//!   file; client certificates): a call crosses two replicas; a replica without credentials or
//!   with a wrong password is refused with a clear error; `token revoke` publishes with them.
//! - `--trusted-proxies`: many devices enrolling at once through one proxy address are all
//!   served, while a spoofed `X-Forwarded-For` from an untrusted peer changes nothing (429 with
//!   `Retry-After`); event streams carry `X-Accel-Buffering: no`.
//! - `host-agent` refuses plain `http://` to a server that is not on this machine.

use std::process::Output;
use std::time::{Duration, Instant};

use e2e::nats::NatsOptions;
use e2e::nats_auth::{AuthKind, NatsAuthSetup, TlsMode};
use e2e::tls::{postgres_ca, TestCa};
use e2e::{Agent, Answer, Control, Dispatcher, LocalCluster, NatsServer, TestDatabase, TestDevice};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Connection;

const SECOND: Duration = Duration::from_secs(1);

/// Runs `dispatcher <args>` with `env` (and none of the host's dispatcher or NATS variables);
/// its output, within 60 s.
async fn dispatcher_with_env(args: &[&str], env: &[(String, String)]) -> Output {
    let mut command = tokio::process::Command::new(e2e::bin::dispatcher());
    command.args(args).stdin(std::process::Stdio::null()).env("RUST_LOG", "warn").env("NO_COLOR", "1");
    for (name, _) in std::env::vars() {
        if name.starts_with("NATS_") || name.starts_with("DISPATCHER_") || name == "DATABASE_URL" {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().map(|(n, v)| (n.as_str(), v.as_str()))).kill_on_drop(true);
    tokio::time::timeout(60 * SECOND, command.output()).await.expect("exits within 60 s").expect("runs")
}

/// The lines of `stderr` that start with `error:` (what the binary says when it gives up).
fn error_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr).lines().filter(|l| l.starts_with("error:")).map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL over TLS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verify_full_every_connection_encrypted() {
    let ca = postgres_ca().expect("the PostgreSQL test CA");
    let db = TestDatabase::create().await.expect("database");
    let url = format!("{}?sslmode=verify-full&sslrootcert={}", db.url(), ca.display());
    let replica = Dispatcher::builder().database_url(&url).start().await.expect("replica over TLS");
    let token = e2e::mint_token(&url, "alice").await.expect("token create over TLS");
    let control = Control::new(replica.base_url(), token);
    let device = TestDevice::pair(&replica.base_url(), &control, "tls-db").await.expect("enroll");
    let _conn = device.connect(&replica.base_url(), Answer::Echo).await.expect("stream");
    let (status, body) = control.call(&device.device_id, "stat", json!({"path": "."}), Some(5000)).await.expect("call");
    assert_eq!(status, StatusCode::OK, "{body}");

    // What the server says about the replica's own connections to this database.
    let mut admin =
        sqlx::PgConnection::connect(&format!("{}/postgres", e2e::postgres::server_url())).await.expect("admin");
    let (encrypted, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1",
    )
    .bind(db.name())
    .fetch_one(&mut admin)
    .await
    .expect("pg_stat_ssl");
    assert!(total >= 1, "the replica holds connections to {}", db.name());
    assert_eq!(encrypted, total, "every connection of the replica uses TLS");

    // `require` encrypts without checking the certificate, as libpq does.
    let require = format!("{}?sslmode=require", db.url());
    e2e::mint_token(&require, "bob").await.expect("token create with sslmode=require");
    drop(replica);
    let _ = admin.close().await;
    db.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn postgres_with_the_wrong_ca_stops_the_replica_with_one_clear_line() {
    let _ = postgres_ca().expect("the PostgreSQL test CA");
    let db = TestDatabase::create().await.expect("database");
    let wrong = TestCa::new("not the PostgreSQL CA").expect("a CA");
    let url = format!("{}?sslmode=verify-full&sslrootcert={}", db.url(), wrong.cert().display());
    let started = Instant::now();
    let output = dispatcher_with_env(&["serve", "--listen", "127.0.0.1:0", "--database-url", &url], &[]).await;
    assert!(!output.status.success(), "exits non-zero: {output:?}");
    let errors = error_lines(&output);
    assert_eq!(errors.len(), 1, "one error line: {}", String::from_utf8_lossy(&output.stderr));
    assert!(errors[0].contains("database") && errors[0].contains("certificate"), "{}", errors[0]);
    println!("wrong CA refused in {:?}: {}", started.elapsed(), errors[0]);
    db.cleanup().await.expect("cleanup");
}

// ---------------------------------------------------------------------------------------------
// The HTTPS listener.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_a_real_agent_over_its_ca() {
    let ca = TestCa::new("e2e HTTPS CA").expect("CA");
    let server = ca.server("dispatcher").expect("server certificate");
    let replica = Dispatcher::builder()
        .https(&server.cert, &server.key, &ca.cert())
        .flag("--connection-timeout-secs", 2)
        .start()
        .await
        .expect("replica over HTTPS");
    let base = replica.base_url();
    assert!(base.starts_with("https://"), "{base}");
    let token = replica.mint_token("alice").await.expect("token");
    let control = Control::with_client(&base, &token, replica.client().expect("client"));

    // A real agent that trusts the CA through --ca-cert.
    let code = control.pairing_code().await.expect("code");
    let root = tempfile::tempdir().expect("root");
    std::fs::write(root.path().join("hello.txt"), "over TLS\n").expect("file");
    let mut agent = Agent::builder(&base)
        .code(&code)
        .root(root.path())
        .flag("--ca-cert", ca.cert().display())
        .spawn()
        .expect("agent");
    let device_id = wait_for_device(&control, 30 * SECOND).await.unwrap_or_else(|| {
        panic!("the agent never came online\n{}\n{}", agent.log_tail(40), replica.log_tail(40));
    });
    let (status, body) =
        control.call(&device_id, "read_file", json!({"path": "hello.txt"}), Some(10_000)).await.expect("call");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["content"], "over TLS\n", "{body}");
    assert!(agent.is_running());

    // ALPN: HTTP/2 when the client offers it, HTTP/1.1 for one that only speaks that.
    let h2 = replica.client().expect("client").get(format!("{base}/healthz")).send().await.expect("h2");
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    let pem = std::fs::read(ca.cert()).expect("ca");
    let http1 = reqwest::Client::builder()
        .http1_only()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let response = http1.get(format!("{base}/healthz")).send().await.expect("http/1.1");
    assert_eq!((response.status(), response.version()), (StatusCode::OK, reqwest::Version::HTTP_11));

    // A client that does not trust the CA, and plain HTTP, get nothing.
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err(), "unknown CA refused");
    let plain = format!("http://{}/healthz", replica.addr());
    assert!(reqwest::Client::new().get(&plain).timeout(5 * SECOND).send().await.is_err(), "plain HTTP gets no answer");

    // A TCP client that never starts its handshake is closed within the connection timeout.
    let mut silent = tokio::net::TcpStream::connect(replica.addr()).await.expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(10 * SECOND, tokio::io::AsyncReadExt::read(&mut silent, &mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
    assert!(started.elapsed() < 5 * SECOND, "closed after {:?}", started.elapsed());

    agent.sigterm().expect("sigterm");
    assert_eq!(agent.exit_code(15 * SECOND).await.expect("exit"), 0);
}

/// The first device the control API lists as online, within `timeout`.
async fn wait_for_device(control: &Control, timeout: Duration) -> Option<String> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Ok(devices) = control.all_devices().await {
            if let Some(device) = devices.iter().find(|d| d["online"] == true) {
                return device["id"].as_str().map(str::to_owned);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// NATS: TLS and each kind of credentials.

/// A two-replica cluster on a NATS server demanding `kind` over `tls`: a call dispatched on one
/// replica reaches the device streaming from the other, and `token revoke` publishes with the
/// same credentials.
async fn a_call_crosses_two_replicas(kind: AuthKind, tls: TlsMode) {
    let setup = NatsAuthSetup::new(kind, tls).expect("NATS auth setup");
    let env = setup.env.clone();
    let cluster = LocalCluster::builder()
        .replicas(2)
        .nats_options(NatsOptions { config: Some(setup.server_config.clone()), ..NatsOptions::default() })
        .configure(move |_, builder| {
            env.iter().fold(builder, |builder, (name, value)| builder.env(name, value.clone()))
        })
        .start()
        .await
        .unwrap_or_else(|error| panic!("cluster with {kind:?} over {tls:?}: {error:#}"));
    let device = cluster.pair_device(0, "crossing").await.expect("enroll");
    let conn = device.connect(&cluster.url(0), Answer::Echo).await.expect("stream on replica a");
    cluster.wait_presence(&device.device_id, true, 10 * SECOND).await.expect("presence");
    let (status, body) = cluster
        .control_at(1)
        .call(&device.device_id, "probe", json!({"kind": format!("{kind:?}")}), Some(10_000))
        .await
        .expect("call");
    assert_eq!(status, StatusCode::OK, "{kind:?}/{tls:?}: {body}\n{}", cluster.log_tails(30));
    assert_eq!(body["result"]["input"]["kind"], format!("{kind:?}"));
    assert_eq!(conn.total_received(), 1);

    // `dispatcher token revoke --nats-url` with the same variables as a replica's pod.
    let token = cluster.mint_token("revoked-user").await.expect("token");
    let mut env = setup.env.clone();
    env.push(("NATS_URL".into(), cluster.nats_urls()));
    let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let said = e2e::process::revoke_token_with_env(cluster.database_url(), &token[..12], &env).await.expect("revoke");
    assert!(said.contains("published the revocation on NATS"), "{kind:?}: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_user_and_password_over_tls() {
    a_call_crosses_two_replicas(AuthKind::UserPassword, TlsMode::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_token_over_tls_with_client_certificates() {
    a_call_crosses_two_replicas(AuthKind::Token, TlsMode::VerifyClients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_nkey_over_tls() {
    a_call_crosses_two_replicas(AuthKind::Nkey, TlsMode::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_file_over_tls() {
    a_call_crosses_two_replicas(AuthKind::CredsFile, TlsMode::On).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_replicas_without_the_right_credentials() {
    let setup = NatsAuthSetup::new(AuthKind::UserPassword, TlsMode::On).expect("setup");
    let server =
        NatsServer::start_with(NatsOptions { config: Some(setup.server_config.clone()), ..Default::default() })
            .await
            .expect("nats-server");
    let dir = tempfile::tempdir().expect("dir");
    let database = format!("sqlite://{}?mode=rwc", dir.path().join("d.db").display());
    let serve = |env: Vec<(String, String)>| {
        let (database, url) = (database.clone(), server.url());
        async move {
            let args = ["serve", "--listen", "127.0.0.1:0", "--database-url", &database, "--nats-url", &url];
            dispatcher_with_env(&args, &env).await
        }
    };
    let ca = ("NATS_TLS_CA_FILE".to_owned(), setup.var("NATS_TLS_CA_FILE").expect("ca").to_owned());

    // No credentials at all, then a wrong password: refused by NATS, one line, exit non-zero.
    let cases = [
        ("no credentials", vec![ca.clone()]),
        (
            "a wrong password",
            vec![ca.clone(), ("NATS_USER".into(), "dispatcher".into()), ("NATS_PASSWORD".into(), "guess".into())],
        ),
    ];
    for (what, env) in cases {
        let output = serve(env).await;
        assert!(!output.status.success(), "{what}: {output:?}");
        let errors = error_lines(&output);
        assert_eq!(errors.len(), 1, "{what}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(errors[0].contains("authorization violation"), "{what}: {}", errors[0]);
        println!("{what}: {}", errors[0]);
    }

    // The right password with a CA that did not sign the server's certificate: a TLS error.
    let wrong = TestCa::new("not the NATS CA").expect("CA");
    let mut env: Vec<(String, String)> =
        setup.env.iter().filter(|(name, _)| name != "NATS_TLS_CA_FILE").cloned().collect();
    env.push(("NATS_TLS_CA_FILE".into(), wrong.cert().display().to_string()));
    let output = serve(env).await;
    assert!(!output.status.success(), "{output:?}");
    let errors = error_lines(&output);
    assert_eq!(errors.len(), 1, "{}", String::from_utf8_lossy(&output.stderr));
    assert!(errors[0].contains("TLS"), "{}", errors[0]);

    // A plain client of NATS itself (any pod) is refused too.
    let unauthenticated = async_nats::ConnectOptions::new()
        .add_root_certificates(setup.var("NATS_TLS_CA_FILE").expect("ca").into())
        .connect(server.url())
        .await;
    let error = unauthenticated.expect_err("NATS refuses a client without credentials");
    assert_eq!(error.kind(), async_nats::ConnectErrorKind::AuthorizationViolation, "{error}");
}

// ---------------------------------------------------------------------------------------------
// Behind a proxy.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_through_a_trusted_proxy_and_spoofing_from_elsewhere() {
    // The proxy is 127.0.0.1; a client that binds 127.0.0.2 reaches the same listener as an
    // untrusted peer.
    let replica = Dispatcher::builder().flag("--trusted-proxies", "127.0.0.1/32").start().await.expect("replica");
    let base = replica.base_url();
    let token = replica.mint_token("alice").await.expect("token");
    let control = Control::new(&base, &token);
    let through_proxy =
        reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 1])).build().expect("client");

    // Twenty-five devices at once, one proxy address, each client named by the proxy: all
    // enrolled (the limit is 10 at once per client address).
    let codes: Vec<String> =
        join_all((0..25).map(|_| control.pairing_code())).await.into_iter().map(|c| c.expect("code")).collect();
    let answers = join_all(codes.iter().enumerate().map(|(i, code)| {
        let request = through_proxy
            .post(format!("{base}/api/host/enroll"))
            .header("x-forwarded-for", format!("198.51.100.{}", i + 1))
            .json(&json!({"code": code, "name": format!("behind-proxy-{i}")}));
        async move { request.send().await.expect("enroll").status() }
    }))
    .await;
    assert!(answers.iter().all(|s| *s == StatusCode::CREATED), "{answers:?}\n{}", replica.log_tail(20));
    assert!(replica.log().contains("client=198.51.100.7"), "logs name the client behind the proxy");

    // `Forwarded` (RFC 7239) from the proxy works too.
    let code = control.pairing_code().await.expect("code");
    let response = through_proxy
        .post(format!("{base}/api/host/enroll"))
        .header("forwarded", "for=\"[2001:db8::7]:4711\";proto=https")
        .json(&json!({"code": code, "name": "forwarded"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(response.status(), StatusCode::CREATED);

    // The same trick from an untrusted peer: every spoofed address is ignored, the peer gets
    // its ten attempts and then 429 with Retry-After.
    let spoofer =
        reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build().expect("client");
    let mut statuses = Vec::new();
    for i in 0..15 {
        let response = spoofer
            .post(format!("{base}/api/host/enroll"))
            .header("x-forwarded-for", format!("203.0.113.{}", i + 1))
            .header("forwarded", format!("for=203.0.113.{}", i + 1))
            .json(&json!({"code": format!("WRONG-CODE-{i:02}"), "name": "spoofer"}))
            .send()
            .await
            .expect("enroll");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after: u64 = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("Retry-After on a 429");
            assert!((1..=3).contains(&retry_after), "Retry-After {retry_after}");
        }
        statuses.push(response.status());
    }
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(statuses[..10].iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 10, "{statuses:?}");
    assert_eq!(refused, 5, "spoofed X-Forwarded-For changed nothing: {statuses:?}");

    // Event streams tell proxies not to buffer.
    let device = TestDevice::pair(&base, &control, "streaming").await.expect("enroll");
    let stream = reqwest::Client::new()
        .get(format!("{base}/api/host/stream"))
        .bearer_auth(&device.token)
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers().get("x-accel-buffering").and_then(|v| v.to_str().ok()), Some("no"));
}

// ---------------------------------------------------------------------------------------------
// host-agent and plain HTTP.

#[tokio::test]
async fn host_agent_refuses_plain_http_to_another_machine() {
    // 0.0.0.0 is not a loopback address: plain HTTP to it is refused before anything is sent.
    let port = e2e::free_port();
    let server = format!("http://0.0.0.0:{port}");
    let mut agent = Agent::builder(&server).code("AAAA-BBBB-CCCC").spawn().expect("agent");
    assert_eq!(agent.exit_code(15 * SECOND).await.expect("exits"), 2, "usage error");
    let log = agent.log();
    assert!(log.contains("--allow-insecure-http") && log.contains("https://"), "{log}");

    // With the flag it starts (and keeps trying to reach a server that is not there).
    let mut allowed = Agent::builder(&server)
        .code("AAAA-BBBB-CCCC")
        .env("FUSION_HOST_ALLOW_INSECURE_HTTP", "1")
        .spawn()
        .expect("agent");
    tokio::time::sleep(2 * SECOND).await;
    assert!(allowed.is_running(), "{}", allowed.log_tail(20));
}
