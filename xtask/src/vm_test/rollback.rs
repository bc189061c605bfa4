//! Provisioning's rollback with packages: a package that installs but never serves (the
//! upgrade's package repacked as a higher revision whose unit starts the proxy with a flag it
//! refuses, and with a changed default `proxy.env`) makes `vagrant provision` fail, saying
//! so, after reinstalling the package before it: the same CA serves again, and the VM's edited
//! `proxy.env` was kept without a prompt, the package's new one left beside it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use super::lab::Lab;
use super::lifecycle::guest;
use crate::{exec, exec::exec, package};

/// The Debian revision of the package that never serves.
const UNSERVABLE_REVISION: &str = "3";
const UNIT: &str = "usr/lib/systemd/system/proxy.service";
const SERVE: &str = "ExecStart=/usr/bin/proxy serve\n";

/// `from` repacked in `work` as revision [`UNSERVABLE_REVISION`]: `proxy serve` gets an
/// unknown flag (`proxy check`, which the provisioning's canary and `ExecStartPre` run,
/// passes), and the packaged `/etc/proxy/proxy.env` gains a line.
pub(super) fn unservable_package(from: &Path, work: &Path) -> Result<PathBuf> {
    let dir = work.join("unservable");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let root = dir.join("root");
    exec(Command::new("dpkg-deb").arg("-R").arg(from).arg(&root))?;

    let unit = root.join(UNIT);
    let text = fs::read_to_string(&unit)?;
    ensure!(text.contains(SERVE), "{UNIT} has no line {SERVE:?}");
    fs::write(
        &unit,
        text.replace(SERVE, "ExecStart=/usr/bin/proxy serve --no-such-flag\n"),
    )?;
    let env = root.join("etc/proxy/proxy.env");
    let mut defaults = fs::read_to_string(&env)?;
    defaults.push_str("# A default this revision changed.\n");
    fs::write(&env, defaults)?;

    let control = root.join("DEBIAN/control");
    let version = package::version(UNSERVABLE_REVISION);
    let fields: Vec<String> = fs::read_to_string(&control)?
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                format!("Version: {version}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    fs::write(&control, fields.join("\n") + "\n")?;
    // The unit's checksum changed, where the package lists checksums (conffiles such as
    // proxy.env have none there).
    let md5sums = root.join("DEBIAN/md5sums");
    if md5sums.exists() {
        let sum = Command::new("md5sum")
            .arg(UNIT)
            .current_dir(&root)
            .output()
            .context("failed to run md5sum")?;
        ensure!(sum.status.success(), "md5sum {UNIT} failed");
        let sum = String::from_utf8(sum.stdout)?;
        let lines: Vec<String> = fs::read_to_string(&md5sums)?
            .lines()
            .map(|l| {
                if l.ends_with(&format!("  {UNIT}")) {
                    sum.trim_end().to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect();
        fs::write(&md5sums, lines.join("\n") + "\n")?;
    }

    let deb = dir.join(format!("proxy_{version}_amd64.deb"));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "-b"])
            .arg(&root)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Provisions `deb` (already in the VM's package folder and synced) on top of the upgrade's
/// revision and checks the rollback.
pub(super) fn provision_and_check(lab: &Lab, limit: Duration) -> Result<()> {
    let before = guest(lab, "state", Duration::from_secs(120))?;
    let serving = package::version("2");
    let unservable = package::version(UNSERVABLE_REVISION);
    ensure!(
        before.get("version") == serving && before.get("serving") == "200",
        "before: proxy {} serving {}",
        before.get("version"),
        before.get("serving")
    );
    let started = Instant::now();
    let provision = exec::tee(lab.vagrant(limit).arg("provision"))?;
    let took = started.elapsed();
    let log: String = provision
        .stdout
        .iter()
        .chain(&provision.stderr)
        .map(|l| format!("{l}\n"))
        .collect();
    ensure!(
        !provision.status.success(),
        "provisioning proxy {unservable}, which never serves, succeeded"
    );
    let said = format!(
        "proxy {unservable} did not become ready within 60 s; rolled back to proxy {serving}, which serves"
    );
    ensure!(log.contains(&said), "provisioning did not say {said:?}");
    ensure!(
        log.contains("the VM's settings were kept, the package's defaults are in /etc/proxy/proxy.env.dpkg-dist"),
        "provisioning did not say that the changed proxy.env was kept"
    );

    let after = guest(lab, "state", Duration::from_secs(120))?;
    println!(
        "rollback: provisioning failed after {} s ({}), installed {}, serving {}, CA {}, \
         proxy.env kept: {}, beside it: {:?}",
        took.as_secs(),
        provision.status,
        after.get("version"),
        after.get("serving"),
        after.get("fingerprint"),
        after.get("env_kept"),
        after.get("dpkg_files")
    );
    ensure!(
        after.get("version") == serving && after.get("serving") == "200",
        "after the rollback: proxy {} serving {}",
        after.get("version"),
        after.get("serving")
    );
    ensure!(
        after.get("fingerprint") == before.get("fingerprint"),
        "the CA changed: {} then {}",
        before.get("fingerprint"),
        after.get("fingerprint")
    );
    ensure!(
        after.get("env_kept") == "1" && after.get("dpkg_files") == "proxy.env.dpkg-dist",
        "the VM's proxy.env: kept {}, beside it {:?}",
        after.get("env_kept"),
        after.get("dpkg_files")
    );
    println!(
        "ok: proxy {unservable} installed without a prompt, never served, and provisioning rolled back to {serving}: same CA, serving 200"
    );
    Ok(())
}
