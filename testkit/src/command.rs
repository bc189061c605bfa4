//! Commands run to completion with their output captured: checked (a failure names the command
//! line, its status and what it wrote to stderr) or bounded in time (killed when it overstays).
//! Command lines are shown as a shell would take them, so a failure says what to re-run by hand.

use std::io;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A command that did not run as asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started (missing, not executable).
    #[error("failed to start `{line}`: {source}")]
    Start { line: String, source: io::Error },
    /// Waiting for the program or reading its output failed.
    #[error("waiting for `{line}`: {source}")]
    Wait { line: String, source: io::Error },
    /// It exited unsuccessfully; `stderr` is what it wrote there, trimmed.
    #[error("`{line}` failed: {status}: {stderr}")]
    Failed {
        line: String,
        status: ExitStatus,
        stderr: String,
    },
    /// It ran longer than allowed and was killed.
    #[error("`{line}` did not finish within {timeout:?}")]
    TimedOut { line: String, timeout: Duration },
}

/// Runs `cmd` with stdin closed and returns its standard output; fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String, CommandError> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Start {
            line: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CommandError::Failed {
            line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with stdin closed and its output captured, killing it (SIGKILL) once `timeout`
/// has passed. Its exit status is the caller's to judge.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, CommandError> {
    let line = display(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Start {
            line: line.clone(),
            source,
        })?;
    let pid = pid_of(&child);
    // A thread reads both pipes to the end, so that a chatty command cannot block on a full
    // pipe while this one waits for the deadline.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|source| CommandError::Wait { line, source }),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            Err(CommandError::TimedOut { line, timeout })
        }
    }
}

/// The command as a shell line: the environment it sets, the program and its arguments, each
/// word quoted when the shell would otherwise split or expand it.
pub fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        Some(format!(
            "{}={}",
            key.to_string_lossy(),
            quote(&value.to_string_lossy())
        ))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|word| quote(&word.to_string_lossy()));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// The process id of a child, as the signal functions take it.
pub(crate) fn pid_of(child: &std::process::Child) -> Pid {
    // Linux process ids fit in an i32 (pid_max is at most 2^22).
    Pid::from_raw(child.id() as i32)
}

/// Quotes `word` for a POSIX shell when it holds anything but plainly safe characters.
fn quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cmd: &mut Command, expected: &str) {
        assert_eq!(display(cmd), expected);
    }

    #[test]
    fn displays_commands_as_shell_lines() {
        check(
            Command::new("cargo").args(["fmt", "--all", "--check"]),
            "cargo fmt --all --check",
        );
        check(
            Command::new("cargo")
                .args(["test", "--workspace"])
                .env("PROXY_BIN", "/tmp/t/debug/proxy"),
            "PROXY_BIN=/tmp/t/debug/proxy cargo test --workspace",
        );
        check(
            Command::new("dpkg-query").args(["-W", "-f=${Status}", "curl"]),
            "dpkg-query -W '-f=${Status}' curl",
        );
        check(
            Command::new("echo").args(["it's", ""]),
            r"echo 'it'\''s' ''",
        );
        check(
            Command::new("proxy").args(["--http-listen", "[::]:8080"]),
            "proxy --http-listen '[::]:8080'",
        );
    }

    #[test]
    fn failures_name_the_command() {
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .expect_err("exit 3 is a failure");
        assert_eq!(
            err.to_string(),
            "`sh -c 'echo oops >&2; exit 3'` failed: exit status: 3: oops"
        );
        let err = output(&mut Command::new("/nonexistent/program")).expect_err("no such program");
        assert!(
            err.to_string()
                .starts_with("failed to start `/nonexistent/program`"),
            "{err}"
        );
        let err = output_within(Command::new("sleep").arg("5"), Duration::from_millis(100))
            .expect_err("sleep 5 overstays");
        assert_eq!(err.to_string(), "`sleep 5` did not finish within 100ms");
        let out = output_within(Command::new("echo").arg("hi"), Duration::from_secs(5))
            .expect("echo runs");
        assert_eq!(out.stdout, b"hi\n");
    }
}
