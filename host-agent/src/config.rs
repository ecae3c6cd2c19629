//! The command line of `host-agent`: clap derive, an `env =` on every flag (the flag wins), and
//! pure validation into a [`crate::runtime::AgentConfig`].
//!
//! ```text
//! host-agent run   --server <url>... [--root <dir>...] [--code <code>] [--name <name>]
//!                  [--credentials-dir <dir>] [--ca-cert <pem>] [--keepalive-secs 15]
//!                  [--backoff-base-ms 1000] [--max-backoff-ms 30000] [--shutdown-grace-secs 30]
//!                  [--log info] [--allow-hardlinked-reads] [--open-deny-ext <ext,...>]
//!                  [--open-allow-ext <ext,...>] [--tools-file <toml>]
//! host-agent tools [--root <dir>...] [--tools-file <toml>]
//! host-agent call  <tool> '<json input>' [--root <dir>...] [--apply] [--allow-hardlinked-reads]
//!                  [--open-deny-ext <ext,...>] [--open-allow-ext <ext,...>] [--tools-file <toml>]
//! ```
//!
//! Environment: `PULSN_URL` (comma-separated servers), `FUSION_HOST_ROOTS` (roots separated by
//! the OS path-list separator, `:` or `;`), `FUSION_HOST_CODE`, `FUSION_HOST_NAME`,
//! `FUSION_HOST_CREDENTIALS_DIR`, `FUSION_HOST_CA_CERT`, `FUSION_HOST_KEEPALIVE_SECS`,
//! `FUSION_HOST_BACKOFF_BASE_MS`, `FUSION_HOST_MAX_BACKOFF_MS`,
//! `FUSION_HOST_SHUTDOWN_GRACE_SECS`, `FUSION_HOST_LOG`, `FUSION_HOST_ALLOW_HARDLINKED_READS`,
//! `FUSION_HOST_OPEN_DENY_EXT`, `FUSION_HOST_OPEN_ALLOW_EXT` (comma-separated),
//! `FUSION_HOST_TOOLS_FILE`.
//!
//! Not here: reading files, opening roots, or any network (the runtime and the tools do that).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use reqwest::Url;

use crate::credentials::{home_dir, CredentialStore};
use crate::runtime::AgentConfig;
use crate::tools::LaunchRules;

/// The device runtime: dials out to the dispatcher, holds the stream, runs tools inside its
/// roots. Nothing listens on this machine.
#[derive(Debug, Parser)]
#[command(name = "host-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll on first run (with --code, or without it by a link to approve), then hold the
    /// stream to the server and run the calls it pushes, until SIGINT/SIGTERM.
    ///
    /// Exit codes: 0 clean shutdown; 1 other failure; 2 usage error; 3 enrollment refused (bad,
    /// expired or used code; too many attempts; the link denied or expired); 4 device
    /// revoked (cached credentials deleted); 5 superseded (another process uses these
    /// credentials). A dropped connection is never an exit: the agent reconnects.
    Run(RunArgs),
    /// Print the tool descriptors (MCP-shaped) as JSON.
    Tools(ToolsArgs),
    /// Run one tool locally, without a server, and print its HostResult as JSON.
    ///
    /// Exit code 0 when the result is ok, 1 when it is not, 2 on a usage error (unknown flags,
    /// input that is not JSON, a root that cannot be opened).
    Call(CallArgs),
}

/// Where tools may look: every path is resolved beneath one of these.
#[derive(Debug, Clone, Args)]
pub struct RootArgs {
    /// An allowed root directory (repeatable; relative paths in calls are taken relative to the
    /// first). FUSION_HOST_ROOTS holds several, separated by the OS path-list separator.
    /// Default: the home directory.
    #[arg(long = "root", value_name = "DIR", env = "FUSION_HOST_ROOTS")]
    pub roots: Vec<PathBuf>,
}

/// What the tools may do inside the roots, beyond the confinement itself.
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyArgs {
    /// Read the content of files with more than one hard link. Refused by default: another link
    /// may lie outside the roots. Mutations never write in place through such a file either way.
    #[arg(long, env = "FUSION_HOST_ALLOW_HARDLINKED_READS", value_parser = BoolishValueParser::new())]
    pub allow_hardlinked_reads: bool,

    /// More file extensions open_path and reveal_in_os refuse, besides the built-in list of
    /// programs, scripts, launchers, bundles and web pages (repeatable, or comma-separated).
    #[arg(long, value_name = "EXT", env = "FUSION_HOST_OPEN_DENY_EXT", value_delimiter = ',')]
    pub open_deny_ext: Vec<String>,

    /// Extensions to take off that list, e.g. `html` on a device where pages should open in the
    /// browser. Files with an executable bit are refused whatever their extension.
    #[arg(long, value_name = "EXT", env = "FUSION_HOST_OPEN_ALLOW_EXT", value_delimiter = ',')]
    pub open_allow_ext: Vec<String>,
}

