//! Private network namespaces, so that a proxy binds the real ports 80 and 443 without
//! colliding with the host or with another test: created with loopback up, entered by commands
//! (`nsenter`) and by threads (`setns`), and deleted, with whatever still runs inside, when
//! dropped. Names carry the creating process's id, so that the namespaces a killed run left
//! behind are recognised and removed by the next one.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::{self, CommandError};

/// Where `ip netns` keeps the namespaces it names.
const NETNS_DIR: &str = "/run/netns";

/// Numbers the namespaces of this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace could not be set up, entered or removed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command that creates, inspects or deletes namespaces failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A thread could not move into the namespace.
    #[error("entering network namespace {name}: {source}")]
    Enter { name: String, source: io::Error },
    /// `/run/netns` could not be listed.
    #[error("listing {NETNS_DIR}: {0}")]
    List(io::Error),
}

/// A network namespace with loopback up; deleted when dropped, after killing whatever still
/// runs in it, unless [`NetNs::keep`] was called.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    kept: bool,
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<n>`, the n-th namespace of this process, after removing those
    /// that earlier, killed processes left under the same prefix.
    pub fn create(prefix: &str) -> Result<NetNs, NetnsError> {
        // Another thread of this process may be removing the same leftovers: not our failure.
        if let Err(e) = remove_stale(prefix) {
            eprintln!("warning: {e}");
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        NetNs::create_named(&format!("{prefix}-{}-{n}", std::process::id()))
    }

    /// Creates the namespace `name`, replacing one of that name left behind.
    pub fn create_named(name: &str) -> Result<NetNs, NetnsError> {
        delete(name)?;
        command::output(Command::new("ip").args(["netns", "add", name]))?;
        // From here on, a failure deletes the namespace again.
        let ns = NetNs {
            name: name.to_owned(),
            kept: false,
        };
        command::output(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace (`nsenter --net=/run/netns/NAME PROGRAM`); add its
    /// arguments to the returned command. `nsenter` and everything it runs exec, so the
    /// child's pid is the program's.
    ///
    /// Not `ip netns exec`: that remounts `/sys`, which hides the cgroup v2 hierarchy the
    /// proxy attaches its eBPF program to. Where `setpriv` exists the program also gets SIGKILL
    /// when the thread that started it dies, so a killed run leaves no server behind.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()));
        if Path::new("/usr/bin/setpriv").exists() {
            cmd.args(["/usr/bin/setpriv", "--pdeathsig", "KILL"]);
        }
        cmd.arg(program);
        cmd
    }

    /// `program` run inside the namespace with `ip netns exec`, which also mounts a `/sys` of
    /// the namespace (its own network devices, no cgroup hierarchy) and the files of
    /// `/etc/netns/NAME`: what a daemon that manages the namespace's own network devices, such
    /// as libvirtd, expects. Never for the proxy (see [`NetNs::command`]).
    pub fn ip_netns_exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread that has entered the namespace and returns its result; a
    /// panic in `f` is raised again here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        thread::scope(|s| s.spawn(|| enter(&self.name).map(|()| f())).join())
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Like [`NetNs::run`] in the background: `join` the handle for `f`'s result.
    ///
    /// # Panics
    ///
    /// The thread panics, which `join` reports, when it cannot enter the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let name = self.name.clone();
        thread::spawn(move || {
            if let Err(e) = enter(&name) {
                panic!("{e}");
            }
            f()
        })
    }

    /// Leaves the namespace in place when dropped, with whatever runs in it.
    pub fn keep(&mut self) {
        self.kept = true;
    }

    fn path(&self) -> PathBuf {
        path(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Err(e) = delete(&self.name) {
            eprintln!("warning: {e}");
        }
    }
}

/// Deletes the namespaces `<prefix>-<pid>-...` whose creating process is gone; returns their
/// names.
pub fn remove_stale(prefix: &str) -> Result<Vec<String>, NetnsError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        // No namespace was ever named on this machine.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetnsError::List(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(NetnsError::List)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(creator) = creator(prefix, &name)
            && !Path::new("/proc").join(creator.to_string()).exists()
        {
            delete(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Kills whatever runs in namespace `name` (other than this process), then deletes it; does
/// nothing when there is no such namespace.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    if !path(name).exists() {
        return Ok(());
    }
    if let Ok(pids) = command::output(Command::new("ip").args(["netns", "pids", name])) {
        let own = std::process::id().to_string();
        for pid in pids.split_whitespace().filter(|pid| *pid != own) {
            if let Ok(pid) = pid.parse() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    command::output(Command::new("ip").args(["netns", "del", name]))?;
    Ok(())
}

fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Moves the calling thread into namespace `name`.
fn enter(name: &str) -> Result<(), NetnsError> {
    let enter_error = |source| NetnsError::Enter {
        name: name.to_owned(),
        source,
    };
    let file = File::open(path(name)).map_err(enter_error)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| enter_error(errno.into()))
}

/// The pid that created namespace `name`, when `prefix` made it.
fn creator(prefix: &str, name: &str) -> Option<u32> {
    name.strip_prefix(prefix)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(prefix: &str, name: &str, expected: Option<u32>) {
        assert_eq!(creator(prefix, name), expected, "{prefix} {name}");
    }

    #[test]
    fn recognises_its_own_namespaces() {
        check("xtask-bench", "xtask-bench-4242-3", Some(4242));
        check("xtask-bench", "xtask-bench-x-3", None);
        check("xtask-bench", "proxy-e2e-4242-0", None);
        check("proxy-e2e", "proxy-e2e-4242-0", Some(4242));
        check("proxy-e2e", "proxy-e2e4242-0", None);
        check("proxy", "proxy-vmtest", None);
    }
}
