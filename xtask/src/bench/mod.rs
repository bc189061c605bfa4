//! `cargo xtask bench`: the release proxy against itself without eBPF and against its peers
//! nginx, HAProxy and h2o, on one server core with the load generator on another. Every
//! contender runs in its own fresh network namespace on the real ports 80/443, the client
//! inside the same namespace; each contender's answer is checked to be the proxy's before it
//! is measured; the contenders are interleaved over the repetitions, each repetition
//! starting one contender later (A B C, B C A, C A B ...), and the report gives medians with
//! min–max, the ratios proxy/nginx, proxy/best peer and attached/detached, and the targets.
//! A markdown table is printed at the end and the raw figures written to
//! `target/bench/bench-<UTC time>.json`. `--smoke` runs the harness
//! itself for the test suite (every contender started, checked and loaded for a second, every
//! scenario below run at least once at a tiny size, no report).
//!
//! Scenarios, each line with the server's CPU µs per request or handshake and the share of
//! its core it used (CPU seconds over wall seconds):
//!
//! - HTTP/1.1 keep-alive over TLS at two connection counts (`wrk --latency -c 50`, `-c 500`);
//! - HTTP/2 at two shapes (`h2load -c 16 -m 32`, `-c 50 -m 10`);
//! - full TLS handshakes (`openssl s_time -new`, one request per connection, never resumed;
//!   the server CPU time per handshake is the figure, since the client is the limit);
//! - resumed TLS 1.3 handshakes, one request per connection (`openssl s_time -reuse`, whose
//!   per-connection marks prove the run resumed: [`resumption`]);
//! - plain HTTP → 308 (`wrk` on :80), and each server's peak RSS;
//! - reverse proxy: HTTP/1.1 keep-alive and HTTP/2 through each contender to the same small
//!   backend on the client core ([`reverse`]);
//! - where `perf stat` counts instructions ([`perf_counters`]), instructions per request on
//!   the HTTP/1.1 and HTTP/2 lines, else the JSON says why not;
//! - for the attached proxy, its eBPF programs' run time per connection (full-handshake run)
//!   and per request (HTTP/1.1 run) and runs per connection ([`bpf_cost`]);
//! - after the repetitions, once per contender, the cost of N idle keep-alive connections,
//!   HTTP/1.1 and h2 ([`idle`]: server RSS and kernel TCP memory per connection, p99 of a small
//!   active client meanwhile, every connection held checked with `ss`);
//! - before the repetitions, the proxy's connection cap shown at work ([`cap_demo`]), a fact
//!   line, not a comparison.

mod answer;
mod bpf_cost;
mod cap_demo;
mod h2o;
mod handshake_check;
mod haproxy;
mod idle;
mod install;
mod load;
mod measure;
mod metric;
mod nginx;
mod perf_counters;
mod report;
mod resumption;
mod reverse;
mod servers;
mod targets;
mod tls_client;

