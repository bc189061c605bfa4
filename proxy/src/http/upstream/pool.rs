//! The pool: its backends, each with its HTTP/1.1 client (`client.rs`), a load count and a
//! health state, and the choice of a backend per request.
//!
//! The choice is the power of two choices on outstanding requests: two healthy backends
//! drawn at random, the one with fewer requests in flight wins. Unlike round robin it sends
//! less to a backend that answers slowly (its requests stay in flight longer), and unlike
//! "least outstanding" over the whole pool it does not send every new request to the same
//! backend between two updates (`cargo xtask test` measures both on a pool with one slow
//! backend; README: "Upstream pools").
//!
//! Health: a backend leaves the pool when its active check fails `unhealthy_threshold`
//! times in a row, or when `eject_after` live requests in a row fail to connect or answer
//! 5xx; it returns when its check passes `healthy_threshold` times in a row. With no backend
//! healthy the pool fails open: every backend is tried, and `proxy_upstream_fail_open` says so.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::client::BackendClient;
use super::connector::Connector;
use crate::config::{BackendAddress, Balance, UpstreamConfig};
use crate::ebpf::KernelObserver;
use crate::telemetry::metrics::{BackendInFlight, BackendMetrics, Metrics};

/// The largest read buffer of a connection to a backend.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// One backend of the pool.
pub(crate) struct Backend {
    pub(super) address: BackendAddress,
    /// The configured address: the `backend` label and the log field.
    pub(super) label: Arc<str>,
    /// What its name resolved to.
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) client: BackendClient,
    pub(super) metrics: BackendMetrics,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// Live requests in a row that failed to connect or got a 5xx.
    consecutive_failures: AtomicU32,
    /// Stops its health check when the backend leaves the configuration.
    pub(super) retired: CancellationToken,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("label", &self.label)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Backend {
    pub(super) fn new(
        address: BackendAddress,
        addrs: Vec<SocketAddr>,
        config: &UpstreamConfig,
        metrics: &Metrics,
        kernel: Option<Arc<KernelObserver>>,
    ) -> Arc<Self> {
        let label: Arc<str> = Arc::from(address.label.as_str());
        let connector = Connector::new(
            label.clone(),
            addrs.clone(),
            config.connect_timeout,
            kernel,
            metrics,
        );
        // What a response may hold in the proxy while its client reads slowly: 64 KiB per
        // connection, not hyper's default of about 400 KiB.
        let client = BackendClient::new(connector, UPSTREAM_READ_BUFFER);
        let backend_metrics = metrics.backend(&label);
        backend_metrics.set_healthy(true);
        Arc::new(Backend {
            address,
            label,
            addrs,
            client,
            metrics: backend_metrics,
            outstanding: AtomicUsize::new(0),
            // Healthy until a check or live traffic says otherwise, as nginx and HAProxy
            // start: a proxy restart must not empty the pool for the first checks' time.
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            retired: CancellationToken::new(),
        })
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Sets the health state; true if it changed.
    pub(super) fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::AcqRel) != healthy;
        if changed {
            self.metrics.set_healthy(healthy);
            if healthy {
                self.consecutive_failures.store(0, Ordering::Release);
            }
        }
        changed
    }

    /// Counts a request sent; it loads the backend until the guard drops.
    pub(super) fn load(self: &Arc<Self>) -> BackendLoad {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        BackendLoad {
            _in_flight: self.metrics.request_sent(),
            backend: self.clone(),
        }
    }

    /// A live request failed in a way that says the backend is sick (no connection, 5xx).
    /// Returns true when this failure ejects it.
    pub(super) fn failed_live(&self, eject_after: u32) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if eject_after == 0 || failures < eject_after {
            return false;
        }
        let ejected = self.set_healthy(false);
        if ejected {
            self.metrics.ejected();
        }
        ejected
    }

    /// A live request got an answer that is not a 5xx.
    pub(super) fn succeeded_live(&self) {
        // Read first: most requests succeed, and a store would bounce the cache line.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Release);
        }
    }

    fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }
}

/// A request a backend is answering (until its response body ends).
pub(crate) struct BackendLoad {
    backend: Arc<Backend>,
    _in_flight: BackendInFlight,
}

