//! The connector of the upstream client ([`super::client`]): opens the proxy's own TCP connections to one
//! backend, at its resolved addresses in order (the request's authority is not used), each
//! attempt under the connect deadline, with TCP_NODELAY. With a kernel observer, each socket
//! is registered before `connect()` (by socket cookie: registering by local port would race
//! a loopback handshake that completes before `connect()` returns), so the kernel measures
//! exactly the proxy's own connections; the kernel's connect time is read as soon as the
//! connection is up and travels with it, beside every response it carries
//! ([`UpstreamConnection`]). A connector without an observer (health checks) is not measured
//! in the kernel.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::ebpf::KernelObserver;
use crate::telemetry::metrics::Metrics;

/// Opens connections to one backend.
#[derive(Debug)]
pub(crate) struct Connector {
    /// The `backend` label: the configured `host:port`.
    backend: Arc<str>,
    /// Tried in order; the first that connects wins.
    addrs: Arc<[SocketAddr]>,
    connect_timeout: Duration,
    kernel: Option<Arc<KernelObserver>>,
    /// Counts each connection opened (`proxy_upstream_connections_total`).
    opened: prometheus::IntCounter,
}

/// What the connector knows about one upstream connection; every response received on it
/// comes with a clone.
#[derive(Clone, Debug)]
pub(crate) struct UpstreamConnection {
    /// The kernel's SYN-sent to ESTABLISHED time, read right after `connect()`; `None`
    /// without a kernel observer or when the socket was not measured.
    pub(crate) kernel_connect: Option<Duration>,
    /// Shared by every clone: set until the first response claims it.
    unclaimed: Arc<AtomicBool>,
}

impl UpstreamConnection {
    /// Whether this is the first response on its connection: true exactly once per connection,
    /// to the first caller (the connection's first request; later ones reused it).
    pub(crate) fn first_response(&self) -> bool {
        self.unclaimed.swap(false, Ordering::AcqRel)
    }
}

impl Connector {
    pub(crate) fn new(
        backend: Arc<str>,
        addrs: Vec<SocketAddr>,
        connect_timeout: Duration,
        kernel: Option<Arc<KernelObserver>>,
        metrics: &Metrics,
    ) -> Self {
        Connector {
            opened: metrics.upstream_connections(&backend),
            backend,
            addrs: addrs.into(),
            connect_timeout,
            kernel,
        }
    }

    /// Connects to the first of the backend's addresses that answers; the error of the last
    /// attempt otherwise (kind `TimedOut` when it hit the connect deadline).
    pub(crate) async fn connect(&self) -> io::Result<UpstreamStream> {
        let mut last_error = None;
        for &addr in self.addrs.iter() {
            match self.connect_to(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("backend {} has no address to connect to", self.backend),
            )
        }))
    }

    async fn connect_to(&self, addr: SocketAddr) -> io::Result<UpstreamStream> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let kernel = self.kernel.as_deref();
        let cookie = kernel.and_then(|kernel| kernel.register_upstream(&socket, &self.backend));
        let connecting = TcpSocket::from_std_stream(socket.into()).connect(addr);
        // A failed or abandoned attempt has closed its socket by the time this returns.
        let outcome = tokio::time::timeout(self.connect_timeout, connecting).await;
        let failed = |error: io::Error| {
            if let (Some(kernel), Some(cookie)) = (kernel, cookie) {
                kernel.unregister_upstream(cookie);
            }
            error
        };
        let stream = match outcome {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(failed(io::Error::new(
                    e.kind(),
                    format!("connecting to {addr}: {e}"),
                )));
            }
            Err(_) => {
                return Err(failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {addr}: no connection within {:?}",
                        self.connect_timeout
                    ),
                )));
            }
        };
        let kernel_connect = kernel
            .zip(cookie)
            .and_then(|(kernel, cookie)| kernel.upstream_connect_time(cookie));
        self.opened.inc();
        Ok(UpstreamStream {
            io: TokioIo::new(stream),
            connection: UpstreamConnection {
                kernel_connect,
                unclaimed: Arc::new(AtomicBool::new(true)),
            },
        })
    }
}

/// An open upstream connection: the TCP stream and what is known about it.
#[derive(Debug)]
pub(crate) struct UpstreamStream {
    pub(super) io: TokioIo<TcpStream>,
    pub(super) connection: UpstreamConnection,
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::net::TcpListener;

    fn connector(addrs: Vec<SocketAddr>, timeout: Duration) -> (Connector, Metrics) {
        let metrics = Metrics::new().expect("metrics register");
        let connector = Connector::new("test:1".into(), addrs, timeout, None, &metrics);
        (connector, metrics)
    }

    #[tokio::test]
    async fn connects_to_the_first_address_that_answers_and_counts_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let live = listener.local_addr().expect("addr");
        // A port nothing listens on: refused at once.
        let dead = {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            closed.local_addr().expect("addr")
        };
        let (connector, metrics) = connector(vec![dead, live], Duration::from_secs(2));
        let stream = connector
            .connect()
            .await
            .expect("the second address answers");
        let (_accepted, peer) = listener.accept().await.expect("accept");
        assert_eq!(stream.io.inner().local_addr().expect("local"), peer);
        assert!(stream.io.inner().nodelay().expect("nodelay"));
        assert_eq!(stream.connection.kernel_connect, None);
        assert!(stream.connection.first_response());
        assert!(!stream.connection.clone().first_response());
        let text = String::from_utf8(metrics.render()).expect("utf8");
        assert!(
            text.contains("proxy_upstream_connections_total{backend=\"test:1\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_connect_past_the_deadline_is_timed_out() {
        // A listener whose accept queue is full: the kernel drops further SYNs, so connects
        // hang as to a host that does not answer.
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => fillers.push(stream),
                _ => break,
            }
        }
        let started = std::time::Instant::now();
        let err = connector(vec![addr], Duration::from_millis(200))
            .0
            .connect()
            .await
            .expect_err("the accept queue is full");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn no_address_is_an_error() {
        let err = connector(vec![], Duration::from_secs(1))
            .0
            .connect()
            .await
            .expect_err("nothing to connect to");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
