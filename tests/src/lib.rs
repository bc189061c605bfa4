//! End-to-end harness for the `proxy` binary.
//!
//! Every test gets a [`TestEnv`]: a fresh network namespace (so the proxy binds the real ports
//! 80, 443 and 9090 without colliding with other tests running in parallel) and a private
//! temporary directory for state, certificates and captured stderr. Clients run on a thread that
//! has entered the namespace ([`NetNs::run`]) and talk to the proxy as a user would: TLS trusting
//! only the proxy's CA, real HTTP/1.1 and HTTP/2, or raw bytes on port 80.
//!
//! The binary comes from `PROXY_BIN`, else `$CARGO_TARGET_DIR/debug/proxy`, else
//! `<workspace>/target/debug/proxy`. Network namespaces need root: without it each test prints
//! a loud SKIPPED line and returns, unless `PROXY_E2E_REQUIRE=1` (CI, `cargo xtask test`), in
//! which case it panics. A failing test prints the proxy's captured stderr and keeps its temp
//! dir (`PROXY_E2E_KEEP=1` keeps it always); `PROXY_LOG` is passed on to the proxy.
//!
//! Run: `cargo build -p proxy && cargo test -p proxy-e2e` (about 40 s on 2 cores, dominated by
//! the certificate rotation and renewal tests).

pub mod client;
pub mod kernel;
pub mod load;
pub mod metrics;
pub mod monitoring;
pub mod mounts;
pub mod netns;
pub mod pool;
pub mod process;
pub mod upstream;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

pub use client::{Alpn, RawResp, Req, Resp, TlsInfo, TlsOptions};
pub use metrics::{Metrics, MetricsExt};
pub use netns::NetNs;
pub use process::{Process, Proxy, proxy_bin, release_proxy_bin, run_with_timeout};
pub use proxy_testkit::{TempDir, poll_until, usage};

/// The proxy's HTTPS listener as seen from inside the namespace.
pub const HTTPS: &str = "127.0.0.1:443";
/// The proxy's plain HTTP (redirect) listener as seen from inside the namespace.
pub const HTTP: &str = "127.0.0.1:80";
/// The proxy's admin listener (metrics, health) as seen from inside the namespace.
pub const ADMIN: &str = "127.0.0.1:9090";

/// One test's private world: a network namespace and a temporary directory.
///
/// Declare it before any [`Proxy`] so that the proxy is killed before the namespace goes away.
pub struct TestEnv {
    /// The namespace every process and client of this test lives in.
    pub ns: NetNs,
    /// Scratch space: state dirs, certificate files, captured stderr.
    pub dir: TempDir,
}

impl TestEnv {
    /// A fresh namespace and temp dir, or `None` (after a loud SKIPPED line) when not root.
    pub fn new(test: &str) -> Option<TestEnv> {
        if !can_use_netns(test) {
            return None;
        }
        Some(TestEnv {
            ns: NetNs::new(),
            dir: scratch_dir(test),
        })
    }

    /// A path inside this test's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `proxy serve` with `args` inside the namespace and waits for `/readyz`.
    ///
    /// `--state-dir <tmp>/state` is added unless `args` has its own.
    pub fn serve(&self, args: &[&str]) -> Proxy {
        Proxy::start(&self.ns, self.dir.path(), args, &[])
    }

    /// Like [`TestEnv::serve`] with the binary `bin` (e.g. [`release_proxy_bin`]).
    pub fn serve_bin(&self, bin: &Path, args: &[&str]) -> Proxy {
        Proxy::start_bin(&self.ns, self.dir.path(), bin, args)
    }

