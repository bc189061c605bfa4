//! The VM test's checks of the package's life and of the socket-activated units under faults,
//! driven through `guest-checks.sh` in the VM (real systemd, real dpkg):
//!
//! - upgrade through provisioning to a rebuild with a higher Debian revision: the CA is the
//!   same, the service was restarted and runs the newly installed binary, the VM's edited
//!   `proxy.env` (a conffile) was kept without a prompt;
//! - `systemctl restart`, `systemctl reload` and `kill -9` of the proxy while a client opens
//!   new connections: none is refused or reset (only a request in flight at the kill may
//!   fail); `systemctl reload` with a broken setting fails and the old proxy keeps serving;
//! - `dpkg -r` then reinstall: same CA; `dpkg --purge`: no state directory, no units.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use super::appliance::ssh_limited;
use super::lab::Lab;
use crate::package;

const GUEST_SCRIPT: &str = include_str!("guest-checks.sh");
const GUEST_PATH: &str = "/tmp/guest-checks.sh";
/// A load run: up to 120 s of requests plus the proxy's restart under emulation.
const LOAD_LIMIT: Duration = Duration::from_secs(300);

/// Key/value lines a guest check printed; `failure` lines are gathered, not keyed.
pub(super) struct Report {
    values: HashMap<String, String>,
    failures: Vec<String>,
}

impl Report {
    pub(super) fn get(&self, key: &str) -> &str {
        self.values.get(key).map_or("", String::as_str)
    }

    fn number(&self, key: &str) -> Result<u64> {
        self.get(key)
            .parse()
            .with_context(|| format!("{key}={:?} is not a number", self.get(key)))
    }
}

/// Puts the guest script in the VM.
pub(super) fn upload_script(lab: &Lab, work: &Path) -> Result<()> {
    let local = work.join("guest-checks.sh");
    fs::write(&local, GUEST_SCRIPT)?;
    let out = lab
        .vagrant(Duration::from_secs(180))
        .arg("upload")
        .arg(&local)
        .arg(GUEST_PATH)
        .output()
        .context("failed to run vagrant upload")?;
    ensure!(
        out.status.success(),
        "vagrant upload: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

pub(super) fn guest(lab: &Lab, args: &str, limit: Duration) -> Result<Report> {
    let text = ssh_limited(lab, &format!("sudo bash {GUEST_PATH} {args}"), limit)?;
    let mut values = HashMap::new();
    let mut failures = Vec::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once('=') {
            if key == "failure" {
                failures.push(value.to_owned());
            } else {
                values.insert(key.to_owned(), value.to_owned());
            }
        }
    }
    Ok(Report { values, failures })
}

/// The fingerprint, version and process before an upgrade, for [`check_upgrade`].
pub(super) struct Before {
    fingerprint: String,
    pid: String,
}

pub(super) fn before_upgrade(lab: &Lab) -> Result<Before> {
    let state = guest(lab, "state", Duration::from_secs(120))?;
    ensure!(
        state.get("version") == package::version("1") && state.get("serving") == "200",
        "before the upgrade: proxy {} serving {}",
        state.get("version"),
        state.get("serving")
    );
    Ok(Before {
        fingerprint: state.get("fingerprint").to_owned(),
        pid: state.get("pid").to_owned(),
    })
}

/// After provisioning installed the rebuild with revision 2.
pub(super) fn check_upgrade(lab: &Lab, before: &Before, provision_log: &str) -> Result<()> {
    let version = package::version("2");
    ensure!(
        provision_log.contains(&format!("installed proxy {version}")),
        "provisioning did not install proxy {version}"
    );
    let state = guest(lab, "state", Duration::from_secs(120))?;
    ensure!(
        state.get("version") == version,
        "installed: {}",
        state.get("version")
    );
    ensure!(
        state.get("fingerprint") == before.fingerprint,
        "the CA changed with the upgrade: {} then {}",
        before.fingerprint,
        state.get("fingerprint")
    );
    ensure!(
        state.get("pid") != before.pid && state.get("exe") == "/usr/bin/proxy",
        "the service was not restarted onto the new binary: pid {} then {}, running {:?}",
        before.pid,
        state.get("pid"),
        state.get("exe")
    );
    ensure!(
        state.get("env_kept") == "1" && state.get("dpkg_files").is_empty(),
        "the edited /etc/proxy/proxy.env was not kept as it was: env_kept={} leftovers={:?}",
        state.get("env_kept"),
        state.get("dpkg_files")
    );
    ensure!(
        state.get("serving") == "200",
        "after the upgrade: HTTP {}",
        state.get("serving")
    );
    println!(
        "ok: upgraded to proxy {version} by provisioning (dpkg -i, no prompt): CA {} unchanged, \
         proxy.service restarted (pid {} -> {}, running {}), the VM's proxy.env kept, serving 200",
        before.fingerprint,
        before.pid,
        state.get("pid"),
        state.get("exe")
    );
    Ok(())
}

/// restart, reload and kill -9 under a client opening new connections; then a broken reload.
pub(super) fn faults(lab: &Lab) -> Result<()> {
    for action in ["restart", "reload", "kill"] {
        let r = guest(lab, &format!("load {action}"), LOAD_LIMIT)?;
        let (requests, failed, refused, reset) = (
            r.number("requests")?,
            r.number("failed")?,
            r.number("refused")?,
            r.number("reset")?,
        );
        println!(
            "{action}: {requests} requests, {failed} failed ({refused} refused, {reset} reset), \
             longest connect {} ms, longest wait for the answer {} ms, done and ready after {} ms, \
             new pid: {}, systemd restarts: {}{}",
            r.get("longest_connect_ms"),
            r.get("longest_answer_ms"),
            r.get("ready_again_ms"),
            r.get("pid_changed"),
            r.get("restarts"),
            if r.failures.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.failures.join("; "))
            }
        );
        ensure!(
            r.get("status") == "0",
            "{action}: status {}",
            r.get("status")
        );
        ensure!(
            requests >= 10,
            "{action}: only {requests} requests were made"
        );
        match action {
            // A sequential client has at most one request in flight when the proxy is killed.
            "kill" => {
                ensure!(
                    refused == 0 && failed <= 1,
                    "kill -9: {refused} connections refused, {failed} requests failed"
                );
                ensure!(
                    r.get("restarts") == "1" && r.get("pid_changed") == "yes",
                    "kill -9: systemd did not restart the proxy once (restarts {})",
                    r.get("restarts")
                );
            }
            "restart" => {
                ensure!(failed == 0, "restart: {failed} requests failed");
                ensure!(r.get("pid_changed") == "yes", "restart: same pid");
            }
            _ => {
                ensure!(failed == 0, "reload: {failed} requests failed");
                ensure!(r.get("pid_changed") == "no", "reload replaced the process");
            }
        }
    }
    let r = guest(lab, "broken-reload", Duration::from_secs(180))?;
    println!(
        "broken reload: systemctl reload exit status {}, same pid: {}, {}, serving HTTP {}; \
         journal: {:?}; after the fix, reload exit status {}",
        r.get("broken_status"),
        r.get("pid_unchanged"),
        r.get("active"),
        r.get("serving"),
        r.get("journal"),
        r.get("fixed_status")
    );
    ensure!(
        r.get("broken_status") != "0" && !r.get("broken_status").is_empty(),
        "systemctl reload succeeded with a broken setting"
    );
    ensure!(
        r.get("pid_unchanged") == "yes" && r.get("active") == "active" && r.get("serving") == "200",
        "the old proxy did not keep serving after the refused reload"
    );
    ensure!(
        !r.get("journal").is_empty(),
        "the journal does not say why the reload failed"
    );
    ensure!(r.get("fixed_status") == "0", "reload after the fix failed");
    Ok(())
}

