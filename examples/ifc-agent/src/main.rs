//! `ifc-agent`: an app's own device binary, built on the `host-agent` library. It serves the 16
//! built-in tools plus one domain tool written in Rust, [`inventory::IfcInventory`]
//! (`ifc_inventory`). `ifc-agent run` takes the same flags and environment as `host-agent run`
//! (`--server`, `--root`, `--code`, `--tools-file`, ...), with the same exit codes.
//!
//! The whole composition is the original's `runHost({ tools: [...builtinTools, convertIfc] })`:
//!
//! ```text
//! let toolbox = Toolbox::new(&roots)?.with_tool(IfcInventory)?;
//! runtime::run(config, Arc::new(toolbox), shutdown).await
//! ```
//!
//! Everything else here is the binary's shell: parse the flags, log to stderr, stop on SIGINT
//! or SIGTERM, map how the run ended to an exit code.

mod inventory;

use std::process::exit;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use host_agent::config::{self, RunArgs};
use host_agent::runtime::{self, exit_code};
use host_agent::tools::Toolbox;
use tokio_util::sync::CancellationToken;

/// An example device agent: the built-in tools plus `ifc_inventory`.
#[derive(Debug, Parser)]
#[command(name = "ifc-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll on first run (--code), then serve the built-ins and ifc_inventory until
    /// SIGINT/SIGTERM. Exit codes as `host-agent run`.
    Run(RunArgs),
}

fn main() {
    let Command::Run(args) = Cli::parse().command;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    exit(run(&args));
}

fn usage(message: impl std::fmt::Display) -> i32 {
    eprintln!("ifc-agent: {message}");
    exit_code::USAGE
}

fn run(args: &RunArgs) -> i32 {
    let agent_config = match args.agent_config(config::home(), config::host_name()) {
        Ok(config) => config,
        Err(message) => return usage(message),
    };
    let roots = match args.roots.resolve(config::home()) {
        Ok(roots) => roots,
        Err(message) => return usage(message),
    };
    // The built-ins, then this app's own tool, then whatever a tools file declares.
    let toolbox = match Toolbox::new(&roots) {
        Ok(toolbox) => toolbox,
        Err(error) => return usage(format!("cannot use the roots: {error}")),
    };
    let mut toolbox = match toolbox.with_tool(inventory::IfcInventory) {
        Ok(toolbox) => toolbox,
        Err(error) => return usage(error),
    };
    if let Some(file) = &args.tools.tools_file {
        toolbox = match toolbox.with_tools_file(file) {
            Ok(toolbox) => toolbox,
            Err(error) => return usage(error),
        };
    }
    let tokio = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(tokio) => tokio,
        Err(error) => {
            eprintln!("ifc-agent: cannot start the async runtime: {error}");
            return exit_code::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let ended = tokio.block_on(async {
        tokio::spawn(stop_on_signal(shutdown.clone()));
        runtime::run(agent_config, Arc::new(toolbox), shutdown).await
    });
    tokio.shutdown_timeout(Duration::from_millis(500));
    match ended {
        Ok(outcome) => outcome.exit_code(),
        Err(error) => {
            eprintln!("ifc-agent: {error}");
            error.exit_code()
        }
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}
