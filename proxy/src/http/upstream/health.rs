//! The active health check: every interval, a `GET` of the check path on a connection of
//! its own (not counted among the proxy's upstream connections, kernel metrics included),
//! under the check timeout; any 2xx or 3xx passes. `unhealthy_threshold` failures in a row
//! take the backend out of the pool, `healthy_threshold` passes in a row bring it back
//! (also after live traffic ejected it).

use std::sync::Arc;

use http::header::{HOST, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::pool::{Backend, FailOpen};
use crate::config::HealthCheck;
use crate::error_chain::error_chain;

/// Checks `backend` until it is retired. Its return to the pool ends `fail_open`.
pub(super) async fn check_forever(
    backend: Arc<Backend>,
    check: HealthCheck,
    fail_open: Arc<FailOpen>,
) {
    // Spread the checks of many backends (and of many proxies) over the interval.
    let offset = check.interval.mul_f64(fastrand::f64());
    tokio::select! {
        () = tokio::time::sleep(offset) => {}
        () = backend.retired.cancelled() => return,
    }
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passes_in_a_row = 0u32;
    let mut failures_in_a_row = 0u32;
    let mut was_healthy = backend.is_healthy();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = backend.retired.cancelled() => return,
        }
        // Ejected by live traffic since the last check: passes count from here.
        if was_healthy && !backend.is_healthy() {
            passes_in_a_row = 0;
        }
        let healthy_before = backend.is_healthy();
        let outcome = probe(&backend, &check).await;
        if healthy_before && !backend.is_healthy() {
            // Ejected by live traffic while this check ran: it must pass again from here.
            passes_in_a_row = 0;
            was_healthy = false;
            continue;
        }
        match outcome {
            Ok(()) => {
                passes_in_a_row = passes_in_a_row.saturating_add(1);
                failures_in_a_row = 0;
                if passes_in_a_row >= check.healthy_threshold && backend.set_healthy(true) {
                    tracing::info!(backend = %backend.label, passes = passes_in_a_row, "backend healthy: back in the pool");
                    fail_open.note(false);
                }
            }
            Err(reason) => {
                failures_in_a_row = failures_in_a_row.saturating_add(1);
                passes_in_a_row = 0;
                if failures_in_a_row >= check.unhealthy_threshold && backend.set_healthy(false) {
                    tracing::warn!(backend = %backend.label, %reason, failures = failures_in_a_row, "backend failed its health check: out of the pool");
                } else {
                    tracing::debug!(backend = %backend.label, %reason, "health check failed");
                }
            }
        }
        was_healthy = backend.is_healthy();
    }
}

/// One check: `Ok` if the backend answered 2xx or 3xx within the timeout.
async fn probe(backend: &Backend, check: &HealthCheck) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, request(backend, check)).await {
        Ok(Ok(status)) if status.is_success() || status.is_redirection() => Ok(()),
        Ok(Ok(status)) => Err(format!("answered {status}")),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn request(backend: &Backend, check: &HealthCheck) -> Result<StatusCode, String> {
    let mut last = String::from("no address");
    let mut stream = None;
    for addr in &backend.addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let stream = stream.ok_or(last)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| error_chain(&e))?;
    let driver = tokio::spawn(connection);
    let request = Request::get(check.path.as_str())
        .header(HOST, backend.address.label.as_str())
        .header(USER_AGENT, "proxy-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let outcome = sender.send_request(request).await;
    driver.abort();
    outcome
        .map(|response| response.status())
        .map_err(|e| error_chain(&e))
}
