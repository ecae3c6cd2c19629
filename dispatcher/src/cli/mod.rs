//! The operator CLI: `dispatcher pair | devices | call | proposals | approve | reject | revoke |
//! calls`,
//! one-shot HTTP clients of the control API of any replica (CONTRACT.md, "The operator CLI").
//!
//! This door translates a command line into control-API requests and their answers into text
//! (or the API's own JSON with `--json`) and an exit code. It decides nothing the server
//! decides: owner scoping, what a call does, whether a proposal may be applied, all stay with
//! the API; the CLI only names devices (id or unique name), asks before approve and revoke,
//! and words the answers.
//!
//! Layout:
//! - [`args`]: the subcommands and their flags (clap derive, `env =` on the shared ones).
//! - [`exit`]: [`CliError`], the one error of every command, and which exit code each answer
//!   of the API means (pure).
//! - [`resolve`]: a device argument to an id, from the user's device list (pure).
//! - [`prompt`]: whether to ask before approve and revoke, and the question itself.
//! - [`render`]: the API's JSON to text: tables, file contents, diffs, relative times (pure).
//! - [`api`]: the thin HTTP client (reqwest over rustls), following list cursors.
//! - [`commands`]: one async function per subcommand, gluing the above.

pub mod api;
pub mod args;
pub mod commands;
pub mod exit;
pub mod prompt;
pub mod render;
pub mod resolve;

use std::io::Write;

pub use args::{OperatorCommand, ServerArgs};
pub use exit::{CliError, ExitCode};

/// Runs one operator command to its end: prints its output, and on failure `error: …` on
/// stderr. Returns the process exit code (CONTRACT.md: 0 done, 1 the tool failed, 2 usage,
/// 3 device offline, 4 device timed out, 5 the server refused, 6 the server unreachable).
pub async fn run(command: OperatorCommand) -> i32 {
    let outcome = commands::run(command).await;
    let _ = std::io::stdout().flush();
    let code = match outcome {
        Ok(()) => ExitCode::Done,
        Err(error) => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {}", render::printable(&error.to_string()));
            let _ = stderr.flush();
            error.exit_code()
        }
    };
    code.into()
}
