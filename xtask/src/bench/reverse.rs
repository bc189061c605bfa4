//! The reverse-proxy lines: every contender proxying `GET /` to the same small backend,
//! `proxy backend` (plain HTTP/1.1, the proxy's static site) on [`BACKEND`] in the
//! contender's namespace, pinned to the client core so that the server core holds the
//! contender alone and its CPU time per request is its own: nginx `proxy_pass` to an upstream
//! with kept-alive connections, HAProxy a `backend` with `http-reuse always`, h2o
//! `proxy.reverse.url`, the proxy `--upstream`. The answer through each is checked as the
//! static one (the backend serves the same fields); HTTP/1.1 keep-alive (wrk) and HTTP/2
//! (h2load) are measured; then the backend is stopped and `GET /` must fail, which proves
//! that the answers measured came through the backend, not from the contender itself.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{NetNs, Process};

use super::{
    measure::{Bench, Line},
    metric::Metric,
    report::{Contender, Run},
    servers::{curl, pinned},
};

/// Where the backend listens, inside each contender's namespace.
pub(super) const BACKEND: &str = "127.0.0.1:8081";

/// How long the backend gets to start answering.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(10);

impl Bench {
    /// The reverse-proxy lines of `contender`, against a fresh backend and a fresh server in
    /// `ns`; their figures go into `run` (the peers of the smoke run get the HTTP/1.1 line
    /// only).
    pub(super) fn reverse_lines(
        &self,
        contender: Contender,
        ns: &NetNs,
        run: &mut Run,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        let backend = self.start_backend(ns, contender)?;
        let mut server = self
            .start_for(contender, ns, None, Some(BACKEND))
            .context("starting it in front of the backend")?;
        let url = "https://127.0.0.1/";
        if self.warm_up {
            self.wrk(ns, url, self.h1_connections[0], 1)?;
        }
        let connections = self.h1_connections[0];
        let h1 = Line {
            what: format!("reverse proxy, HTTP/1.1 keep-alive ×{connections}"),
            json: "reverse_h1",
            share: "reverse_h1_server_core_share",
            rps: Metric::ReverseH1Rps,
            p50: None,
            p99: Some(Metric::ReverseH1P99Ms),
            cpu: Metric::ReverseH1CpuUs,
            instructions: None,
        };
        self.line(run, &server, &h1, progress, || {
            self.wrk(ns, url, connections, self.seconds)
        })?;
        if !(self.smoke && contender.is_peer()) {
            let (clients, streams) = self.h2_shapes[0];
            let h2 = Line {
                what: format!("reverse proxy, HTTP/2 {clients}×{streams} streams"),
                json: "reverse_h2",
                share: "reverse_h2_server_core_share",
                rps: Metric::ReverseH2Rps,
                p50: None,
                p99: None,
                cpu: Metric::ReverseH2CpuUs,
                instructions: None,
            };
            self.line(run, &server, &h2, progress, || {
                self.h2load(ns, clients, streams)
            })?;
        }
        drop(backend);
        let status = curl(
            ns,
            &["-o", "/dev/null", "-w", "%{http_code}"],
            &format!("{url}?backend=stopped"),
        )
        .unwrap_or_default();
        if status == "200" {
            bail!(
                "{} still answers 200 with its backend stopped: it did not proxy",
                contender.label()
            );
        }
        server.check_running()?;
        Ok(())
    }

    /// `proxy backend` on [`BACKEND`] in `ns`, pinned to the client core, answering.
    fn start_backend(&self, ns: &NetNs, contender: Contender) -> Result<Process> {
        let mut cmd = pinned(ns, self.client_cpu, &self.proxy.to_string_lossy());
        cmd.args(["backend", "--listen", BACKEND])
            .env("PROXY_LOG", "warn");
        let log = self
            .dir
            .join(format!("backend-for-{}.log", contender.key()));
        let mut backend =
            Process::spawn("backend", &mut cmd, &log)?.stop_with_sigterm(Duration::from_secs(5));
        backend.wait_ready(BACKEND_READY_TIMEOUT, || {
            curl(
                ns,
                &["-o", "/dev/null", "-w", "%{http_code}"],
                &format!("http://{BACKEND}/"),
            )
            .is_ok_and(|code| code == "200")
        })?;
        Ok(backend)
    }
}
