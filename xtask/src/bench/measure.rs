//! One contender in one repetition, once [`super::servers`] has started it and checked its
//! answer: every scenario run against it with the load generator pinned to the client core,
//! the server's CPU time read around each run and its peak RSS at the end.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{NetNs, Process, command, usage};

use super::{
    load::{self, Throughput},
    report::{Contender, Metric, Run},
    servers::pinned,
};

/// Everything a measurement needs, fixed for the whole benchmark.
#[derive(Debug)]
pub(super) struct Bench {
    pub proxy: PathBuf,
    pub nginx: Option<(PathBuf, (u32, u32, u32))>,
    pub haproxy: Option<PathBuf>,
    pub h2o: Option<PathBuf>,
    /// The temporary directory: state, logs, the peers' directories.
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
    /// Whether `contender` can run here (a peer whose binary was found).
    pub(super) fn has(&self, contender: Contender) -> bool {
        match contender {
            Contender::Nginx => self.nginx.is_some(),
            Contender::Haproxy => self.haproxy.is_some(),
            Contender::H2o => self.h2o.is_some(),
            _ => true,
        }
    }

    /// The proxy's state directory: its CA and the leaf every server presents.
    pub(super) fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
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
        // shared with the worker), reported beside it. HAProxy (no master) and h2o are one
        // process each.
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
