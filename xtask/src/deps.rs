//! The system packages the tests need, and making sure they are present: on Debian as root,
//! missing ones are installed with apt; anywhere else the task says what is missing and how to
//! install it, then carries on (the tests that need a tool say so themselves).

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{exec::exec, privilege};

/// Debian packages the tests use. Later work appends here (prometheus, bpftool...).
pub(crate) const PACKAGES: &[&str] = &[
    "iproute2",        // `ip netns`, `ss`: private network namespaces for end-to-end tests
    "openssl",         // `openssl s_client`/`x509`: checking certificates as a client would
    "curl",            // a real HTTP client against the running proxy
    "ca-certificates", // `update-ca-certificates`: `proxy ca trust` against the real store
    "libnss3-tools",   // `certutil`: `proxy ca trust` into NSS databases
    "procps",          // `ps`, `pgrep`, `free`: processes and the machine
    "util-linux",      // `nsenter`, `setpriv`: run the proxy in a namespace, drop its privileges
    "nftables",        // `nft`: drop handshake packets to test what the kernel metrics show
    "systemd",         // `systemd-socket-activate`: listening sockets created by another process
    "prometheus", // `prometheus`, `promtool`: rules checked, unit-tested and run against the proxy
    "prometheus-alertmanager", // `prometheus-alertmanager`, `amtool`: routing checked and run
    "yamllint",   // every YAML file of monitoring/
    "vagrant",    // `vagrant validate` of vagrant/Vagrantfile (no VM is started)
    "shellcheck", // provisioning and helper scripts of vagrant/ and deploy/
    "slowhttptest", // 1000 slowloris connections against the proxy (tests/tests/hostile.rs)
    "testssl.sh", // `testssl`: the soak's TLS scan, HIGH/CRITICAL findings fail it
    "groff-base", // `groff`: the manual pages render without a warning
    "man-db",     // `man -l`: the packaged manual pages render (cargo xtask package)
    "lintian",    // Debian's package checks (cargo xtask package)
    "make",       // builds jemalloc, the proxy's allocator (tikv-jemalloc-sys)
];

/// Makes sure every package of [`PACKAGES`] is installed, installing what is missing when this
/// is Debian and we are root.
pub(crate) fn ensure() -> Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        println!(
            "not Debian: cannot check system packages; the tests need the equivalents of: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    let missing = missing(PACKAGES)?;
    if missing.is_empty() {
        println!("system packages present: {}", PACKAGES.join(" "));
        return Ok(());
    }
    let list = missing.join(" ");
    if !privilege::is_root() {
        println!("missing system packages: {list}");
        println!("install them with: sudo apt-get install -y --no-install-recommends {list}");
        println!("(continuing: the tests that need them will say so)");
        return Ok(());
    }
    println!("installing missing system packages: {list}");
    apt_install(&missing)
}

/// Installs those of `packages` that dpkg does not report as installed.
pub(crate) fn apt_install_missing(packages: &[&str]) -> Result<()> {
    let missing = missing(packages)?;
    if missing.is_empty() {
        println!("host packages present: {}", packages.join(" "));
        return Ok(());
    }
    apt_install(&missing)
}

/// `apt-get update` then `apt-get install` of `packages`, checking they are installed after.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    exec(apt_get().arg("update"))?;
    exec(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
    )?;
    let still = self::missing(packages)?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

/// The packages of `packages` that dpkg does not report as installed.
pub(crate) fn missing<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    let mut missing = Vec::new();
    for &package in packages {
        // Exits 1 for a package dpkg has never heard of: that is "missing" too.
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .context("failed to run dpkg-query")?;
        if !is_installed(&String::from_utf8_lossy(&out.stdout)) {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// Whether a dpkg `${Status}` ("want flag state", e.g. `install ok installed`) means installed.
fn is_installed(status: &str) -> bool {
    status.split_whitespace().last() == Some("installed")
}

/// The host's apt sources for Debian 12 (`bookworm`, `bookworm-updates`,
/// `bookworm-security`; not backports), as one-line `deb URI SUITE COMPONENTS` entries, from
/// `/etc/apt/sources.list.d/debian.sources` or else `/etc/apt/sources.list`; Debian's own
/// mirror when neither names one.
pub(crate) fn bookworm_sources() -> Vec<String> {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let one_line = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let mut sources = bookworm_entries(&deb822, &one_line);
    if sources.is_empty() {
        sources.push("deb http://deb.debian.org/debian bookworm main".to_owned());
    }
    sources
}

fn bookworm_entries(deb822: &str, one_line: &str) -> Vec<String> {
    let wanted = |suite: &str| suite.starts_with("bookworm") && !suite.ends_with("-backports");
    let mut entries = Vec::new();
    for stanza in deb822.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or("")
        };
        if !field("Types").split_whitespace().any(|t| t == "deb") {
            continue;
        }
        for uri in field("URIs").split_whitespace() {
            for suite in field("Suites").split_whitespace().filter(|s| wanted(s)) {
                entries.push(format!("deb {uri} {suite} {}", field("Components")));
            }
        }
    }
    for line in one_line.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // `deb [options] URI SUITE COMPONENTS...`; options are not carried over.
        let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with('[')).collect();
        if words.len() >= 4 && words[0] == "deb" && wanted(words[2]) {
            entries.push(words.join(" "));
        }
    }
    entries
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    // Wait for another apt (an unattended upgrade, a second task) instead of failing.
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=300"]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: &str, expected: bool) {
        assert_eq!(is_installed(status), expected, "{status:?}");
    }

    #[test]
    fn reads_bookworm_sources() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://m.example/debian\n\
            Suites: bookworm bookworm-updates\nComponents: main\n\n\
            Types: deb\nURIs: http://m.example/debian\nSuites: bookworm-backports\n\
            Components: main\n\nTypes: deb-src\nURIs: http://m.example/debian\n\
            Suites: bookworm\nComponents: main\n";
        assert_eq!(
            bookworm_entries(
                deb822,
                "deb http://s.example/debian-security bookworm-security main\n# deb x y z\n"
            ),
            [
                "deb http://m.example/debian bookworm main",
                "deb http://m.example/debian bookworm-updates main",
                "deb http://s.example/debian-security bookworm-security main",
            ]
        );
        assert!(bookworm_entries("", "deb http://m.example/debian trixie main").is_empty());
    }

    #[test]
    fn reads_dpkg_status() {
        check("install ok installed", true);
        check("hold ok installed", true);
        check("deinstall ok config-files", false);
        check("install ok half-installed", false);
        check("unknown ok not-installed", false);
        check("", false);
    }
}
