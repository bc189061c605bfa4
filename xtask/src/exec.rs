//! Running external commands: the one `exec` helper every task uses, which prints the command
//! line before running it and, when it fails, returns an error naming the command and its exit
//! status, so a failing CI log says what to re-run by hand; and [`tee`], for the tasks that
//! also read what a command printed.

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context as _, Result, bail};

pub(crate) use proxy_testkit::command::display;

/// Prints `cmd`, runs it with inherited stdio and fails unless it exits with status 0.
pub(crate) fn exec(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(())
}

/// What a command printed, line by line.
pub(crate) struct Teed {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: Vec<String>,
    pub(crate) stderr: Vec<String>,
}

/// Runs `cmd` as [`exec`] does (printing it first), passing its output through as it comes and
/// keeping it. Fails only when the command cannot start: its status is the caller's to judge.
pub(crate) fn tee(cmd: &mut Command) -> Result<Teed> {
    let line = display(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let stdout = std::thread::spawn(move || pass_through(stdout, |l| println!("{l}")));
    let stderr = std::thread::spawn(move || pass_through(stderr, |l| eprintln!("{l}")));
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    Ok(Teed {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Installs the cargo subcommand `cargo <subcommand>` (crate `package` at `version`, with its
/// lock file) unless it already runs.
pub(crate) fn ensure_cargo_tool(subcommand: &str, package: &str, version: &str) -> Result<()> {
    let installed = Command::new("cargo")
        .args([subcommand, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    exec(Command::new("cargo").args(["install", package, "--locked", "--version", version]))
}

/// Reads `pipe` to its end (lossily as UTF-8), printing and keeping every line.
fn pass_through(pipe: impl Read, print: impl Fn(&str)) -> Vec<String> {
    BufReader::new(pipe)
        .split(b'\n')
        .map_while(std::io::Result::ok)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .inspect(|line| print(line))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_its_status() {
        let err = exec(Command::new("sh").args(["-c", "exit 3"])).expect_err("exit 3 is a failure");
        assert_eq!(
            format!("{err:#}"),
            "`sh -c 'exit 3'` failed: exit status: 3"
        );
        let err = exec(&mut Command::new("/nonexistent/program")).expect_err("no such program");
        assert!(
            format!("{err:#}").starts_with("failed to start `/nonexistent/program`"),
            "{err:#}"
        );
    }

    #[test]
    fn tee_keeps_both_streams() {
        let teed = tee(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 2"]))
            .expect("sh starts");
        assert_eq!(teed.stdout, ["out"]);
        assert_eq!(teed.stderr, ["err"]);
        assert_eq!(teed.status.code(), Some(2));
    }
}
