//! One request's answer: the redirect on the plain-HTTP listener, the static site or the
//! upstream on HTTPS (with the security headers), and for each request its metrics and one
//! access-log line with the kernel's and the TLS handshake's timings for its connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::Config;
use crate::ebpf::{KernelObserver, KernelTimings};
use crate::http::deadlines::{Activity, TrackedBody};
use crate::http::redirect;
use crate::http::responses::{Body, static_site, text};
use crate::http::upstream::Upstream;
use crate::http::upstream_connector::UpstreamConnection;
use crate::telemetry::logging::ACCESS_TARGET;
use crate::telemetry::metrics::{LabelValue as _, Listener, Metrics};
use crate::tls::resolver::CertStore;

/// What answers requests, shared by every connection.
pub(super) struct Responder {
    metrics: Metrics,
    certs: Arc<CertStore>,
    upstream: Option<Upstream>,
    hsts: HeaderValue,
    max_headers: usize,
    public_https_port: u16,
}

impl Responder {
    pub(super) fn new(
        config: &Config,
        metrics: Metrics,
        certs: Arc<CertStore>,
        kernel: Option<Arc<KernelObserver>>,
    ) -> Self {
        let upstream = config
            .upstream
            .as_ref()
            .map(|u| Upstream::new(u, metrics.clone(), kernel));
        let hsts = HeaderValue::from_str(&format!("max-age={}", config.hsts_max_age))
            .unwrap_or_else(|_| HeaderValue::from_static("max-age=31536000"));
        Responder {
            metrics,
            certs,
            upstream,
            hsts,
            max_headers: config.limits.max_headers,
            public_https_port: config.public_https_port,
        }
    }
}

/// Facts about one client connection, for its requests' answers and logs.
pub(super) struct Connection {
    pub(super) responder: Arc<Responder>,
    pub(super) listener: Listener,
    pub(super) peer: SocketAddr,
    pub(super) activity: Arc<Activity>,
    pub(super) tls_handshake: Option<Duration>,
    pub(super) kernel: Option<KernelTimings>,
}

impl Connection {
    /// Answers `request`, counts it and logs it.
    pub(super) async fn handle(&self, request: Request<Incoming>) -> Response<TrackedBody> {
        let in_flight = self.activity.begin();
        let started = Instant::now();
        let responder = &self.responder;
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let version = request.version();
        let host = request
            .uri()
            .host()
            .map(str::to_owned)
            .or_else(|| {
                request
                    .headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let response: Response<Body> = match self.listener {
            // hyper enforces the count for HTTP/1.1 itself; HTTP/2 limits only header bytes.
            _ if request.headers().len() > responder.max_headers => text(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields\n",
            ),
            Listener::Http => redirect::respond(redirect::decide(
                &request,
                |host| responder.certs.serves(host),
                responder.public_https_port,
            )),
            Listener::Https => {
                let mut response = match &responder.upstream {
                    Some(upstream) => upstream.forward(request, self.peer).await,
                    None => static_site(&method, &path),
                };
                add_security_headers(response.headers_mut(), &responder.hsts);
                response
            }
        };
        let elapsed = started.elapsed();
        let status = response.status();
        // The kernel's connect time, on the first response of a new upstream connection.
        let upstream_connect = response
            .extensions()
            .get::<UpstreamConnection>()
            .filter(|connection| connection.first_response())
            .and_then(|connection| connection.kernel_connect);
        responder
            .metrics
            .request_answered(self.listener, status, elapsed);
        // A root event: its fields say whose request it was, and its format stays the same
        // whatever spans surround it.
        tracing::info!(
            target: ACCESS_TARGET,
            parent: None,
            listener = self.listener.as_str(),
            peer = %self.peer,
            %method,
            host,
            path,
            version = ?version,
            status = status.as_u16(),
            duration_ms = millis(elapsed),
            tcp_handshake_ms = self.kernel.and_then(|k| k.handshake).map(millis),
            accept_wait_ms = self.kernel.map(|k| millis(k.accept_wait)),
            tls_handshake_ms = self.tls_handshake.map(millis),
            upstream_connect_ms = upstream_connect.map(millis),
            "request"
        );
        response.map(|body| TrackedBody::new(body, in_flight))
    }
}

/// Milliseconds rounded to microseconds, for log fields.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

fn add_security_headers(headers: &mut http::HeaderMap, hsts: &HeaderValue) {
    headers.insert(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
}
