//! The fuzz phase of `cargo xtask test` (and `soak`): a run of every cargo-fuzz target in `fuzz/`
//! (the parsers of untrusted input: Host/redirect, configuration, certificates). A crash
//! fails the phase and leaves its input under `fuzz/artifacts/`.
//!
//! cargo-fuzz wants nightly flags; `RUSTC_BOOTSTRAP=1` lets the stable toolchain take them.

use std::process::Command;

use anyhow::Result;

use crate::{exec::exec, workspace};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Every target of `fuzz/Cargo.toml`.
pub(crate) const TARGETS: &[&str] = &["host_redirect", "config", "certificate"];

/// Runs each target for `seconds`.
pub(crate) fn run(seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    for target in TARGETS {
        exec(&mut command(target, seconds))?;
    }
    Ok(())
}

/// Installs cargo-fuzz unless it runs.
pub(crate) fn ensure_cargo_fuzz() -> Result<()> {
    crate::exec::ensure_cargo_tool("fuzz", "cargo-fuzz", CARGO_FUZZ_VERSION)
}

/// The command that fuzzes `target` for `seconds`; libFuzzer ends its output with
/// `Done N runs in S second(s)`.
pub(crate) fn command(target: &str, seconds: u32) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace::root().join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "--release", target, "--"])
        .arg(format!("-max_total_time={seconds}"));
    cmd
}
