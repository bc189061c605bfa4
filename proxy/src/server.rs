//! The data plane: accept loops for the HTTP and HTTPS listeners, the life of each client
//! connection (connection cap, TLS handshake deadline, HTTP/1.1 or HTTP/2 by ALPN, idle and
//! first-request deadlines, graceful drain) and the per-request metrics and access log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::{Activity, TrackedBody};
use crate::config::Config;
use crate::ebpf::{KernelObserver, KernelTimings};
use crate::metrics::Metrics;
use crate::redirect;
use crate::responses::{Body, static_site, text};
use crate::tls::{self, CertStore};
use crate::upstream::Upstream;

/// Which listener a connection came in on; also the `listener` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Http,
    Https,
}

impl ListenerKind {
    pub fn label(self) -> &'static str {
        match self {
            ListenerKind::Http => "http",
            ListenerKind::Https => "https",
        }
    }
}

/// State shared by every connection of the process.
pub struct Server {
    config: Config,
    metrics: Metrics,
    certs: Arc<CertStore>,
    upstream: Option<Upstream>,
    tls: TlsAcceptor,
    hsts: HeaderValue,
    /// HTTP/1.1 only (TLS without ALPN h2), HTTP/2 only (ALPN h2), and either (plain HTTP).
    h1: Builder<TokioExecutor>,
    h2: Builder<TokioExecutor>,
    either: Builder<TokioExecutor>,
    connection_slots: Arc<Semaphore>,
    /// The eBPF observer, when attached: joins kernel timings to accepted connections.
    kernel: Option<Arc<KernelObserver>>,
    /// Cancelled when the process starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so that shutdown can wait for them.
    pub connections: TaskTracker,
}

/// Facts about one client connection, for its requests' logs.
struct ConnContext {
    server: Arc<Server>,
    kind: ListenerKind,
    peer: SocketAddr,
    activity: Arc<Activity>,
    tls_handshake: Option<Duration>,
    kernel: Option<KernelTimings>,
}

impl Server {
    pub fn new(
        config: &Config,
        metrics: Metrics,
        certs: Arc<CertStore>,
        kernel: Option<Arc<KernelObserver>>,
    ) -> Result<Arc<Self>, rustls::Error> {
        let tls = TlsAcceptor::from(tls::server_config(certs.clone())?);
        let upstream = config
            .upstream
            .as_ref()
            .map(|u| Upstream::new(u, metrics.clone()));
        let hsts = HeaderValue::from_str(&format!("max-age={}", config.hsts_max_age))
            .unwrap_or_else(|_| HeaderValue::from_static("max-age=31536000"));
        Ok(Arc::new(Server {
            h1: http_builder(config).http1_only(),
            h2: http_builder(config).http2_only(),
            either: http_builder(config),
            connection_slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            kernel,
            config: config.clone(),
            metrics,
            certs,
            upstream,
            tls,
            hsts,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        }))
    }

