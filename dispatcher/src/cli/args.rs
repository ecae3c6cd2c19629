//! The operator subcommands' command lines (clap derive). Every subcommand takes the same
//! [`ServerArgs`] (`--server`, `--token`, `--ca-cert`, `--json`), each flag also read from its
//! environment variable; the flag wins.
//!
//! Not here: what the flags mean for a request ([`super::commands`]), nor checking the server
//! URL or the token (a usage error there, with the message that says how to fix it).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use protocol::{CALL_TIMEOUT_MAX_MS, PAIRING_TTL_MAX_SECS};

/// Where the CLI talks to when neither `--server` nor `DISPATCHER_URL` says.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// The operator's one-shot clients of the control API, as subcommands of `dispatcher`.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Mint a pairing code; print it and the `host-agent run` command that enrolls a device.
    Pair {
        /// How long the code stays valid [server default: 600].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=PAIRING_TTL_MAX_SECS))]
        ttl_secs: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the devices: name, id, online, replica, platform, last seen.
    Devices {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run a tool on a device and print its result; a mutation prints its proposal.
    Call {
        /// The device: its id, or its name when no other device has the same one.
        device: String,
        /// The tool, e.g. read_file, list_directory, write_file.
        tool: String,
        /// The tool's input as JSON [default: {}].
        input: Option<String>,
        /// How long to wait for the device's answer [server default: 30000].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=CALL_TIMEOUT_MAX_MS))]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List pending proposals (every proposal with --all).
    Proposals {
        /// Every proposal, whatever its status.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a proposal's change, ask, then apply it on its device.
    Approve {
        /// The proposal's id.
        proposal: String,
        /// Apply without asking (required when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Reject a pending proposal; it is never applied.
    Reject {
        /// The proposal's id.
        proposal: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The call log: the latest calls, newest first, or one call's record.
    Calls {
        /// One call's id: show its record instead of a list.
        call_id: Option<String>,
        /// Only calls to this device: its id, or its name when no other device has the same one.
        #[arg(long)]
        device: Option<String>,
        /// Only calls of this tool.
        #[arg(long)]
        tool: Option<String>,
        /// Only calls with this outcome.
        #[arg(long, value_parser = OUTCOMES)]
        outcome: Option<String>,
        /// How many calls to show at most (pages are followed).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        limit: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke a device after confirmation: its stream closes and its token stops working.
    Revoke {
        /// The device: its id, or its name when no other device has the same one.
        device: String,
        /// Revoke without asking (required when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// The outcomes `calls --outcome` takes (`timed-out` stands for `timed out`).
const OUTCOMES: [&str; 7] = ["pending", "ok", "error", "offline", "timed out", "timed-out", "unknown"];

/// The control API to talk to, and how to print its answers.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Base URL of any replica.
    #[arg(long, env = "DISPATCHER_URL", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// An api token (`dispatcher token create --user <id>`).
    #[arg(long, env = "DISPATCHER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust besides the bundled web roots (a private CA).
    #[arg(long, env = "DISPATCHER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON (one document on stdout) instead of text.
    #[arg(long)]
    pub json: bool,
}

impl OperatorCommand {
    /// The server arguments of any subcommand.
    pub fn server(&self) -> &ServerArgs {
        match self {
            Self::Pair { server, .. }
            | Self::Devices { server }
            | Self::Call { server, .. }
            | Self::Proposals { server, .. }
            | Self::Approve { server, .. }
            | Self::Reject { server, .. }
            | Self::Revoke { server, .. }
            | Self::Calls { server, .. } => server,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: OperatorCommand,
    }

    fn parse(args: &[&str]) -> Result<OperatorCommand, clap::Error> {
        let mut argv = vec!["dispatcher"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    #[test]
    fn every_subcommand_takes_the_server_flags() {
        for args in [
            &["pair"][..],
            &["devices"],
            &["call", "laptop", "stat"],
            &["proposals"],
            &["approve", "p"],
            &["reject", "p"],
            &["revoke", "laptop"],
            &["calls"],
            &["calls", "0a000001-0000-4000-8000-000000000001"],
        ] {
            let mut argv = args.to_vec();
            argv.extend(["--server", "https://d.example", "--token", "t", "--json", "--ca-cert", "/ca.pem"]);
            let command = parse(&argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let server = command.server();
            assert_eq!(server.server, "https://d.example", "{args:?}");
            assert_eq!(server.token.as_deref(), Some("t"), "{args:?}");
            assert!(server.json, "{args:?}");
            assert_eq!(server.ca_cert, Some(PathBuf::from("/ca.pem")), "{args:?}");
        }
    }

    #[test]
    fn call_takes_an_optional_input_and_timeout() {
        match parse(&["call", "laptop", "read_file", r#"{"path":"a"}"#, "--timeout-ms", "500"]).unwrap() {
            OperatorCommand::Call { device, tool, input, timeout_ms, .. } => {
                assert_eq!((device.as_str(), tool.as_str()), ("laptop", "read_file"));
                assert_eq!(input.as_deref(), Some(r#"{"path":"a"}"#));
                assert_eq!(timeout_ms, Some(500));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["call", "laptop", "stat"]).unwrap() {
            OperatorCommand::Call { input, timeout_ms, .. } => assert_eq!((input, timeout_ms), (None, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_range_values_are_usage_errors() {
        for args in [
            &["pair", "--ttl-secs", "0"][..],
            &["pair", "--ttl-secs", "86401"],
            &["pair", "--ttl-secs", "soon"],
            &["call", "d", "t", "--timeout-ms", "0"],
            &["call", "d", "t", "--timeout-ms", "300001"],
            &["call", "d"],
            &["approve"],
            &["revoke"],
            &["devices", "extra"],
            &["calls", "--outcome", "fine"],
            &["calls", "--limit", "0"],
            &["calls", "a", "b"],
        ] {
            let error = parse(args).expect_err(&format!("{args:?}"));
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn yes_has_a_short_form() {
        assert!(matches!(parse(&["approve", "p", "-y"]).unwrap(), OperatorCommand::Approve { yes: true, .. }));
        assert!(matches!(parse(&["revoke", "d", "--yes"]).unwrap(), OperatorCommand::Revoke { yes: true, .. }));
        assert!(matches!(parse(&["revoke", "d"]).unwrap(), OperatorCommand::Revoke { yes: false, .. }));
    }
}
