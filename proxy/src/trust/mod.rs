//! Installing the CA certificate as trusted on this machine (`proxy ca trust`) and removing
//! exactly that again (`proxy ca untrust`): the system trust store of Debian/Ubuntu,
//! Fedora/RHEL or Arch, and the NSS databases Firefox and Chromium keep under `$HOME`.
//!
//! Everything a change needs is looked up first (the platform, its tool, root, the
//! databases), so an unknown platform or a missing privilege changes nothing. The anchor
//! file and the NSS nickname carry a short fingerprint of the certificate: untrust removes
//! this CA and no other, and trusting again rewrites the same entries.

mod nss;
mod system;
mod tool;

use std::io::Write;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::tls::ca::CaCertificate;
use crate::tls::state_dir::WriteError;

/// Why the CA could not be trusted or untrusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Neither `/etc/os-release` nor `PATH` names a system trust store this command knows.
    #[error(
        "no system trust store this command knows: {0}; pass --no-system to change only the NSS databases, or install the certificate by hand"
    )]
    UnknownPlatform(String),
    /// The platform is known but its trust store's tool is not installed.
    #[error("{platform}: {tool} is not on PATH (install the {package} package)")]
    ToolMissing {
        platform: String,
        tool: &'static str,
        package: &'static str,
    },
    /// The system trust store needs root.
    #[error(
        "changing the system trust store needs root: run `sudo {command}`, or add --no-system to change only the NSS databases under $HOME"
    )]
    NotRoot { command: String },
    /// A trust store's file could not be written or removed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The anchor file could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A tool could not be started.
    #[error("cannot run `{command}`: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("`{command}` failed ({status}): {output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
}

/// Which stores a command changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stores {
    pub(crate) system: bool,
    pub(crate) nss: bool,
}

/// The name this CA goes by in every store: `proxy-local-ca-` and the first six bytes of
/// its SHA-256 fingerprint, so that two CAs never share a file or a nickname.
pub(crate) fn anchor_name(cert: &CaCertificate) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
    let short: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("proxy-local-ca-{short}")
}

/// Installs `cert` into `stores`, writing what it did to `out` as it goes. `command` is this
/// command line, for the message that asks for root.
pub(crate) fn trust(
    cert: &CaCertificate,
    stores: Stores,
    command: &str,
    out: &mut impl Write,
) -> Result<(), TrustError> {
    let name = anchor_name(cert);
    let plan = Plan::find(stores)?;
    if let Some(system) = &plan.system {
        require_root(command)?;
        let already = system.add(&name, cert.pem())?;
        let path = system.anchor_path(&name);
        let what = if already { "already present" } else { "added" };
        let _ = writeln!(
            out,
            "system trust store, {}: {what} {}; bundles rebuilt",
            system.describe(),
            path.display()
        );
    }
    for_each_database(&plan, out, |certutil, dir, out| {
        let what = if certutil.has(dir, &name)? {
            "already present"
        } else {
            certutil.add(dir, &name, cert.der())?;
            "added"
        };
        let _ = writeln!(
            out,
            "NSS database {}: {what} {name} (trust {})",
            dir.display(),
            nss::TRUST_FLAGS
        );
        Ok(())
    })?;
    Ok(())
}

/// Removes what [`trust`] installed for `cert` from `stores`. Returns whether anything
/// was there.
pub(crate) fn untrust(
    cert: &CaCertificate,
    stores: Stores,
    command: &str,
    out: &mut impl Write,
) -> Result<bool, TrustError> {
    let name = anchor_name(cert);
    let plan = Plan::find(stores)?;
    let mut removed = false;
    if let Some(system) = &plan.system {
        let path = system.anchor_path(&name);
        if path.exists() {
            require_root(command)?;
        }
        if system.remove(&name)? {
            removed = true;
            let _ = writeln!(
                out,
                "system trust store, {}: removed {}; bundles rebuilt",
                system.describe(),
                path.display()
            );
        } else {
            let _ = writeln!(
                out,
                "system trust store, {}: not installed (no {})",
                system.describe(),
                path.display()
            );
        }
    }
    for_each_database(&plan, out, |certutil, dir, out| {
        if certutil.has(dir, &name)? {
            certutil.remove(dir, &name)?;
            removed = true;
            let _ = writeln!(out, "NSS database {}: removed {name}", dir.display());
        } else {
            let _ = writeln!(out, "NSS database {}: not installed", dir.display());
        }
        Ok(())
    })?;
    Ok(removed)
}

/// The stores found, before anything is changed.
struct Plan {
    system: Option<system::SystemStore>,
    /// `None` when the NSS databases are left alone.
    nss: Option<NssPlan>,
}

struct NssPlan {
    home: Option<PathBuf>,
    databases: Vec<PathBuf>,
    certutil: Option<nss::Certutil>,
}

impl Plan {
    fn find(stores: Stores) -> Result<Self, TrustError> {
        let system = stores.system.then(system::SystemStore::find).transpose()?;
        let nss = stores.nss.then(|| {
            let home = std::env::var_os("HOME")
                .filter(|home| !home.is_empty())
                .map(PathBuf::from);
            NssPlan {
                databases: home.as_deref().map(nss::databases).unwrap_or_default(),
                home,
                certutil: nss::Certutil::find(),
            }
        });
        Ok(Plan { system, nss })
    }
}

/// Runs `change` on each NSS database of `plan`, or says why there is none to change.
fn for_each_database<W: Write>(
    plan: &Plan,
    out: &mut W,
    mut change: impl FnMut(&nss::Certutil, &std::path::Path, &mut W) -> Result<(), TrustError>,
) -> Result<(), TrustError> {
    let Some(nss) = &plan.nss else {
        return Ok(());
    };
    let Some(home) = &nss.home else {
        let _ = writeln!(out, "NSS databases: skipped, HOME is not set");
        return Ok(());
    };
    if nss.databases.is_empty() {
        let _ = writeln!(
            out,
            "NSS databases: none under {} (Firefox and Chromium create theirs on first start)",
            home.display()
        );
        return Ok(());
    }
    let Some(certutil) = &nss.certutil else {
        let listed: Vec<String> = nss
            .databases
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let _ = writeln!(
            out,
            "NSS databases: skipped {} (certutil is not on PATH: install libnss3-tools or nss-tools)",
            listed.join(", ")
        );
        return Ok(());
    };
    let me = nix::unistd::geteuid().as_raw();
    for dir in &nss.databases {
        // certutil run by root in a user's database would leave files the browser cannot
        // write: each user changes their own.
        let owner = std::fs::metadata(dir.join("cert9.db")).map(|m| m.uid());
        if let Ok(owner) = owner
            && owner != me
        {
            let _ = writeln!(
                out,
                "NSS database {}: skipped, owned by uid {owner} (run the command as that user, with --no-system)",
                dir.display()
            );
            continue;
        }
        change(certutil, dir, out)?;
    }
    Ok(())
}

fn require_root(command: &str) -> Result<(), TrustError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(TrustError::NotRoot {
            command: command.to_owned(),
        })
    }
}
