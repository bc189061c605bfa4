//! `cargo xtask vm-test`: the Vagrant VM for real. Boots the project's own `vagrant/Vagrantfile`
//! with its provisioning under libvirt (software emulation where the CPU has no
//! virtualisation), using the release proxy built on this host, then checks from the host side,
//! through the forwarded ports, what a user of the VM would see:
//!
//! - with 127.0.0.1:8443 already taken on the host, `vagrant up` forwards the next free port
//!   instead, says so, and leaves the other program's port alone;
//! - `https://localhost:<that port>/` answers `Hello SRE!` with a certificate of the VM's CA
//!   (and curl without that CA refuses it); the fingerprint matches what provisioning printed;
//! - `http://localhost:8080/...` redirects to the same path on the forwarded HTTPS port;
//! - the proxy in the VM reports `proxy_ebpf_attached 1` and its kernel connection counts rise by
//!   exactly the number of requests made through the forwards;
//! - Prometheus in the VM has the proxy target up and its kernel metrics; Alertmanager is ready;
//! - a second `vagrant provision` succeeds and changes nothing;
//! - the package's life and the units under faults ([`lifecycle`]): an upgrade through
//!   provisioning, restart, reload and `kill -9` under load, a broken reload, `dpkg -r` and
//!   reinstall, `dpkg --purge`;
//! - provisioning a package that never serves fails and rolls back to the one before
//!   ([`rollback`]).
//!
//! Provisioning installs the package built on this host (`cargo xtask package`, revision 1,
//! in `vagrant/bin`); the upgrade is a rebuild with revision 2; the package that never serves
//! is revision 2 repacked as 3.
//!
//! Everything runs in a private network namespace (see [`lab`]); the guest reaches only the
//! Debian mirror. Needs root and about 4 GB of disk under the work directory.

mod appliance;
mod base_box;
mod lab;
mod lifecycle;
mod rollback;

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use proxy_testkit::phase::{self, Phase};

use crate::{deps, exec, exec::exec, package, privilege, workspace};
use lab::Lab;

/// Options of `cargo xtask vm-test`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Where the base box, the VM's disk state and logs are kept between runs.
    #[arg(long, default_value = "/var/tmp/proxy-vm-test")]
    pub work_dir: PathBuf,
    /// Leave the VM running afterwards (in the test's network namespace).
    #[arg(long)]
    pub keep: bool,
    /// Only take down what an earlier `--keep` or interrupted run left, then exit.
    #[arg(long)]
    pub destroy: bool,
}

/// Host packages: emulator, libvirt with Vagrant's plugin, and the tools that build the box.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "dnsmasq-base",
    "vagrant",
    "vagrant-libvirt",
    "debootstrap",
    "extlinux",
    "syslinux-common",
    "fdisk",
    "socat",
    "rsync",
    "openssl",
    "curl",
];
const VM_LIMIT: Duration = Duration::from_secs(40 * 60);

