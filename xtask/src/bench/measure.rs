//! One contender in one repetition: start it in a fresh namespace pinned to the server core,
//! check it gives the proxy's answer, then run every scenario against it with the load
//! generator pinned to the client core, reading the server's CPU time around each run and its
//! peak RSS at the end.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{Metrics, NetNs, Process, command, usage};

use super::{
    load::{self, HOST, Throughput},
    nginx,
    report::{Contender, Metric, Run},
};

/// How long a server gets to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything a measurement needs, fixed for the whole benchmark.
#[derive(Debug)]
pub(super) struct Bench {
    pub proxy: PathBuf,
    pub nginx: Option<(PathBuf, (u32, u32, u32))>,
    /// The temporary directory: state, logs, nginx prefixes.
    pub dir: PathBuf,
    pub server_cpu: usize,
    pub client_cpu: usize,
    pub seconds: u64,
    pub connections: usize,
    pub h2_connections: usize,
    pub h2_streams: usize,
    pub handshake_clients: usize,
}

impl Bench {
    /// The proxy's state directory: its CA and the leaf both servers present.
    pub(super) fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

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

    /// Runs the scenarios of `contender` against `server`; `progress` gets one line each.
    pub(super) fn measure(
        &self,
        contender: Contender,
        rep: usize,
        ns: &NetNs,
        server: &mut Process,
        progress: &dyn Fn(&str),
    ) -> Result<Run> {
        let mut run = Run {
            contender,
            rep,
            figures: Vec::new(),
            errors: Vec::new(),
            extra: Vec::new(),
        };
        // nginx: the worker serves; the master only holds the configuration (pages mostly
        // shared with the worker), reported beside it.
        let pids = server.pids();
        let serving = if contender == Contender::Nginx {
            &pids[1..]
        } else {
            &pids[..1]
        };
        // The peak so far is start-up's (for the proxy with eBPF: loading the program);
        // from here on the peak is the peak under load.
        let mut startup = 0;
        for &pid in serving {
            startup += usage::memory(pid)?.peak_kib;
            usage::reset_peak_memory(pid)?;
        }
        run.extra
            .push(("startup_peak_rss_mib", startup as f64 / 1024.0));
        // Warm-up: caches, allocator, the runtime's first connections.
        self.wrk(ns, "https://127.0.0.1/", 1)?;

        let (t, cpu) =
            self.with_cpu(server, || self.wrk(ns, "https://127.0.0.1/", self.seconds))?;
        let cpu_us = cpu.per_event_us(t.requests);
        run.figures.extend([
            (Metric::H1Rps, t.rps),
            (Metric::H1P50Ms, t.p50_ms.unwrap_or(f64::NAN)),
            (Metric::H1P99Ms, t.p99_ms.unwrap_or(f64::NAN)),
            (Metric::H1CpuUs, cpu_us),
        ]);
        run.errors.push(("h1", t.errors));
        run.extra.push(("h1_server_core_share", cpu.core_share()));
        progress(&format!(
            "HTTP/1.1 keep-alive: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms; server {cpu_us:.1} µs/req, {:.0}% of its core{}",
            t.rps,
            t.p50_ms.unwrap_or(f64::NAN),
            t.p99_ms.unwrap_or(f64::NAN),
            cpu.core_share() * 100.0,
            errors_note(t.errors),
        ));

        if contender != Contender::AccessLog {
            let (t, cpu) = self.with_cpu(server, || self.h2load(ns))?;
            let cpu_us = cpu.per_event_us(t.requests);
            run.figures
                .extend([(Metric::H2Rps, t.rps), (Metric::H2CpuUs, cpu_us)]);
            run.errors.push(("h2", t.errors));
            run.extra.push(("h2_server_core_share", cpu.core_share()));
            progress(&format!(
                "HTTP/2 ({}×{} streams): {:.0} req/s; server {cpu_us:.1} µs/req, {:.0}% of its core{}",
                self.h2_connections,
                self.h2_streams,
                t.rps,
                cpu.core_share() * 100.0,
                errors_note(t.errors)
            ));

            let ((count, per_second), cpu) = self.with_cpu(server, || self.handshakes(ns))?;
            let cpu_us = cpu.per_event_us(count);
            run.figures.extend([
                (Metric::HandshakesPerSec, per_second),
                (Metric::HandshakeCpuUs, cpu_us),
            ]);
            let (user_us, system_us) = (
                cpu.user / count as f64 * 1e6,
                cpu.system / count as f64 * 1e6,
            );
            run.extra.extend([
                ("handshake_server_user_us", user_us),
                ("handshake_server_system_us", system_us),
                ("handshake_server_core_share", cpu.core_share()),
            ]);
            progress(&format!(
                "full TLS handshakes: {per_second:.0}/s ({count}); server {cpu_us:.1} µs each \
                 ({user_us:.0} user + {system_us:.0} system), {:.0}% of its core",
                cpu.core_share() * 100.0
            ));

            let (t, cpu) =
                self.with_cpu(server, || self.wrk(ns, "http://127.0.0.1/", self.seconds))?;
            let cpu_us = cpu.per_event_us(t.requests);
            run.figures.extend([
                (Metric::RedirectRps, t.rps),
                (Metric::RedirectCpuUs, cpu_us),
            ]);
            run.errors.push(("redirect", t.errors));
            run.extra
                .push(("redirect_server_core_share", cpu.core_share()));
            progress(&format!(
                "plain HTTP → 308: {:.0} req/s; server {cpu_us:.1} µs/req, {:.0}% of its core{}",
                t.rps,
                cpu.core_share() * 100.0,
                errors_note(t.errors)
            ));
        }

        let (mut peak, mut now) = (0, 0);
        for &pid in serving {
            let memory = usage::memory(pid)?;
            peak += memory.peak_kib;
            now += memory.current_kib;
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        run.figures.push((Metric::RssMib, mib(peak)));
        run.extra.push(("rss_after_load_mib", mib(now)));
        let mut line = format!(
            "peak RSS under load {:.1} MiB (now {:.1} MiB; start-up peak {:.1} MiB)",
            mib(peak),
            mib(now),
            mib(startup)
        );
        if contender == Contender::Nginx {
            let master = usage::memory(pids[0])?.peak_kib;
            run.extra.push(("nginx_master_peak_rss_mib", mib(master)));
            line += &format!(", worker only; master {:.1} MiB", mib(master));
        }
        progress(&line);
        server.check_running()?;
        Ok(run)
    }

    /// Runs `f` and returns its result with the server's CPU time spent meanwhile.
    pub(super) fn with_cpu<T>(
        &self,
        server: &Process,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Cpu)> {
        let pids = server.pids();
        let start = Instant::now();
        let before = usage::cpu_time(&pids)?;
        let value = f()?;
        let after = usage::cpu_time(&pids)?;
        let cpu = Cpu {
            user: after.user_seconds - before.user_seconds,
            system: after.system_seconds - before.system_seconds,
            wall: start.elapsed().as_secs_f64(),
        };
        Ok((value, cpu))
    }

    fn wrk(&self, ns: &NetNs, url: &str, seconds: u64) -> Result<Throughput> {
        let mut cmd = pinned(ns, self.client_cpu, "wrk");
        cmd.args(load::wrk_args(url, self.connections, seconds));
        load::parse_wrk(&command::output(&mut cmd)?).context("reading wrk's report")
    }

    fn h2load(&self, ns: &NetNs) -> Result<Throughput> {
        let mut cmd = pinned(ns, self.client_cpu, "h2load");
        cmd.args(load::h2load_args(
            "https://127.0.0.1/",
            self.h2_connections,
            self.h2_streams,
            self.seconds,
        ));
        load::parse_h2load(&command::output(&mut cmd)?).context("reading h2load's report")
    }

    /// Full handshakes with `openssl s_time -new`, several in parallel on the client core:
    /// the handshakes completed and their rate.
    pub(super) fn handshakes(&self, ns: &NetNs) -> Result<(u64, f64)> {
        self.s_time(ns, self.handshake_clients, self.seconds, "-new")
    }

    /// `clients` parallel `openssl s_time` for `seconds`, with `-new` or `-reuse`.
    pub(super) fn s_time(
        &self,
        ns: &NetNs,
        clients: usize,
        seconds: u64,
        mode: &str,
    ) -> Result<(u64, f64)> {
        let start = Instant::now();
        let children = (0..clients)
            .map(|_| {
                let mut cmd = pinned(ns, self.client_cpu, "openssl");
                cmd.args(
                    load::s_time_args(seconds)
                        .iter()
                        .map(|a| if a == "-new" { mode } else { a.as_str() }),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("failed to start openssl s_time")
            })
            .collect::<Result<Vec<Child>>>()?;
        let mut total = 0;
        for child in children {
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let (count, bytes) = load::parse_s_time(&text).with_context(|| {
                format!(
                    "reading openssl s_time's report: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
            if count > 0 && bytes == 0 {
                bail!("openssl s_time read no response over its connections");
            }
            total += count;
        }
        if total == 0 {
            bail!("openssl s_time completed no connection");
        }
        Ok((total, total as f64 / start.elapsed().as_secs_f64()))
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

/// CPU time a server spent during a run, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Cpu {
    pub user: f64,
    pub system: f64,
    pub wall: f64,
}

impl Cpu {
    /// User plus system time per event, in microseconds.
    pub(super) fn per_event_us(self, events: u64) -> f64 {
        if events == 0 {
            f64::NAN
        } else {
            (self.user + self.system) / events as f64 * 1e6
        }
    }

    /// How much of one core the server used: near 1 when it was the bottleneck.
    pub(super) fn core_share(self) -> f64 {
        (self.user + self.system) / self.wall
    }
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

fn errors_note(errors: u64) -> String {
    if errors == 0 {
        String::new()
    } else {
        format!(" ({errors} errors)")
    }
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

    #[test]
    fn divides_cpu_by_events() {
        let cpu = Cpu {
            user: 0.375,
            system: 0.125,
            wall: 2.0,
        };
        check(cpu.per_event_us(1000), 500.0);
        check(cpu.core_share(), 0.25);
        assert!(cpu.per_event_us(0).is_nan());
    }
}
