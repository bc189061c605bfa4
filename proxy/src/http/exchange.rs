//! One exchange, from the request head to the end of its response, counted and logged once,
//! when the response ends: whole (`complete`), broken off by the backend, or cut by a
//! deadline or by the client leaving. The response body carries the record to that end.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use http::{Method, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::ebpf::KernelTimings;
use crate::http::deadlines::{Activity, BodyDeadline, Closed, InFlight, SendWatch};
use crate::http::responses::{Body, BoxError};
use crate::http::upstream::UpstreamReport;
use crate::telemetry::labels::{LabelValue as _, Listener, Outcome, UpstreamFailure};
use crate::telemetry::logging::ACCESS_TARGET;
use crate::telemetry::metrics::Metrics;

/// The status logged and counted for a request whose client left before its response was
/// ready (nginx's 499).
pub(crate) const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// An exchange whose response is not ready yet: dropped as it is, it ends as the client
/// leaving (499 `client_closed`), or as the proxy closing the connection under it (503
/// `aborted` at the drain deadline, 499 `client_timeout` at the send deadline).
pub(crate) struct PendingExchange {
    exchange: Option<Exchange>,
    activity: Arc<Activity>,
}

impl PendingExchange {
    pub(crate) fn new(exchange: Exchange, activity: Arc<Activity>) -> Self {
        PendingExchange {
            exchange: Some(exchange),
            activity,
        }
    }

    /// The response is ready: the exchange goes on with its body.
    pub(crate) fn answered(
        mut self,
        status: StatusCode,
        upstream: Option<UpstreamReport>,
    ) -> Option<Exchange> {
        let mut exchange = self.exchange.take()?;
        exchange.status = status;
        exchange.upstream = upstream;
        Some(exchange)
    }
}

impl Drop for PendingExchange {
    fn drop(&mut self) {
        if let Some(mut exchange) = self.exchange.take() {
            let outcome = match self.activity.closed_by_proxy() {
                Some(Closed::Drain) => {
                    exchange.status = StatusCode::SERVICE_UNAVAILABLE;
                    Outcome::Aborted
                }
                Some(Closed::SendTimeout) => Outcome::ClientTimeout,
                None => Outcome::ClientClosed,
            };
            exchange.finish(outcome, 0);
        }
    }
}

/// What is known of an exchange once its response head is ready.
pub(crate) struct Exchange {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: Instant,
    pub(crate) listener: Listener,
    pub(crate) peer: SocketAddr,
    pub(crate) method: Method,
    pub(crate) host: String,
    pub(crate) path: String,
    pub(crate) version: Version,
    pub(crate) status: StatusCode,
    pub(crate) tls_handshake: Option<Duration>,
    pub(crate) kernel: Option<KernelTimings>,
    pub(crate) upstream: Option<UpstreamReport>,
}

impl Exchange {
    /// Counts and logs the exchange as ended with `outcome` after `bytes` of body.
    fn finish(self, outcome: Outcome, bytes: u64) {
        // A whole 408 is still an exchange the client's slowness cut short.
        let outcome = match outcome {
            Outcome::Complete if self.client_body_late() => Outcome::ClientTimeout,
            other => other,
        };
        let elapsed = self.started.elapsed();
        self.metrics
            .request_answered(self.listener, self.status, outcome, elapsed);
        let upstream = self.upstream.as_ref();
        if let Some(report) = upstream {
            match outcome {
                Outcome::UpstreamTimeout => report.metrics.failed(UpstreamFailure::BodyTimeout),
                Outcome::UpstreamError => report.metrics.failed(UpstreamFailure::BodyError),
                _ => {}
            }
        }
        // A root event: its fields say whose request it was, and its format stays the same
        // whatever spans surround it.
        tracing::info!(
            target: ACCESS_TARGET,
            parent: None,
            listener = self.listener.as_str(),
            peer = %self.peer,
            method = %self.method,
            host = self.host,
            path = self.path,
            version = ?self.version,
            status = self.status.as_u16(),
            outcome = outcome.as_str(),
            bytes,
            duration_ms = millis_to_ns(elapsed),
            tcp_handshake_ms = self.kernel.and_then(|k| k.handshake).map(millis),
            accept_wait_ms = self.kernel.map(|k| millis(k.accept_wait)),
            tls_handshake_ms = self.tls_handshake.map(millis),
            backend = upstream.map(|u| &*u.backend),
            upstream_status = upstream.and_then(|u| u.status).map(|s| s.as_u16()),
            upstream_ms = upstream.map(|u| millis(u.head_time)),
            upstream_connect_ms = upstream.and_then(|u| u.connect_time).map(millis),
            upstream_reused = upstream.and_then(|u| u.reused),
            retries = upstream.map(|u| u.retries),
            "request"
        );
    }

