//! Child processes held by a guard: started with their output in a log file, polled until
//! ready, signalled, and stopped when the guard is dropped (at once with SIGKILL, or with
//! SIGTERM first and a grace period). A guard dropped while its thread panics prints the end of
//! the log, which usually says why.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::{display, pid_of};
use crate::usage;

/// How often [`poll_until`] (and so every wait here) looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How much of the log a panicking guard prints.
const LOG_TAIL_BYTES: usize = 6000;
/// How many lines of the log an [`ProcessError::Exited`] carries.
const EXIT_TAIL_LINES: usize = 5;

/// A guarded process did not do what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be created.
    #[error("creating {}: {source}", path.display())]
    Log { path: PathBuf, source: io::Error },
    /// The program could not be started.
    #[error("failed to start `{line}`: {source}")]
    Start { line: String, source: io::Error },
    /// Its state could not be read.
    #[error("waiting for {label}: {source}")]
    Wait { label: String, source: io::Error },
    /// A signal could not be delivered.
    #[error("sending {signal} to {label}: {source}")]
    Signal {
        label: String,
        signal: Signal,
        source: Errno,
    },
    /// It exited while it should be running; `tail` is the end of its log.
    #[error("{label} exited: {status}\n{tail}")]
    Exited {
        label: String,
        status: ExitStatus,
        tail: String,
    },
    /// It did not become ready in time.
    #[error("{label} not ready after {timeout:?}")]
    NotReady { label: String, timeout: Duration },
}

/// A child process that is stopped when this guard is dropped.
#[derive(Debug)]
pub struct Process {
    label: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
    /// SIGTERM first and this long to exit, else SIGKILL at once.
    grace: Option<Duration>,
}

impl Process {
    /// Starts `cmd` with stdin closed and its stdout and stderr written to `log`. `label` names
    /// it in messages ("proxy", "nginx").
    pub fn spawn(label: &str, cmd: &mut Command, log: &Path) -> Result<Process, ProcessError> {
        let file = File::create(log).map_err(|source| ProcessError::Log {
            path: log.to_owned(),
            source,
        })?;
        let stdout = file.try_clone().map_err(|source| ProcessError::Log {
            path: log.to_owned(),
            source,
        })?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .map_err(|source| ProcessError::Start {
                line: display(cmd),
                source,
            })?;
        Ok(Process {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
            exit: None,
            grace: None,
        })
    }

    /// When dropped, asks the process to stop with SIGTERM and kills it only if it is still
    /// there after `grace` (a server that drains, or a master that stops its workers).
    pub fn stop_with_sigterm(mut self, grace: Duration) -> Process {
        self.grace = Some(grace);
        self
    }

    /// What the process is, as messages name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The process id (`nsenter`, `setpriv` and `taskset` exec, so this is the program's).
    pub fn pid(&self) -> Pid {
        pid_of(&self.child)
    }

    /// The process and its children (an nginx master and its workers).
    pub fn pids(&self) -> Vec<Pid> {
        let mut pids = vec![self.pid()];
        pids.extend(usage::children(self.pid()));
        pids
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        kill(self.pid(), signal).map_err(|source| ProcessError::Signal {
            label: self.label.clone(),
            signal,
            source,
        })
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, once it has exited.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(|source| ProcessError::Wait {
                label: self.label.clone(),
                source,
            })?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        poll_until(timeout, || self.try_exit().transpose()).transpose()
    }

    /// Fails, with the end of its log, when the process has exited.
    pub fn check_running(&mut self) -> Result<(), ProcessError> {
        match self.try_exit()? {
            None => Ok(()),
            Some(status) => Err(ProcessError::Exited {
                label: self.label.clone(),
                status,
                tail: last_lines(&self.log(), EXIT_TAIL_LINES),
            }),
        }
    }

    /// Polls `ready` until it holds; fails when the process exits first or `timeout` passes.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), ProcessError> {
        poll_until(timeout, || match self.check_running() {
            Err(e) => Some(Err(e)),
            Ok(()) => ready().then_some(Ok(())),
        })
        .unwrap_or_else(|| {
            Err(ProcessError::NotReady {
                label: self.label.clone(),
                timeout,
            })
        })
    }

    /// Stops the process as [`Process::stop_with_sigterm`] asked, and reaps it.
    fn stop(&mut self) {
        if let Some(grace) = self.grace {
            let _ = kill(self.pid(), Signal::SIGTERM);
            if poll_until(grace, || self.child.try_wait().ok().flatten()).is_some() {
                return;
            }
            eprintln!(
                "warning: {} did not stop on SIGTERM; killing it",
                self.label
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.try_exit(), Ok(None)) {
            self.stop();
        }
        if thread::panicking() {
            let log = self.log();
            eprintln!(
                "----- {} output (last {LOG_TAIL_BYTES} bytes) -----\n{}\n-----",
                self.label,
                last_bytes(&log, LOG_TAIL_BYTES)
            );
        }
    }
}

/// Calls `check` every 50 ms until it returns `Some`, or gives up (`None`) once `timeout` has
/// passed. `check` runs at least once.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` bytes of `text` or a little less, starting on a character boundary.
fn last_bytes(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_logs() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_bytes("héllo", 4), "llo");
        assert_eq!(last_bytes("héllo", 5), "éllo");
        assert_eq!(last_bytes("ok", 10), "ok");
    }

    #[test]
    fn polls_until_a_value_or_the_deadline() {
        let mut calls = 0;
        let found = poll_until(Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(found, Some(3));
        let started = Instant::now();
        assert_eq!(poll_until(Duration::from_millis(120), || None::<()>), None);
        assert!(started.elapsed() >= Duration::from_millis(120));
    }

    #[test]
    fn guards_a_process() {
        let dir = crate::TempDir::new("proxy-testkit-process-").expect("a temporary directory");
        let log = dir.path().join("sh.log");
        let mut sh = Process::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo started; sleep 30"]),
            &log,
        )
        .expect("sh starts");
        sh.wait_ready(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|text| text.contains("started"))
        })
        .expect("sh says it started");
        sh.check_running().expect("sh sleeps");
        sh.signal(Signal::SIGTERM).expect("sh can be signalled");
        let status = sh.wait_exit(Duration::from_secs(5)).expect("sh exits");
        assert!(status.is_some_and(|s| !s.success()), "{status:?}");
        let err = sh.check_running().expect_err("sh is gone");
        assert!(err.to_string().starts_with("sh exited: "), "{err}");
        assert!(err.to_string().ends_with("\nstarted"), "{err}");

        let mut quick = Process::spawn("true", &mut Command::new("true"), &log).expect("starts");
        let err = quick
            .wait_ready(Duration::from_secs(5), || false)
            .expect_err("true exits");
        assert!(matches!(err, ProcessError::Exited { .. }), "{err}");
    }
}
