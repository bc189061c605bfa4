//! Upstream mode: forward HTTPS requests to a pool of backends over kept-alive HTTP/1.1
//! connections (`client.rs`), with `Forwarded`/`X-Forwarded-*` added and hop-by-hop headers
//! removed.
//!
//! Each request goes to the backend the pool chooses (`pool.rs`). A request that failed
//! before any of its bytes reached a backend (no connection, a new connection closed first;
//! a kept-alive one found closed is the client's to replace) is retried once on another
//! backend; one that failed after, only if its method is idempotent (RFC 9110 9.2.2), its
//! body can be sent again and no byte of a response came back. Retries are bounded by the
//! budget (`budget.rs`). Failures become 502/504 with a plain-text reason and are counted
//! per backend and kind.
//!
//! Deadlines: connect, response head (`--upstream-timeout`), response body idle
//! (`--upstream-body-timeout`) and request body idle (`--client-body-timeout`: 408 before a
//! response, a broken response after).

mod body;
mod budget;
mod client;
mod connector;
mod headers;
mod health;
mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendAddress, UpstreamConfig};
use crate::ebpf::KernelObserver;
use crate::error_chain::{causes, error_chain};
use crate::http::deadlines::{BodyDeadline, IdleTimeout};
use crate::http::responses::{Body, text};
use crate::telemetry::labels::{LabelValue as _, UpstreamFailure};
use crate::telemetry::metrics::{BackendMetrics, Metrics};
use body::RequestBody;
use budget::RetryBudget;
use client::SendError;
use connector::UpstreamConnection;
use pool::{Backend, FailOpen, Pool};

pub(crate) use headers::ClientAddress;
pub(crate) use pool::BackendLoad;

/// Why the pool could not be built.
#[derive(Debug, thiserror::Error)]
#[error("upstream {backend}: {reason}")]
pub struct UpstreamError {
    backend: String,
    reason: String,
}

/// The upstream pool and how requests are sent to it.
pub(crate) struct Upstream {
    pool: ArcSwap<Pool>,
    config: ArcSwap<UpstreamConfig>,
    budget: RetryBudget,
    metrics: Metrics,
    kernel: Option<Arc<KernelObserver>>,
    /// Stops the running health checks when a reload changes how they are made.
    checks: Mutex<CancellationToken>,
    /// Shared with the health checks, which end it as soon as a backend is healthy again.
    fail_open: Arc<FailOpen>,
    /// Deadline for a client's request body between two pieces.
    client_body_timeout: Duration,
}

/// What the access log and the metrics need to know about the backend side of a request.
pub(crate) struct UpstreamReport {
    /// The backend that answered (or failed last).
    pub(crate) backend: Arc<str>,
    /// The backend's status, if it answered.
    pub(crate) status: Option<StatusCode>,
    /// Request sent to response head (or failure), of the last attempt.
    pub(crate) head_time: Duration,
    /// Retries made.
    pub(crate) retries: u32,
    /// The kernel's connect time of the connection that carried the answer, when the
    /// connection was opened for this request.
    pub(crate) connect_time: Option<Duration>,
    /// Whether the answer came over a connection an earlier request opened.
    pub(crate) reused: Option<bool>,
    /// The backend's series, for failures of the body.
    pub(crate) metrics: BackendMetrics,
    /// Set when the client's request body missed its deadline.
    pub(crate) client_body_timed_out: Arc<AtomicBool>,
    /// Keeps the request counted against the backend's load until the response ends.
    pub(crate) _load: Option<BackendLoad>,
}

