//! Bounded client load: several tasks, each request on a NEW TLS connection (the handshake is
//! what certificate rotation affects), over HTTP/1.1 and HTTP/2, recording failures and the
//! leaf serials seen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{self, Alpn, Req, TlsOptions};
use crate::netns::NetNs;

/// Shape and bounds of a load run.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// Tasks speaking HTTP/1.1.
    pub h1_tasks: usize,
    /// Tasks speaking HTTP/2.
    pub h2_tasks: usize,
    /// Hard upper bound on the run's length (it also stops when told to).
    pub max_duration: Duration,
    /// Hard upper bound on requests per task.
    pub max_requests_per_task: u64,
    /// Pause between a task's requests, so the proxy is exercised, not saturated.
    pub pause: Duration,
}

impl Default for LoadPlan {
    fn default() -> Self {
        LoadPlan {
            h1_tasks: 2,
            h2_tasks: 2,
            max_duration: Duration::from_secs(40),
            max_requests_per_task: 20_000,
            pause: Duration::from_millis(10),
        }
    }
}

/// What the load saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests answered 200 `Hello SRE!`.
    pub ok: u64,
    /// Requests that failed in any way.
    pub failed: u64,
    /// The first few failures, described.
    pub errors: Vec<String>,
    /// Distinct leaf serials, in the order first seen.
    pub serials: Vec<String>,
    /// How often the served serial differed from the one served just before (any task).
    pub changes: u64,
    last_serial: Option<String>,
}

/// A load run in the background, inside a namespace.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts `plan` against the proxy's HTTPS port in `ns`, trusting `tls`.
    pub fn start(ns: &NetNs, tls: TlsOptions, plan: LoadPlan) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = ns.spawn(move || run(tls, plan, flag));
        Load {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the load and returns what it saw.
    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().expect("load joined twice");
        let report = handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        eprintln!(
            "load: {} ok, {} failed, {} serial changes, serials seen {:?}",
            report.ok, report.failed, report.changes, report.serials
        );
        report
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

async fn run(tls: TlsOptions, plan: LoadPlan, stop: Arc<AtomicBool>) -> LoadReport {
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let deadline = Instant::now() + plan.max_duration;
    let mut tasks = tokio::task::JoinSet::new();
    let alpns = std::iter::repeat_n(Alpn::H1, plan.h1_tasks)
        .chain(std::iter::repeat_n(Alpn::H2, plan.h2_tasks));
    for alpn in alpns {
        let tls = tls.clone().alpn(alpn);
        let report = report.clone();
        let stop = stop.clone();
        let plan = plan.clone();
        tasks.spawn(async move {
            for _ in 0..plan.max_requests_per_task {
                if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                    break;
                }
                let outcome = one_request(&tls, alpn).await;
                record(&report, alpn, outcome);
                tokio::time::sleep(plan.pause).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let r = report.lock().expect("load report lock");
    r.clone()
}

fn record(report: &Mutex<LoadReport>, alpn: Alpn, outcome: Result<String, String>) {
    let mut r = report.lock().expect("load report lock");
    match outcome {
        Ok(serial) => {
            r.ok += 1;
            if r.last_serial.as_ref().is_some_and(|last| *last != serial) {
                r.changes += 1;
            }
            r.last_serial = Some(serial.clone());
            if !r.serials.contains(&serial) {
                r.serials.push(serial);
            }
        }
        Err(e) => {
            r.failed += 1;
            if r.errors.len() < 10 {
                r.errors.push(format!("{alpn:?}: {e}"));
            }
        }
    }
}

/// One GET / on a new connection; the served serial on success.
async fn one_request(tls: &TlsOptions, alpn: Alpn) -> Result<String, String> {
    let resp = client::https(tls, Req::get("/")).await?;
    let want_alpn = if alpn == Alpn::H2 { "h2" } else { "http/1.1" };
    if resp.tls.alpn.as_deref() != Some(want_alpn) {
        return Err(format!("negotiated ALPN {:?}", resp.tls.alpn));
    }
    if resp.status != 200 || &resp.body[..] != b"Hello SRE!" {
        return Err(format!("got {} {:?}", resp.status, resp.text()));
    }
    Ok(resp.tls.serial)
}
