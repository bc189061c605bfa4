//! The cost of idle connections: N keep-alive TLS connections opened to a contender, each
//! through a full handshake and one `GET /` (HTTP/1.1, or h2 by ALPN), then left idle while
//! the server's resident memory (`VmRSS`, for nginx its worker) and the kernel's TCP memory
//! (`/proc/PID/net/sockstat`, in pages) are read against what they were before, and a
//! well-behaved client (`wrk -c4`) is served at the same time. The server must hold all N
//! (`ss` in the namespace counts its established :443 sockets before and after), or the line
//! fails for that contender.
//!
//! The holder is this process: a thread in the namespace, pinned to the client core, with a
//! single-threaded runtime holding every connection until told to close them.

use std::{
    path::Path,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use proxy_testkit::{NetNs, Process, command, poll_until, usage};
use tokio::sync::oneshot;

use super::{
    load,
    measure::Bench,
    report::{Contender, Metric, Run},
    servers::pinned,
    tls_client::{self, Alpn, H2Connection},
};

/// Handshakes the holder runs at a time while opening.
const OPENING_CONCURRENCY: usize = 64;
/// The well-behaved client served while the idle connections are held.
const PROBE_CONNECTIONS: usize = 4;

/// What N idle connections cost one contender.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct IdleCost {
    pub alpn: Alpn,
    pub connections: usize,
    /// Server resident memory per connection, KiB.
    pub rss_kib: f64,
    /// Kernel TCP memory per connection, KiB (both ends: the client is on the same host).
    pub socket_kib: f64,
    /// p99 latency of the well-behaved client, ms.
    pub probe_p99_ms: f64,
    /// Seconds the holder took to open the N connections.
    pub opening_seconds: f64,
}

/// The idle scenario for each of `contenders`, HTTP/1.1 then h2, each against a fresh server
/// in a fresh namespace (a server that had the other protocol's connections would reuse their
/// memory); a failed line is printed and recorded, and the others go on. The smoke run gives
/// the peers HTTP/1.1 only (their configuration is the same for both).
pub(super) fn phase(
    bench: &Bench,
    contenders: &[Contender],
    n: usize,
    fresh_ns: &mut dyn FnMut() -> Result<NetNs>,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for &contender in contenders {
        println!("==> [idle] {}", contender.label());
        let mut run = Run {
            contender,
            rep: 1,
            figures: Vec::new(),
            errors: Vec::new(),
            failed: Vec::new(),
            extra: Vec::new(),
        };
        let protocols = if bench.smoke && contender.is_peer() {
            &[Alpn::Http1][..]
        } else {
            &[Alpn::Http1, Alpn::H2]
        };
        for &alpn in protocols {
            let ns = fresh_ns()?;
            let started = bench.start_for(contender, &ns, Some(n), None);
            let (rss, socket, p99, opening, line) = match alpn {
                Alpn::Http1 => (
                    Metric::IdleH1RssKib,
                    Metric::IdleH1SocketKib,
                    Metric::IdleH1ProbeP99Ms,
                    "idle_h1_opening_seconds",
                    "idle_h1",
                ),
                Alpn::H2 => (
                    Metric::IdleH2RssKib,
                    Metric::IdleH2SocketKib,
                    Metric::IdleH2ProbeP99Ms,
                    "idle_h2_opening_seconds",
                    "idle_h2",
                ),
            };
            let cost = match started.and_then(|mut server| {
                let cost = bench.idle_cost(contender, &ns, &mut server, alpn, n);
                drop(server);
                cost
            }) {
                Ok(cost) => cost,
                Err(e) => {
                    println!("    FAILED {n} idle {} connections: {e:#}", alpn.key());
                    run.failed.push((line, format!("{e:#}")));
                    continue;
                }
            };
            run.figures.extend([
                (rss, cost.rss_kib),
                (socket, cost.socket_kib),
                (p99, cost.probe_p99_ms),
            ]);
            run.extra.push((opening, cost.opening_seconds));
            println!(
                "    {n} idle {} connections (opened in {:.1} s; {n} established on :443 as the \
                 server sees it): server RSS {:.1} KiB/conn, kernel TCP {:.2} KiB/conn; \
                 {PROBE_CONNECTIONS} active connections meanwhile: p99 {:.2} ms",
                alpn.key(),
                cost.opening_seconds,
                cost.rss_kib,
                cost.socket_kib,
                cost.probe_p99_ms
            );
        }
        runs.push(run);
    }
    Ok(runs)
}