/// `dpkg -r` then reinstall of `deb` (a path in the VM); then `dpkg --purge`.
pub(super) fn remove_and_purge(lab: &Lab, deb: &str) -> Result<()> {
    let r = guest(
        lab,
        &format!("remove-reinstall {deb}"),
        Duration::from_secs(300),
    )?;
    println!(
        "dpkg -r: {}, proxy.service {}, https {}, CA kept: {}; reinstalled: proxy.env kept {}, {}, serving {}",
        r.get("removed"),
        r.get("unit_after_remove"),
        r.get("https_after_remove"),
        r.get("ca_kept"),
        r.get("env_kept"),
        r.get("active"),
        r.get("serving")
    );
    ensure!(
        r.get("removed").ends_with("config-files") && r.get("unit_after_remove") == "gone",
        "dpkg -r left the package or its units: {} {}",
        r.get("removed"),
        r.get("unit_after_remove")
    );
    ensure!(r.get("ca_kept") == "yes", "dpkg -r deleted the CA");
    ensure!(
        r.get("env_kept") == "1",
        "the reinstall (plain dpkg -i) did not keep the VM's edited proxy.env"
    );
    ensure!(
        r.get("fingerprint_after") == r.get("fingerprint_before")
            && !r.get("fingerprint_after").is_empty(),
        "the CA changed across remove and reinstall: {} then {}",
        r.get("fingerprint_before"),
        r.get("fingerprint_after")
    );
    ensure!(
        r.get("active") == "active,active,active" && r.get("serving") == "200",
        "after the reinstall: {} serving {}",
        r.get("active"),
        r.get("serving")
    );
    println!(
        "ok: CA fingerprint {} unchanged across dpkg -r and reinstall",
        r.get("fingerprint_after")
    );

    let r = guest(lab, "purge", Duration::from_secs(180))?;
    println!(
        "dpkg --purge: left {:?}, unit links {:?}, unit files {}, status {}",
        r.get("left"),
        r.get("unit_links"),
        r.get("unit_files"),
        r.get("status")
    );
    ensure!(
        r.get("left").is_empty() && r.get("unit_links").is_empty() && r.get("unit_files") == "0",
        "dpkg --purge left {:?}, unit links {:?}, {} unit files",
        r.get("left"),
        r.get("unit_links"),
        r.get("unit_files")
    );
    println!("ok: purged: no /var/lib/proxy, no /var/lib/private/proxy, no units");
    Ok(())
}
