//! The fuzz phase of `cargo xtask test`: a short run of every cargo-fuzz target in `fuzz/`
//! (the parsers of untrusted input: Host/redirect, configuration, certificates). A crash
//! fails the phase and leaves its input under `fuzz/artifacts/`.
//!
//! cargo-fuzz wants nightly flags; `RUSTC_BOOTSTRAP=1` lets the stable toolchain take them.

use std::process::Command;

use anyhow::Result;

use crate::{exec::exec, workspace};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Every target of `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["host_redirect", "config", "certificate"];

/// Runs each target for `seconds`.
pub fn run(seconds: u32) -> Result<()> {
    crate::exec::ensure_cargo_tool("fuzz", "cargo-fuzz", CARGO_FUZZ_VERSION)?;
    let fuzz_dir = workspace::root().join("fuzz");
    for target in TARGETS {
        exec(
            Command::new("cargo")
                .current_dir(&fuzz_dir)
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", "--release", target, "--"])
                .arg(format!("-max_total_time={seconds}")),
        )?;
    }
    Ok(())
}
