//! One contender in one repetition, once [`super::servers`] has started it and checked its
//! answer: every scenario run against it with the load generator pinned to the client core,
//! the server's CPU time read around each run (its share of its core printed with each line),
//! its instructions where `perf` can count them, the eBPF programs' run time for the attached
//! proxy, and its peak RSS at the end.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use nix::unistd::Pid;
use proxy_testkit::{NetNs, Process, command, usage};

use super::{
    bpf_cost,
    load::{self, Throughput},
    perf_counters,
    report::{Contender, Metric, Run},
    resumption::Resumptions,
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
    /// HTTP/1.1 keep-alive connections (wrk -c) of the two HTTP/1.1 lines.
    pub h1_connections: [usize; 2],
    /// Connections × streams (h2load -c -m) of the two HTTP/2 lines.
    pub h2_shapes: [(usize, usize); 2],
    pub handshake_clients: usize,
    /// Whether `perf stat` counts instructions here, or why not.
    pub perf: Result<(), String>,
    /// The smoke run: no warm-ups, and the peers get one HTTP/1.1 and one HTTP/2 shape, no
    /// resumed-handshake line (nor the handshake check's proof of their resumption) and idle
    /// HTTP/1.1 connections only.
    pub smoke: bool,
    /// A second of load before each line (caches, allocator, the runtime's first
    /// connections); left out of the smoke and quick runs.
    pub warm_up: bool,
}

/// The metrics of one throughput line.
pub(super) struct Line {
    pub what: String,
    /// The key of its load-generator errors.
    pub json: &'static str,
    /// The key of its server core share.
    pub share: &'static str,
    pub rps: Metric,
    pub p50: Option<Metric>,
    pub p99: Option<Metric>,
    pub cpu: Metric,
    /// Where `perf` counts instructions: the key of the server's instructions per request.
    pub instructions: Option<Metric>,
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
            failed: Vec::new(),
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
        // The kernel counts the programs' runs only while asked to; restored when dropped.
        let bpf_stats = match contender {
            Contender::Attached => Some(bpf_cost::StatsEnabled::new()?),
            _ => None,
        };
        // Warm-up: caches, allocator, the runtime's first connections.
        if self.warm_up {
            self.wrk(ns, "https://127.0.0.1/", self.h1_connections[0], 1)?;
        }
        let all_lines = !(self.smoke && contender.is_peer());

        let bpf_before = bpf_stats
            .as_ref()
            .map(|_| bpf_cost::programs(pids[0]))
            .transpose()?;
        let url = "https://127.0.0.1/";
        let h1 = Line {
            what: format!("HTTP/1.1 keep-alive ×{}", self.h1_connections[0]),
            json: "h1",
            share: "h1_server_core_share",
            rps: Metric::H1Rps,
            p50: Some(Metric::H1P50Ms),
            p99: Some(Metric::H1P99Ms),
            cpu: Metric::H1CpuUs,
            instructions: Some(Metric::H1Instructions),
        };
        let t = self.line(&mut run, server, &h1, progress, || {
            self.wrk(ns, url, self.h1_connections[0], self.seconds)
        })?;
        if let Some(before) = &bpf_before {
            let (cost, _) = bpf_cost::difference(before, &bpf_cost::programs(pids[0])?);
            let per_request = cost.run_time_ns as f64 / t.requests.max(1) as f64;
            run.figures.push((Metric::BpfNsPerRequest, per_request));
            progress(&format!(
                "eBPF programs over that run: {} runs, {:.1} ms, {per_request:.0} ns per request",
                cost.run_count,
                cost.run_time_ns as f64 / 1e6
            ));
        }
        if contender == Contender::AccessLog {
            return self.finish(run, contender, server, serving, startup, progress);
        }
        let h1_many = Line {
            what: format!("HTTP/1.1 keep-alive ×{}", self.h1_connections[1]),
            json: "h1_many",
            share: "h1_many_server_core_share",
            rps: Metric::H1ManyRps,
            p50: None,
            p99: Some(Metric::H1ManyP99Ms),
            cpu: Metric::H1ManyCpuUs,
            instructions: Some(Metric::H1ManyInstructions),
        };
        if all_lines {
            self.line(&mut run, server, &h1_many, progress, || {
                self.wrk(ns, url, self.h1_connections[1], self.seconds)
            })?;
        }
        let h2_lines = [
            (Metric::H2Rps, Metric::H2CpuUs, Metric::H2Instructions, "h2"),
            (
                Metric::H2WideRps,
                Metric::H2WideCpuUs,
                Metric::H2WideInstructions,
                "h2_wide",
            ),
        ];
        let shares = ["h2_server_core_share", "h2_wide_server_core_share"];
        let h2_count = if all_lines { 2 } else { 1 };
        for ((&(clients, streams), (rps, cpu, instructions, json)), share) in self
            .h2_shapes
            .iter()
            .zip(h2_lines)
            .zip(shares)
            .take(h2_count)
        {
            let line = Line {
                what: format!("HTTP/2 {clients}×{streams} streams"),
                json,
                share,
                rps,
                p50: None,
                p99: None,
                cpu,
                instructions: Some(instructions),
            };
            self.line(&mut run, server, &line, progress, || {
                self.h2load(ns, clients, streams)
            })?;
        }

