//! TLS between the agent and its server: a server whose certificate is signed by a private CA
//! is refused with a message that says the certificate is not trusted and names `--ca-cert`;
//! with `--ca-cert` pointing at that CA the agent enrolls and connects.
//!
//! The server is the fake dispatcher behind a small TLS terminator (tokio-rustls) using a
//! fixed test CA and a leaf for `localhost` / `127.0.0.1`, valid 2000 to 2100, generated once
//! with openssl and embedded below (test material only, no secret).

mod runtime_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runtime_support::{run_args, AgentProcess, Fake};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

const WAIT: Duration = Duration::from_secs(15);

const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBbTCCARSgAwIBAgICEAAwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSaG9zdC1h
Z2VudCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAd
MRswGQYDVQQDDBJob3N0LWFnZW50IHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASUPlEvrD1XkWA/3jHHN1b64LCy4jq6fzKgjcpplW2r8jh/JSKzoBie
TCx5UmCwVkeqsZMIw9IW5rr2rpnFkD8io0IwQDAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQU10n7tMcdnR409PUmlmIGKrmGF4IwCgYI
KoZIzj0EAwIDRwAwRAIgc5hSxlpBOJV7m7X/mKEwW1S6+Q+t48R5aaS2VHVanlAC
ID1oMQwWypQiM89/bNfhS1RZEAlrfYwHTCRNXo2u1cex
-----END CERTIFICATE-----
";

const LEAF_CERT_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBtjCCAVygAwIBAgICEAEwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSaG9zdC1h
Z2VudCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAU
MRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQp
3zXJtWHtYFTDRHY9O0DXOBqx2Q1eZj0XYrAvOqaOXBk4zw1d85tPWCRijMm1G1Ym
6i4YxghBKIyYGUZKmlKDo4GSMIGPMBoGA1UdEQQTMBGCCWxvY2FsaG9zdIcEfwAA
ATAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEF
BQcDATAfBgNVHSMEGDAWgBTXSfu0xx2dHjT09SaWYgYquYYXgjAdBgNVHQ4EFgQU
owsMoiZUsqgHbkpFWgow3BXvNHgwCgYIKoZIzj0EAwIDSAAwRQIhAIKLIRX9PH8K
GLd/FWqUe8tV8dhwum2pX0sNG9SL+Q2ZAiBGjI4YCpPhbmdHeHvjgPtN6W0vMQPr
66vZTTJ5+W8F1A==
-----END CERTIFICATE-----
";

const LEAF_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg8O0VT3rStD2Lpy6w
pLqB7OJbsB1dByDRt0QPQhzuBTKhRANCAAQp3zXJtWHtYFTDRHY9O0DXOBqx2Q1e
Zj0XYrAvOqaOXBk4zw1d85tPWCRijMm1G1Ym6i4YxghBKIyYGUZKmlKD
-----END PRIVATE KEY-----
";

/// Accepts TLS on a fresh port and forwards the plaintext to `backend`.
async fn tls_terminator(backend: SocketAddr) -> SocketAddr {
    let certs =
        rustls_pemfile::certs(&mut LEAF_CERT_PEM.as_bytes()).collect::<Result<Vec<_>, _>>().expect("leaf certificate");
    let key = rustls_pemfile::private_key(&mut LEAF_KEY_PEM.as_bytes()).expect("key pem").expect("a key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_untrusted_certificate_is_named_with_the_flag_to_fix_it() {
    let fake = Fake::start(&["PAIR-TLS"]).await;
    let tls = tls_terminator(fake.addr).await;
    let url = format!("https://127.0.0.1:{}", tls.port());
    let root = tempfile::tempdir().expect("root");
    let creds = tempfile::tempdir().expect("creds");
    let mut agent = AgentProcess::spawn(&run_args(&[&url], root.path(), creds.path(), &["--code", "PAIR-TLS"]), &[]);
    agent.wait_for_stderr("certificate is not trusted", 1, WAIT).await;
    let stderr = agent.stderr();
    assert!(stderr.contains("--ca-cert"), "{stderr}");
    assert!(agent.is_running(), "an untrusted server is retried, not an exit");
    assert!(fake.state.enrollments().is_empty());
}

#[tokio::test]
async fn a_ca_cert_makes_a_private_ca_trusted() {
    let fake = Fake::start(&["PAIR-TLS"]).await;
    let tls = tls_terminator(fake.addr).await;
    let url = format!("https://127.0.0.1:{}", tls.port());
    let root = tempfile::tempdir().expect("root");
    let creds = tempfile::tempdir().expect("creds");
    let ca = creds.path().join("test-ca.pem");
    std::fs::write(&ca, TEST_CA_PEM).expect("write the CA");
    let ca = ca.display().to_string();
    let args = run_args(&[&url], root.path(), creds.path(), &["--code", "PAIR-TLS", "--ca-cert", &ca]);
    let agent = AgentProcess::spawn(&args, &[]);
    agent.wait_for_stderr(&format!("connected to {url} as device"), 1, WAIT).await;
    assert_eq!(fake.state.enrollments().len(), 1);
}

#[tokio::test]
async fn a_ca_cert_file_without_certificates_is_a_usage_error() {
    let root = tempfile::tempdir().expect("root");
    let creds = tempfile::tempdir().expect("creds");
    let ca = creds.path().join("empty.pem");
    std::fs::write(&ca, "nothing here").expect("write");
    let ca = ca.display().to_string();
    let args = run_args(&["https://127.0.0.1:9"], root.path(), creds.path(), &["--code", "X", "--ca-cert", &ca]);
    let mut agent = AgentProcess::spawn(&args, &[]);
    assert_eq!(agent.wait_exit(WAIT).await, 2);
    assert!(agent.stderr().contains("empty.pem"), "{}", agent.stderr());
}

/// Enrollment by link says the same about an untrusted certificate as a pairing enrollment.
#[tokio::test]
async fn enrollment_by_link_names_the_flag_too() {
    let fake = Fake::start(&[]).await;
    let tls = tls_terminator(fake.addr).await;
    let url = format!("https://127.0.0.1:{}", tls.port());
    let root = tempfile::tempdir().expect("root");
    let creds = tempfile::tempdir().expect("creds");
    let mut agent = AgentProcess::spawn(&run_args(&[&url], root.path(), creds.path(), &[]), &[]);
    agent.wait_for_stderr("certificate is not trusted", 1, WAIT).await;
    let stderr = agent.stderr();
    assert!(stderr.contains("--ca-cert") && stderr.contains("enrollment link"), "{stderr}");
    assert!(agent.is_running(), "an untrusted server is retried, not an exit");
}