use std::{
    fs,
    path::Path,
    process::{Command, ExitCode},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{NetNs, TempDir, netns};
use serde_json::json;

use crate::{deps, ebpf, exec::exec, privilege, workspace};
use measure::Bench;
use report::{Contender, Results, Shapes};

/// Names of the namespaces this task creates: the prefix, then the creating process's id.
const NETNS_PREFIX: &str = "xtask-bench";

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Two repetitions of 2-second runs without warm-ups and 1500 idle connections (under
    /// five minutes once built) instead of 5 of 4 seconds and 18000 (under half an hour).
    #[arg(long)]
    pub quick: bool,
    /// Check the harness, not the servers: the debug proxy and every peer started, their
    /// answers checked, one repetition of 1-second runs, 100 idle connections, no access-log
    /// run and no report.
    #[arg(long, conflicts_with = "quick")]
    pub smoke: bool,
    /// The core the server (the proxy or a peer) is pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// The core the load generator is pinned to.
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
    /// Repetitions of each contender [default: 5, --quick: 2].
    #[arg(long)]
    pub reps: Option<usize>,
    /// Seconds of each measured run [default: 4, --quick: 2].
    #[arg(long)]
    pub seconds: Option<u64>,
    /// HTTP/1.1 keep-alive connections of the first HTTP/1.1 line (wrk -c).
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// HTTP/1.1 keep-alive connections of the second HTTP/1.1 line (wrk -c).
    #[arg(long, default_value_t = 500)]
    pub many_connections: usize,
    /// HTTP/2 connections of the first HTTP/2 line (h2load -c).
    #[arg(long, default_value_t = 16)]
    pub h2_connections: usize,
    /// Concurrent streams per connection of the first HTTP/2 line (h2load -m).
    #[arg(long, default_value_t = 32)]
    pub h2_streams: usize,
    /// HTTP/2 connections of the second HTTP/2 line (h2load -c).
    #[arg(long, default_value_t = 50)]
    pub h2_wide_connections: usize,
    /// Concurrent streams per connection of the second HTTP/2 line (h2load -m).
    #[arg(long, default_value_t = 10)]
    pub h2_wide_streams: usize,
    /// Idle connections held open per contender and protocol, below the open-file hard limit
    /// [default: 18000, --quick: 1500, --smoke: 100].
    #[arg(long)]
    pub idle_connections: Option<usize>,
    /// The proxy's connection cap in the cap demonstration.
    #[arg(long, default_value_t = 50)]
    pub cap: usize,
    /// Parallel `openssl s_time -new` clients for the full-handshake run, and connections at
    /// a time of the resumed-handshake run.
    #[arg(long, default_value_t = 4)]
    pub handshake_clients: usize,
    /// Leave out the run with the proxy's access log on.
    #[arg(long)]
    pub no_access_log_run: bool,
    /// Never install missing tools (wrk, h2load, nginx, HAProxy, h2o) with apt.
    #[arg(long)]
    pub no_install: bool,
}

/// The Debian packages of the load generators and of the namespaces they run in.
const TOOLS: &[&str] = &[
    "wrk",            // HTTP/1.1 keep-alive and redirect load, with latency percentiles
    "nghttp2-client", // h2load: multiplexed HTTP/2 load
    "openssl",        // s_time -new: full TLS handshakes
    "curl",           // readiness and answer checks
    "iproute2",       // ip netns
    "util-linux",     // nsenter, taskset
];

/// Runs the benchmark; prints the error and fails on the first problem (the guards stop every
/// server and delete every namespace on the way out).
pub(crate) fn bench(opts: Options) -> ExitCode {
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The smoke run of the test suite: `cargo xtask bench --smoke` with the proxy already built
/// (debug, with the eBPF program).
pub(crate) fn smoke() -> Result<()> {
    use clap::{Args as _, FromArgMatches as _};
    // The defaults of every other option, as `cargo xtask bench --smoke` has them.
    let matches = Options::augment_args(clap::Command::new("bench"))
        .try_get_matches_from(["bench", "--smoke"])?;
    run(Options::from_arg_matches(&matches)?)
}

fn run(opts: Options) -> Result<()> {
    let started = Instant::now();
    let reps = if opts.smoke {
        1
    } else {
        opts.reps.unwrap_or(if opts.quick { 2 } else { 5 }).max(1)
    };
    let seconds = if opts.smoke {
        1
    } else {
        opts.seconds
            // 4 s, not 5, since the reverse-proxy lines: 5 s took the full run to 31 min.
            .unwrap_or(if opts.quick { 2 } else { 4 })
            .max(1)
    };
    let idle_n = match (opts.idle_connections, opts.smoke, opts.quick) {
        (Some(n), _, _) => n,
        (None, true, _) => 100,
        (None, false, true) => 1500,
        (None, false, false) => 18_000,
    }
    .max(1);
    check_machine(&opts)?;
    raise_descriptor_limit(idle_n)?;
    for name in netns::remove_stale(NETNS_PREFIX)? {
        println!("removed network namespace {name} left by an interrupted run");
    }
    let install = !opts.no_install;
    ensure_tools(install)?;
    let nginx =
        nginx::find_or_install(install).and_then(|bin| nginx::version(&bin).map(|v| (bin, v)));
    let haproxy = haproxy::find_or_install(install);
    let h2o = h2o::find_or_install(install);

    // The attached contender needs the program, so a fresh machine gets the toolchain (and
    // tracefs, for the resets tracepoint) as `cargo xtask test` gets them.
    if install {
        ebpf::ensure_tracefs()?;
        ebpf::ensure_toolchain()?;
    }
    ebpf::build().context("the attached contender needs the eBPF program")?;
    if opts.smoke {
        // The test suite has built the debug proxy; a release build would take minutes.
        exec(workspace::cargo().args(["build", "--locked", "-p", "proxy"]))?;
    } else {
        println!("==> building the release proxy with its eBPF program");
        exec(workspace::cargo().args(["build", "--release", "--locked", "-p", "proxy"]))?;
    }

    // The budgets (30 minutes, 5 with --quick) are for what follows: a fresh machine's first
    // installs and release build take minutes more, once.
    let measuring_started = Instant::now();
    let setup = measuring_started.duration_since(started).as_secs();
    let dir = TempDir::new("xtask-bench-").context("creating a temporary directory")?;
    let bench = Bench {
        proxy: workspace::proxy_bin(!opts.smoke),
        nginx,
        haproxy,
        h2o,
        dir: dir.path().to_owned(),
        server_cpu: opts.server_cpu,
        client_cpu: opts.client_cpu,
        seconds,
        h1_connections: [opts.connections, opts.many_connections],
        h2_shapes: [
            (opts.h2_connections, opts.h2_streams),
            (opts.h2_wide_connections, opts.h2_wide_streams),
        ],
        handshake_clients: opts.handshake_clients.max(1),
        perf: perf_counters::probe(),
        smoke: opts.smoke,
        warm_up: !opts.smoke && !opts.quick,
    };
    match &bench.perf {
        Ok(()) => println!("perf stat counts instructions here: instructions per request included"),
        Err(why) => println!("SKIPPED instructions per request: {why}"),
    }
    // The smoke run leaves out the detached proxy: the same binary, and the run's second.
    let mut contenders = if opts.smoke {
        vec![Contender::Attached]
    } else {
        vec![Contender::Attached, Contender::Detached]
    };
    contenders.extend(Contender::PEERS.into_iter().filter(|&c| bench.has(c)));
    if opts.smoke && contenders.len() < 1 + Contender::PEERS.len() {
        bail!("the smoke run needs every peer (nginx, HAProxy, h2o); see the lines above");
    }
    if !opts.no_access_log_run && !opts.smoke {
        contenders.push(Contender::AccessLog);
    }
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "==> servers pinned to CPU {}, load generators to CPU {}; load average now: {}",
        opts.server_cpu,
        opts.client_cpu,
        loadavg.trim()
    );

    let mut fresh_ns = || Ok(NetNs::create(NETNS_PREFIX)?);
    let handshake_check = handshake_check::check(&bench, &mut fresh_ns)?;
    println!("==> the connection cap at work (proxy only)");
    let cap_demo = {
        let ns = fresh_ns()?;
        let hold = Duration::from_millis(if opts.smoke { 300 } else { 1000 });
        bench.cap_demo(&ns, opts.cap.max(1), hold)?
    };
    println!("    {}", cap_demo.line());

    // Seconds each run takes: its measured seconds, the warm-ups (1 s each, none in the smoke
    // and quick runs; the smoke run's peers also leave out three lines), start and checks.
    // The reverse-proxy lines add two runs (one in the smoke run's peers), a warm-up and two
    // starts.
    let per_run = |c: Contender| match (c, opts.smoke) {
        (Contender::AccessLog, _) => seconds + 4,
        (_, false) if opts.quick => 9 * seconds + 3,
        (_, false) => 9 * seconds + 11,
        (c, true) if c.is_peer() => 5 * seconds + 4,
        (_, true) => 9 * seconds + 4,
    };
    let idle_contenders: Vec<Contender> = contenders
        .iter()
        .copied()
        .filter(|&c| c != Contender::AccessLog)
        .collect();
    // Opening runs at about 500 full handshakes a second on the two cores; then the probe,
    // and a server started for each protocol.
    let idle_plan = idle_contenders.len() as u64 * 2 * (idle_n as u64 / 500 + seconds + 3);
    let total: u64 = reps as u64 * contenders.iter().map(|&c| per_run(c)).sum::<u64>();
    println!(
        "==> plan: {reps} repetitions of {} contenders (~{}), then {idle_n} idle connections \
         per contender and protocol (~{})",
        contenders.len(),
        minutes(total),
        minutes(idle_plan)
    );
    let runs = reps * contenders.len();
    let measuring = Instant::now();
    let mut results = Results {
        runs: Vec::new(),
        shapes: Shapes {
            h1: bench.h1_connections,
            h2: bench.h2_shapes,
            idle: idle_n,
        },
    };
    for rep in 1..=reps {
        // Each repetition starts one contender later, so that none always runs first (after
        // the previous repetition's slowest start) or always right after the same neighbour.
        let mut order = contenders.clone();
        order.rotate_left((rep - 1) % contenders.len());
        for (i, &contender) in order.iter().enumerate() {
            let done = (rep - 1) * contenders.len() + i;
            let elapsed = measuring.elapsed().as_secs();
            let left = if done == 0 {
                total
            } else {
                // Scale the plan by how long the runs so far really took.
                let planned_done: u64 = (rep as u64 - 1)
                    * contenders.iter().map(|&c| per_run(c)).sum::<u64>()
                    + order[..i].iter().map(|&c| per_run(c)).sum::<u64>();
                (total - planned_done) * elapsed / planned_done.max(1)
            };
            println!(
                "==> [rep {rep}/{reps}, run {}/{runs}, ~{} left] {}",
                done + 1,
                minutes(left),
                contender.label()
            );
            let ns = fresh_ns()?;
            let mut server = bench.start(contender, &ns)?;
            let progress = |line: &str| println!("    {line}");
            let mut run = bench.measure(contender, rep, &ns, &mut server, &progress)?;
            drop(server);
            drop(ns);
            if contender != Contender::AccessLog {
                let ns = fresh_ns()?;
                bench
                    .reverse_lines(contender, &ns, &mut run, &progress)
                    .with_context(|| format!("{}, reverse proxy", contender.label()))?;
            }
            results.runs.push(run);
        }
    }

    println!("==> idle connections: {idle_n} per contender and protocol");
    results.runs.extend(idle::phase(
        &bench,
        &idle_contenders,
        idle_n,
        &mut fresh_ns,
    )?);

    let failed: Vec<String> = results
        .runs
        .iter()
        .flat_map(|run| {
            run.failed
                .iter()
                .map(move |(line, why)| format!("{} {line}: {why}", run.contender.label()))
        })
        .collect();
    if !failed.is_empty() {
        println!(
            "FAILED lines, left out of the figures:\n  {}",
            failed.join("\n  ")
        );
    }

    if opts.smoke {
        println!(
            "smoke run done in {}: every contender answered as the proxy does and was measured",
            minutes(started.elapsed().as_secs())
        );
        return Ok(());
    }
    let table = results.markdown();
    println!("\n==> results: medians (min–max) of {reps} interleaved runs, {seconds} s each\n");
    println!("{table}");
    let errors: Vec<String> = results
        .runs
        .iter()
        .flat_map(|run| {
            run.errors
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(move |(what, n)| {
                    format!("{} rep {} {what}: {n}", run.contender.label(), run.rep)
                })
        })
        .collect();
    if !errors.is_empty() {
        println!("load-generator errors: {}", errors.join(", "));
    }

    // `2026-11-28T04:50:00Z`, and `20261128T045000Z` for the file name.
    let iso = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let stamp = iso.replace(['-', ':'], "");
    let mut json = results.json();
    json["started"] = json!(iso);
    json["command"] = json!(command_line());
    json["duration_s"] = json!({
        "installing_and_building": setup,
        "measuring": measuring_started.elapsed().as_secs(),
    });
    json["markdown"] = json!(table);
    json["machine"] = machine(&loadavg);
    json["tools"] = tools(&bench);
    json["handshake_check"] = handshake_check;
    json["cap_demo"] = cap_demo.json();
    json["perf_instructions"] = match &bench.perf {
        Ok(()) => json!({"available": true}),
        Err(why) => json!({"available": false, "reason": why}),
    };
    json["settings"] = json!({
        "reps": reps,
        "seconds": seconds,
        "server_cpu": opts.server_cpu,
        "client_cpu": opts.client_cpu,
        "wrk_connections": bench.h1_connections,
        "h2load_shapes": bench.h2_shapes.iter().map(|(c, m)| json!({"connections": c, "streams": m})).collect::<Vec<_>>(),
        "s_time_clients": bench.handshake_clients,
        "resumption_clients": bench.handshake_clients,
        "resumption_min_share": resumption::MIN_RESUMED_SHARE,
        "idle_connections": idle_n,
        "idle_note": "server RSS is VmRSS (nginx: the worker) before opening vs with all open; kernel TCP is sockstat's TCP mem, a host-wide counter that covers both ends on loopback; every contender started with its connection limit raised above the idle count",
        "bpf_stats": "kernel.bpf_stats_enabled=1 only while the attached proxy is measured, restored after",
        "proxy_log": "PROXY_LOG=warn (access log off) except the access-log run (info, to /dev/null)",
        "nginx": "worker_processes 1 pinned, access_log off, keepalive_requests 1000000, keepalive_timeout 3600s",
        "haproxy": "nbthread 1, cpu-map to the server core, no log, http-request return (no backend), timeout client/http-request/http-keep-alive 1h",
        "h2o": "num-threads 1, no access log, mruby handler for the answer, http1-request-timeout and http2-idle-timeout 3600 s, neverbleed off",
        "reverse_proxy": format!("every contender proxies to `proxy backend` on {} in its namespace, pinned to the client core; nginx: upstream keepalive 256, proxy_http_version 1.1; HAProxy: http-reuse always; h2o: proxy.reverse.url; proxy: --upstream", reverse::BACKEND),
        "ignored_answer_fields": answer::IGNORED,
    });
    let out = workspace::target_dir().join("bench");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(format!("bench-{stamp}.json"));
    fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "raw figures: {} (done in {}: {} installing and building, {} measuring)",
        path.display(),
        minutes(started.elapsed().as_secs()),
        minutes(setup),
        minutes(measuring_started.elapsed().as_secs()),
    );
    Ok(())
}

