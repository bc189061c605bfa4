//! The system trust store: which one this machine has (its `/etc/os-release` family, or
//! failing that the tool that is installed), and adding or removing one anchor file there.
//!
//! Each family keeps the certificates an administrator adds as files in one directory and
//! rebuilds the bundles every program reads with one tool, so the file is all there is to
//! undo.

use std::path::{Path, PathBuf};

use super::{TrustError, tool};
use crate::tls::state_dir::{self, CERT_MODE};

/// A family of distributions sharing one way of trusting a CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Debian,
    Fedora,
    Arch,
}

impl Family {
    const ALL: [Family; 3] = [Family::Debian, Family::Fedora, Family::Arch];

    /// The `ID`/`ID_LIKE` values of `/etc/os-release` that mean this family.
    fn ids(self) -> &'static [&'static str] {
        match self {
            Family::Debian => &["debian", "ubuntu"],
            Family::Fedora => &["fedora", "rhel", "centos"],
            Family::Arch => &["arch"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::Debian => "Debian",
            Family::Fedora => "Fedora",
            Family::Arch => "Arch",
        }
    }

    /// Where an administrator's CA certificates go.
    fn anchor_dir(self) -> &'static str {
        match self {
            Family::Debian => "/usr/local/share/ca-certificates",
            Family::Fedora => "/etc/pki/ca-trust/source/anchors",
            Family::Arch => "/etc/ca-certificates/trust-source/anchors",
        }
    }

    /// The tool that rebuilds the bundles from the anchors, and its arguments after an
    /// anchor was added, or removed.
    fn refresh(self, removed: bool) -> (&'static str, &'static [&'static str]) {
        match self {
            // A deleted anchor is no removal to Debian's tool unless it starts afresh: without
            // --fresh its links stay in /etc/ssl/certs and its hooks (Java's keystore) keep it.
            Family::Debian if removed => ("update-ca-certificates", &["--fresh"]),
            Family::Debian => ("update-ca-certificates", &[]),
            Family::Fedora => ("update-ca-trust", &["extract"]),
            // What `trust anchor --store` runs after writing its own file; a file of ours
            // keeps the name, and so the undo, exact.
            Family::Arch => ("trust", &["extract-compat"]),
        }
    }

    /// The package that provides the tool.
    fn package(self) -> &'static str {
        match self {
            Family::Debian | Family::Fedora => "ca-certificates",
            Family::Arch => "p11-kit",
        }
    }
}

/// The system trust store found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SystemStore {
    pub(super) family: Family,
    /// The refresh tool, found on `PATH`.
    tool: PathBuf,
}

impl SystemStore {
    /// Finds the store from `/etc/os-release` (or `/usr/lib/os-release`) and `PATH`.
    pub(super) fn find() -> Result<Self, TrustError> {
        let os_release = ["/etc/os-release", "/usr/lib/os-release"]
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok());
        detect(os_release.as_deref(), tool::find)
    }

    /// `Debian (update-ca-certificates)`, for messages.
    pub(super) fn describe(&self) -> String {
        format!("{} ({})", self.family.name(), self.family.refresh(false).0)
    }

    /// The anchor file of the CA called `name`.
    pub(super) fn anchor_path(&self, name: &str) -> PathBuf {
        Path::new(self.family.anchor_dir()).join(format!("{name}.crt"))
    }

    /// Writes `pem` as the anchor `name` and rebuilds the bundles. Returns whether the file
    /// was already there with these contents.
    pub(super) fn add(&self, name: &str, pem: &str) -> Result<bool, TrustError> {
        let path = self.anchor_path(name);
        let already = std::fs::read(&path).is_ok_and(|old| old == pem.as_bytes());
        if !already {
            let dir = Path::new(self.family.anchor_dir());
            std::fs::create_dir_all(dir).map_err(|source| TrustError::Io {
                action: "create",
                path: dir.to_owned(),
                source,
            })?;
            state_dir::write_all_atomic(&[(&path, pem.as_bytes(), CERT_MODE)])?;
        }
        // Even when the file was there: an earlier run may have stopped before the rebuild.
        self.refresh(false)?;
        Ok(already)
    }

    /// Removes the anchor `name` and rebuilds the bundles; `false` when it was not there.
    pub(super) fn remove(&self, name: &str) -> Result<bool, TrustError> {
        let path = self.anchor_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(TrustError::Io {
                    action: "remove",
                    path,
                    source,
                });
            }
        }
        self.refresh(true)?;
        Ok(true)
    }

    fn refresh(&self, removed: bool) -> Result<(), TrustError> {
        tool::run_ok(&self.tool, self.family.refresh(removed).1, None)
    }
}

