//! Connections to one backend: its resolved addresses in order, each under the connect
//! timeout, with TCP_NODELAY.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::ebpf::KernelObserver;
use crate::telemetry::metrics::Metrics;

/// Opens connections to one backend for its pooled client.
#[derive(Clone)]
pub(crate) struct Connector {
    addrs: Arc<[SocketAddr]>,
    connect_timeout: Duration,
}

impl Connector {
    pub(crate) fn new(
        _backend: Arc<str>,
        addrs: Vec<SocketAddr>,
        connect_timeout: Duration,
        _kernel: Option<Arc<KernelObserver>>,
        _metrics: Metrics,
    ) -> Self {
        Connector {
            addrs: addrs.into(),
            connect_timeout,
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addrs = self.addrs.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
            for addr in addrs.iter() {
                match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(TokioIo::new(stream));
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => {
                        last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    }
                }
            }
            Err(last)
        })
    }
}