impl PolicyArgs {
    /// What the actions refuse to hand over; an error names an extension that is not one.
    pub fn launch_rules(&self) -> Result<LaunchRules, String> {
        LaunchRules::new(&self.open_deny_ext, &self.open_allow_ext)
            .map_err(|error| format!("invalid --open-deny-ext or --open-allow-ext: {error}"))
    }
}

/// Domain tools declared beside the built-ins.
#[derive(Debug, Clone, Default, Args)]
pub struct ToolsFileArgs {
    /// A TOML file of domain tools (named shell-outs with typed, scoped arguments) to serve
    /// beside the built-ins. A file that does not validate is a usage error (exit 2).
    #[arg(long, value_name = "TOML", env = "FUSION_HOST_TOOLS_FILE")]
    pub tools_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Base URL of the server (repeatable, or comma-separated; tried in turn on failure). All of
    /// them must be entry points of one cluster: the device's credentials are valid on each.
    #[arg(long = "server", value_name = "URL", env = "PULSN_URL", value_delimiter = ',', required = true)]
    pub servers: Vec<String>,

    #[command(flatten)]
    pub roots: RootArgs,

    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub tools: ToolsFileArgs,

    /// One-time pairing code, used on the first run (no cached credentials). Without it the
    /// first run enrolls by link: it prints a link to approve in the admin page.
    #[arg(long, value_name = "CODE", env = "FUSION_HOST_CODE", hide_env_values = true)]
    pub code: Option<String>,

    /// Human label of this device, sent at enrollment. Default: the host name.
    #[arg(long, value_name = "NAME", env = "FUSION_HOST_NAME")]
    pub name: Option<String>,

    /// Where credentials are cached, one file per server origin, mode 0600. Default:
    /// ~/.fusion-host.
    #[arg(long, value_name = "DIR", env = "FUSION_HOST_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,

    /// A PEM file of CA certificates to trust besides the system's roots (for servers behind a
    /// private or self-signed CA).
    #[arg(long, value_name = "PEM", env = "FUSION_HOST_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// The server's keepalive interval in seconds: a stream silent for two intervals is dead
    /// and the agent reconnects.
    #[arg(long, value_name = "SECS", env = "FUSION_HOST_KEEPALIVE_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_secs: u64,

    /// First reconnect delay window in milliseconds; it doubles per failure (full jitter).
    #[arg(long, value_name = "MS", env = "FUSION_HOST_BACKOFF_BASE_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub backoff_base_ms: u64,

    /// Largest reconnect delay in milliseconds.
    #[arg(long, value_name = "MS", env = "FUSION_HOST_MAX_BACKOFF_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub max_backoff_ms: u64,

    /// On SIGINT/SIGTERM, how long to wait for the calls in hand to be answered.
    #[arg(long, value_name = "SECS", env = "FUSION_HOST_SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_secs: u64,

    /// Log filter (tracing EnvFilter syntax), logs go to stderr.
    #[arg(long, value_name = "FILTER", env = "FUSION_HOST_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Args)]
pub struct ToolsArgs {
    #[command(flatten)]
    pub roots: RootArgs,
    #[command(flatten)]
    pub tools: ToolsFileArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// The tool to run (see `host-agent tools`).
    pub tool: String,
    /// Its input, one JSON value, e.g. '{"path": "."}'.
    pub input: String,
    #[command(flatten)]
    pub roots: RootArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub tools: ToolsFileArgs,
    /// Apply a mutation instead of printing its proposal. The agent plans the change right
    /// then and applies it at once with that fresh plan's preconditions: there is no approval
    /// step, so use it only for changes you would make yourself.
    #[arg(long)]
    pub apply: bool,
}

/// Parses the process's arguments; prints help or errors and exits (code 2) like clap does.
pub fn parse() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
}

/// Parses `args` (the first is the program name). Roots that came from `FUSION_HOST_ROOTS` are
/// split at the OS path-list separator; roots given as flags are taken whole.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let from_env =
        matches.subcommand().and_then(|(_, sub)| sub.value_source("roots")) == Some(ValueSource::EnvVariable);
    if from_env {
        let roots = match &mut cli.command {
            Command::Run(args) => &mut args.roots,
            Command::Tools(args) => &mut args.roots,
            Command::Call(args) => &mut args.roots,
        };
        roots.roots = split_path_list(&roots.roots);
    }
    Ok(cli)
}

