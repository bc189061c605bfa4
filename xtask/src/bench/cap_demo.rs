//! The connection cap at work, a fact rather than a comparison: the proxy started with a small
//! `--max-connections`, then cap + 1 connections opened at once, each to do its handshake and
//! one `GET /` and stay open. The proxy takes a slot before it calls `accept()`, so the
//! connections beyond the cap complete their TCP handshake in the kernel and wait in the
//! accept queue with no TLS answer; once one served connection closes, one of them is accepted
//! and served. The demonstration fails unless exactly the cap was served (one accept loop
//! serves both listeners, so the idle :80 holds no slot), and reports how many waited (and the
//! listener's accept queue, from `ss`) and how long after the close a waiting one was served.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use proxy_testkit::{NetNs, command};
use serde_json::{Value, json};

use super::{
    idle::Held,
    measure::Bench,
    tls_client::{self, Alpn},
};

/// What the demonstration saw.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CapDemo {
    pub cap: usize,
    /// Connections opened at once: cap + 1.
    pub opened: usize,
    /// Of those, served (handshake and answer) while the others waited.
    pub served: usize,
    /// The slowest TCP handshake among the connections left waiting, ms.
    pub waiting_tcp_connect_ms: f64,
    /// The :443 listener's accept queue while they waited.
    pub accept_queue: Option<u64>,
    /// How long the waiting ones had no TLS answer before a served one closed, ms.
    pub waited_ms: f64,
    /// From closing one served connection to a waiting one's answer, ms.
    pub served_after_close_ms: f64,
}

impl CapDemo {
    pub(super) fn line(&self) -> String {
        let waiting = self.opened - self.served;
        let queue = self
            .accept_queue
            .map_or_else(|| "unknown".to_owned(), |q| q.to_string());
        format!(
            "--max-connections {}: of {} connections opened at once, {} were served and {waiting} \
             completed their TCP handshake (slowest {:.2} ms) but got no TLS answer for {:.0} ms \
             (:443 accept queue: {queue}); one served connection closed, a waiting one was \
             served {:.1} ms later",
            self.cap,
            self.opened,
            self.served,
            self.waiting_tcp_connect_ms,
            self.waited_ms,
            self.served_after_close_ms
        )
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "max_connections": self.cap,
            "opened_at_once": self.opened,
            "served": self.served,
            "waiting_tcp_connect_ms_max": self.waiting_tcp_connect_ms,
            "accept_queue_while_waiting": self.accept_queue,
            "waited_without_tls_answer_ms": self.waited_ms,
            "served_after_close_ms": self.served_after_close_ms,
        })
    }
}

/// One connection of the demonstration: its TCP handshake's time and, once served, the
/// connection and when its answer came.
type Outcome = Result<(Duration, Held, Instant)>;

impl Bench {
    /// Runs the demonstration against a proxy capped at `cap` connections in `ns`, leaving the
    /// connections beyond it waiting for `hold`.
    pub(super) fn cap_demo(&self, ns: &NetNs, cap: usize, hold: Duration) -> Result<CapDemo> {
        let log = self.dir.join("proxy-cap.log");
        let cap_arg = cap.to_string();
        let args = ["--max-connections", &cap_arg];
        let _server = self.start_proxy_with(ns, "off", "warn", &log, &args)?;
        let connector = tls_client::connector(&self.state_dir().join("ca.pem"), Alpn::Http1)?;
        let cpu = self.client_cpu;
        ns.run(move || {
            let runtime = tls_client::runtime_on(cpu)?;
            runtime.block_on(async move {
                let opened = cap + 1;
                let started = Instant::now();
                let mut tasks: Vec<_> = (0..opened)
                    .map(|_| {
                        let connector = connector.clone();
                        tokio::spawn(async move {
                            let connecting = Instant::now();
                            let tcp = tls_client::tcp_connect().await?;
                            let connected = connecting.elapsed();
                            let mut tls =
                                tls_client::handshake(&connector, tcp, Alpn::Http1).await?;
                            tls_client::get_h1(&mut tls, false).await?;
                            Outcome::Ok((connected, Held::Http1(Box::new(tls)), Instant::now()))
                        })
                    })
                    .collect();
                tokio::time::sleep(hold).await;
                let (done, waiting): (Vec<_>, Vec<_>) =
                    tasks.drain(..).partition(|task| task.is_finished());
                let mut served = Vec::new();
                for task in done {
                    served.push(task.await??);
                }
                let accept_queue = listen_queue(ns).ok();
                let waited_ms = started.elapsed().as_secs_f64() * 1e3;
                let closing = Instant::now();
                drop(served.pop().context("no connection was served")?);
                let mut first_after_close = None;
                let mut waiting_tcp_connect_ms: f64 = 0.0;
                for task in waiting {
                    let (connected, held, answered) =
                        tokio::time::timeout(Duration::from_secs(10), task)
                            .await
                            .context(
                                "a waiting connection was not served after a slot freed",
                            )???;
                    waiting_tcp_connect_ms =
                        waiting_tcp_connect_ms.max(connected.as_secs_f64() * 1e3);
                    first_after_close =
                        Some(first_after_close.map_or(answered, |t: Instant| t.min(answered)));
                    // Each waiting one served frees no slot: close it for the next.
                    drop(held);
                }
                let served_after_close_ms = first_after_close.map_or(f64::NAN, |at| {
                    at.saturating_duration_since(closing).as_secs_f64() * 1e3
                });
                anyhow::ensure!(
                    served.len() + 1 == cap,
                    "--max-connections {cap}: {} connections were served, not {cap}",
                    served.len() + 1
                );
                Ok(CapDemo {
                    cap,
                    opened,
                    served: served.len() + 1,
                    waiting_tcp_connect_ms,
                    accept_queue,
                    waited_ms,
                    served_after_close_ms,
                })
            })
        })?
    }
}

/// The accept queue of the :443 listener in `ns` (`ss` shows it as the listening socket's
/// Recv-Q).
fn listen_queue(ns: &NetNs) -> Result<u64> {
    let mut cmd = ns.command("ss");
    cmd.args(["-Hltn", "( sport = :443 )"]);
    let out = command::output(&mut cmd)?;
    Ok(out
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}
