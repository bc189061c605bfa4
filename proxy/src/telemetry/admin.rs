//! The admin listener (loopback by default): `/metrics` in Prometheus text format,
//! `/healthz` (the process answers), `/readyz` (serving; 503 while draining) and `/ca.pem`
//! (the local CA's certificate, never its key, as served now: it follows a reload).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::telemetry::metrics::Metrics;

/// What `/ca.pem` serves: the certificate of the local CA that issued the leaf being served,
/// or `None` when the operator brought their own certificate.
pub(crate) type CaPem = Arc<dyn Fn() -> Option<Arc<str>> + Send + Sync>;

/// Serves the admin endpoints on `listener` until the process exits.
pub(crate) async fn serve(
    listener: Arc<TcpListener>,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    ca_pem: CaPem,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        let ca_pem = ca_pem.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = route(&request, &metrics, &ready, &ca_pem);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(
    request: &Request<Incoming>,
    metrics: &Metrics,
    ready: &AtomicBool,
    ca_pem: &CaPem,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/ca.pem" => match ca_pem() {
            Some(pem) => {
                let mut response = Response::new(Full::new(Bytes::from(pem.as_bytes().to_vec())));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-pem-file"),
                );
                response
            }
            None => text(
                StatusCode::NOT_FOUND,
                "no local CA: the certificate served is the operator's own\n",
            ),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A plain-text answer.
fn text(status: StatusCode, message: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
