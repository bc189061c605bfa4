//! The data plane: one accept loop for the HTTP and HTTPS listeners and the life of each client
//! connection: the connection cap, the TLS handshake deadline, HTTP/1.1 or HTTP/2 by ALPN,
//! the first-request and idle deadlines, and graceful drain. Each connection's work runs in
//! a `connection` span (debug level) naming its listener and peer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::Config;
use crate::ebpf::{KernelObserver, KernelTimings};
use crate::http::deadlines::{Activity, Closed};
use crate::http::request::{Connection, Responder};
use crate::http::streams::{ConnectionStreams, WithStreams};
use crate::http::upstream::Upstream;
use crate::telemetry::labels::{LabelValue as _, Listener, TlsFailure};
use crate::telemetry::metrics::Metrics;
use crate::tls;
use crate::tls::handshake_failure::failure_reason;
use crate::tls::resolver::CertStore;

/// State shared by every connection of the process.
pub(crate) struct Server {
    config: Config,
    metrics: Metrics,
    responder: Arc<Responder>,
    tls: TlsAcceptor,
    connection_slots: Arc<Semaphore>,
    /// The eBPF observer, when attached: joins kernel timings to accepted connections.
    kernel: Option<Arc<KernelObserver>>,
    /// Cancelled when the process starts draining.
    pub(crate) shutdown: CancellationToken,
    /// Every connection task, so that shutdown can wait for them.
    pub(crate) connections: TaskTracker,
    /// Set when the drain deadline passes with connections still open.
    abandoned: Arc<AtomicBool>,
}

impl Server {
    pub(crate) fn new(
        config: &Config,
        metrics: Metrics,
        certs: Arc<CertStore>,
        kernel: Option<Arc<KernelObserver>>,
        upstream: Option<Arc<Upstream>>,
    ) -> Result<Arc<Self>, rustls::Error> {
        let tls = TlsAcceptor::from(tls::server_config(certs.clone())?);
        let responder = Arc::new(Responder::new(config, metrics.clone(), certs, upstream));
        Ok(Arc::new(Server {
            connection_slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            kernel,
            config: config.clone(),
            metrics,
            responder,
            tls,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            abandoned: Arc::default(),
        }))
    }

