//! The contenders as servers: each started in its own namespace, pinned to the server core,
//! with its output in the bench's directory, and stopped (SIGTERM, then SIGKILL) when dropped;
//! ready once `GET /` over TLS answers 200. Before any measurement the answer is checked to be
//! the proxy's ([`answer`]), and for the proxy that its eBPF program is attached or detached
//! as asked. Servers and load generators alike run as [`pinned`] commands.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{Metrics, NetNs, Process, command};

use super::{answer, h2o, haproxy, measure::Bench, nginx, report::Contender};

/// How long a server gets to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Connections allowed beyond those the bench holds: readiness checks, the probe client.
const CAPACITY_MARGIN: usize = 100;

impl Bench {
    /// Starts `contender` in `ns` and waits until it answers; checks the answer and, for the
    /// proxy, whether its eBPF program is attached as asked.
    pub(super) fn start(&self, contender: Contender, ns: &NetNs) -> Result<Process> {
        self.start_for(contender, ns, None, None)
    }

    /// [`Bench::start`], with room for `capacity` connections held open at once when given:
    /// every contender's connection limit raised above it (the proxy's `--max-connections`,
    /// nginx's `worker_connections`, HAProxy's `maxconn`, h2o's `max-connections`) and the
    /// proxy's idle deadline made as long as the peers' (an hour); and proxying every request
    /// to the backend at `upstream` (`HOST:PORT`) when given, instead of answering itself.
    pub(super) fn start_for(
        &self,
        contender: Contender,
        ns: &NetNs,
        capacity: Option<usize>,
        upstream: Option<&str>,
    ) -> Result<Process> {
        let limit = capacity.map(|n| (n + CAPACITY_MARGIN).to_string());
        let upstream_url = upstream.map(|addr| format!("http://{addr}"));
        let mut proxy_args: Vec<&str> = Vec::new();
        if let Some(limit) = &limit {
            proxy_args.extend(["--max-connections", limit, "--idle-timeout", "1h"]);
        }
        if let Some(url) = &upstream_url {
            proxy_args.extend(["--upstream", url]);
        }
        let mut server = match contender {
            Contender::Nginx | Contender::Haproxy | Contender::H2o => {
                let name = match (capacity, upstream) {
                    (Some(_), _) => format!("{}-idle", contender.key()),
                    (None, Some(_)) => format!("{}-reverse", contender.key()),
                    (None, None) => contender.key().to_owned(),
                };
                let peer = Peer {
                    contender,
                    name: &name,
                    resumption_log: false,
                    capacity: capacity.map(|n| n + CAPACITY_MARGIN),
                    upstream,
                };
                self.start_peer(ns, &peer)?.0
            }
            Contender::AccessLog => {
                self.start_proxy_with(ns, "required", "info", Path::new("/dev/null"), &proxy_args)?
            }
            Contender::Attached | Contender::Detached => {
                let ebpf = if contender == Contender::Attached {
                    "required"
                } else {
                    "off"
                };
                let log = match upstream {
                    Some(_) => self.dir.join(format!("{}-reverse.log", contender.key())),
                    None => self.dir.join(format!("{}.log", contender.key())),
                };
                self.start_proxy_with(ns, ebpf, "warn", &log, &proxy_args)?
            }
        };
        wait_ready(ns, &mut server)?;
        answer::check(ns).with_context(|| {
            format!(
                "{} does not give the proxy's answer, so it would not do the same work",
                contender.label()
            )
        })?;
        if !contender.is_peer() {
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
        self.start_proxy_with(ns, ebpf, filter, log, &[])
    }

    /// [`Bench::start_proxy`] with more `proxy serve` arguments.
    pub(super) fn start_proxy_with(
        &self,
        ns: &NetNs,
        ebpf: &str,
        filter: &str,
        log: &Path,
        args: &[&str],
    ) -> Result<Process> {
        let mut cmd = pinned(ns, self.server_cpu, &self.proxy.to_string_lossy());
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--ebpf", ebpf, "--drain-timeout", "1s"])
            .args(args)
            .env("PROXY_LOG", filter);
        let mut server = start_server("proxy", &mut cmd, log)?;
        wait_ready(ns, &mut server)?;
        Ok(server)
    }

    /// A peer with its generated configuration in its own directory under the bench's,
    /// ready; with its resumption log, the file the log goes to.
    pub(super) fn start_peer(&self, ns: &NetNs, peer: &Peer<'_>) -> Result<(Process, PathBuf)> {
        let Peer {
            contender,
            name,
            resumption_log,
            capacity,
            upstream,
        } = *peer;
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = dir.join("server.out");
        let mut log = dir.join("resumption.log");
        let state = self.state_dir();
        let (bin, args) = match contender {
            Contender::Nginx => {
                let (bin, version) = self.nginx.as_ref().context("nginx is not available")?;
                let conf = nginx::config(&nginx::Settings {
                    dir: &dir,
                    state_dir: &state,
                    cpu: self.server_cpu,
                    version: *version,
                    resumption_log: resumption_log.then_some(log.as_path()),
                    max_connections: capacity,
                    upstream,
                });
                fs::write(dir.join("nginx.conf"), conf)?;
                (bin, nginx::args(&dir))
            }
            Contender::Haproxy => {
                let bin = self.haproxy.as_ref().context("HAProxy is not available")?;
                // HAProxy reads the certificate and its key from one file.
                let mut bundle = fs::read(state.join("leaf.pem"))?;
                bundle.extend(fs::read(state.join("leaf.key"))?);
                fs::write(dir.join(haproxy::BUNDLE), bundle)?;
                let conf = haproxy::config(&haproxy::Settings {
                    dir: &dir,
                    cpu: self.server_cpu,
                    resumption_log,
                    max_connections: capacity,
                    upstream,
                });
                fs::write(dir.join("haproxy.cfg"), conf)?;
                // It logs to standard output.
                log = out.clone();
                (bin, haproxy::args(&dir))
            }
            Contender::H2o => {
                let bin = self.h2o.as_ref().context("h2o is not available")?;
                let conf = h2o::config(&h2o::Settings {
                    dir: &dir,
                    state_dir: &state,
                    resumption_log: resumption_log.then_some(log.as_path()),
                    max_connections: capacity,
                    upstream,
                });
                fs::write(dir.join("h2o.conf"), conf)?;
                (bin, h2o::args(&dir))
            }
            _ => bail!("{} is not a peer", contender.label()),
        };
        let mut cmd = pinned(ns, self.server_cpu, &bin.to_string_lossy());
        cmd.args(args);
        let mut server = start_server(contender.key(), &mut cmd, &out)?;
        wait_ready(ns, &mut server)?;
        Ok((server, log))
    }
}

/// A peer (nginx, HAProxy, h2o) to start.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer<'a> {
    pub contender: Contender,
    /// Its directory under the bench's.
    pub name: &'a str,
    /// Log, per request, whether the TLS session was resumed and the HTTP version (first and
    /// last field).
    pub resumption_log: bool,
    /// Connections it must be able to hold at once, when above its usual limit.
    pub capacity: Option<usize>,
    /// Proxy every request to this `HOST:PORT` instead of answering itself.
    pub upstream: Option<&'a str>,
}

/// `curl -sk ARGS URL` in `ns`, its standard output.
pub(super) fn curl(ns: &NetNs, args: &[&str], url: &str) -> Result<String> {
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
