//! The peers' binaries (nginx, HAProxy, h2o): found where Debian puts them, or installed with
//! apt when the bench runs as root on Debian and may install. A peer that cannot be had is
//! left out with the reason printed, and the bench runs without it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{deps, privilege};

/// `bin`, installing the first of `packages` that provides it when allowed; `None` (with the
/// reason printed) when it is absent and cannot be installed.
pub(super) fn find_or_install(
    name: &str,
    bin: &str,
    packages: &[&str],
    service: &str,
    allow_install: bool,
) -> Option<PathBuf> {
    let bin = PathBuf::from(bin);
    if bin.is_file() {
        return Some(bin);
    }
    if !allow_install || !privilege::is_root() || !Path::new("/etc/debian_version").exists() {
        println!(
            "{name} is not installed: skipping it (install it with `apt-get install {}`, \
             or let the bench do it as root on Debian without --no-install)",
            packages[0]
        );
        return None;
    }
    for package in packages {
        println!("installing {package} to compare against");
        match deps::apt_install(&[package]) {
            Ok(()) if bin.is_file() => {
                stop_system_service(service);
                return Some(bin);
            }
            Ok(()) => println!("{package} installed no {}", bin.display()),
            Err(e) => println!("could not install {package}: {e:#}"),
        }
    }
    println!("{name} could not be installed: skipping it");
    None
}

/// The first line a binary prints for `args` (on standard output or error), for the JSON.
pub(super) fn first_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|out| {
            let text = [out.stdout, out.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Debian starts a server's service on installation (ports 80 and 443 on the host): the
/// bench runs its own.
fn stop_system_service(unit: &str) {
    let active = Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .is_ok_and(|s| s.success());
    if active {
        println!("stopping and disabling the {unit}.service the package started");
        let _ = crate::exec::exec(Command::new("systemctl").args(["disable", "--now", unit]));
    }
}
