//! The `host-agent` binary, a thin shell: parse the command line, set up logging to stderr,
//! open the roots, pick the signals (SIGINT, SIGTERM) that stop a run, and turn how it ended
//! into the contract's exit code (see [`host_agent::runtime::exit_code`]).
//!
//! Everything else lives in the library: [`host_agent::runtime::run`] is the whole of
//! `host-agent run`.

use std::io::IsTerminal;
use std::process::exit;
use std::sync::Arc;
use std::time::Duration;

use host_agent::config::{self, CallArgs, Command, RunArgs, ToolsArgs};
use host_agent::runtime::{self, exit_code, Outcome};
use host_agent::tools::Toolbox;
use protocol::{CallMode, HostCall};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

fn main() {
    let cli = config::parse();
    let code = match cli.command {
        Command::Run(args) => run_agent(&args),
        Command::Tools(args) => print_tools(&args),
        Command::Call(args) => call_tool(&args),
    };
    exit(code);
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|err| {
        eprintln!("host-agent: ignoring the log filter {filter:?} ({err}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn usage_error(message: &str) -> i32 {
    eprintln!("host-agent: {message}");
    exit_code::USAGE
}

/// The built-ins over the roots, and the domain tools of `--tools-file` beside them; a bad
/// tools file is a usage error that names the tool and the problem.
fn open_toolbox(roots: &config::RootArgs, tools: &config::ToolsFileArgs) -> Result<Toolbox, i32> {
    let roots = roots.resolve(config::home()).map_err(|msg| usage_error(&msg))?;
    let toolbox = Toolbox::new(&roots).map_err(|err| usage_error(&format!("cannot use the roots: {err}")))?;
    match &tools.tools_file {
        Some(file) => toolbox.with_tools_file(file).map_err(|err| usage_error(&err.to_string())),
        None => Ok(toolbox),
    }
}

/// The toolbox of `run` and `call`: the roots, and what the tools may do inside them.
fn open_toolbox_with(
    roots: &config::RootArgs,
    policy: &config::PolicyArgs,
    tools: &config::ToolsFileArgs,
) -> Result<Toolbox, i32> {
    let rules = policy.launch_rules().map_err(|msg| usage_error(&msg))?;
    Ok(open_toolbox(roots, tools)?.with_hardlinked_reads(policy.allow_hardlinked_reads).with_launch_rules(rules))
}

fn run_agent(args: &RunArgs) -> i32 {
    init_logging(&args.log);
    let agent_config = match args.agent_config(config::home(), config::host_name()) {
        Ok(config) => config,
        Err(message) => return usage_error(&message),
    };
    let toolbox = match open_toolbox_with(&args.roots, &args.policy, &args.tools) {
        Ok(toolbox) => toolbox,
        Err(code) => return code,
    };
    let tokio = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(tokio) => tokio,
        Err(err) => {
            eprintln!("host-agent: cannot start the async runtime: {err}");
            return exit_code::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let ended = tokio.block_on(async {
        tokio::spawn(watch_signals(shutdown.clone()));
        runtime::run(agent_config, Arc::new(toolbox), shutdown).await
    });
    // A tool abandoned at its deadline may still hold a blocking thread: do not wait for it.
    tokio.shutdown_timeout(Duration::from_millis(500));
    match ended {
        Ok(Outcome::Shutdown) => {
            info!("stopped");
            exit_code::OK
        }
        Ok(Outcome::Revoked) => {
            eprintln!(
                "host-agent: this device was revoked by the server; its cached credentials were deleted. \
                 To use this machine again, enroll it again: with a new pairing code (--code), or run without \
                 --code for a link to approve."
            );
            exit_code::REVOKED
        }
        Ok(Outcome::Superseded) => {
            eprintln!(
                "host-agent: superseded: another process is connected with this device's credentials (a newer \
                 stream took over), so this one exits. Run one host-agent per credentials directory, or enroll \
                 the other machine with its own pairing code."
            );
            exit_code::SUPERSEDED
        }
        Ok(Outcome::EnrollmentRefused(why)) => {
            eprintln!("host-agent: {why}");
            exit_code::ENROLLMENT_REFUSED
        }
        Err(err) => {
            eprintln!("host-agent: {err}");
            err.exit_code()
        }
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    let first = next_signal().await;
    info!("{first} received: finishing the calls in hand, then exiting");
    shutdown.cancel();
    let second = next_signal().await;
    warn!("{second} received again: exiting now");
    exit(exit_code::FAILURE);
}

#[cfg(unix)]
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(err) => {
            error!("cannot watch SIGTERM ({err}); only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn next_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

fn print_tools(args: &ToolsArgs) -> i32 {
    init_logging("warn");
    let toolbox = match open_toolbox(&args.roots, &args.tools) {
        Ok(toolbox) => toolbox,
        Err(code) => return code,
    };
    match serde_json::to_string_pretty(&toolbox.descriptors()) {
        Ok(json) => {
            println!("{json}");
            exit_code::OK
        }
        Err(err) => {
            eprintln!("host-agent: cannot print the descriptors: {err}");
            exit_code::FAILURE
        }
    }
}

/// Runs one tool as the server would send it. With `--apply`, a mutation is planned first and
/// then applied at once with that plan's preconditions.
fn call_tool(args: &CallArgs) -> i32 {
    init_logging("warn");
    let input: serde_json::Value = match serde_json::from_str(&args.input) {
        Ok(input) => input,
        Err(err) => return usage_error(&format!("the input is not JSON: {err}")),
    };
    let toolbox = match open_toolbox_with(&args.roots, &args.policy, &args.tools) {
        Ok(toolbox) => toolbox,
        Err(code) => return code,
    };
    let plan = HostCall {
        call_id: format!("local-{}", uuid::Uuid::new_v4()),
        tool: args.tool.clone(),
        input,
        mode: None,
        preconditions: None,
        deadline: None,
        traceparent: None,
    };
    let mut result = toolbox.run(&plan);
    if args.apply && result.ok && result.is_proposal() {
        let preconditions = result.result.as_ref().and_then(|proposal| proposal.get("preconditions")).cloned();
        let apply = HostCall { mode: Some(CallMode::Apply), preconditions, ..plan };
        result = toolbox.run(&apply);
    }
    match serde_json::to_string_pretty(&result) {
        Ok(json) => println!("{json}"),
        Err(err) => {
            eprintln!("host-agent: cannot print the result: {err}");
            return exit_code::FAILURE;
        }
    }
    if result.ok {
        exit_code::OK
    } else {
        exit_code::FAILURE
    }
}
