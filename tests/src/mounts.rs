//! Faults of the file system the proxy writes to, made real for a root process (which
//! ignores file permissions): a read-only bind mount, or a tiny tmpfs filled up. Every mount
//! is made inside a private mount namespace (`unshare --mount`) that only the proxy lives in,
//! so the host never sees it and it disappears with the proxy, even when a test dies.
//!
//! Files in that namespace are read through `/proc/<pid>/root`, which resolves paths in the
//! process's own mount namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::unistd::Pid;

use crate::netns::NetNs;
use crate::run_with_timeout;

/// Size of the tmpfs that stands for a small, full disk.
pub const TINY_TMPFS: &str = "64k";
/// The file that fills a file system up; it is the only file a fault adds.
pub const FILLER: &str = "fill.bin";
const SPARE: &str = "spare.bin";

/// A wrapper command line (for [`crate::Proxy::start_via`]) that runs the program in a new
/// private mount namespace once the shell commands `setup` succeeded.
pub fn private_mounts(setup: &str) -> Vec<String> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!("{setup} && exec \"$0\" \"$@\""),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `proxy ARGS` in `ns` in a new private mount namespace after `setup`, expecting it to
/// stop by itself (bounded to 30 s). Its stdout is then the listing of `dir` as the proxy saw
/// it (name and size of every file), which is gone with the namespace once it returns.
pub fn run_proxy_then_list(ns: &NetNs, setup: &str, args: &[&str], dir: &Path) -> Output {
    // The proxy is the shell's child here: it must die with the shell if the test does.
    let script = format!(
        "{setup} || exit 99; setpriv --pdeathsig KILL \"$0\" \"$@\"; status=$?; \
         find {dir} -mindepth 1 -printf '%f %s\\n'; exit $status",
        dir = quoted(dir)
    );
    let mut cmd = ns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(crate::proxy_bin())
        .args(args)
        .env("NO_COLOR", "1");
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_ne!(
        out.status.code(),
        Some(99),
        "setting up the mounts failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Shell commands that make `dir` read-only (a bind mount of itself, remounted read-only).
pub fn read_only(dir: &Path) -> String {
    let dir = quoted(dir);
    format!("mount --bind {dir} {dir} && mount -o remount,bind,ro {dir}")
}

/// Shell commands that mount a [`TINY_TMPFS`] tmpfs on `dir`, private to root.
pub fn tiny_tmpfs(dir: &Path) -> String {
    format!(
        "mount -t tmpfs -o size={TINY_TMPFS},mode=0700 proxy-state {}",
        quoted(dir)
    )
}

/// Shell commands that fill the file system of `dir` with [`FILLER`] until only `free_pages`
/// pages of 4 KiB remain (tmpfs hands out whole pages).
pub fn fill(dir: &Path, free_pages: u32) -> String {
    let (spare, filler) = (quoted(&dir.join(SPARE)), quoted(&dir.join(FILLER)));
    // dd stops at "no space left"; the spare pages are set aside first and given back after.
    format!(
        "{{ dd if=/dev/zero of={spare} bs=4096 count={free_pages} 2>/dev/null; \
         dd if=/dev/zero of={filler} bs=4096 2>/dev/null; rm -f {spare}; }}"
    )
}

/// Runs the shell commands `script` in the mount namespace of process `pid`.
pub fn in_mount_namespace_of(pid: Pid, script: &str) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={pid}"))
        .args(["--mount", "sh", "-c", script]);
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "`{script}` in the mount namespace of {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `path` as process `pid` sees it, in its own mount namespace.
pub fn seen_by(pid: Pid, path: &Path) -> PathBuf {
    let relative = path.strip_prefix("/").unwrap_or(path);
    PathBuf::from(format!("/proc/{pid}/root")).join(relative)
}

/// The names of the entries of `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Single-quotes a path for `sh`.
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
