//! Finding the trust stores' tools on `PATH` and running them, with what they said when
//! they fail.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::TrustError;

/// The first file named `program` in a directory of `PATH`.
pub(super) fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs `program ARGS`, feeding it `stdin`; its exit status and output, or an error naming
/// the command when it could not be started.
pub(super) fn run(
    program: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<std::process::Output, TrustError> {
    let shown = shown(program, args);
    let start_failed = |source| TrustError::Start {
        command: shown.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(start_failed)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits without reading says why on stderr; that error is the one to show.
        let _ = pipe.write_all(input);
    }
    child.wait_with_output().map_err(start_failed)
}

/// Runs `program ARGS` and fails, with its output, unless it exits 0.
pub(super) fn run_ok(
    program: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<(), TrustError> {
    let output = run(program, args, stdin)?;
    if output.status.success() {
        return Ok(());
    }
    let said = [&output.stderr, &output.stdout]
        .iter()
        .map(|bytes| String::from_utf8_lossy(bytes).trim().to_owned())
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(TrustError::Failed {
        command: shown(program, args),
        status: output.status.to_string(),
        output: said,
    })
}

/// The command line as a user would type it.
fn shown(program: &Path, args: &[&str]) -> String {
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    std::iter::once(name.as_str())
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}