/// Raises this process's soft open-file limit to its hard limit, which the servers inherit:
/// the idle scenario holds `idle` connections here and in the server.
fn raise_descriptor_limit(idle: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    // nginx needs the most: a sixteenth more connections than it holds (see `nginx.rs`),
    // plus its listeners, logs and the probe client's connections.
    let needed = idle as u64 * 16 / 15 + 512;
    if hard < needed {
        bail!(
            "{idle} idle connections need {needed} open files per process and the hard limit \
             is {hard} (ulimit -Hn): lower --idle-connections"
        );
    }
    Ok(())
}

/// Root (namespaces, ports 80/443, eBPF) and two distinct cores that exist.
fn check_machine(opts: &Options) -> Result<()> {
    if !privilege::is_root() {
        bail!("the benchmark needs root: network namespaces, ports 80/443 and eBPF");
    }
    if opts.server_cpu == opts.client_cpu {
        bail!(
            "--server-cpu and --client-cpu must differ (both are {})",
            opts.server_cpu
        );
    }
    for cpu in [opts.server_cpu, opts.client_cpu] {
        if !Path::new(&format!("/sys/devices/system/cpu/cpu{cpu}")).exists() {
            bail!(
                "there is no CPU {cpu}: the benchmark needs two cores (see --server-cpu, --client-cpu)"
            );
        }
    }
    Ok(())
}