/// Each value split at the OS path-list separator, empty entries dropped.
pub fn split_path_list(values: &[PathBuf]) -> Vec<PathBuf> {
    values.iter().flat_map(|value| std::env::split_paths(value)).filter(|p| !p.as_os_str().is_empty()).collect()
}

impl RootArgs {
    /// The roots as given, or the home directory when none were.
    pub fn resolve(&self, home: Option<PathBuf>) -> Result<Vec<PathBuf>, String> {
        if !self.roots.is_empty() {
            return Ok(self.roots.clone());
        }
        home.map(|home| vec![home])
            .ok_or_else(|| "no --root given and no home directory to default to: pass --root <dir>".to_owned())
    }
}

/// `text` as a server base URL: http or https, with a host.
pub fn parse_server(text: &str) -> Result<Url, String> {
    let trimmed = text.trim();
    let url = Url::parse(trimmed).map_err(|e| format!("invalid --server {trimmed:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("invalid --server {trimmed:?}: the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid --server {trimmed:?}: no host"));
    }
    Ok(url)
}

impl RunArgs {
    /// The validated configuration of a run. `home` and `hostname` supply the defaults.
    pub fn agent_config(&self, home: Option<PathBuf>, hostname: Option<String>) -> Result<AgentConfig, String> {
        let mut servers: Vec<Url> = Vec::new();
        for text in self.servers.iter().filter(|s| !s.trim().is_empty()) {
            let url = parse_server(text)?;
            if !servers.contains(&url) {
                servers.push(url);
            }
        }
        if servers.is_empty() {
            return Err("no server given: pass --server <url> or set PULSN_URL".into());
        }
        let name = self
            .name
            .clone()
            .or(hostname)
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| "no device name: pass --name <name>".to_owned())?;
        let credentials_dir = match &self.credentials_dir {
            Some(dir) => dir.clone(),
            None => home
                .map(|home| home.join(".fusion-host"))
                .or_else(CredentialStore::default_dir)
                .ok_or_else(|| "no home directory for the credentials: pass --credentials-dir <dir>".to_owned())?,
        };
        Ok(AgentConfig {
            servers,
            name,
            code: self.code.clone().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()),
            credentials_dir,
            ca_cert: self.ca_cert.clone(),
            keepalive: Duration::from_secs(self.keepalive_secs),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_cap: Duration::from_millis(self.max_backoff_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        })
    }
}

/// The host name, for the default device name.
pub fn host_name() -> Option<String> {
    hostname::get().ok().map(|name| name.to_string_lossy().into_owned())
}