/// The store for a machine whose os-release says `os_release` and whose `PATH` has what
/// `find` finds: the os-release family when it is one we know (its tool must be there),
/// else the first family whose tool is there.
pub(super) fn detect(
    os_release: Option<&str>,
    find: impl Fn(&str) -> Option<PathBuf>,
) -> Result<SystemStore, TrustError> {
    let fields = os_release.map(parse_os_release).unwrap_or_default();
    let field = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    };
    let (id, id_like) = (field("ID"), field("ID_LIKE"));
    let named = std::iter::once(id)
        .chain(id_like.split_whitespace())
        .find_map(|id| Family::ALL.into_iter().find(|f| f.ids().contains(&id)));
    if let Some(family) = named {
        let program = family.refresh(false).0;
        return match find(program) {
            Some(tool) => Ok(SystemStore { family, tool }),
            None => Err(TrustError::ToolMissing {
                platform: format!("ID={id}"),
                tool: program,
                package: family.package(),
            }),
        };
    }
    if let Some((family, tool)) = Family::ALL
        .into_iter()
        .find_map(|family| Some((family, find(family.refresh(false).0)?)))
    {
        return Ok(SystemStore { family, tool });
    }
    let known: Vec<&str> = Family::ALL.iter().flat_map(|f| f.ids()).copied().collect();
    let tools: Vec<&str> = Family::ALL.iter().map(|f| f.refresh(false).0).collect();
    let said = match os_release {
        None => "no /etc/os-release".to_owned(),
        Some(_) => format!("/etc/os-release says ID={id:?} ID_LIKE={id_like:?}"),
    };
    Err(TrustError::UnknownPlatform(format!(
        "{said}, none of {}, and none of {} is on PATH",
        known.join(", "),
        tools.join(", ")
    )))
}

/// The `KEY=value` lines of an os-release file, quotes removed.
fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .map(|(key, value)| {
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                .unwrap_or(value);
            (key.trim().to_owned(), unquoted.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Detects with `tools` on PATH; `Ok(family)` or `Err(part of the message)`.
    fn check(os_release: Option<&str>, tools: &[&str], expected: Result<Family, &str>) {
        let found = detect(os_release, |program| {
            tools
                .contains(&program)
                .then(|| PathBuf::from("/usr/sbin").join(program))
        });
        match (found, expected) {
            (Ok(store), Ok(family)) => assert_eq!(store.family, family, "{os_release:?}"),
            (Err(e), Err(part)) => {
                let text = e.to_string();
                assert!(text.contains(part), "{os_release:?}: {text}");
            }
            (found, expected) => {
                panic!("{os_release:?} {tools:?}: {found:?}, expected {expected:?}")
            }
        }
    }

    #[test]
    fn the_platform_is_found_by_os_release_then_by_tool() {
        let all = ["update-ca-certificates", "update-ca-trust", "trust"];
        check(Some("ID=debian\n"), &all, Ok(Family::Debian));
        check(
            Some("ID=ubuntu\nID_LIKE=debian\n"),
            &all[..1],
            Ok(Family::Debian),
        );
        check(
            Some("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n"),
            &all[..1],
            Ok(Family::Debian),
        );
        check(
            Some("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n"),
            &all,
            Ok(Family::Fedora),
        );
        check(Some("ID=fedora\n"), &all[1..], Ok(Family::Fedora));
        check(
            Some("ID=endeavouros\nID_LIKE=arch\n"),
            &all,
            Ok(Family::Arch),
        );
        // An unknown ID: whatever tool is installed decides.
        check(Some("ID=gentoo\n"), &["trust"], Ok(Family::Arch));
        check(None, &["update-ca-trust"], Ok(Family::Fedora));
        // The family is known but its tool is missing: say which package has it.
        check(
            Some("ID=debian\n"),
            &["trust"],
            Err("update-ca-certificates is not on PATH"),
        );
        check(
            Some("ID=plan9\n"),
            &[],
            Err("/etc/os-release says ID=\"plan9\" ID_LIKE=\"\", none of debian, ubuntu"),
        );
        check(None, &[], Err("no /etc/os-release"));
    }
}