impl Upstream {
    /// Resolves the backends' names and starts their health checks. A name that does not
    /// resolve fails the start.
    pub(crate) async fn start(
        config: &UpstreamConfig,
        client_body_timeout: Duration,
        metrics: Metrics,
        kernel: Option<Arc<KernelObserver>>,
    ) -> Result<Arc<Self>, UpstreamError> {
        let mut backends = Vec::new();
        for address in &config.backends {
            let addrs = resolve(address).await.map_err(|reason| UpstreamError {
                backend: address.label.clone(),
                reason,
            })?;
            backends.push(Backend::new(
                address.clone(),
                addrs,
                config,
                &metrics,
                kernel.clone(),
            ));
        }
        if let Some(kernel) = &kernel {
            kernel.set_backends(&labels(&config.backends));
        }
        let upstream = Arc::new(Upstream {
            pool: ArcSwap::from_pointee(Pool {
                backends,
                balance: config.balance,
                turn: AtomicUsize::new(0),
            }),
            config: ArcSwap::from_pointee(config.clone()),
            budget: RetryBudget::new(config.retry_budget_percent),
            fail_open: Arc::new(FailOpen::new(metrics.clone())),
            metrics,
            kernel,
            checks: Mutex::new(CancellationToken::new()),
            client_body_timeout,
        });
        upstream.start_checks(&upstream.pool.load().backends);
        Ok(upstream)
    }

