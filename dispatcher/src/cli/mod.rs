//! The operator CLI: `dispatcher pair | devices | call | proposals | approve | reject | revoke`,
//! one-shot HTTP clients of the control API of any replica (CONTRACT.md, "The operator CLI").
//!
//! This door translates a command line into control-API requests and their answers into text
//! (or the API's own JSON with `--json`) and an exit code. It decides nothing the server
//! decides: owner scoping, what a call does, whether a proposal may be applied, all stay with
//! the API; the CLI only names devices (id or unique name), asks before approve and revoke,
//! and words the answers.
//!
//! Layout:
//! - [`exit`]: [`CliError`], the one error of every command, and which exit code each answer
//!   of the API means (pure).
//! - [`resolve`]: a device argument to an id, from the user's device list (pure).
//! - [`prompt`]: whether to ask before approve and revoke, and the question itself.
//! - [`render`]: the API's JSON to text: tables, file contents, diffs, relative times (pure).

pub mod exit;
pub mod prompt;
pub mod render;
pub mod resolve;

pub use exit::{CliError, ExitCode};
