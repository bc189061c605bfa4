//! What this process may do, read from `/proc` without unsafe code: whether it runs as root,
//! whether a program it executes may bind ports below 1024 (`CAP_NET_BIND_SERVICE`), and from
//! which port the kernel lets anyone bind.

use std::{fs, path::Path, process::Command};

/// `CAP_NET_BIND_SERVICE`, the capability to bind ports below `ip_unprivileged_port_start`.
const CAP_NET_BIND_SERVICE: u32 = 10;

/// Where the kernel says from which port unprivileged processes may bind.
const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// Whether this process runs with effective user id 0. `false` when it cannot be told.
pub(crate) fn is_root() -> bool {
    own_status().is_some_and(|status| effective_uid(&status) == Some(0))
}

/// The first port an unprivileged process may bind (1024 unless the sysctl says otherwise).
pub(crate) fn unprivileged_port_start() -> u16 {
    fs::read_to_string(UNPRIVILEGED_PORT_START)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1024)
}

/// Whether `program`, executed by this process, may bind ports below
/// [`unprivileged_port_start`]: root keeps the capability across `exec`, anyone else through
/// an ambient capability or a file capability on the program (`setcap`).
pub(crate) fn exec_may_bind_low_ports(program: &Path) -> bool {
    own_status().is_some_and(|status| exec_keeps_bind_cap(&status)) || has_file_cap(program)
}

/// Whether a process with this `/proc/<pid>/status` keeps `CAP_NET_BIND_SERVICE` after
/// executing a program without file capabilities. Root gets what its bounding or inheritable
/// set allows; anyone else only its ambient set.
fn exec_keeps_bind_cap(status: &str) -> bool {
    let has =
        |field| capabilities(status, field).is_some_and(|set| set >> CAP_NET_BIND_SERVICE & 1 == 1);
    match effective_uid(status) {
        Some(0) => has("CapBnd") || has("CapInh"),
        Some(_) => has("CapAmb"),
        None => false,
    }
}

/// The effective user id: the second number of the `Uid:` line.
fn effective_uid(status: &str) -> Option<u32> {
    field(status, "Uid")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A capability set (`CapEff`, `CapAmb`...), given in hexadecimal.
fn capabilities(status: &str, name: &str) -> Option<u64> {
    u64::from_str_radix(field(status, name)?.trim(), 16).ok()
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
}

fn own_status() -> Option<String> {
    fs::read_to_string("/proc/self/status").ok()
}

/// Whether `getcap` (libcap2-bin; in /usr/sbin, often off a user's PATH) shows the capability
/// on `program`.
fn has_file_cap(program: &Path) -> bool {
    ["getcap", "/usr/sbin/getcap", "/sbin/getcap"]
        .iter()
        .any(|getcap| {
            Command::new(getcap).arg(program).output().is_ok_and(|out| {
                String::from_utf8_lossy(&out.stdout).contains("cap_net_bind_service")
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "Name:\tcat\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";

    fn check(status: &str, expected: (Option<u32>, bool)) {
        assert_eq!(
            (effective_uid(status), exec_keeps_bind_cap(status)),
            expected,
            "{status}"
        );
    }

    #[test]
    fn reads_uid_and_bind_capability() {
        check(ROOT, (Some(0), true));
        // Root without CAP_NET_BIND_SERVICE in its bounding set (a locked-down container).
        check(
            &ROOT.replace("CapBnd:\t000001ffffffffff", "CapBnd:\t000001fffffffbff"),
            (Some(0), false),
        );
        // A user who became root through setuid: the effective id is what counts.
        check(
            "Uid:\t1000\t0\t0\t0\nCapBnd:\t000001ffffffffff\n",
            (Some(0), true),
        );
        let user = "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n\
            CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        check(user, (Some(1000), false));
        // An ambient capability survives exec.
        check(
            &user.replace("CapAmb:\t0000000000000000", "CapAmb:\t0000000000000400"),
            (Some(1000), true),
        );
        // Effective but not ambient: lost at exec.
        check(
            &user.replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400"),
            (Some(1000), false),
        );
        check("", (None, false));
    }
}
