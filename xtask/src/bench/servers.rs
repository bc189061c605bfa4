//! The contenders as servers: each started in its own namespace, pinned to the server core,
//! with its output in the bench's directory, and stopped (SIGTERM, then SIGKILL) when dropped;
//! ready once `GET /` over TLS answers 200. Before any measurement the answer is checked to be
//! the proxy's (the same body, type and redirect), and for the proxy that its eBPF program is
//! attached or detached as asked. Servers and load generators alike run as [`pinned`]
//! commands.

use std::{fs, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{Metrics, NetNs, Process, command};

use super::{load::HOST, measure::Bench, nginx, report::Contender};

/// How long a server gets to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl Bench {
    /// Starts `contender` in `ns` and waits until it answers; checks the answer and, for the
    /// proxy, whether its eBPF program is attached as asked.
    pub(super) fn start(&self, contender: Contender, ns: &NetNs) -> Result<Process> {
        let mut server = match contender {
            Contender::Nginx => self.start_nginx(ns)?,
            Contender::AccessLog => {
                self.start_proxy(ns, "required", "info", Path::new("/dev/null"))?
            }
            Contender::Attached | Contender::Detached => {
                let ebpf = if contender == Contender::Attached {
                    "required"
                } else {
                    "off"
                };
                let log = self.dir.join(format!("{}.log", contender.key()));
                self.start_proxy(ns, ebpf, "warn", &log)?
            }
        };
        wait_ready(ns, &mut server)?;
        check_answer(ns).with_context(|| format!("{} answers differently", contender.label()))?;
        if contender != Contender::Nginx {
            let metrics = Metrics::parse(&curl(ns, &[], "http://127.0.0.1:9090/metrics")?);
            let want = if contender == Contender::Detached {
                0.0
            } else {
                1.0
            };
            let attached = metrics.get("proxy_ebpf_attached", &[("program", "sock_ops")]);
            if attached != Some(want) {
                bail!(
                    "{}: proxy_ebpf_attached{{program=\"sock_ops\"}} is {attached:?}, expected {want}",
                    contender.label()
                );
            }
        }
        Ok(server)
    }

    /// The proxy with `--ebpf ebpf`, `PROXY_LOG=filter` and its standard error to `log`, ready.
    /// The access log costs a line per request: the bench runs it off (`warn`) except in the
    /// access-log run (`info`, to /dev/null: formatting and the write calls, not a disk).
    pub(super) fn start_proxy(
        &self,
        ns: &NetNs,
        ebpf: &str,
        filter: &str,
        log: &Path,
    ) -> Result<Process> {
        let mut cmd = pinned(ns, self.server_cpu, &self.proxy.to_string_lossy());
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--ebpf", ebpf, "--drain-timeout", "1s"])
            .env("PROXY_LOG", filter);
        let mut server = start_server("proxy", &mut cmd, log)?;
        wait_ready(ns, &mut server)?;
        Ok(server)
    }

    /// nginx with the configuration of [`nginx::config`] (a resumption log when `log` is
    /// given) in its own prefix directory, ready.
    pub(super) fn start_nginx_with(
        &self,
        ns: &NetNs,
        name: &str,
        log: Option<&Path>,
    ) -> Result<Process> {
        let (bin, version) = self.nginx.as_ref().context("nginx is not available")?;
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = nginx::config(&nginx::Settings {
            dir: &dir,
            state_dir: &self.state_dir(),
            cpu: self.server_cpu,
            version: *version,
            resumption_log: log,
        });
        fs::write(dir.join("nginx.conf"), conf)?;
        let mut cmd = pinned(ns, self.server_cpu, &bin.to_string_lossy());
        cmd.args(nginx::args(&dir));
        let mut server = start_server("nginx", &mut cmd, &dir.join("nginx.out"))?;
        wait_ready(ns, &mut server)?;
        Ok(server)
    }

    fn start_nginx(&self, ns: &NetNs) -> Result<Process> {
        self.start_nginx_with(ns, "nginx", None)
    }
}

/// Checks the contender gives the proxy's answer: `GET /` over h2 → 200 `Hello SRE!` as
/// `text/plain; charset=utf-8`, and plain HTTP → 308 to the same path over https.
fn check_answer(ns: &NetNs) -> Result<()> {
    let h2 = curl(
        ns,
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %{content_type}",
        ],
        "https://127.0.0.1/",
    )?;
    let body = curl(ns, &["--http1.1"], "https://127.0.0.1/")?;
    let redirect = curl(
        ns,
        &["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"],
        "http://127.0.0.1/a?b=1",
    )?;
    let problems = answer_problems(&h2, &body, &redirect);
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// What differs from the proxy's answer, given curl's `-w` lines and the body.
fn answer_problems(h2: &str, body: &str, redirect: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if h2 != "2 200 text/plain; charset=utf-8" {
        problems.push(format!("GET / over h2: {h2:?}"));
    }
    if body != "Hello SRE!" {
        problems.push(format!("body {body:?}"));
    }
    if redirect != format!("308 https://{HOST}/a?b=1") {
        problems.push(format!("plain HTTP: {redirect:?}"));
    }
    problems
}

/// `curl -sk ARGS URL` in `ns`, its standard output.
fn curl(ns: &NetNs, args: &[&str], url: &str) -> Result<String> {
    let mut cmd = ns.command("curl");
    cmd.args(["-sk", "--max-time", "5"]).args(args).arg(url);
    Ok(command::output(&mut cmd)?)
}

/// `program` run inside `ns` and pinned to `cpu` (nsenter and taskset both exec, so the
/// child's pid is the program's).
pub(super) fn pinned(ns: &NetNs, cpu: usize, program: &str) -> Command {
    let mut cmd = ns.command("taskset");
    cmd.args(["-c", &cpu.to_string(), program]);
    cmd
}

/// Starts a server with its output to `log`; stopped with SIGTERM (then SIGKILL) when dropped.
fn start_server(label: &str, cmd: &mut Command, log: &Path) -> Result<Process> {
    Ok(Process::spawn(label, cmd, log)?.stop_with_sigterm(STOP_GRACE))
}

/// Waits until `GET /` over TLS answers 200 in `ns`.
fn wait_ready(ns: &NetNs, server: &mut Process) -> Result<()> {
    Ok(server.wait_ready(READY_TIMEOUT, || {
        curl(
            ns,
            &["-o", "/dev/null", "-w", "%{http_code}"],
            "https://127.0.0.1/",
        )
        .is_ok_and(|code| code == "200")
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) {
        assert_eq!(actual, expected);
    }

    #[test]
    fn compares_answers() {
        let h2 = "2 200 text/plain; charset=utf-8";
        let redirect = "308 https://127.0.0.1/a?b=1";
        check(answer_problems(h2, "Hello SRE!", redirect), vec![]);
        check(
            answer_problems("2 200 text/plain", "Hello SRE!", redirect),
            vec![r#"GET / over h2: "2 200 text/plain""#.to_owned()],
        );
        check(
            answer_problems(h2, "Hello SRE!\n", "301 https://127.0.0.1/a?b=1").len(),
            2,
        );
    }
}
