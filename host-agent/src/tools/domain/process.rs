//! Running one declared command: never through a shell, with a small fixed environment, in its
//! own process group, bounded in time and in output.
//!
//! Owns: the child's setup (argv as given, one element per argument; the environment cleared to
//! [`SAFE_ENV`] with a fixed `PATH`; the first root as working directory; stdin from the null
//! device; stdout and stderr piped), reading both streams at once (each kept up to the cap and
//! drained past it, so a chatty program never blocks on a full pipe), and the end of the group:
//! when the program exits, times out or the call's deadline passes, the whole process group is
//! SIGKILLed before the leader is reaped, so no descendant is left behind and the group id
//! cannot be reused in between. A descendant that leaves the group on purpose (`setsid`) is out
//! of reach, as with any process supervisor that is not a container.
//!
//! Elsewhere than Unix the program itself is killed at the timeout (there is no process group).
//!
//! Does not: decide the arguments (`super`), or judge the exit status.

use std::ffi::OsString;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::tools::Deadline;

/// The variables a command inherits from the agent (when set); everything else is cleared.
#[cfg(unix)]
pub const SAFE_ENV: &[&str] = &["HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"];
#[cfg(windows)]
pub const SAFE_ENV: &[&str] =
    &["SystemRoot", "SystemDrive", "windir", "TEMP", "TMP", "USERPROFILE", "PATHEXT", "LANG", "TZ"];
#[cfg(not(any(unix, windows)))]
pub const SAFE_ENV: &[&str] = &["HOME", "LANG", "TZ"];

/// The `PATH` a command runs with (its own program is absolute; this is for what it starts).
#[cfg(unix)]
pub const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How long the streams may stay open after the group was killed (a descendant that left the
/// group may hold them): then what was read is what is returned.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What the program wrote on one stream, up to the cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub bytes: Vec<u8>,
    /// More was written than the cap.
    pub truncated: bool,
}

/// How a run ended.
#[derive(Debug)]
pub enum Ended {
    Exited(ExitStatus),
    /// The tool's own timeout passed: the group was killed.
    TimedOut,
    /// The call's deadline passed: the group was killed.
    DeadlineExceeded,
}

/// What a run produced.
#[derive(Debug)]
pub struct Run {
    pub ended: Ended,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// Runs `program` with `args` in `cwd` until it exits, `timeout` passes or `deadline` does.
/// An error only when the program cannot be started.
pub fn run(
    program: &Path,
    args: &[OsString],
    cwd: &Path,
    timeout: Duration,
    deadline: Deadline,
    max_output: usize,
) -> io::Result<Run> {
    let mut command = Command::new(program);
    command.args(args).current_dir(cwd).env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for name in SAFE_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.env("PATH", SAFE_PATH).process_group(0);
    }
    #[cfg(windows)]
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    let mut child = command.spawn()?;
    let (sender, receiver) = mpsc::channel();
    let readers = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for (index, stream) in readers.into_iter().enumerate() {
        let sender = sender.clone();
        if let Some(stream) = stream {
            std::thread::spawn(move || {
                let _ = sender.send((index, capture(stream, max_output)));
            });
        } else {
            let _ = sender.send((index, Captured::default()));
        }
    }
    drop(sender);

    let ended = supervise(&mut child, Instant::now() + timeout, deadline);
    let mut streams = [Captured::default(), Captured::default()];
    let drained_by = Instant::now() + DRAIN_GRACE;
    for _ in 0..2 {
        match receiver.recv_timeout(drained_by.saturating_duration_since(Instant::now())) {
            Ok((index, captured)) => streams[index] = captured,
            Err(_) => {
                // A stream still open: what it held so far is lost with its reader; say so.
                for stream in &mut streams {
                    stream.truncated = true;
                }
                break;
            }
        }
    }
    let [stdout, stderr] = streams;
    Ok(Run { ended, stdout, stderr })
}