pub(crate) fn vm_test(opts: Options) -> ExitCode {
    if !privilege::is_root() {
        eprintln!("error: the VM test needs root (libvirt, network namespaces, loop devices)");
        return ExitCode::FAILURE;
    }
    let work = opts.work_dir.clone();
    if opts.destroy {
        let lab = Lab::start(&work, &mirror_host(&mirror()), false);
        return match lab {
            Ok(lab) => {
                drop(lab);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                lab::destroy_leftovers(&work);
                ExitCode::FAILURE
            }
        };
    }
    let lab: RefCell<Option<Lab>> = RefCell::new(None);
    let up_log = RefCell::new(String::new());
    let phases = vec![
        Phase::new("host packages", install_host_packages),
        Phase::new("proxy packages", || build_packages_for_vm(&work)),
        Phase::new("base box", || register_box(&work)),
        Phase::new("libvirt", || {
            *lab.borrow_mut() = Some(Lab::start(&work, &mirror_host(&mirror()), opts.keep)?);
            Ok(())
        }),
        Phase::new("vagrant up", || {
            let mut lab = lab.borrow_mut();
            let lab = lab.as_mut().context("no lab")?;
            // A busy 8443, as on a host already running something there: `vagrant up` must
            // forward another port and say so, not abort.
            lab.occupy_port(appliance::PREFERRED_HTTPS_PORT)?;
            let log = capture(lab.vagrant(VM_LIMIT).args(["up", "--provider=libvirt"]))?;
            *up_log.borrow_mut() = log;
            Ok(())
        }),
        Phase::new("checks from the host", || {
            let lab = lab.borrow();
            let lab = lab.as_ref().context("no lab")?;
            let checked = appliance::check_ports(lab, &up_log.borrow())
                .and_then(|ports| appliance::check(lab, ports, &up_log.borrow(), &work));
            if checked.is_err() {
                print_journal(lab);
            }
            checked
        }),
        Phase::new("second provision", || {
            let lab = lab.borrow();
            let lab = lab.as_ref().context("no lab")?;
            let log = capture(lab.vagrant(VM_LIMIT).arg("provision"))?;
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            ensure!(
                last.contains("provisioning changed nothing"),
                "the second provisioning changed something: {last:?}"
            );
            println!("second provision: {}", strip_vagrant_prefix(last));
            Ok(())
        }),
        Phase::new("upgrade", || {
            let lab = lab.borrow();
            let lab = lab.as_ref().context("no lab")?;
            lifecycle::upload_script(lab, &work)?;
            let before = lifecycle::before_upgrade(lab)?;
            // The rebuild joins the first package in vagrant/bin; provisioning takes the newest.
            let deb = upgrade_deb(&work);
            let name = deb.file_name().context("package name")?;
            fs::copy(&deb, vm_packages_dir().join(name))?;
            capture(lab.vagrant(VM_LIMIT).arg("rsync"))?;
            let log = capture(lab.vagrant(VM_LIMIT).arg("provision"))?;
            lifecycle::check_upgrade(lab, &before, &log)
        }),
        Phase::new("rollback", || {
            let lab = lab.borrow();
            let lab = lab.as_ref().context("no lab")?;
            let deb = rollback::unservable_package(&upgrade_deb(&work), &work)?;
            let in_vm = vm_packages_dir().join(deb.file_name().context("package name")?);
            fs::copy(&deb, &in_vm)?;
            capture(lab.vagrant(VM_LIMIT).arg("rsync"))?;
            let checked = rollback::provision_and_check(lab, VM_LIMIT);
            // Out of the folder provisioning takes the newest package from.
            fs::remove_file(&in_vm)?;
            capture(lab.vagrant(VM_LIMIT).arg("rsync"))?;
            checked
        }),
        Phase::new("faults", || {
            let lab = lab.borrow();
            let lab = lab.as_ref().context("no lab")?;
            let checked = lifecycle::faults(lab);
            if checked.is_err() {
                print_journal(lab);
            }
            checked
        }),
        Phase::new("remove and purge", || {
            let lab = lab.borrow();
            let lab = lab.as_ref().context("no lab")?;
            let deb = upgrade_deb(&work);
            let name = deb.file_name().context("package name")?.to_string_lossy();
            lifecycle::remove_and_purge(lab, &format!("/proxy-src/vagrant/bin/{name}"))
        }),
        Phase::new("destroy", || {
            drop(lab.borrow_mut().take());
            Ok(())
        }),
    ];
    let passed = phase::run_all(phases);
    // A failed phase leaves the lab up until here.
    drop(lab.into_inner());
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn install_host_packages() -> Result<()> {
    let missing = deps::missing(HOST_PACKAGES)?;
    if missing.is_empty() {
        println!("host packages present");
        return Ok(());
    }
    if missing.contains(&"qemu-system-x86") && installed_from_backports("qemu-utils") {
        // The emulator must match the qemu-utils already installed from bookworm-backports.
        enable_backports()?;
        exec(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
                .args(["--no-install-recommends", "-t", "bookworm-backports"])
                .arg("qemu-system-x86"),
        )?;
    }
    deps::apt_install(&deps::missing(HOST_PACKAGES)?)
}

fn installed_from_backports(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("bpo"))
}

