//! What the upstream-pool tests need besides the proxy: the pool's addresses and proxy,
//! live requests told from health checks,
//! client load recording every exchange (a new TLS connection per request, or kept-alive
//! connections), and the figures drawn from them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

use crate::client::{self, Alpn, CLIENT_TIMEOUT, Req, TlsOptions};
use crate::netns::NetNs;
use crate::process::Proxy;
use crate::{HTTPS, Metrics};
use crate::{TestEnv, poll_until};

/// The `User-Agent` of the proxy's active health checks, which tell them from live requests.
pub const HEALTH_CHECK_AGENT: &str = "proxy-health-check";

/// The pool tests' backend addresses.
pub const A: &str = "127.0.0.1:8081";
pub const B: &str = "127.0.0.1:8082";
pub const C: &str = "127.0.0.1:8083";
/// What the shipped backend answers to `GET /`.
pub const HELLO: &str = "Hello SRE!";

/// The `--upstream` URL of a backend address.
pub fn url(addr: &str) -> String {
    format!("http://{addr}")
}

/// Starts the proxy with the pool `backends` (one `--upstream` each) and `extra` flags.
pub fn serve_pool(env: &TestEnv, backends: &[&str], extra: &[&str]) -> Proxy {
    let urls: Vec<String> = backends.iter().map(|b| url(b)).collect();
    let mut args: Vec<&str> = urls
        .iter()
        .flat_map(|u| ["--upstream", u.as_str()])
        .collect();
    args.extend_from_slice(extra);
    env.serve(&args)
}

/// Attempts the proxy sent to `backends`, all together.
pub fn sum_attempts(m: &Metrics, backends: &[&str]) -> f64 {
    backends.iter().map(|b| attempts(m, b)).sum()
}

/// Waits for `proxy_upstream_requests_in_flight` to come back to 0 once the clients have all
/// their answers; panics with the scrape if it does not (a leak would also skew p2c).
pub fn assert_in_flight_settles(env: &TestEnv, context: &str) {
    let settled = poll_until(Duration::from_secs(10), || {
        (in_flight(&env.metrics()) == 0.0).then_some(())
    });
    assert!(
        settled.is_some(),
        "{context}: every response has ended, yet proxy_upstream_requests_in_flight is not 0:\n{}",
        env.metrics().text
    );
}

/// The exchanges that did not end as `200` with one of `bodies`, described (first ten).
pub fn failures(exchanges: &[Exchange], bodies: &[&str]) -> (usize, Vec<String>) {
    let failed: Vec<&Exchange> = exchanges.iter().filter(|e| !e.ok_with(bodies)).collect();
    let shown = failed.iter().take(10).map(|e| e.describe()).collect();
    (failed.len(), shown)
}

/// Whether a request head (as an upstream received it) is one of the proxy's health checks.
pub fn is_health_check(head: &str) -> bool {
    head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("user-agent") && value.trim() == HEALTH_CHECK_AGENT
        })
    })
}

/// Of the request heads an upstream received, those that are not health checks.
pub fn live_requests(heads: &[String]) -> usize {
    heads.iter().filter(|head| !is_health_check(head)).count()
}

/// One request as the client saw it.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// When the client started it (before connecting, for a new connection).
    pub started: Instant,
    /// When the whole response had arrived, or the request failed.
    pub ended: Instant,
    /// The status, if a response came.
    pub status: Option<u16>,
    /// The response's `Content-Type`.
    pub content_type: Option<String>,
    /// The response body (lossy text).
    pub body: String,
    /// Why no response came.
    pub error: Option<String>,
}

impl Exchange {
    /// From start to the end of the response.
    pub fn latency(&self) -> Duration {
        self.ended - self.started
    }

    /// Answered 200 with one of `bodies`.
    pub fn ok_with(&self, bodies: &[&str]) -> bool {
        self.status == Some(200) && bodies.contains(&self.body.as_str())
    }

    /// A short description for failure messages.
    pub fn describe(&self) -> String {
        match (&self.error, self.status) {
            (Some(e), _) => format!("error: {e}"),
            (None, Some(status)) => format!("{status} {:?}", self.body),
            (None, None) => "nothing".to_owned(),
        }
    }

    fn record(started: Instant, outcome: Result<(u16, Option<String>, Bytes), String>) -> Exchange {
        let ended = Instant::now();
        match outcome {
            Ok((status, content_type, body)) => Exchange {
                started,
                ended,
                status: Some(status),
                content_type,
                body: String::from_utf8_lossy(&body).into_owned(),
                error: None,
            },
            Err(e) => Exchange {
                started,
                ended,
                status: None,
                content_type: None,
                body: String::new(),
                error: Some(e),
            },
        }
    }
}

/// One `GET /` on a new TLS connection to the proxy.
pub async fn get_on_new_connection(tls: &TlsOptions) -> Exchange {
    let started = Instant::now();
    let outcome = client::https(tls, Req::get("/")).await.map(|resp| {
        let content_type = resp.header("content-type").map(str::to_owned);
        (resp.status.as_u16(), content_type, resp.body)
    });
    Exchange::record(started, outcome)
}

/// Continuous `GET /` load in the background, each request on a NEW TLS connection, half of
/// the tasks over HTTP/1.1 and half over HTTP/2; bounded in time, and stopped when told.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: Option<JoinHandle<Vec<Exchange>>>,
}

