//! The NSS certificate databases Firefox and Chromium keep under the user's home directory,
//! changed with `certutil` (Debian's libnss3-tools, Fedora's nss-tools).

use std::path::{Path, PathBuf};

use super::{TrustError, tool};

/// Trust flags for an anchor: a CA for TLS servers, nothing else (`-t C,,`).
pub(super) const TRUST_FLAGS: &str = "C,,";

/// The databases (directories holding `cert9.db`) under `home`: Chromium's shared one and
/// each Firefox profile's, the snap packages' included.
pub(super) fn databases(home: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = [".pki/nssdb", "snap/chromium/current/.pki/nssdb"]
        .iter()
        .map(|dir| home.join(dir))
        .collect();
    for profiles in [".mozilla/firefox", "snap/firefox/common/.mozilla/firefox"] {
        if let Ok(entries) = std::fs::read_dir(home.join(profiles)) {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
            dirs.sort();
            found.extend(dirs);
        }
    }
    // Only the SQLite format: the old cert8.db went with Firefox 58 and Chromium 61.
    found.retain(|dir| dir.join("cert9.db").is_file());
    found
}

/// `certutil`, found on `PATH`.
#[derive(Debug, Clone)]
pub(super) struct Certutil(PathBuf);

impl Certutil {
    pub(super) fn find() -> Option<Self> {
        tool::find("certutil").map(Certutil)
    }

    /// Whether the database in `dir` holds a certificate called `nickname`.
    pub(super) fn has(&self, dir: &Path, nickname: &str) -> Result<bool, TrustError> {
        let db = sql(dir);
        let output = tool::run(&self.0, &["-L", "-d", &db, "-n", nickname], None)?;
        Ok(output.status.success())
    }

    /// Adds the DER certificate `der` as `nickname`, trusted to identify TLS servers.
    pub(super) fn add(&self, dir: &Path, nickname: &str, der: &[u8]) -> Result<(), TrustError> {
        let db = sql(dir);
        // Without -i, certutil reads the certificate from stdin.
        tool::run_ok(
            &self.0,
            &["-A", "-d", &db, "-n", nickname, "-t", TRUST_FLAGS],
            Some(der),
        )
    }

    /// Deletes `nickname`.
    pub(super) fn remove(&self, dir: &Path, nickname: &str) -> Result<(), TrustError> {
        let db = sql(dir);
        tool::run_ok(&self.0, &["-D", "-d", &db, "-n", nickname], None)
    }
}

/// certutil's name for the SQLite database in `dir`.
fn sql(dir: &Path) -> String {
    format!("sql:{}", dir.display())
}