fn enable_backports() -> Result<()> {
    let sources = Path::new("/etc/apt/sources.list.d/proxy-vm-test-backports.sources");
    if !sources.exists() {
        fs::write(
            sources,
            format!(
                "# Written by `cargo xtask vm-test`: qemu matching the installed qemu-utils.\n\
                 Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                mirror()
            ),
        )?;
    }
    exec(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update", "-q"]))
}

/// The package, where provisioning looks for it (`PROXY_VM_PREBUILT=1`; the guest reaches no
/// crates.io, and compiling under emulation would take an hour), and its rebuild with a higher
/// revision for the upgrade, kept aside until then.
fn build_packages_for_vm(work: &Path) -> Result<()> {
    let dir = vm_packages_dir();
    if dir.exists() {
        // Only this run's packages: provisioning installs the newest it finds.
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    package::build("1", &dir)?;
    package::build("2", &work.join("upgrade"))?;
    Ok(())
}

fn vm_packages_dir() -> PathBuf {
    workspace::root().join("vagrant/bin")
}

fn upgrade_deb(work: &Path) -> PathBuf {
    work.join("upgrade")
        .join(format!("proxy_{}_amd64.deb", package::version("2")))
}

/// What the proxy said, for the CI log of a failed check.
fn print_journal(lab: &Lab) {
    match appliance::ssh(lab, "sudo journalctl -u proxy.service --no-pager -n 60") {
        Ok(journal) => println!("journal of proxy.service in the VM:\n{journal}"),
        Err(e) => println!("(no journal from the VM: {e:#})"),
    }
}

fn register_box(work: &Path) -> Result<()> {
    fs::create_dir_all(work)?;
    let box_file = base_box::ensure(work, &mirror())?;
    let home = work.join("vagrant-home");
    let registered = Command::new("vagrant")
        .env("VAGRANT_HOME", &home)
        .args(["box", "list"])
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with(&format!("{} ", base_box::NAME)))
        });
    let stamp = work.join("debian-12.box.registered");
    let box_time = fs::metadata(&box_file)?.modified()?;
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= box_time);
    if registered && fresh {
        println!("{} registered", base_box::NAME);
        return Ok(());
    }
    exec(
        Command::new("vagrant")
            .env("VAGRANT_HOME", &home)
            .args(["box", "add", "--force", "--name", base_box::NAME])
            .arg(&box_file),
    )?;
    fs::write(stamp, "")?;
    Ok(())
}

/// Vagrant prefixes the provisioner's lines with the machine name.
fn strip_vagrant_prefix(line: &str) -> &str {
    line.split_once(": ").map_or(line, |(_, rest)| rest)
}

/// Prints the command's output as it comes and returns it, standard output then standard
/// error; fails like [`exec`].
fn capture(cmd: &mut Command) -> Result<String> {
    let line = exec::display(cmd);
    let teed = exec::tee(cmd)?;
    ensure!(teed.status.success(), "`{line}` failed: {}", teed.status);
    Ok(teed
        .stdout
        .iter()
        .chain(&teed.stderr)
        .map(|l| format!("{l}\n"))
        .collect())
}

/// The Debian mirror this host uses (the guest is let through to it, and only to it): the
/// URI of its `bookworm` suite.
fn mirror() -> String {
    let sources = deps::bookworm_sources();
    let uri = |entry: &String| {
        let mut words = entry.split_whitespace().skip(1);
        let uri = words.next()?;
        (words.next()? == "bookworm").then(|| uri.to_owned())
    };
    sources
        .iter()
        .find_map(uri)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

fn mirror_host(mirror: &str) -> String {
    let rest = mirror.split_once("://").map_or(mirror, |(_, rest)| rest);
    rest.split(['/', ':']).next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_mirror_host() {
        assert_eq!(
            mirror_host("http://deb.debian.org/debian"),
            "deb.debian.org"
        );
        assert_eq!(
            mirror_host("http://mirror.example:8080/debian/"),
            "mirror.example"
        );
    }
}
