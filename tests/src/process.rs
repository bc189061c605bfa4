//! The proxy (and its backend) as child processes: started inside a namespace, waited for
//! until ready, signalled, and killed on drop (the testkit's guard); their output is captured
//! to a file and printed when a test fails. Also one-shot commands, bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use proxy_testkit::command;
use proxy_testkit::process::ProcessError;

use crate::client;
use crate::netns::NetNs;
use crate::{ADMIN, TlsOptions};

/// How long a proxy or backend gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The proxy binary: `PROXY_BIN`, else `$CARGO_TARGET_DIR/debug/proxy`, else
/// `<workspace>/target/debug/proxy`. Panics if it does not exist.
pub fn proxy_bin() -> PathBuf {
    let candidates: Vec<PathBuf> = if let Some(bin) = std::env::var_os("PROXY_BIN") {
        vec![PathBuf::from(bin)]
    } else {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut c = Vec::new();
        if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
            c.push(PathBuf::from(target).join("debug/proxy"));
        }
        c.push(workspace.join("target/debug/proxy"));
        c
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the proxy binary is missing (looked at {candidates:?}); build it with \
                 `cargo build -p proxy` or point PROXY_BIN at it"
            )
        })
}

/// The optimised proxy binary, when `PROXY_RELEASE_BIN` names one (`cargo xtask test` builds it
/// and sets it): for checks of what production timings look like, which the debug build's
/// slower TLS and parsing would distort.
pub fn release_proxy_bin() -> Option<PathBuf> {
    std::env::var_os("PROXY_RELEASE_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// Runs `cmd` to completion with captured output, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    command::output_within(&mut cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// A child process with its output captured to a file; killed and reaped on drop (the
/// testkit's guard, which also prints the end of the output when the test fails).
pub struct Process(proxy_testkit::Process);

impl Process {
    /// Spawns `cmd` with stdin closed and its output written to `stderr_path`.
    pub fn spawn(label: &str, mut cmd: Command, stderr_path: PathBuf) -> Process {
        Process(
            proxy_testkit::Process::spawn(label, &mut cmd, &stderr_path)
                .unwrap_or_else(|e| panic!("starting the {label}: {e}")),
        )
    }

    /// The process id (`nsenter` execs the program, so this is the program itself).
    pub fn pid(&self) -> Pid {
        self.0.pid()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) {
        self.0.signal(sig).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Everything the process wrote so far.
    pub fn stderr(&self) -> String {
        self.0.log()
    }

    /// The exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.0.try_exit().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.0.wait_exit(timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Panics, showing stderr, if the process has exited.
    pub fn assert_running(&mut self, context: &str) {
        if let Some(status) = self.try_exit() {
            panic!(
                "{context}: the {} exited ({status}); its stderr:\n{}",
                self.0.label(),
                self.stderr()
            );
        }
    }

    /// Polls `ready` until it holds, panicking with stderr if the process dies or times out.
    pub fn wait_ready(&mut self, ready: impl FnMut() -> bool) {
        match self.0.wait_ready(READY_TIMEOUT, ready) {
            Ok(()) => {}
            Err(ProcessError::Exited { .. }) => self.assert_running("while waiting for readiness"),
            Err(ProcessError::NotReady { .. }) => panic!(
                "the {} was not ready within {READY_TIMEOUT:?}; its stderr:\n{}",
                self.0.label(),
                self.stderr()
            ),
            Err(e) => panic!("{e}"),
        }
    }
}

/// A running `proxy serve`.
pub struct Proxy {
    /// The process itself (signals, exit status, stderr).
    pub process: Process,
    /// The `--state-dir` it was started with.
    pub state_dir: PathBuf,
}

impl Proxy {
    /// Starts `proxy serve ARGS` in `ns` (adding `--state-dir <dir>/state` unless given) and
    /// waits until the admin `/readyz` answers 200 (on `--admin-listen` when given).
    pub fn start(ns: &NetNs, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::start_via(ns, dir, &[], args, env, || {})
    }

    /// Like [`Proxy::start`] with the binary `bin` instead of [`proxy_bin`].
    pub fn start_bin(ns: &NetNs, dir: &Path, bin: &Path, args: &[&str]) -> Proxy {
        Proxy::launch(ns, dir, bin, &[], args, &[], || {})
    }

    /// Like [`Proxy::start`], with the proxy started through `wrapper` (a command line that
    /// ends by running the program it is given, e.g. `setpriv ...` or `systemd-socket-activate
    /// ...`), and `kick` called once the process runs (e.g. to trigger socket activation).
    pub fn start_via(
        ns: &NetNs,
        dir: &Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        kick: impl FnOnce(),
    ) -> Proxy {
        Proxy::launch(ns, dir, &proxy_bin(), wrapper, args, env, kick)
    }

    fn launch(
        ns: &NetNs,
        dir: &Path,
        bin: &Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        kick: impl FnOnce(),
    ) -> Proxy {
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = ns.command(program);
                cmd.args(wrapper_args).arg(bin);
                cmd
            }
            None => ns.command(bin),
        };
        cmd.arg("serve").args(args);
        let state_dir = match args.iter().position(|a| *a == "--state-dir") {
            Some(i) => PathBuf::from(args.get(i + 1).expect("--state-dir needs a value")),
            None => {
                let s = dir.join("state");
                cmd.arg("--state-dir").arg(&s);
                s
            }
        };
        cmd.env(
            "PROXY_LOG",
            std::env::var("PROXY_LOG").unwrap_or("info".into()),
        );
        // Readable captured logs; the proxy does not check whether stderr is a terminal.
        cmd.env("NO_COLOR", "1");
        cmd.envs(env.iter().copied());
        let admin = args
            .iter()
            .position(|a| *a == "--admin-listen")
            .and_then(|i| args.get(i + 1))
            .map_or(ADMIN.to_owned(), |a| (*a).to_owned());
        let mut process = Process::spawn("proxy", cmd, dir.join("proxy.stderr"));
        kick();
        process.wait_ready(|| {
            ns.run(|| async {
                client::raw_http(&admin, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await
            })
            .is_ok_and(|r| r.status == 200)
        });
        Proxy { process, state_dir }
    }

    /// The CA certificate PEM from the state dir.
    pub fn ca_pem(&self) -> Vec<u8> {
        crate::read(&self.state_dir.join("ca.pem"))
    }

    /// TLS client options trusting only this proxy's local CA.
    pub fn tls(&self) -> TlsOptions {
        TlsOptions::trusting_pem(&self.ca_pem())
    }

    /// Sends `sig` to the proxy.
    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }
}

/// Starts `proxy backend --listen ADDR` in `ns` and waits until it accepts connections. Its
/// output goes to a log of its own, `backend-<addr>.stderr` (`-2`, `-3`, ... for a restart),
/// so that several backends, or one restarted, keep their logs apart.
pub fn start_backend(ns: &NetNs, dir: &Path, listen: &str) -> Process {
    let mut cmd = ns.command(proxy_bin());
    cmd.args(["backend", "--listen", listen]);
    let name = format!("backend-{}", listen.replace([':', '.', '[', ']'], "-"));
    let log = std::iter::once(dir.join(format!("{name}.stderr")))
        .chain((2..).map(|n| dir.join(format!("{name}-{n}.stderr"))))
        .find(|path| !path.exists())
        .unwrap_or_else(|| dir.join(format!("{name}.stderr")));
    let mut process = Process::spawn("backend", cmd, log);
    let addr = listen.to_owned();
    process.wait_ready(|| {
        let addr = addr.clone();
        ns.run(|| async move { tokio::net::TcpStream::connect(addr.as_str()).await.is_ok() })
    });
    process
}