    /// Whether the client's request body missed its deadline.
    fn client_body_late(&self) -> bool {
        self.upstream
            .as_ref()
            .is_some_and(|u| u.client_body_timed_out.load(Ordering::Acquire))
    }

    /// The outcome of a body that failed with `error`.
    fn failure(&self, error: &BoxError) -> Outcome {
        match error.downcast_ref::<BodyDeadline>() {
            Some(BodyDeadline::Upstream) => Outcome::UpstreamTimeout,
            Some(BodyDeadline::Client) => Outcome::ClientTimeout,
            None if self.client_body_late() => Outcome::ClientTimeout,
            None => Outcome::UpstreamError,
        }
    }
}

/// Whether access lines are written (`PROXY_LOG` enables the access target at info).
pub(crate) fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// Milliseconds rounded to microseconds, for log fields.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// Milliseconds to the nanosecond, for `duration_ms`: a static answer takes a few
/// microseconds, which the request-duration histogram resolves to 1 µs, so the access line
/// must resolve finer to be checked against it.
fn millis_to_ns(duration: Duration) -> f64 {
    duration.as_nanos() as f64 / 1e6
}

/// A response body that keeps its request in flight until it ends, watches the client take
/// it, and finishes its exchange when it ends, fails or is dropped.
pub(crate) struct TrackedBody {
    inner: Body,
    exchange: Option<Box<Exchange>>,
    bytes: u64,
    activity: Arc<Activity>,
    /// Present while a streamed body waits for the client between frames.
    watch: Option<SendWatch>,
    _in_flight: InFlight,
}

impl TrackedBody {
    pub(crate) fn new(
        inner: Body,
        exchange: Option<Exchange>,
        activity: Arc<Activity>,
        in_flight: InFlight,
    ) -> Self {
        let mut body = TrackedBody {
            inner,
            exchange: exchange.map(Box::new),
            bytes: 0,
            activity,
            watch: None,
            _in_flight: in_flight,
        };
        // hyper never polls a body that is over before it starts (HEAD, 204, a redirect).
        if body.inner.is_end_stream() {
            body.finish(Outcome::Complete);
        }
        body
    }

    fn finish(&mut self, outcome: Outcome) {
        self.watch = None;
        if let Some(exchange) = self.exchange.take() {
            exchange.finish(outcome, self.bytes);
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(watch) = &this.watch {
            watch.asked();
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => {}
            Poll::Ready(None) => this.finish(Outcome::Complete),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.remaining() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(Outcome::Complete);
                } else if let Some(watch) = &this.watch {
                    watch.handed_over();
                } else if this.exchange.is_some() {
                    this.watch = Some(SendWatch::start(&this.activity));
                }
            }
            Poll::Ready(Some(Err(error))) => {
                let outcome = this
                    .exchange
                    .as_ref()
                    .map_or(Outcome::UpstreamError, |e| e.failure(error));
                this.finish(outcome);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.exchange.is_some() {
            let outcome = match self.activity.closed_by_proxy() {
                Some(Closed::SendTimeout) => Outcome::ClientTimeout,
                Some(Closed::Drain) => Outcome::Aborted,
                None => Outcome::ClientClosed,
            };
            self.finish(outcome);
        }
    }
}