/// Reads a stream to its end, keeping at most `cap` bytes.
fn capture(mut stream: impl Read, cap: usize) -> Captured {
    let mut captured = Captured::default();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                let room = cap.saturating_sub(captured.bytes.len());
                captured.bytes.extend_from_slice(&buffer[..read.min(room)]);
                if read > room {
                    captured.truncated = true;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    captured
}

/// Waits for the program, kills its group when it exits or time is up, reaps it.
fn supervise(child: &mut Child, timeout_at: Instant, deadline: Deadline) -> Ended {
    let mut pause = Duration::from_millis(1);
    let ended = loop {
        match exited(child) {
            Ok(Some(())) | Err(_) => break None,
            Ok(None) => {}
        }
        if deadline.check().is_err() {
            break Some(Ended::DeadlineExceeded);
        }
        if Instant::now() >= timeout_at {
            break Some(Ended::TimedOut);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    kill_group(child);
    let status = child.wait();
    match (ended, status) {
        (Some(ended), _) => ended,
        (None, Ok(status)) => Ended::Exited(status),
        // Reaped elsewhere or unwaitable: treat as killed at the timeout, the safe reading.
        (None, Err(_)) => Ended::TimedOut,
    }
}

/// `Some(())` once the program has exited, without reaping it (Unix: its pid, and so its group
/// id, stay taken until [`kill_group`] is done).
#[cfg(unix)]
fn exited(child: &Child) -> io::Result<Option<()>> {
    use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
    let pid = Pid::from_child(child);
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    Ok(waitid(WaitId::Pid(pid), options)?.map(|_| ()))
}

#[cfg(not(unix))]
fn exited(child: &mut Child) -> io::Result<Option<()>> {
    Ok(child.try_wait()?.map(|_| ()))
}

/// SIGKILLs the program's whole process group (the program leads it); gone already is fine.
#[cfg(unix)]
fn kill_group(child: &mut Child) {
    use rustix::process::{kill_process_group, Pid, Signal};
    let _ = kill_process_group(Pid::from_child(child), Signal::KILL);
}

#[cfg(not(unix))]
fn kill_group(child: &mut Child) {
    let _ = child.kill();
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration, cap: usize) -> Run {
        let args = [OsString::from("-c"), OsString::from(script)];
        run(Path::new("/bin/sh"), &args, Path::new("/"), timeout, Deadline::NONE, cap).expect("starts")
    }

    #[test]
    fn output_is_captured_and_capped_per_stream() {
        let run = sh("printf hello; printf oops >&2; exit 3", Duration::from_secs(10), 1024);
        assert!(matches!(run.ended, Ended::Exited(status) if status.code() == Some(3)));
        assert_eq!(run.stdout, Captured { bytes: b"hello".to_vec(), truncated: false });
        assert_eq!(run.stderr.bytes, b"oops");
        let run = sh("head -c 300000 /dev/zero; echo done >&2", Duration::from_secs(10), 1000);
        assert!(matches!(run.ended, Ended::Exited(status) if status.success()), "{:?}", run.ended);
        assert_eq!(run.stdout.bytes.len(), 1000);
        assert!(run.stdout.truncated);
        assert_eq!(run.stderr, Captured { bytes: b"done\n".to_vec(), truncated: false });
    }

    #[test]
    fn the_environment_is_small() {
        let run = sh("env", Duration::from_secs(10), 1 << 16);
        let env = String::from_utf8_lossy(&run.stdout.bytes).into_owned();
        for line in env.lines() {
            let name = line.split('=').next().unwrap_or_default();
            assert!(SAFE_ENV.contains(&name) || ["PATH", "PWD", "SHLVL", "_"].contains(&name), "{line}");
        }
        assert!(env.contains(&format!("PATH={SAFE_PATH}")), "{env}");
    }

    /// The processes of group `group` still running (zombies are dead already).
    fn running_in_group(group: u32) -> Vec<u32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let Some((_, rest)) = stat.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(group) {
                found.push(pid);
            }
        }
        found
    }

    fn group_of(run: &Run) -> u32 {
        let text = String::from_utf8_lossy(&run.stdout.bytes).into_owned();
        text.lines().next().and_then(|line| line.trim().parse().ok()).expect("the group id on the first line")
    }

    fn assert_group_gone(group: u32) {
        let started = Instant::now();
        while !running_in_group(group).is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "left running: {:?}", running_in_group(group));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_timeout_kills_the_whole_group() {
        let started = Instant::now();
        let run = sh("echo $$; sleep 30 & sleep 30 & wait", Duration::from_millis(300), 1024);
        assert!(matches!(run.ended, Ended::TimedOut), "{:?}", run.ended);
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(!run.stdout.truncated, "both streams closed when the group died");
        assert_group_gone(group_of(&run));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn what_an_exited_program_left_running_is_killed() {
        let run = sh("echo $$; sleep 30 & exit 0", Duration::from_secs(20), 1024);
        assert!(matches!(run.ended, Ended::Exited(status) if status.success()), "{:?}", run.ended);
        assert_group_gone(group_of(&run));
    }

    #[test]
    fn a_past_deadline_stops_the_program() {
        let past = Deadline::from_wall(Some(chrono::Utc::now()), chrono::Utc::now(), Instant::now());
        let args = [OsString::from("30")];
        let run = run(Path::new("/bin/sleep"), &args, Path::new("/"), Duration::from_secs(60), past, 10).expect("run");
        assert!(matches!(run.ended, Ended::DeadlineExceeded), "{:?}", run.ended);
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let error = run(Path::new("/nonexistent/x"), &[], Path::new("/"), Duration::from_secs(1), Deadline::NONE, 10);
        assert!(error.is_err());
    }
}
