//! Asking before approve and revoke: whether to ask at all ([`confirmation`]: `--yes` skips,
//! a terminal is asked, anything else is refused so a script never hangs on a question), what
//! counts as a yes ([`is_yes`]), and the one blocking read of the answer ([`ask`]).
//!
//! Not here: what is being confirmed (the commands show it first) nor what happens next.

use std::io::{BufRead, Write};

use super::exit::CliError;

/// How a command gets its go-ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// `--yes`: go ahead without asking.
    Given,
    /// Ask on the terminal.
    Ask,
}

/// Decides before any request is sent: `--yes` needs no question; without it the question
/// needs a terminal on stdin, else it is a usage error that names `--yes`.
pub fn confirmation(yes: bool, stdin_is_terminal: bool, action: &str) -> Result<Confirmation, CliError> {
    match (yes, stdin_is_terminal) {
        (true, _) => Ok(Confirmation::Given),
        (false, true) => Ok(Confirmation::Ask),
        (false, false) => Err(CliError::Usage(format!(
            "stdin is not a terminal, so there is nobody to ask; pass --yes to {action} without asking"
        ))),
    }
}

/// `y` or `yes`, in any case and with surrounding blanks; anything else (including nothing) is
/// a no.
pub fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// Prints `question [y/N] ` on stderr and reads one line from stdin; end of input is a no.
pub async fn ask(question: &str) -> bool {
    let question = format!("{question} [y/N] ");
    tokio::task::spawn_blocking(move || {
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(question.as_bytes());
        let _ = stderr.flush();
        let mut answer = String::new();
        match std::io::stdin().lock().read_line(&mut answer) {
            Ok(0) | Err(_) => false,
            Ok(_) => is_yes(&answer),
        }
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_to_ask() {
        assert_eq!(confirmation(true, true, "apply"), Ok(Confirmation::Given));
        assert_eq!(confirmation(true, false, "apply"), Ok(Confirmation::Given));
        assert_eq!(confirmation(false, true, "apply"), Ok(Confirmation::Ask));
        let refused = confirmation(false, false, "revoke").unwrap_err();
        assert_eq!(refused.exit_code(), crate::cli::ExitCode::Usage);
        assert!(refused.to_string().contains("pass --yes to revoke"), "{refused}");
    }

    #[test]
    fn answers() {
        for yes in ["y", "Y", "yes", "YES", " y \n", "Yes\r\n"] {
            assert!(is_yes(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "N", "yep", "y y", "ja", "1"] {
            assert!(!is_yes(no), "{no:?}");
        }
    }
}