impl Drop for BackendLoad {
    fn drop(&mut self) {
        self.backend.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the pool is failing open, for `proxy_upstream_fail_open` and the log. Requests
/// start it (the first with no healthy backend); requests and health checks end it, the
/// checks so that an idle proxy does not keep saying it fails open once a backend is back.
pub(super) struct FailOpen {
    /// Read by every request; changed only under `change`.
    failing: AtomicBool,
    /// Orders the changes, so that the gauge ends where the flag does.
    change: Mutex<()>,
    metrics: Metrics,
}

impl FailOpen {
    pub(super) fn new(metrics: Metrics) -> Self {
        metrics.set_fail_open(false);
        FailOpen {
            failing: AtomicBool::new(false),
            change: Mutex::new(()),
            metrics,
        }
    }

    /// Records whether the pool fails open now; says so once per change.
    pub(super) fn note(&self, fail_open: bool) {
        if self.failing.load(Ordering::Acquire) == fail_open {
            return;
        }
        let _change = self.change.lock().unwrap_or_else(|e| e.into_inner());
        if self.failing.load(Ordering::Acquire) == fail_open {
            return;
        }
        self.failing.store(fail_open, Ordering::Release);
        self.metrics.set_fail_open(fail_open);
        if fail_open {
            tracing::warn!(
                "no healthy backend: sending requests to all of them anyway (failing open)"
            );
        } else {
            tracing::info!("a backend is healthy again: no longer failing open");
        }
    }
}

/// The backends configured now.
#[derive(Debug)]
pub(super) struct Pool {
    pub(super) backends: Vec<Arc<Backend>>,
    pub(super) balance: Balance,
    /// Round robin's position.
    pub(super) turn: AtomicUsize,
}

impl Pool {
    /// Picks a backend for a request, avoiding those in `tried`. `None` only when every
    /// backend has been tried. The bool says whether the pool is failing open.
    pub(super) fn choose(&self, tried: &[Arc<Backend>]) -> Option<(Arc<Backend>, bool)> {
        let untried = |b: &&Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let healthy = self
            .backends
            .iter()
            .filter(|b| b.is_healthy() && untried(b))
            .count();
        if healthy > 0 {
            let pick = self.pick(
                self.backends
                    .iter()
                    .filter(|b| b.is_healthy() && untried(b)),
                healthy,
            );
            return pick.map(|b| (b, false));
        }
        // A retry goes to an untried backend even if it is out of the pool, but only the
        // first attempt with none healthy at all is failing open.
        let any_healthy = self.backends.iter().any(|b| b.is_healthy());
        let candidates = self.backends.iter().filter(untried).count();
        self.pick(self.backends.iter().filter(untried), candidates)
            .map(|b| (b, !any_healthy))
    }

    fn pick<'a>(
        &self,
        candidates: impl Iterator<Item = &'a Arc<Backend>> + Clone,
        count: usize,
    ) -> Option<Arc<Backend>> {
        match self.balance {
            Balance::P2c => power_of_two(candidates, count),
            Balance::RoundRobin if count == 0 => None,
            Balance::RoundRobin => {
                let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                candidates.clone().nth(turn % count).cloned()
            }
        }
    }
}

/// Of `count` candidates, two drawn at random; the one with fewer requests in flight.
fn power_of_two<'a>(
    candidates: impl Iterator<Item = &'a Arc<Backend>> + Clone,
    count: usize,
) -> Option<Arc<Backend>> {
    match count {
        0 => None,
        1 => candidates.clone().next().cloned(),
        _ => {
            let first = fastrand::usize(..count);
            // A different second index, uniformly among the others.
            let second = (first + 1 + fastrand::usize(..count - 1)) % count;
            let a = candidates.clone().nth(first)?;
            let b = candidates.clone().nth(second)?;
            Some(
                if b.outstanding() < a.outstanding() {
                    b
                } else {
                    a
                }
                .clone(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    fn backend(label: &str, outstanding: usize, healthy: bool) -> Arc<Backend> {
        let metrics = Metrics::new().expect("metrics");
        let config = crate::config::UpstreamConfig {
            backends: Vec::new(),
            balance: Balance::P2c,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            health: crate::config::HealthCheck {
                path: http::uri::PathAndQuery::from_static("/"),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            },
            eject_after: 3,
            retry_budget_percent: 20,
        };
        let address = BackendAddress {
            authority: label.parse().expect("authority"),
            label: label.to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 1,
        };
        let backend = Backend::new(address, Vec::new(), &config, &metrics, None);
        backend.outstanding.store(outstanding, Ordering::Release);
        backend.set_healthy(healthy);
        backend
    }

    #[tokio::test]
    async fn two_choices_avoid_the_loaded_and_the_sick() {
        let idle = backend("idle:1", 0, true);
        let busy = backend("busy:1", 50, true);
        let sick = backend("sick:1", 0, false);
        let pool = Pool {
            backends: vec![idle.clone(), busy.clone(), sick.clone()],
            balance: Balance::P2c,
            turn: AtomicUsize::new(0),
        };
        for _ in 0..100 {
            let (chosen, fail_open) = pool.choose(&[]).expect("a backend");
            assert!(!fail_open);
            // Two healthy backends: both are drawn, the idle one wins every time.
            assert!(Arc::ptr_eq(&chosen, &idle), "chose {chosen:?}");
        }
        // A retry avoids the backend already tried.
        let (retry, _) = pool.choose(std::slice::from_ref(&idle)).expect("a backend");
        assert!(Arc::ptr_eq(&retry, &busy));
        // Every healthy one tried: an unhealthy one is still better than none.
        let (last, _) = pool
            .choose(&[idle.clone(), busy.clone()])
            .expect("a backend");
        assert!(Arc::ptr_eq(&last, &sick));
        assert!(pool.choose(&[idle, busy, sick]).is_none());
    }

    #[tokio::test]
    async fn round_robin_takes_turns_whatever_the_load() {
        let idle = backend("idle:1", 0, true);
        let busy = backend("busy:1", 50, true);
        let pool = Pool {
            backends: vec![idle, busy.clone()],
            balance: Balance::RoundRobin,
            turn: AtomicUsize::new(0),
        };
        let busy_turns = (0..100)
            .filter(|_| Arc::ptr_eq(&pool.choose(&[]).expect("a backend").0, &busy))
            .count();
        assert_eq!(busy_turns, 50);
    }

    #[tokio::test]
    async fn no_healthy_backend_fails_open() {
        let a = backend("a:1", 0, false);
        let b = backend("b:1", 0, false);
        let pool = Pool {
            backends: vec![a, b],
            balance: Balance::P2c,
            turn: AtomicUsize::new(0),
        };
        let (_, fail_open) = pool.choose(&[]).expect("still a backend");
        assert!(fail_open);
    }

    #[tokio::test]
    async fn consecutive_live_failures_eject() {
        let a = backend("a:1", 0, true);
        assert!(!a.failed_live(3));
        assert!(!a.failed_live(3));
        a.succeeded_live();
        assert!(!a.failed_live(3));
        assert!(!a.failed_live(3));
        assert!(a.failed_live(3), "the third failure in a row ejects");
        assert!(!a.is_healthy());
        assert!(!a.failed_live(3), "already out: not ejected twice");
    }
}