    fn start_checks(&self, backends: &[Arc<Backend>]) {
        let stop = self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let check = self.config.load().health.clone();
        for backend in backends {
            let backend = backend.clone();
            let check = check.clone();
            let stop = stop.clone();
            let fail_open = self.fail_open.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = health::check_forever(backend, check, fail_open) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    /// Applies a reloaded configuration: backends that stay keep their connections and
    /// health; new ones join; removed ones leave the pool at once and finish the requests
    /// they have in flight. A name that no longer resolves keeps its previous addresses.
    pub(crate) async fn reconfigure(&self, config: &UpstreamConfig) {
        let old_config = self.config.load_full();
        let old = self.pool.load_full();
        let same_connections = old_config.connect_timeout == config.connect_timeout;
        let mut backends = Vec::new();
        let mut fresh = Vec::new();
        for address in &config.backends {
            let existing = old.backends.iter().find(|b| b.address == *address);
            let addrs = match (resolve(address).await, existing) {
                (Ok(addrs), _) => addrs,
                (Err(reason), Some(existing)) => {
                    tracing::warn!(backend = %address.label, %reason, "backend name no longer resolves; keeping its previous addresses");
                    existing.addrs.clone()
                }
                (Err(reason), None) => {
                    tracing::error!(backend = %address.label, %reason, "new backend left out: its name does not resolve");
                    continue;
                }
            };
            match existing {
                Some(existing) if existing.addrs == addrs && same_connections => {
                    backends.push(existing.clone());
                }
                _ => {
                    let backend = Backend::new(
                        address.clone(),
                        addrs,
                        config,
                        &self.metrics,
                        self.kernel.clone(),
                    );
                    match existing {
                        // New addresses or connections, same backend: its health carries over.
                        Some(existing) => {
                            backend.set_healthy(existing.is_healthy());
                        }
                        None => tracing::info!(backend = %address.label, "backend joins the pool"),
                    }
                    fresh.push(backend.clone());
                    backends.push(backend);
                }
            }
        }
        if backends.is_empty() {
            tracing::error!("no configured backend resolves; keeping the previous pool");
            return;
        }
        for gone in &old.backends {
            if !backends.iter().any(|b| Arc::ptr_eq(b, gone)) {
                gone.retired.cancel();
                if !backends.iter().any(|b| b.label == gone.label) {
                    self.metrics.backend_removed(&gone.label);
                    tracing::info!(backend = %gone.label, "backend leaves the pool; its requests in flight finish");
                }
            }
        }
        if let Some(kernel) = &self.kernel {
            let kept: Vec<String> = backends.iter().map(|b| b.label.to_string()).collect();
            kernel.set_backends(&kept);
        }
        self.config.store(Arc::new(config.clone()));
        self.pool.store(Arc::new(Pool {
            backends: backends.clone(),
            balance: config.balance,
            turn: AtomicUsize::new(0),
        }));
        if old_config.health != config.health {
            // Every check restarts with the new settings; health states carry over.
            let stop = std::mem::take(&mut *self.checks.lock().unwrap_or_else(|e| e.into_inner()));
            stop.cancel();
            self.start_checks(&backends);
        } else {
            self.start_checks(&fresh);
        }
    }

    /// Forwards `request` from client `peer`: the response (the backend's, or a 502/504/408
    /// saying why there is none) and what happened on the backend side.
    pub(crate) async fn forward(
        &self,
        request: Request<Incoming>,
        client: &ClientAddress,
    ) -> (Response<Body>, Option<UpstreamReport>) {
        let peer = client.peer;
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        headers::remove_hop_by_hop(&mut parts.headers);
        // A clone shares the value's bytes: the host is borrowed, not copied.
        let host_header = parts.headers.get(HOST).cloned();
        let host = parts
            .uri
            .authority()
            .map(Authority::as_str)
            .or_else(|| host_header.as_ref().and_then(|h| h.to_str().ok()));
        headers::add_forwarding(&mut parts.headers, client, host);
        // Looked up only when the client sent none (h2): `add_forwarding` may have set one.
        let has_host = host_header.is_some() || parts.headers.contains_key(HOST);
        let client_body_timed_out = Arc::new(AtomicBool::new(false));
        let body = RequestBody::new(
            IdleTimeout::new(body, self.client_body_timeout, BodyDeadline::Client)
                .flagging(client_body_timed_out.clone()),
        );

        let config = self.config.load();
        let pool = self.pool.load();
        self.budget.request();
        let mut tried: Vec<Arc<Backend>> = Vec::with_capacity(2);
        let mut next_body = Some(body);
        loop {
            let Some(body) = next_body.take() else {
                break;
            };
            let Some((backend, fail_open)) = pool.choose(&tried) else {
                break;
            };
            self.fail_open.note(fail_open);
            let resend = body.again();
            let mut attempt = Request::new(body);
            *attempt.method_mut() = parts.method.clone();
            // Origin form: the connection is the backend's already.
            *attempt.uri_mut() = Uri::from(path_and_query.clone());
            *attempt.version_mut() = Version::HTTP_11;
            // The headers are kept for a retry only where one can happen: on the first
            // attempt, with another backend to retry on.
            *attempt.headers_mut() = if tried.is_empty() && pool.backends.len() > 1 {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            // A request without a host (HTTP/1.0) is for the backend's own name.
            if !has_host
                && let Ok(value) = HeaderValue::from_str(backend.address.authority.as_str())
            {
                attempt.headers_mut().insert(HOST, value);
            }

            let load = backend.load();
            let started = Instant::now();
            // The head's deadline starts once the request body is all sent.
            let head_deadline = async {
                if let Some(resend) = &resend {
                    resend.sent().await;
                }
                tokio::time::sleep(config.timeout).await;
            };
            let outcome = tokio::select! {
                response = backend.client.send(attempt) => Ok(response),
                () = head_deadline => Err(()),
            };
            let head_time = started.elapsed();
            backend.metrics.answered(head_time);
            let retries = u32::try_from(tried.len()).unwrap_or(u32::MAX);
            let report = |status: Option<StatusCode>,
                          load: Option<BackendLoad>,
                          connection: Option<&UpstreamConnection>| {
                let first = connection.map(UpstreamConnection::first_response);
                UpstreamReport {
                    backend: backend.label.clone(),
                    status,
                    head_time,
                    retries,
                    connect_time: connection
                        .filter(|_| first == Some(true))
                        .and_then(|c| c.kernel_connect),
                    reused: first.map(|first| !first),
                    metrics: backend.metrics.clone(),
                    client_body_timed_out: client_body_timed_out.clone(),
                    _load: load,
                }
            };
            match outcome {
                Ok(Ok((response, connection))) => {
                    let status = response.status();
                    if status.is_server_error() {
                        self.failed_live(&backend, &config);
                    } else {
                        backend.succeeded_live();
                    }
                    let (mut head, body) = response.into_parts();
                    headers::remove_hop_by_hop(&mut head.headers);
                    let body =
                        IdleTimeout::new(body, config.body_timeout, BodyDeadline::Upstream).boxed();
                    return (
                        Response::from_parts(head, body),
                        Some(report(Some(status), Some(load), Some(&connection))),
                    );
                }
                Ok(Err(e)) => {
                    drop(load);
                    if client_body_timed_out.load(Ordering::Acquire) {
                        tracing::info!(%peer, backend = %backend.label, "client request body timed out");
                        return (
                            text(StatusCode::REQUEST_TIMEOUT, "request body timed out\n"),
                            Some(report(None, None, None)),
                        );
                    }
                    let kind = if e.is_connect() {
                        UpstreamFailure::Connect
                    } else {
                        UpstreamFailure::Protocol
                    };
                    backend.metrics.failed(kind);
                    self.failed_live(&backend, &config);
                    let unsent = e.is_unsent();
                    let may_retry = unsent || (is_idempotent(&parts.method) && no_response(&e));
                    if may_retry
                        && tried.is_empty()
                        && let Some(again) = resend.and_then(|b| b.again())
                    {
                        tried.push(backend.clone());
                        if pool.choose(&tried).is_some() && self.take_retry() {
                            backend.metrics.retried();
                            tracing::info!(error = %error_chain(&e), kind = kind.as_str(), %peer, backend = %backend.label, "upstream request failed; retrying on another backend");
                            next_body = Some(again);
                            continue;
                        }
                        tried.pop();
                    }
                    let kind = kind.as_str();
                    tracing::warn!(error = %error_chain(&e), kind, %peer, backend = %backend.label, "upstream request failed");
                    return (
                        text(
                            StatusCode::BAD_GATEWAY,
                            format!("upstream unavailable ({kind} error)\n"),
                        ),
                        Some(report(None, None, None)),
                    );
                }
                Err(_) => {
                    drop(load);
                    backend.metrics.failed(UpstreamFailure::Timeout);
                    tracing::warn!(timeout = ?config.timeout, %peer, backend = %backend.label, "upstream timed out");
                    return (
                        text(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
                        Some(report(None, None, None)),
                    );
                }
            }
        }
        (text(StatusCode::BAD_GATEWAY, "no upstream backend\n"), None)
    }

    /// Takes a retry from the budget, counting the refusal if it is spent.
    fn take_retry(&self) -> bool {
        let allowed = self.budget.try_retry();
        if !allowed {
            self.metrics.retry_refused();
        }
        allowed
    }

    fn failed_live(&self, backend: &Backend, config: &UpstreamConfig) {
        if backend.failed_live(config.eject_after) {
            tracing::warn!(backend = %backend.label, failures = config.eject_after, "backend ejected: consecutive failed requests; it returns when its health check passes");
        }
    }
}

/// RFC 9110 9.2.2: methods whose repetition has the effect of one request.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether the backend sent no byte of a response: the connection closed or was reset
/// before any. A malformed response (bytes came back) or a timeout does not qualify.
fn no_response(error: &SendError) -> bool {
    let mut closed = false;
    for cause in causes(error) {
        if let Some(e) = cause.downcast_ref::<hyper::Error>() {
            if e.is_parse() || e.is_parse_status() || e.is_timeout() {
                return false;
            }
            closed |= e.is_incomplete_message() || e.is_canceled();
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            closed |= matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
    }
    closed
}

fn labels(backends: &[BackendAddress]) -> Vec<String> {
    backends.iter().map(|b| b.label.clone()).collect()
}

/// The addresses `address` names now.
async fn resolve(address: &BackendAddress) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((address.host.as_str(), address.port))
        .await
        .map_err(|e| format!("resolving {}: {e}", address.host))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{} resolves to no address", address.host));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_are_rfc_9110s() {
        for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(is_idempotent(&method.parse().expect("method")), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT"] {
            assert!(!is_idempotent(&method.parse().expect("method")), "{method}");
        }
    }

    #[tokio::test]
    async fn names_resolve_and_bad_ones_say_why() {
        let local = BackendAddress {
            authority: http::uri::Authority::from_static("localhost:80"),
            label: "localhost:80".into(),
            host: "localhost".into(),
            port: 80,
        };
        assert!(
            !resolve(&local)
                .await
                .expect("localhost resolves")
                .is_empty()
        );
        let bad = BackendAddress {
            authority: http::uri::Authority::from_static("no-such-host.invalid:80"),
            label: "no-such-host.invalid:80".into(),
            host: "no-such-host.invalid".into(),
            port: 80,
        };
        let reason = resolve(&bad).await.expect_err("does not resolve");
        assert!(reason.contains("no-such-host.invalid"), "{reason}");
    }
}
