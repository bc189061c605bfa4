//! One request's answer: the redirect on the plain-HTTP listener, the static site or the
//! upstream on HTTPS (with the security headers). Its metrics and access-log line come when
//! the response ends (`exchange.rs`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Either, Ready, ready};
use http::header::{HOST, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::Config;
use crate::ebpf::KernelTimings;
use crate::http::deadlines::{Activity, InFlight};
use crate::http::exchange::{
    CLIENT_CLOSED_REQUEST, Exchange, PendingExchange, TrackedBody, access_log_enabled,
};
use crate::http::redirect;
use crate::http::responses::{Body, hello, hello_head, static_site, text};
use crate::http::upstream::{ClientAddress, Upstream, UpstreamReport};
use crate::telemetry::labels::Listener;
use crate::telemetry::metrics::Metrics;
use crate::tls::resolver::CertStore;

/// What answers requests, shared by every connection.
pub(super) struct Responder {
    /// Shared with every exchange in flight (one reference count per request).
    metrics: Arc<Metrics>,
    certs: Arc<CertStore>,
    upstream: Option<Arc<Upstream>>,
    hsts: HeaderValue,
    /// The head of `GET /`'s static answer, security fields included, made once.
    hello_head: HeaderMap,
    max_headers: usize,
    public_https_port: u16,
}

impl Responder {
    pub(super) fn new(
        config: &Config,
        metrics: Metrics,
        certs: Arc<CertStore>,
        upstream: Option<Arc<Upstream>>,
    ) -> Self {
        let hsts = HeaderValue::from_str(&format!("max-age={}", config.hsts_max_age))
            .unwrap_or_else(|_| HeaderValue::from_static("max-age=31536000"));
        let mut hello_head = hello_head();
        add_security_headers(&mut hello_head, &hsts);
        Responder {
            metrics: Arc::new(metrics),
            certs,
            upstream,
            hsts,
            hello_head,
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
    /// The client's address as forwarding headers write it, made at its first proxied request.
    pub(super) client_address: OnceLock<ClientAddress>,
}

/// A request's answer. Only a forwarded request waits; every other answer is ready at once.
/// hyper keeps an HTTP/1.1 connection's answer future allocated between requests, so the
/// upstream call's large state is boxed on its own rather than sized into every future.
pub(super) type Answer =
    Either<Ready<Response<TrackedBody>>, BoxFuture<'static, Response<TrackedBody>>>;

impl Connection {
    /// Answers `request`, counts it and logs it.
    pub(super) fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Answer {
        let in_flight = self.activity.begin();
        let started = Instant::now();
        let responder = &self.responder;
        let method = request.method().clone();
        let version = request.version();
        // Host and path are copied for the access log only: two allocations a request.
        let (host, path) = if access_log_enabled() {
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
            (host, request.uri().path().to_owned())
        } else {
            (String::new(), String::new())
        };
        // Until a response is ready, the exchange ends as the client leaving (hyper drops
        // the answer's future when the client resets the stream or closes the connection).
        let pending = PendingExchange::new(
            Exchange {
                metrics: responder.metrics.clone(),
                started,
                listener: self.listener,
                peer: self.peer,
                method,
                host,
                path,
                version,
                status: CLIENT_CLOSED_REQUEST,
                tls_handshake: self.tls_handshake,
                kernel: self.kernel,
                upstream: None,
            },
            self.activity.clone(),
        );
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
            // The static hello's head was made once, security fields included.
            Listener::Https
                if responder.upstream.is_none()
                    && request.method() == Method::GET
                    && request.uri().path() == "/" =>
            {
                hello(&responder.hello_head)
            }
            Listener::Https => match &responder.upstream {
                Some(upstream) => {
                    let upstream = upstream.clone();
                    let connection = self.clone();
                    return Either::Right(Box::pin(async move {
                        let client = connection
                            .client_address
                            .get_or_init(|| ClientAddress::new(connection.peer));
                        let (mut response, report) = upstream.forward(request, client).await;
                        add_security_headers(response.headers_mut(), &connection.responder.hsts);
                        connection.track(response, pending, report, in_flight)
                    }));
                }
                None => {
                    let mut response = static_site(request.method(), request.uri().path());
                    add_security_headers(response.headers_mut(), &responder.hsts);
                    response
                }
            },
        };
        Either::Left(ready(self.track(response, pending, None, in_flight)))
    }

    /// The answer with the body that counts and logs the exchange when it ends.
    fn track(
        &self,
        response: Response<Body>,
        pending: PendingExchange,
        upstream: Option<UpstreamReport>,
        in_flight: InFlight,
    ) -> Response<TrackedBody> {
        let exchange = pending.answered(response.status(), upstream);
        let activity = self.activity.clone();
        response.map(|body| TrackedBody::new(body, exchange, activity, in_flight))
    }
}

fn add_security_headers(headers: &mut HeaderMap, hsts: &HeaderValue) {
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
