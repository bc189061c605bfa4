//! The proxy (and its backend) as child processes: start inside a namespace, wait until ready,
//! signal, and kill on drop; stderr is captured to a file and printed when a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client;
use crate::netns::NetNs;
use crate::{ADMIN, TlsOptions, poll_until};

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

/// Runs `cmd` to completion with captured output, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {shown}: {e}")),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("{shown} did not finish within {timeout:?}")
        }
    }
}

/// A child process with captured stderr; SIGKILLed and reaped on drop.
pub struct Process {
    label: String,
    child: Child,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Spawns `cmd` with stdin closed, stdout discarded and stderr written to `stderr_path`.
    pub fn spawn(label: &str, mut cmd: Command, stderr_path: PathBuf) -> Process {
        let stderr = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", stderr_path.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label} ({cmd:?}): {e}"));
        Process {
            label: label.to_owned(),
            child,
            stderr_path,
            exit: None,
        }
    }

    /// The process id (`nsenter` execs the program, so this is the program itself).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig)
            .unwrap_or_else(|e| panic!("sending {sig} to the {}: {e}", self.label));
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for the {}: {e}", self.label));
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_exit())
    }

    /// Panics, showing stderr, if the process has exited.
    pub fn assert_running(&mut self, context: &str) {
        if let Some(status) = self.try_exit() {
            panic!(
                "{context}: the {} exited ({status}); its stderr:\n{}",
                self.label,
                self.stderr()
            );
        }
    }

    /// Polls `ready` until it holds, panicking with stderr if the process dies or times out.
    pub fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.assert_running("while waiting for readiness");
            if ready() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the {} was not ready within {READY_TIMEOUT:?}; its stderr:\n{}",
                    self.label,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let stderr = self.stderr();
            let tail = &stderr[stderr.len().saturating_sub(6000)..];
            let tail = tail.trim_start_matches(|c: char| !c.is_ascii());
            eprintln!(
                "----- {} stderr (last 6000 bytes) -----\n{tail}\n-----",
                self.label
            );
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
    /// waits until the admin `/readyz` answers 200.
    pub fn start(ns: &NetNs, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::start_via(ns, dir, &[], args, env, || {})
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
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = ns.command(program);
                cmd.args(wrapper_args).arg(proxy_bin());
                cmd
            }
            None => ns.command(proxy_bin()),
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
        let mut process = Process::spawn("proxy", cmd, dir.join("proxy.stderr"));
        kick();
        process.wait_ready(|| {
            ns.run(|| async {
                client::raw_http(ADMIN, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await
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

/// Starts `proxy backend --listen ADDR` in `ns` and waits until it accepts connections.
pub fn start_backend(ns: &NetNs, dir: &Path, listen: &str) -> Process {
    let mut cmd = ns.command(proxy_bin());
    cmd.args(["backend", "--listen", listen]);
    let mut process = Process::spawn("backend", cmd, dir.join("backend.stderr"));
    let addr = listen.to_owned();
    process.wait_ready(|| {
        let addr = addr.clone();
        ns.run(|| async move { tokio::net::TcpStream::connect(addr.as_str()).await.is_ok() })
    });
    process
}
