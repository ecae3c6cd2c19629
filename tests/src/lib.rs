//! `e2e`: the shared harness of the end-to-end suites. It starts the real binaries
//! (`dispatcher`, `host-agent`), a real `nats-server` and fresh PostgreSQL databases, and
//! speaks the contract over HTTP like a device and like an app backend would.
//!
//! Not here: any of the project's own logic. Nothing in this crate mocks the dispatcher or the
//! agent; it only drives them from the outside, as CONTRACT.md describes them.
//!
//! Layout:
//! - [`bin`]: where the built binaries are, building them once if they are missing.
//! - [`process`]: a `dispatcher serve` process ([`process::Dispatcher`]), `dispatcher token`
//!   commands, and a `host-agent run` process ([`process::Agent`]); signals, exit codes, logs.
//! - [`nats`]: a `nats-server` on a free port, or a cluster of them; kill and restart.
//! - [`nats_auth`]: NATS server configurations with TLS and each kind of authentication, and
//!   the settings a replica needs for them (users, tokens, nkeys, operator JWTs).
//! - [`tls`]: a private CA issuing test certificates; the local PostgreSQL's test CA.
//! - [`postgres`]: a fresh PostgreSQL database per test, dropped afterwards.
//! - [`device`]: [`device::TestDevice`], a small device speaking the contract over HTTP, and
//!   [`device::Control`], the control API as an app backend uses it.
//! - [`sse`]: a minimal Server-Sent-Events frame parser that keeps comment lines.
//! - [`events`]: [`events::EventStream`], a listener of `GET /api/events`.
//! - [`swarm`]: thousands of simulated devices in one process, for the measurement tools.
//! - [`load`]: a load generator (closed and open loop) with latency percentiles.
//! - [`cluster`]: [`cluster::LocalCluster`], NATS, a database and N dispatcher replicas as one.
//!
//! Everything spawned is killed when its handle is dropped; every port is picked free, so
//! suites run in parallel.

pub mod bin;
pub mod cluster;
pub mod device;
pub mod events;
pub mod load;
pub mod nats;
pub mod nats_auth;
pub mod postgres;
pub mod process;
pub mod sse;
pub mod swarm;
pub mod tls;

pub use cluster::LocalCluster;
pub use device::{Answer, Control, DeviceConn, TestDevice};
pub use nats::{NatsCluster, NatsServer};
pub use postgres::TestDatabase;
pub use process::{mint_token, Agent, AgentBuilder, Dispatcher, DispatcherBuilder};

use std::net::{SocketAddr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// The value of the Prometheus metric whose name ends with `suffix` (labels summed), read
/// from `{base}/metrics`; `None` when it is absent or the replica does not answer.
pub async fn metric(base: &str, suffix: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics")).await.ok()?.text().await.ok()?;
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let bare = name.split('{').next().unwrap_or(name);
        if bare.ends_with(suffix) {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail_file(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
