//! The supply-chain phases of `cargo xtask test`: `cargo deny` checks licences, bans, sources
//! and known advisories of every dependency, offline, and `cargo machete` finds dependencies
//! no crate uses. Advisories come from the offline RustSec snapshot the build machines keep
//! beside the checkout ([`ADVISORY_SNAPSHOT`]), laid out as the git checkout cargo-deny reads
//! (`deny.toml` points `db-path` at `target/advisory-db`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{exec::exec, workspace};

const CARGO_DENY_VERSION: &str = "0.20.2";
const CARGO_MACHETE_VERSION: &str = "0.9.2";
/// The RustSec snapshot, relative to the workspace root.
const ADVISORY_SNAPSHOT: &str = "../shared/advisory-db";
/// The directory name cargo-deny derives from the RustSec database URL.
const DB_DIR: &str = "advisory-db-3157b0e258782691";

/// Installs cargo-deny if needed, prepares the advisory snapshot, and runs every check.
pub(crate) fn check() -> Result<()> {
    crate::exec::ensure_cargo_tool("deny", "cargo-deny", CARGO_DENY_VERSION)?;
    prepare_advisory_db()?;
    // Every platform's crates must be present for `cargo metadata` before going offline.
    exec(workspace::cargo().args(["fetch", "--locked"]))?;
    exec(workspace::cargo().args(["deny", "--offline", "check"]))
}

/// Fails on a dependency no crate uses: cargo-machete reads every manifest below the root (the
/// fuzz and kernel-program workspaces too) and looks for each dependency in the sources.
pub(crate) fn unused_dependencies() -> Result<()> {
    crate::exec::ensure_cargo_tool("machete", "cargo-machete", CARGO_MACHETE_VERSION)?;
    exec(
        Command::new("cargo")
            .current_dir(workspace::root())
            .arg("machete")
            // cargo-machete takes a set CARGO_PKG_NAME (which `cargo run` gives xtask) for a
            // sign that it runs outside cargo, and then reads "machete" as a directory.
            .env_remove("CARGO_PKG_NAME"),
    )
}

/// Copies the snapshot into `target/advisory-db/<DB_DIR>` as a one-commit git repository
/// dated like the snapshot (cargo-deny reads the database's age from its HEAD commit).
fn prepare_advisory_db() -> Result<()> {
    let root = workspace::root();
    let snapshot = root.join(ADVISORY_SNAPSHOT);
    if !snapshot.join("crates").is_dir() {
        bail!(
            "the RustSec snapshot {} is missing: advisories cannot be checked offline",
            snapshot.display()
        );
    }
    let db = root.join("target/advisory-db").join(DB_DIR);
    if db.join(".git").is_dir() {
        return Ok(());
    }
    if db.exists() {
        std::fs::remove_dir_all(&db).with_context(|| format!("removing {}", db.display()))?;
    }
    // Written anew, so writable: git rewrites its copy, and the snapshot is read-only.
    proxy_testkit::tree::copy_tree(&snapshot, &db, &|_, bytes| bytes)
        .with_context(|| format!("copying {} to {}", snapshot.display(), db.display()))?;
    let date = snapshot_date(&root).unwrap_or_else(|| "2026-08-21T00:00:00Z".to_owned());
    let git = |args: &[&str]| -> Result<()> {
        exec(
            Command::new("git")
                .current_dir(&db)
                .args(args)
                .env("GIT_AUTHOR_NAME", "rustsec snapshot")
                .env("GIT_AUTHOR_EMAIL", "snapshot@localhost")
                .env("GIT_COMMITTER_NAME", "rustsec snapshot")
                .env("GIT_COMMITTER_EMAIL", "snapshot@localhost")
                .env("GIT_AUTHOR_DATE", &date)
                .env("GIT_COMMITTER_DATE", &date),
        )
    };
    git(&["init", "--quiet"])?;
    git(&["add", "--all"])?;
    git(&[
        "commit",
        "--quiet",
        "--no-gpg-sign",
        "--message",
        "RustSec advisory-db snapshot",
    ])
}

/// The snapshot's date from the note beside it, `<snapshot>.SNAPSHOT.txt` ("..., 2026-08-21)").
fn snapshot_date(root: &Path) -> Option<String> {
    let text =
        std::fs::read_to_string(root.join(format!("{ADVISORY_SNAPSHOT}.SNAPSHOT.txt"))).ok()?;
    let date = text
        .split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .find(|word| {
            word.len() == 10 && word.as_bytes()[4] == b'-' && word.as_bytes()[7] == b'-'
        })?;
    Some(format!("{date}T00:00:00Z"))
}
