//! Python tools the tests use, from PyPI (reachable wherever the tests run): installed with
//! pip when a module cannot be imported.

use std::process::{Command, Stdio};

use anyhow::Result;

use crate::exec::exec;

/// (module to import, PyPI package): the tests that need them say why.
pub(crate) const PACKAGES: &[(&str, &str)] = &[
    ("sslyze", "sslyze"), // the TLS posture gate against Mozilla's intermediate profile
];

/// Installs every package whose module does not import.
pub(crate) fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(module, _)| !imports(module))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        println!(
            "Python packages present: {}",
            PACKAGES
                .iter()
                .map(|(_, p)| *p)
                .collect::<Vec<_>>()
                .join(" ")
        );
        return Ok(());
    }
    exec(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )
}

fn imports(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