    /// Accepts connections until shutdown. At the connection cap it stops accepting, so the
    /// kernel queues new clients instead of the proxy overcommitting.
    pub async fn accept_loop(self: Arc<Self>, listener: Arc<TcpListener>, kind: ListenerKind) {
        loop {
            let slot = tokio::select! {
                slot = self.connection_slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
                () = self.shutdown.cancelled() => break,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = self.shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // First thing after accept(), so the accept wait is measured to here.
                    let timings = self.kernel.as_ref().and_then(|kernel| kernel.join(&stream));
                    let _ = stream.set_nodelay(true);
                    // Dual-stack listeners report IPv4 clients as ::ffff:a.b.c.d.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    self.connections.spawn(
                        self.clone()
                            .serve_connection(stream, peer, kind, timings, slot),
                    );
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the queue holds clients.
                    tracing::warn!(listener = kind.label(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Dropping the last reference closes the port: new clients are refused while
        // in-flight requests drain (unless a successor holds the socket too).
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        kind: ListenerKind,
        kernel: Option<KernelTimings>,
        _slot: OwnedSemaphorePermit,
    ) {
        let label = kind.label();
        self.metrics.connections.with_label_values(&[label]).inc();
        let open = self.metrics.connections_open.with_label_values(&[label]);
        open.inc();
        match kind {
            ListenerKind::Http => {
                let ctx = self.context(kind, peer, kernel, None);
                self.drive(&self.either, TokioIo::new(stream), ctx).await;
            }
            ListenerKind::Https => {
                let started = Instant::now();
                match tokio::time::timeout(
                    self.config.timeouts.tls_handshake,
                    self.tls.accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => {
                        let elapsed = started.elapsed();
                        self.metrics
                            .tls_handshake_duration
                            .observe(elapsed.as_secs_f64());
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        let ctx = self.context(kind, peer, kernel, Some(elapsed));
                        let builder = if h2 { &self.h2 } else { &self.h1 };
                        self.drive(builder, TokioIo::new(tls), ctx).await;
                    }
                    Ok(Err(e)) => {
                        let reason = tls::failure_reason(&e);
                        self.metrics
                            .tls_handshake_failures
                            .with_label_values(&[reason])
                            .inc();
                        tracing::debug!(%peer, reason, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        self.metrics
                            .tls_handshake_failures
                            .with_label_values(&["timeout"])
                            .inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            }
        }
        open.dec();
    }

    fn context(
        self: &Arc<Self>,
        kind: ListenerKind,
        peer: SocketAddr,
        kernel: Option<KernelTimings>,
        tls_handshake: Option<Duration>,
    ) -> Arc<ConnContext> {
        Arc::new(ConnContext {
            server: self.clone(),
            kind,
            peer,
            activity: Activity::new(),
            tls_handshake,
            kernel,
        })
    }

    /// Serves HTTP on `io` until the client leaves, a deadline passes, or shutdown drains it.
    async fn drive<I>(&self, builder: &Builder<TokioExecutor>, io: I, ctx: Arc<ConnContext>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = ctx.activity.clone();
        let service = service_fn(move |request| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(ctx.handle(request).await) }
        });
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let timeouts = self.config.timeouts;
        let mut draining = false;
        let grace = loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = activity.expired(timeouts.header_read, timeouts.idle) => {
                    tracing::debug!("closing connection: deadline passed with no request in flight");
                    if !activity.any_request() {
                        // Not even a first request (or an HTTP/2 preface): nothing to say goodbye to.
                        return;
                    }
                    break Duration::from_secs(1);
                }
                () = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    if activity.any_request() {
                        break timeouts.drain;
                    }
                    // Accepted but no request yet: the client is about to send one. Closing
                    // now would fail it; serve it first (the first-request deadline still holds).
                }
                () = activity.first_request(), if draining => break timeouts.drain,
            }
        };
        // Finishes requests in flight (HTTP/2: GOAWAY); an idle connection closes at once.
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(grace, connection).await;
    }
}

impl ConnContext {
    async fn handle(&self, request: Request<Incoming>) -> Response<TrackedBody> {
        let in_flight = self.activity.begin();
        let started = Instant::now();
        let server = &self.server;
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
        let response: Response<Body> = match self.kind {
            // hyper enforces the count for HTTP/1.1 itself; HTTP/2 limits only header bytes.
            _ if request.headers().len() > server.config.limits.max_headers => text(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields\n",
            ),
            ListenerKind::Http => redirect::respond(redirect::decide(
                &request,
                |host| server.certs.serves(host),
                server.config.public_https_port,
            )),
            ListenerKind::Https => {
                let mut response = match &server.upstream {
                    Some(upstream) => upstream.forward(request, self.peer).await,
                    None => static_site(&method, &path),
                };
                add_security_headers(response.headers_mut(), &server.hsts);
                response
            }
        };
        let elapsed = started.elapsed();
        let listener = self.kind.label();
        let status = response.status();
        server
            .metrics
            .http_requests
            .with_label_values(&[listener, status.as_str()])
            .inc();
        server
            .metrics
            .http_request_duration
            .with_label_values(&[listener])
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "proxy::access",
            listener,
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

/// The hyper connection builder with our limits and timeouts for both protocols.
fn http_builder(config: &Config) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read)
        .max_buf_size(config.limits.max_header_bytes)
        .max_headers(config.limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}
