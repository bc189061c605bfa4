//! Facts about the running kernel the loader needs: where the cgroup v2 hierarchy is
//! mounted (its root is where the program is attached), the layout of the
//! `tcp:tcp_receive_reset` tracepoint record, a socket's network namespace cookie, and the
//! monotonic clock the BPF side stamps events with.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
pub(crate) fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_root_in(&mountinfo)
}

fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <major:minor> <root> <mount point> <options> ... - <fstype> <source> ..."
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        let mut fields = fields.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
    })
}

/// Offset of `sock_cookie` in the `tcp:tcp_receive_reset` record, from tracefs.
pub(crate) fn receive_reset_cookie_offset() -> Result<u32, String> {
    let mut last_error = String::new();
    for tracefs in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let path = format!("{tracefs}/events/tcp/tcp_receive_reset/format");
        match std::fs::read_to_string(&path) {
            Ok(format) => {
                return field_offset(&format, "sock_cookie").ok_or_else(|| {
                    format!("{path} has no sock_cookie field (kernel older than 5.17?)")
                });
            }
            Err(e) => last_error = format!("{path}: {e}"),
        }
    }
    Err(format!(
        "{last_error} (is tracefs mounted? mount -t tracefs tracefs /sys/kernel/tracing)"
    ))
}

fn field_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let declaration = line.strip_prefix("field:")?.split(';').next()?;
        // "type name" or "type name[N]".
        let field = declaration.split_whitespace().last()?;
        if field.split('[').next()? != name {
            return None;
        }
        let offset = line
            .split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?;
        offset.parse().ok()
    })
}

/// `SO_NETNS_COOKIE` of a socket: the same value `bpf_get_netns_cookie` gives the program.
pub(crate) fn netns_cookie(socket: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64, and the fd is
    // borrowed from an open socket for the duration of the call.
    #[allow(unsafe_code, reason = "a libc call with no safe wrapper; see SAFETY")]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let mountinfo = "\
35 24 0:30 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
37 35 0:32 /sub /mnt/other rw - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_root_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_root_in("1 2 0:3 / / rw - ext4 /dev/vda rw"), None);
    }

    #[test]
    fn reads_tracepoint_offsets() {
        let format = "\
name: tcp_receive_reset
format:
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:30;\tsize:16;\tsigned:0;
\tfield:__u64 sock_cookie;\toffset:64;\tsize:8;\tsigned:0;";
        assert_eq!(field_offset(format, "sock_cookie"), Some(64));
        assert_eq!(field_offset(format, "saddr_v6"), Some(30));
        assert_eq!(field_offset(format, "cookie"), None);
    }
}