    /// Like [`TestEnv::serve`] with extra environment variables (e.g. `PROXY_*` settings).
    pub fn serve_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::start(&self.ns, self.dir.path(), args, env)
    }

    /// Starts `proxy backend --listen ADDR` inside the namespace and waits until it accepts.
    pub fn backend(&self, listen: &str) -> Process {
        process::start_backend(&self.ns, self.dir.path(), listen)
    }

    /// Runs a future on a thread inside the namespace and returns its output.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        self.ns.run(f)
    }

    /// Scrapes `GET /metrics` from the admin listener.
    pub fn metrics(&self) -> Metrics {
        let resp = self
            .run(|| client::raw_http(ADMIN, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
            .unwrap_or_else(|e| panic!("scraping the admin /metrics endpoint failed: {e}"));
        assert_eq!(
            resp.status, 200,
            "GET /metrics on the admin listener answered {} instead of 200",
            resp.status
        );
        Metrics::parse(&String::from_utf8_lossy(&resp.body))
    }

    /// Runs `openssl ARGS` inside the namespace (bounded to 20 s).
    pub fn openssl(&self, args: &[&str]) -> Output {
        let mut cmd = self.ns.command("openssl");
        cmd.args(args);
        run_with_timeout(cmd, Duration::from_secs(20))
    }
}

/// Whether namespace tests can run; prints SKIPPED or panics (with `PROXY_E2E_REQUIRE=1`) if not.
pub fn can_use_netns(test: &str) -> bool {
    nix::unistd::geteuid().is_root() || skip(test, "needs root for network namespaces")
}

/// Whether `program` is on `PATH`. When it is not, prints a loud SKIPPED line saying how to
/// `install` it (`apt-get install ...`), or panics under `PROXY_E2E_REQUIRE=1`.
pub fn require_tool(test: &str, program: &str, install: &str) -> bool {
    on_path(program)
        || skip(
            test,
            &format!("needs `{program}` ({install}; `cargo xtask test` installs it)"),
        )
}

/// Whether `program` is a file in one of the directories of `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Gives up on `test` for `reason`: panics under `PROXY_E2E_REQUIRE=1` (CI and `cargo xtask
/// test`, where every test must run), else prints a loud SKIPPED line. Returns `false`, for
/// `if !require_tool(..) { return; }`.
pub fn skip(test: &str, reason: &str) -> bool {
    if std::env::var("PROXY_E2E_REQUIRE").as_deref() == Ok("1") {
        panic!("{test}: {reason}, and PROXY_E2E_REQUIRE=1 forbids skipping");
    }
    eprintln!("\n*** SKIPPED {test}: {reason} ***\n");
    false
}

/// Whether this is the soak (`cargo xtask soak` sets `PROXY_SOAK=1`): long checks scale up.
pub fn soak() -> bool {
    std::env::var("PROXY_SOAK").as_deref() == Ok("1")
}

/// Prints what a check measured as one line that `cargo xtask soak` collects into its report:
/// `SOAK-FIGURE <test>\t<check>\t<figure>` on stderr. The test is the current thread's name,
/// which libtest sets to the test's name; its pass or fail is the check's.
pub fn soak_figure(check: &str, figure: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    eprintln!("SOAK-FIGURE {test}\t{check}\t{figure}");
}

/// A fresh directory `<tmp>/proxy-e2e-<name>-XXXXXX`, removed on drop unless the test failed
/// or `PROXY_E2E_KEEP` is set (then kept for a post-mortem, and its path printed).
pub fn scratch_dir(name: &str) -> TempDir {
    TempDir::new(&format!("proxy-e2e-{name}-"))
        .unwrap_or_else(|e| panic!("creating a temporary directory for {name}: {e}"))
        .kept_when_set("PROXY_E2E_KEEP")
}

/// Runs a one-shot `proxy ARGS` command (no namespace needed), bounded to 30 s.
pub fn proxy_cmd(args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(proxy_bin());
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(30))
}

/// Like [`proxy_cmd`] but panics, with the command's stderr, unless it exits 0.
pub fn proxy_cmd_ok(args: &[&str]) -> Output {
    let out = proxy_cmd(args);
    assert!(
        out.status.success(),
        "`proxy {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Reads a file, panicking with its path on failure.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Replaces `path` atomically with `contents` (write a sibling temp file, then rename).
pub fn write_atomic(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp-e2e");
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// The serial number (colon separated hex) of the first certificate in a PEM file.
pub fn pem_serial(path: &Path) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = read(path);
    let der = CertificateDer::from_pem_slice(&pem)
        .unwrap_or_else(|e| panic!("{} holds no PEM certificate: {e:?}", path.display()));
    client::serial_of(&der)
}

/// A path as the `&str` a command-line argument wants (test paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Issues a leaf for `localhost` from the CA in `ca_dir` with `proxy ca issue`, written to
/// `cert` and `key`.
pub fn issue_localhost_leaf(ca_dir: &Path, cert: &Path, key: &Path) {
    proxy_cmd_ok(&[
        "ca",
        "issue",
        "--state-dir",
        path_str(ca_dir),
        "--name",
        "localhost",
        "--cert-out",
        path_str(cert),
        "--key-out",
        path_str(key),
    ]);
}

/// A local CA made with `proxy ca init` in `<tmp>/ca` for `localhost`, and `count` leaves it
/// issued with `proxy ca issue` (`leaf<i>.pem`, `leaf<i>.key`): bring-your-own material.
pub fn ca_with_leaves(env: &TestEnv, count: usize) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    let ca_dir = env.path("ca");
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&ca_dir),
        "--name",
        "localhost",
    ]);
    let leaves = (0..count)
        .map(|i| {
            let (cert, key) = (
                env.path(&format!("leaf{i}.pem")),
                env.path(&format!("leaf{i}.key")),
            );
            issue_localhost_leaf(&ca_dir, &cert, &key);
            (cert, key)
        })
        .collect();
    (ca_dir, leaves)
}