/// Makes sure the load generators are there, installing them on Debian as root when allowed.
fn ensure_tools(allow_install: bool) -> Result<()> {
    let missing = deps::missing(TOOLS)?;
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !allow_install || !privilege::is_root() || !Path::new("/etc/debian_version").exists() {
        bail!("missing load tools: apt-get install -y --no-install-recommends {list}");
    }
    println!("installing the load tools: {list}");
    deps::apt_install(&missing)
}

fn minutes(seconds: u64) -> String {
    format!("{}:{:02} min", seconds / 60, seconds % 60)
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

fn machine(loadavg: &str) -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown");
    json!({
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu_model": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_before": loadavg.trim(),
    })
}

fn tools(bench: &Bench) -> serde_json::Value {
    let first_line = |program: &str, args: &[&str]| install::first_line(Path::new(program), args);
    let git = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(workspace::root())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({
        "proxy_git": git,
        "wrk": first_line("wrk", &["-v"]),
        "h2load": first_line("h2load", &["--version"]),
        "openssl": first_line("openssl", &["version"]),
        "nginx": bench.nginx.as_ref().map(|(bin, _)| install::first_line(bin, &["-v"])),
        "haproxy": bench.haproxy.as_ref().map(|bin| install::first_line(bin, &["-v"])),
        "h2o": bench.h2o.as_ref().map(|bin| install::first_line(bin, &["-v"])),
    })
}