impl Traffic {
    /// Starts `tasks` clients in `ns`, each pausing `pause` between requests, for at most
    /// `max_duration`.
    pub fn start(
        ns: &NetNs,
        tls: TlsOptions,
        tasks: usize,
        pause: Duration,
        max_duration: Duration,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let handle = ns.spawn(move || async move {
            let exchanges = Arc::new(Mutex::new(Vec::new()));
            let deadline = Instant::now() + max_duration;
            let mut set = tokio::task::JoinSet::new();
            for task in 0..tasks {
                let alpn = if task % 2 == 0 { Alpn::H1 } else { Alpn::H2 };
                let tls = tls.clone().alpn(alpn);
                let (flag, count, exchanges) = (flag.clone(), count.clone(), exchanges.clone());
                set.spawn(async move {
                    while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                        let exchange = get_on_new_connection(&tls).await;
                        exchanges.lock().expect("exchanges lock").push(exchange);
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(pause).await;
                    }
                });
            }
            while set.join_next().await.is_some() {}
            let exchanges = exchanges.lock().expect("exchanges lock");
            exchanges.clone()
        });
        Traffic {
            stop,
            done,
            handle: Some(handle),
        }
    }

    /// Requests completed so far.
    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests than now have completed; false if `timeout` passed.
    pub fn wait_for_more(&self, n: u64, timeout: Duration) -> bool {
        let target = self.completed() + n;
        crate::poll_until(timeout, || (self.completed() >= target).then_some(())).is_some()
    }

    /// Stops the load and returns every exchange, in the order they ended.
    pub fn finish(mut self) -> Vec<Exchange> {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().expect("traffic joined twice");
        let mut exchanges = handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        exchanges.sort_by_key(|e| e.ended);
        exchanges
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `clients` HTTP/1.1 clients at once, each sending `requests_per_client` `GET /` one after
/// the other over one kept-alive TLS connection (a new one only when the proxy closes it).
/// Runs inside a namespace thread.
pub async fn keep_alive_load(
    tls: &TlsOptions,
    clients: usize,
    requests_per_client: usize,
) -> Vec<Exchange> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let tls = tls.clone().alpn(Alpn::H1);
        set.spawn(async move {
            let mut sender = None;
            let mut exchanges = Vec::with_capacity(requests_per_client);
            for _ in 0..requests_per_client {
                let started = Instant::now();
                let outcome =
                    tokio::time::timeout(CLIENT_TIMEOUT, kept_alive_get(&tls, &mut sender))
                        .await
                        .unwrap_or_else(|_| Err(format!("no response within {CLIENT_TIMEOUT:?}")));
                if outcome.is_err() {
                    sender = None;
                }
                exchanges.push(Exchange::record(started, outcome));
            }
            exchanges
        });
    }
    let mut all = Vec::new();
    while let Some(exchanges) = set.join_next().await {
        all.extend(exchanges.expect("keep-alive client task"));
    }
    all
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// `GET /` over the connection in `sender`, opening one first if there is none or it closed.
async fn kept_alive_get(
    tls: &TlsOptions,
    sender: &mut Option<Sender>,
) -> Result<(u16, Option<String>, Bytes), String> {
    if sender.as_ref().is_none_or(Sender::is_closed) {
        let conn = client::tls_connect(HTTPS, tls).await?;
        let (s, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn.stream))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(connection);
        *sender = Some(s);
    }
    let s = sender.as_mut().expect("a connection was just opened");
    s.ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let request = http::Request::get("/")
        .header(http::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building the request: {e}"))?;
    let response = s
        .send_request(request)
        .await
        .map_err(|e| format!("GET /: {e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the body of GET /: {e}"))?
        .to_bytes();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((parts.status.as_u16(), content_type, body))
}

/// The `p`-th percentile (0 < p ≤ 100, nearest rank) of the exchanges' latencies.
pub fn percentile(exchanges: &[Exchange], p: f64) -> Duration {
    let mut latencies: Vec<Duration> = exchanges.iter().map(Exchange::latency).collect();
    latencies.sort();
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * latencies.len() as f64).ceil() as usize;
    latencies[rank.clamp(1, latencies.len()) - 1]
}

/// The sample lines of a scrape that carry `backend="<backend>"`.
pub fn backend_series(metrics: &Metrics, backend: &str) -> Vec<String> {
    metrics
        .samples
        .iter()
        .filter(|s| s.label("backend") == Some(backend))
        .map(ToString::to_string)
        .collect()
}

/// `proxy_upstream_requests_total` of one backend (attempts sent to it), 0 when absent.
pub fn attempts(metrics: &Metrics, backend: &str) -> f64 {
    metrics.value("proxy_upstream_requests_total", &[("backend", backend)])
}

/// `proxy_upstream_requests_in_flight` summed over the pool.
pub fn in_flight(metrics: &Metrics) -> f64 {
    metrics.value("proxy_upstream_requests_in_flight", &[])
}

/// `proxy_upstream_healthy` of one backend, if exported.
pub fn healthy(metrics: &Metrics, backend: &str) -> Option<f64> {
    metrics.get("proxy_upstream_healthy", &[("backend", backend)])
}
