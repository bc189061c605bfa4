//! The small backing service that upstream mode proxies to: plain HTTP/1.1 answering the
//! static site (`GET /` is `Hello SRE!`). It exists so that the appliance can be run and
//! tested end to end in upstream mode with nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::http::responses::static_site;
use crate::lifecycle::listeners::{self, ListenError};
use crate::lifecycle::signals;

/// Serves until SIGTERM or SIGINT.
pub(crate) async fn run(listen: SocketAddr) -> Result<(), ListenError> {
    let listener = listeners::bind(listen, 1024)?;
    tracing::info!(%listen, "backend ready");
    let stop = signals::terminate();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => return Ok(()),
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|request: hyper::Request<Incoming>| {
                let response = static_site(request.method(), request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            // hyper's header-read timer also runs while a kept-alive connection waits for its
            // next request, so it is the backend's idle timeout too: longer than the proxy's
            // pool keeps idle connections (30 s), so that the pool, not the backend, closes
            // them and no request is sent on a connection the backend is closing. 75 s is
            // nginx's keepalive_timeout.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(75))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
