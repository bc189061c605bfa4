//! Private network namespaces: one per test, so each proxy binds the real ports without
//! colliding, and client threads that enter them.

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEANUP: Once = Once::new();

/// A network namespace `proxy-e2e-<pid>-<n>` with `lo` up; deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback interface up.
    pub fn new() -> NetNs {
        let name = format!(
            "proxy-e2e-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        CLEANUP.call_once(remove_stale);
        // A leftover from an earlier run that reused our pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        exec(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        exec(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nsenter --net=/run/netns/NAME PROGRAM`: add the program's arguments to the returned command.
    ///
    /// Where `setpriv` exists the program also gets SIGKILL when the thread that started it
    /// dies, so a killed test run leaves no proxy behind. Either way the pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        // nsenter, not `ip netns exec`: the latter remounts /sys, which hides the cgroup v2
        // hierarchy the proxy attaches its eBPF program to.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()));
        if Path::new("/usr/bin/setpriv").exists() {
            cmd.args(["/usr/bin/setpriv", "--pdeathsig", "KILL"]);
        }
        cmd.arg(program);
        cmd
    }

    /// Runs `f()` on a fresh thread inside the namespace, on a current-thread tokio runtime,
    /// and returns its output. A panic inside is re-raised here.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = self.path();
        thread::scope(|s| {
            s.spawn(move || {
                enter(&path);
                runtime().block_on(f())
            })
            .join()
        })
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Like [`NetNs::run`] but in the background; join the handle to get the output.
    pub fn spawn<F, Fut, T>(&self, f: F) -> thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = self.path();
        thread::spawn(move || {
            enter(&path);
            runtime().block_on(f())
        })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: running `ip netns del {}`: {e}", self.name),
        }
    }
}

/// Deletes `proxy-e2e-<pid>-*` namespaces left by test runs that were killed (their pid is gone).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("proxy-e2e-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &PathBuf) {
    let fd = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    setns(&fd, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a current-thread tokio runtime")
}

/// Runs a setup command, panicking with its stderr if it fails.
fn exec(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