impl Bench {
    /// Opens `n` idle connections of `alpn` to `server` in `ns`, measures, closes them.
    pub(super) fn idle_cost(
        &self,
        contender: Contender,
        ns: &NetNs,
        server: &mut Process,
        alpn: Alpn,
        n: usize,
    ) -> Result<IdleCost> {
        let pids = server.pids();
        let serving = if contender == Contender::Nginx {
            pids[1..].to_vec()
        } else {
            pids[..1].to_vec()
        };
        let rss = || -> Result<u64> {
            serving
                .iter()
                .map(|&pid| Ok(usage::memory(pid)?.current_kib))
                .sum()
        };
        let sockstat_path = format!("/proc/{}/net/sockstat", pids[0]);
        let socket_pages = || -> Result<u64> {
            let text = std::fs::read_to_string(&sockstat_path)
                .with_context(|| format!("reading {sockstat_path}"))?;
            tcp_memory_pages(&text).with_context(|| format!("no TCP mem in {sockstat_path}"))
        };
        let (rss_before, pages_before) = (rss()?, socket_pages()?);
        let opening = Instant::now();
        let holder = Holder::open(
            ns,
            self.client_cpu,
            &self.state_dir().join("ca.pem"),
            alpn,
            n,
        )?;
        let opening_seconds = opening.elapsed().as_secs_f64();
        let held = established_443(ns)?;
        if held != n {
            bail!(
                "{}: {held} connections established on :443 with {n} opened ({})",
                contender.label(),
                alpn.key()
            );
        }
        let (rss_after, pages_after) = (rss()?, socket_pages()?);
        let mut probe = pinned(ns, self.client_cpu, "wrk");
        probe.args(load::wrk_args(
            "https://127.0.0.1/",
            PROBE_CONNECTIONS,
            self.seconds,
        ));
        let probe = load::parse_wrk(&command::output(&mut probe)?).context("reading wrk")?;
        if probe.errors > 0 {
            bail!("the well-behaved client met {} errors", probe.errors);
        }
        // wrk's own connections take a moment to leave ESTABLISHED on the server's side.
        let still_held = poll_until(Duration::from_secs(2), || {
            established_443(ns).ok().filter(|&count| count == n)
        });
        if still_held.is_none() {
            bail!(
                "{}: {} connections established on :443 after the probe, {n} held ({})",
                contender.label(),
                established_443(ns)?,
                alpn.key()
            );
        }
        holder.close()?;
        server.check_running()?;
        let page_kib = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?
            .map_or(4.0, |bytes| bytes as f64 / 1024.0);
        Ok(IdleCost {
            alpn,
            connections: n,
            rss_kib: (rss_after as f64 - rss_before as f64) / n as f64,
            socket_kib: (pages_after as f64 - pages_before as f64) * page_kib / n as f64,
            probe_p99_ms: probe.p99_ms.unwrap_or(f64::NAN),
            opening_seconds,
        })
    }
}

/// Connections held open by a thread in the namespace until [`Holder::close`] (or drop).
pub(super) struct Holder {
    close: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Holder {
    /// Opens `n` connections, each with a full handshake and one `GET /` answered, on core
    /// `cpu` in `ns`; returns once all are open, or fails with the first failure.
    pub(super) fn open(
        ns: &NetNs,
        cpu: usize,
        ca_pem: &Path,
        alpn: Alpn,
        n: usize,
    ) -> Result<Holder> {
        let connector = tls_client::connector(ca_pem, alpn)?;
        let (opened_tx, opened_rx) = mpsc::channel::<Result<()>>();
        let (close_tx, close_rx) = oneshot::channel::<()>();
        let thread = ns.spawn(move || {
            let runtime = tls_client::runtime_on(cpu)?;
            runtime.block_on(async move {
                match open_all(&connector, alpn, n).await {
                    Ok(held) => {
                        let _ = opened_tx.send(Ok(()));
                        let _ = close_rx.await;
                        drop(held);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
        });
        let mut holder = Holder {
            close: Some(close_tx),
            thread: Some(thread),
        };
        match opened_rx.recv() {
            Ok(Ok(())) => Ok(holder),
            Ok(Err(e)) => Err(e.context(format!("opening {n} {} connections", alpn.key()))),
            Err(_) => Err(holder
                .join()
                .err()
                .unwrap_or_else(|| anyhow!("the holder's thread ended early"))),
        }
    }

    /// Closes every connection and waits for the thread.
    pub(super) fn close(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        drop(self.close.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the holder's thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// One held connection; dropping it closes it.
pub(super) enum Held {
    Http1(
        #[expect(dead_code, reason = "held only to keep the connection open")]
        Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    ),
    H2(#[expect(dead_code, reason = "held only to keep the connection open")] H2Connection),
}

/// Opens `n` connections of `alpn`, [`OPENING_CONCURRENCY`] at a time.
pub(super) async fn open_all(
    connector: &tokio_rustls::TlsConnector,
    alpn: Alpn,
    n: usize,
) -> Result<Vec<Held>> {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut held = Vec::with_capacity(n);
            let mut pending = tokio::task::JoinSet::new();
            let mut started = 0;
            while held.len() < n {
                while started < n && pending.len() < OPENING_CONCURRENCY {
                    let connector = connector.clone();
                    pending.spawn_local(async move { open_one(&connector, alpn).await });
                    started += 1;
                }
                let done = pending.join_next().await.context("nothing pending")?;
                held.push(done?.with_context(|| format!("connection {}", held.len() + 1))?);
            }
            Ok(held)
        })
        .await
}

/// One connection of `alpn`: handshake and one answered `GET /`, kept open.
pub(super) async fn open_one(connector: &tokio_rustls::TlsConnector, alpn: Alpn) -> Result<Held> {
    let tcp = tls_client::tcp_connect().await?;
    let mut tls = tls_client::handshake(connector, tcp, alpn).await?;
    Ok(match alpn {
        Alpn::Http1 => {
            tls_client::get_h1(&mut tls, false).await?;
            Held::Http1(Box::new(tls))
        }
        Alpn::H2 => Held::H2(tls_client::get_h2(tls).await?),
    })
}

/// Established TCP connections whose local port is 443 in `ns`: the server's side of each.
pub(super) fn established_443(ns: &NetNs) -> Result<usize> {
    let mut cmd = ns.command("ss");
    cmd.args(["-Htn", "state", "established", "( sport = :443 )"]);
    Ok(command::output(&mut cmd)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// TCP's `mem` (pages) from a sockstat file.
fn tcp_memory_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = fields.iter().position(|&f| f == "mem")?;
    fields.get(at + 1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_memory() {
        let sockstat = "sockets: used 180\n\
            TCP: inuse 7 orphan 0 tw 2 alloc 9 mem 12\n\
            UDP: inuse 1 mem 3\n";
        assert_eq!(tcp_memory_pages(sockstat), Some(12));
        assert_eq!(tcp_memory_pages("UDP: inuse 1 mem 3\n"), None);
    }
}