    /// The drain deadline passed: the connections still open are the proxy's to break off,
    /// and their requests end as `aborted`.
    pub(crate) fn abandon_connections(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    /// Accepts connections on every listener until shutdown. At the connection cap it stops
    /// accepting, so the kernel queues new clients instead of the proxy overcommitting. One
    /// loop serves all listeners, holding one slot while it waits: a loop per listener would
    /// each hold a slot, and an idle listener would keep one of the cap from the busy one.
    pub(crate) async fn accept_loop(self: Arc<Self>, listeners: Vec<(Arc<TcpListener>, Listener)>) {
        let mut next = 0;
        loop {
            let slot = tokio::select! {
                slot = self.connection_slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
                () = self.shutdown.cancelled() => break,
            };
            let (accepted, kind) = tokio::select! {
                accepted = accept_any(&listeners, &mut next) => accepted,
                () = self.shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // First thing after accept(), so the accept wait is measured to here.
                    let timings = self.kernel.as_ref().and_then(|kernel| kernel.join(&stream));
                    let _ = stream.set_nodelay(true);
                    // Dual-stack listeners report IPv4 clients as ::ffff:a.b.c.d.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    // Debug level: what is logged about a connection at info and above
                    // names its peer itself, and an enabled span costs every poll an enter
                    // and an exit (`cargo xtask bench`: about 2 µs of server CPU per
                    // keep-alive request at info; nothing while disabled).
                    let span = tracing::debug_span!("connection", listener = kind.as_str(), %peer);
                    self.connections.spawn(
                        self.clone()
                            .serve_connection(stream, peer, kind, timings, slot)
                            .instrument(span),
                    );
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the queue holds clients.
                    tracing::warn!(listener = kind.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Dropping the last reference closes the ports: new clients are refused while
        // in-flight requests drain (unless a successor holds the sockets too).
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        kind: Listener,
        kernel: Option<KernelTimings>,
        _slot: OwnedSemaphorePermit,
    ) {
        let _open = self.metrics.connection_opened(kind);
        match kind {
            Listener::Http => {
                let connection = self.connection(kind, peer, kernel, None);
                self.drive(Protocols::Either, TokioIo::new(stream), connection)
                    .await;
            }
            Listener::Https => {
                let Some((tls, elapsed)) = self.tls_handshake(stream).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let connection = self.connection(kind, peer, kernel, Some(elapsed));
                let protocols = if h2 {
                    Protocols::Http2
                } else {
                    Protocols::Http1
                };
                self.drive(protocols, TokioIo::new(tls), connection).await;
            }
        }
    }

    /// The TLS handshake within its deadline, counted and timed. The stream comes boxed: a
    /// connection's task holds it for as long as the connection lives, and a rustls
    /// connection (~1.2 KB) kept inline would be laid out there more than once.
    async fn tls_handshake(
        &self,
        stream: TcpStream,
    ) -> Option<(Box<tokio_rustls::server::TlsStream<TcpStream>>, Duration)> {
        let started = Instant::now();
        match tokio::time::timeout(self.config.timeouts.tls_handshake, self.tls.accept(stream))
            .await
        {
            Ok(Ok(tls)) => {
                let elapsed = started.elapsed();
                self.metrics.tls_handshake_completed(elapsed);
                Some((Box::new(tls), elapsed))
            }
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                self.metrics.tls_handshake_failed(reason);
                tracing::debug!(reason = reason.as_str(), error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.metrics.tls_handshake_failed(TlsFailure::Timeout);
                tracing::debug!("TLS handshake timed out");
                None
            }
        }
    }

    fn connection(
        &self,
        listener: Listener,
        peer: SocketAddr,
        kernel: Option<KernelTimings>,
        tls_handshake: Option<Duration>,
    ) -> Arc<Connection> {
        Arc::new(Connection {
            responder: self.responder.clone(),
            listener,
            peer,
            activity: Activity::new(self.abandoned.clone()),
            tls_handshake,
            kernel,
            client_address: OnceLock::new(),
        })
    }

    /// Serves HTTP on `io` until the client leaves, a deadline passes, or shutdown drains it.
    async fn drive<I>(&self, protocols: Protocols, io: I, connection: Arc<Connection>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = connection.activity.clone();
        let service =
            service_fn(move |request| connection.handle(request).map(Ok::<_, Infallible>));
        // This connection's HTTP/2 streams run in its own task (`streams.rs`).
        let streams = ConnectionStreams::default();
        let builder = http_builder(&self.config, protocols, streams.clone());
        let connection = WithStreams::new(builder.serve_connection(io, service), &streams);
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
                () = activity.send_stalled(timeouts.send) => {
                    // Closing breaks the unread response visibly (HTTP/1.1: short of its
                    // length or last chunk; HTTP/2: the streams with the connection).
                    tracing::debug!(timeout = ?timeouts.send, "closing connection: the client stopped reading its response");
                    activity.close_by_proxy(Closed::SendTimeout);
                    return;
                }
            }
        };
        // Finishes requests in flight (HTTP/2: GOAWAY); an idle connection closes at once.
        connection.as_mut().connection().graceful_shutdown();
        let finished = tokio::select! {
            finished = tokio::time::timeout(grace, connection.as_mut()) => finished.is_ok(),
            () = activity.send_stalled(timeouts.send) => {
                activity.close_by_proxy(Closed::SendTimeout);
                return;
            }
        };
        if !finished {
            activity.close_by_proxy(Closed::Drain);
        }
    }
}

/// The next connection of any of `listeners`. Polling starts after the listener that gave
/// the last one, so that a busy listener cannot starve the others.
async fn accept_any(
    listeners: &[(Arc<TcpListener>, Listener)],
    next: &mut usize,
) -> (std::io::Result<(TcpStream, SocketAddr)>, Listener) {
    std::future::poll_fn(|cx| {
        for i in 0..listeners.len() {
            let index = (*next + i) % listeners.len();
            let (listener, kind) = &listeners[index];
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                *next = index + 1;
                return Poll::Ready((accepted, *kind));
            }
        }
        Poll::Pending
    })
    .await
}

/// Which protocols a connection may speak.
#[derive(Debug, Clone, Copy)]
enum Protocols {
    /// TLS without ALPN h2.
    Http1,
    /// TLS with ALPN h2.
    Http2,
    /// Plain HTTP: HTTP/1.1, or HTTP/2 with prior knowledge.
    Either,
}

/// The hyper connection builder of one connection, with our limits and timeouts, whose
/// HTTP/2 streams go to `streams`.
fn http_builder(
    config: &Config,
    protocols: Protocols,
    streams: ConnectionStreams,
) -> Builder<ConnectionStreams> {
    let mut builder = Builder::new(streams);
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's own header-read timer restarts whenever it waits for a request head, idle
        // keep-alive included, so it would close keep-alive connections after the header-read
        // timeout instead of the idle one. The connection's deadlines (`deadlines.rs`) bound
        // the first request by the header-read timeout and every later wait by the idle one.
        .header_read_timeout(None)
        .max_buf_size(config.limits.max_header_bytes)
        .max_headers(config.limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    match protocols {
        Protocols::Http1 => builder.http1_only(),
        Protocols::Http2 => builder.http2_only(),
        Protocols::Either => builder,
    }
}