/// The home directory, for the default root and credentials directory.
pub fn home() -> Option<PathBuf> {
    home_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut full = vec!["host-agent", "run"];
        full.extend_from_slice(args);
        match parse_from(full).expect("parses").command {
            Command::Run(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let args = run_args(&["--server", "http://127.0.0.1:8080"]);
        let config = args.agent_config(Some("/home/me".into()), Some("box".into())).expect("valid");
        assert_eq!(config.servers, vec![Url::parse("http://127.0.0.1:8080").expect("url")]);
        assert_eq!(config.name, "box");
        assert_eq!(config.credentials_dir, PathBuf::from("/home/me/.fusion-host"));
        assert_eq!(config.keepalive, Duration::from_secs(15));
        assert_eq!(config.backoff_base, Duration::from_millis(1000));
        assert_eq!(config.backoff_cap, Duration::from_secs(30));
        assert_eq!(config.code, None);
        assert_eq!(args.roots.resolve(Some("/home/me".into())).expect("roots"), vec![PathBuf::from("/home/me")]);
    }

    #[test]
    fn repeated_and_comma_separated_servers() {
        let args = run_args(&["--server", "http://a:1,http://b:2", "--server", "https://c", "--server", "http://a:1"]);
        let config = args.agent_config(None, Some("x".into())).expect("valid");
        let hosts: Vec<&str> = config.servers.iter().filter_map(Url::host_str).collect();
        assert_eq!(hosts, ["a", "b", "c"], "in order, duplicates dropped");
    }

    #[test]
    fn every_setting_as_a_flag() {
        let args = run_args(&[
            "--server",
            "http://a:1",
            "--root",
            "/r1",
            "--root",
            "/r:2",
            "--code",
            " ABC-123 ",
            "--name",
            "Workstation A",
            "--credentials-dir",
            "/creds",
            "--ca-cert",
            "/ca.pem",
            "--keepalive-secs",
            "2",
            "--backoff-base-ms",
            "10",
            "--max-backoff-ms",
            "100",
            "--shutdown-grace-secs",
            "3",
        ]);
        assert_eq!(args.roots.roots, [PathBuf::from("/r1"), PathBuf::from("/r:2")], "flags are taken whole");
        let config = args.agent_config(None, None).expect("valid");
        assert_eq!(config.code.as_deref(), Some("ABC-123"));
        assert_eq!(config.name, "Workstation A");
        assert_eq!(config.credentials_dir, PathBuf::from("/creds"));
        assert_eq!(config.ca_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(config.keepalive, Duration::from_secs(2));
        assert_eq!(config.backoff_base, Duration::from_millis(10));
        assert_eq!(config.backoff_cap, Duration::from_millis(100));
        assert_eq!(config.shutdown_grace, Duration::from_secs(3));
    }

    #[test]
    fn bad_servers_are_usage_errors() {
        for bad in ["not a url", "ftp://a", "file:///tmp/x", "http://"] {
            let args = run_args(&["--server", bad]);
            let err = args.agent_config(None, Some("x".into())).expect_err(bad);
            assert!(err.contains("--server"), "{err}");
        }
    }

    #[test]
    fn usage_errors_from_clap_exit_2() {
        for args in [
            vec!["host-agent"],
            vec!["host-agent", "run"],
            vec!["host-agent", "run", "--server", "http://a", "--keepalive-secs", "0"],
            vec!["host-agent", "run", "--server", "http://a", "--bogus"],
            vec!["host-agent", "call", "stat"],
        ] {
            // `run` without --server fails only when PULSN_URL is unset, as in tests.
            if args.len() == 2 && std::env::var_os("PULSN_URL").is_some() {
                continue;
            }
            let err = parse_from(&args).expect_err("usage error");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn call_arguments() {
        let cli =
            parse_from(["host-agent", "call", "stat", r#"{"path":"."}"#, "--root", "/tmp", "--apply"]).expect("ok");
        match cli.command {
            Command::Call(call) => {
                assert_eq!(call.tool, "stat");
                assert_eq!(call.input, r#"{"path":"."}"#);
                assert_eq!(call.roots.roots, [PathBuf::from("/tmp")]);
                assert!(call.apply);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn path_lists_split_at_the_os_separator() {
        let joined = std::env::join_paths(["/a", "/b c", "/d"]).expect("join");
        let split = split_path_list(&[PathBuf::from(joined)]);
        assert_eq!(split, [PathBuf::from("/a"), PathBuf::from("/b c"), PathBuf::from("/d")]);
        assert!(split_path_list(&[PathBuf::new()]).is_empty());
    }

    #[test]
    fn open_extension_lists() {
        let args = run_args(&["--server", "http://a", "--open-deny-ext", "pdf,.MD", "--open-allow-ext", "html"]);
        assert_eq!(args.policy.open_deny_ext, ["pdf", ".MD"]);
        assert_eq!(args.policy.open_allow_ext, ["html"]);
        let expected = LaunchRules::new(&["pdf".into(), "md".into()], &["html".into()]).expect("rules");
        assert_eq!(args.policy.launch_rules().expect("valid"), expected);
        assert_eq!(run_args(&["--server", "http://a"]).policy.launch_rules().expect("default"), LaunchRules::default());
        let bad = run_args(&["--server", "http://a", "--open-deny-ext", "tar.gz"]);
        assert!(bad.policy.launch_rules().expect_err("invalid").contains("--open-deny-ext"));
    }

    #[test]
    fn hardlinked_reads_are_refused_unless_asked() {
        assert!(!run_args(&["--server", "http://a"]).policy.allow_hardlinked_reads);
        assert!(run_args(&["--server", "http://a", "--allow-hardlinked-reads"]).policy.allow_hardlinked_reads);
        let call = parse_from(["host-agent", "call", "stat", "{}", "--allow-hardlinked-reads"]).expect("call");
        assert!(matches!(call.command, Command::Call(args) if args.policy.allow_hardlinked_reads));
    }

    #[test]
    fn a_tools_file_for_run_tools_and_call() {
        let run = run_args(&["--server", "http://a", "--tools-file", "/etc/fusion/tools.toml"]);
        assert_eq!(run.tools.tools_file, Some(PathBuf::from("/etc/fusion/tools.toml")));
        assert_eq!(run_args(&["--server", "http://a"]).tools.tools_file, None);
        let tools = parse_from(["host-agent", "tools", "--tools-file", "t.toml"]).expect("tools");
        assert!(matches!(tools.command, Command::Tools(args) if args.tools.tools_file == Some("t.toml".into())));
        let call = parse_from(["host-agent", "call", "x", "{}", "--tools-file", "t.toml"]).expect("call");
        assert!(matches!(call.command, Command::Call(args) if args.tools.tools_file == Some("t.toml".into())));
    }

    #[test]
    fn no_root_and_no_home_is_an_error() {
        assert!(RootArgs { roots: vec![] }.resolve(None).is_err());
    }
}