        let bpf_before = bpf_stats
            .as_ref()
            .map(|_| bpf_cost::programs(pids[0]))
            .transpose()?;
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
             ({user_us:.0} user + {system_us:.0} system), {}",
            cpu.busy()
        ));
        if let Some(before) = &bpf_before {
            let (cost, programs) = bpf_cost::difference(before, &bpf_cost::programs(pids[0])?);
            let per_connection = cost.run_time_ns as f64 / count as f64;
            let calls = cost.run_count as f64 / count as f64;
            run.figures.extend([
                (Metric::BpfNsPerConnection, per_connection),
                (Metric::BpfCallsPerConnection, calls),
            ]);
            progress(&format!(
                "eBPF programs over that run ({}): {per_connection:.0} ns and {calls:.1} runs \
                 per connection",
                programs.join(", ")
            ));
        }
        drop(bpf_stats);

        if all_lines {
            self.resumed_line(&mut run, contender, ns, server, progress)?;
        }

        let (t, cpu) = self.with_cpu(server, || {
            self.wrk(
                ns,
                "http://127.0.0.1/",
                self.h1_connections[0],
                self.seconds,
            )
        })?;
        let cpu_us = cpu.per_event_us(t.requests);
        run.figures.extend([
            (Metric::RedirectRps, t.rps),
            (Metric::RedirectCpuUs, cpu_us),
        ]);
        run.errors.push(("redirect", t.errors));
        run.extra
            .push(("redirect_server_core_share", cpu.core_share()));
        progress(&format!(
            "plain HTTP → 308: {:.0} req/s; server {cpu_us:.1} µs/req, {}{}",
            t.rps,
            cpu.busy(),
            errors_note(t.errors)
        ));
        self.finish(run, contender, server, serving, startup, progress)
    }

    /// The resumed-handshake line; a contender that does not let the client resume fails it.
    fn resumed_line(
        &self,
        run: &mut Run,
        contender: Contender,
        ns: &NetNs,
        server: &Process,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        let (resumed, cpu) = self.with_cpu(server, || {
            self.s_time(ns, self.handshake_clients, self.seconds, "-reuse")
        })?;
        match resumed.check(contender.label()) {
            Ok(()) => {
                let cpu_us = cpu.per_event_us(resumed.handshakes);
                run.figures.extend([
                    (Metric::ResumedPerSec, resumed.per_second),
                    (Metric::ResumedCpuUs, cpu_us),
                ]);
                progress(&format!(
                    "resumed TLS 1.3 handshakes: {:.0}/s ({} of {} resumed); server {cpu_us:.1} µs each, {}",
                    resumed.per_second,
                    resumed.resumed,
                    resumed.handshakes,
                    cpu.busy()
                ));
            }
            Err(e) => {
                progress(&format!("FAILED resumed TLS 1.3 handshakes: {e:#}"));
                run.failed.push(("resumed_handshakes", format!("{e:#}")));
            }
        }
        run.extra.extend([
            ("resumed_handshakes", resumed.handshakes as f64),
            ("resumed_handshakes_resumed", resumed.resumed as f64),
            ("resumed_server_core_share", cpu.core_share()),
        ]);
        Ok(())
    }

    /// One throughput line: `load` run with the server's CPU time (and instructions, where
    /// counted) read around it, its figures added to `run` and printed.
    pub(super) fn line(
        &self,
        run: &mut Run,
        server: &Process,
        line: &Line,
        progress: &dyn Fn(&str),
        load: impl FnOnce() -> Result<Throughput>,
    ) -> Result<Throughput> {
        let (t, cpu, instructions) = if self.perf.is_ok() && line.instructions.is_some() {
            let ((t, cpu), instructions) =
                perf_counters::count_during(&server.pids(), || self.with_cpu(server, load))?;
            (t, cpu, Some(instructions))
        } else {
            let (t, cpu) = self.with_cpu(server, load)?;
            (t, cpu, None)
        };
        if t.requests == 0 {
            let why = format!("no request completed in {} s", self.seconds);
            progress(&format!("FAILED {}: {why}", line.what));
            run.failed.push((line.json, why));
            return Ok(t);
        }
        let cpu_us = cpu.per_event_us(t.requests);
        run.figures.extend([(line.rps, t.rps), (line.cpu, cpu_us)]);
        let mut text = format!("{}: {:.0} req/s", line.what, t.rps);
        for (metric, value, name) in [(line.p50, t.p50_ms, "p50"), (line.p99, t.p99_ms, "p99")] {
            if let Some(metric) = metric {
                let value = value.unwrap_or(f64::NAN);
                run.figures.push((metric, value));
                text += &format!(", {name} {value:.2} ms");
            }
        }
        text += &format!("; server {cpu_us:.1} µs/req, {}", cpu.busy());
        if let (Some(count), Some(metric)) = (instructions, line.instructions) {
            let per_request = count as f64 / t.requests.max(1) as f64;
            run.figures.push((metric, per_request));
            text += &format!(", {per_request:.0} instructions/req");
        }
        run.errors.push((line.json, t.errors));
        run.extra.push((line.share, cpu.core_share()));
        progress(&format!("{text}{}", errors_note(t.errors)));
        Ok(t)
    }

    /// The peak RSS under load, and a last check that the server still runs.
    fn finish(
        &self,
        mut run: Run,
        contender: Contender,
        server: &mut Process,
        serving: &[Pid],
        startup: u64,
        progress: &dyn Fn(&str),
    ) -> Result<Run> {
        let pids = server.pids();
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

    pub(super) fn wrk(
        &self,
        ns: &NetNs,
        url: &str,
        connections: usize,
        seconds: u64,
    ) -> Result<Throughput> {
        let mut cmd = pinned(ns, self.client_cpu, "wrk");
        cmd.args(load::wrk_args(url, connections, seconds));
        load::parse_wrk(&command::output(&mut cmd)?).context("reading wrk's report")
    }

    pub(super) fn h2load(&self, ns: &NetNs, clients: usize, streams: usize) -> Result<Throughput> {
        let mut cmd = pinned(ns, self.client_cpu, "h2load");
        let warm_up = u64::from(self.warm_up);
        cmd.args(load::h2load_args(
            "https://127.0.0.1/",
            clients,
            streams,
            warm_up,
            self.seconds,
        ));
        load::parse_h2load(&command::output(&mut cmd)?).context("reading h2load's report")
    }

    /// Full handshakes with `openssl s_time -new`, several in parallel on the client core:
    /// the handshakes completed and their rate; fails if s_time marked any resumed.
    pub(super) fn handshakes(&self, ns: &NetNs) -> Result<(u64, f64)> {
        let run = self.s_time(ns, self.handshake_clients, self.seconds, "-new")?;
        if run.resumed > 0 {
            bail!(
                "openssl s_time -new resumed {} of {} handshakes",
                run.resumed,
                run.handshakes
            );
        }
        Ok((run.handshakes, run.per_second))
    }

    /// `clients` parallel `openssl s_time` for `seconds`, with `-new` or `-reuse`.
    pub(super) fn s_time(
        &self,
        ns: &NetNs,
        clients: usize,
        seconds: u64,
        mode: &str,
    ) -> Result<Resumptions> {
        let start = Instant::now();
        let children = (0..clients)
            .map(|_| {
                let mut cmd = pinned(ns, self.client_cpu, "openssl");
                cmd.args(load::s_time_args(mode, seconds))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("failed to start openssl s_time")
            })
            .collect::<Result<Vec<Child>>>()?;
        let (mut total, mut resumed) = (0, 0);
        for child in children {
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let report = load::parse_s_time(&text).with_context(|| {
                format!(
                    "reading openssl s_time's report: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
            if report.connections > 0 && report.bytes_per_connection == 0 {
                bail!("openssl s_time read no response over its connections");
            }
            total += report.connections;
            resumed += report.resumed;
        }
        if total == 0 {
            bail!("openssl s_time completed no connection");
        }
        Ok(Resumptions {
            handshakes: total,
            resumed,
            per_second: total as f64 / start.elapsed().as_secs_f64(),
        })
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

    /// The core's use as printed with every line: CPU seconds over wall seconds.
    pub(super) fn busy(self) -> String {
        format!(
            "core {:.0}% busy ({:.2} CPU s / {:.2} s)",
            self.core_share() * 100.0,
            self.user + self.system,
            self.wall
        )
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
