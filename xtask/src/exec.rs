//! Running external commands: the one `exec` helper every task uses, which prints the command
//! line before running it and, when it fails, returns an error naming the command and its exit
//! status, so a failing CI log says what to re-run by hand.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Prints `cmd`, runs it with inherited stdio and fails unless it exits with status 0.
pub fn exec(cmd: &mut Command) -> Result<()> {
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

/// Installs the cargo subcommand `cargo <subcommand>` (crate `package` at `version`, with its
/// lock file) unless it already runs.
pub fn ensure_cargo_tool(subcommand: &str, package: &str, version: &str) -> Result<()> {
    let installed = Command::new("cargo")
        .args([subcommand, "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    exec(Command::new("cargo").args(["install", package, "--locked", "--version", version]))
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
}
