//! The tests' private network namespaces: the testkit's, named `proxy-e2e-<pid>-<n>` (one per
//! test, so that each proxy binds the real ports without colliding), with client futures run
//! on a thread that has entered the namespace, on a current-thread tokio runtime.

use std::ffi::OsStr;
use std::future::Future;
use std::process::Command;
use std::thread;

/// A network namespace `proxy-e2e-<pid>-<n>` with `lo` up; deleted on drop.
pub struct NetNs(proxy_testkit::NetNs);

impl NetNs {
    /// Creates the namespace and brings its loopback interface up.
    pub fn new() -> NetNs {
        NetNs(
            proxy_testkit::NetNs::create("proxy-e2e")
                .unwrap_or_else(|e| panic!("creating a network namespace: {e}")),
        )
    }

    /// `program` run inside the namespace (through `nsenter`, which keeps the cgroup mount the
    /// proxy's eBPF program needs); add the program's arguments to the returned command.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.0.command(program)
    }

    /// Runs `f()` on a fresh thread inside the namespace and returns its output. A panic
    /// inside is re-raised here.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        self.0
            .run(|| runtime().block_on(f()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`NetNs::run`] but in the background; join the handle to get the output.
    pub fn spawn<F, Fut, T>(&self, f: F) -> thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        self.0.spawn(move || runtime().block_on(f()))
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a current-thread tokio runtime")
}
