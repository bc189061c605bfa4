//! The application metrics, in one registry served on the admin listener; the kernel
//! observer registers its collectors into the same registry. Their label values are the
//! enums of `labels.rs`, and every declared value is exported at 0 from the start, so rates
//! and ratios over it are 0 rather than absent before the first event.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use proxy_common::Scale;
use strum::IntoEnumIterator;

use crate::telemetry::labels::{
    Certificate, LabelValue, Listener, Outcome, Reloaded, TlsFailure, UpstreamFailure,
};
use crate::telemetry::listen_queue::ListenQueueCollector;

/// Bucket bounds of `scale` (`proxy_common::buckets`, the grid the kernel's histograms use
/// too): fine for request and TLS handshake durations (1 µs to 67 s, 8 per octave), coarse for
/// the per-backend request duration (one per octave, as there are up to 64 backends).
fn bounds(scale: Scale) -> Vec<f64> {
    scale.finite_bounds_seconds().collect()
}

/// The statuses most answers have, whose complete-answer counters are kept resolved.
const COMMON_STATUSES: [u16; 8] = [200, 204, 301, 304, 308, 404, 502, 504];

/// Every application metric, registered once at start-up.
#[derive(Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_request_duration: HistogramVec,
    /// `http_request_duration` of each listener, resolved once: a label lookup hashes its
    /// values, and this one is made for every request.
    request_duration_by_listener: [Histogram; 2],
    /// `http_requests` of the commonest answers (complete, by listener and status), each
    /// resolved on its first use, for the same reason; shared by every clone.
    common_answers: Arc<[[OnceLock<IntCounter>; COMMON_STATUSES.len()]; 2]>,
    tls_handshake_duration: Histogram,
    tls_handshake_failures: IntCounterVec,
    connections_open: IntGaugeVec,
    connections: IntCounterVec,
    connections_max: prometheus::IntGauge,
    upstream: UpstreamMetrics,
    certificate_expiry: GaugeVec,
    reloads: IntCounterVec,
    state_write_failures: IntCounter,
    upstream_connections: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric. Fails only on a programming error (a duplicate or
    /// malformed name), which the unit test below catches.
    pub(crate) fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let register = |metric: Box<dyn prometheus::core::Collector>| registry.register(metric);
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            register(Box::new(metric.clone()))?;
            prometheus::Result::Ok(metric)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
            register(Box::new(metric.clone()))?;
            prometheus::Result::Ok(metric)
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], scale: Scale| {
            let metric = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(bounds(scale)),
                labels,
            )?;
            register(Box::new(metric.clone()))?;
            prometheus::Result::Ok(metric)
        };
        let histogram = |name: &str, help: &str| {
            let metric =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(bounds(Scale::Fine)))?;
            register(Box::new(metric.clone()))?;
            prometheus::Result::Ok(metric)
        };

        let http_request_duration = histogram_vec(
            "proxy_http_request_duration_seconds",
            "Time from request head to the end of the response.",
            &["listener"],
            Scale::Fine,
        )?;
        let upstream = UpstreamMetrics {
            request_duration: histogram_vec(
                "proxy_upstream_request_duration_seconds",
                "Time for a backend to answer with a response head (or fail), by backend.",
                &["backend"],
                Scale::Coarse,
            )?,
            errors: counter(
                "proxy_upstream_errors_total",
                "Upstream requests that failed, by backend and kind.",
                &["backend", "kind"],
            )?,
            requests: counter(
                "proxy_upstream_requests_total",
                "Requests sent to each backend, retries included.",
                &["backend"],
            )?,
            retries: counter(
                "proxy_upstream_retries_total",
                "Requests retried on another backend, by the backend that failed them.",
                &["backend"],
            )?,
            retries_refused: IntCounter::new(
                "proxy_upstream_retries_refused_total",
                "Retries not made because the retry budget was spent.",
            )?,
            healthy: gauge(
                "proxy_upstream_healthy",
                "1 if the backend is in the pool (passing its health check), else 0.",
                &["backend"],
            )?,
            in_flight: gauge(
                "proxy_upstream_requests_in_flight",
                "Requests a backend is answering now.",
                &["backend"],
            )?,
            ejections: counter(
                "proxy_upstream_ejections_total",
                "Times a backend was taken out of the pool for failing live requests.",
                &["backend"],
            )?,
            fail_open: prometheus::IntGauge::new(
                "proxy_upstream_fail_open",
                "1 while no backend is healthy and requests go to all of them anyway.",
            )?,
        };
        register(Box::new(upstream.retries_refused.clone()))?;
        register(Box::new(upstream.fail_open.clone()))?;
        let certificate_expiry = GaugeVec::new(
            Opts::new(
                "proxy_certificate_expiry_timestamp_seconds",
                "Unix time at which the served leaf or its CA expires.",
            ),
            &["cert"],
        )?;
        register(Box::new(certificate_expiry.clone()))?;
        let state_write_failures = IntCounter::new(
            "proxy_state_write_failures_total",
            "New leaves the state directory could not store (read-only or full); each is served \
             from memory.",
        )?;
        register(Box::new(state_write_failures.clone()))?;
        gauge(
            "proxy_build_info",
            "Always 1; its labels say which build runs: version, source revision, and whether \
             the eBPF object is embedded.",
            &["version", "revision", "ebpf"],
        )?
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            env!("PROXY_REVISION"),
            crate::ebpf::BUILD,
        ])
        .set(1);
        let connections_max = prometheus::IntGauge::new(
            "proxy_connections_max",
            "The connection cap (--max-connections): at it the proxy stops accepting.",
        )?;
        register(Box::new(connections_max.clone()))?;
        // CPU, resident memory, open and maximum file descriptors, start time.
        register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        register(Box::new(ListenQueueCollector::new()?))?;

        let metrics = Metrics {
            http_requests: counter(
                "proxy_http_requests_total",
                "HTTP requests answered, by listener, status code and how the response ended.",
                &["listener", "code", "outcome"],
            )?,
            request_duration_by_listener: [Listener::Http, Listener::Https]
                .map(|l| http_request_duration.with_label_values(&[l.as_str()])),
            common_answers: Arc::default(),
            http_request_duration,
            tls_handshake_duration: histogram(
                "proxy_tls_handshake_duration_seconds",
                "Time from TCP accept to a completed TLS handshake.",
            )?,
            tls_handshake_failures: counter(
                "proxy_tls_handshake_failures_total",
                "TLS handshakes that failed, by reason.",
                &["reason"],
            )?,
            connections_open: gauge(
                "proxy_connections_open",
                "Client connections open now.",
                &["listener"],
            )?,
            connections_max,
            connections: counter(
                "proxy_connections_total",
                "Client connections accepted.",
                &["listener"],
            )?,
            upstream,
            certificate_expiry,
            reloads: counter(
                "proxy_reloads_total",
                "Reloads and renewals, by what was reloaded and the result.",
                &["what", "result"],
            )?,
            state_write_failures,
            upstream_connections: counter(
                "proxy_upstream_connections_total",
                "Upstream TCP connections the proxy opened, by backend.",
                &["backend"],
            )?,
            registry,
        };
        for reason in TlsFailure::iter() {
            metrics
                .tls_handshake_failures
                .with_label_values(&[reason.as_str()]);
        }
        for what in Reloaded::iter() {
            metrics
                .reloads
                .with_label_values(&[what.as_str(), "failure"]);
        }
        for listener in Listener::iter() {
            let listener = listener.as_str();
            metrics.connections_open.with_label_values(&[listener]);
            metrics.connections.with_label_values(&[listener]);
            metrics.http_request_duration.with_label_values(&[listener]);
        }
        Ok(metrics)
    }

    /// The registry, for collectors of other layers (the kernel observer) to join.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets the connection cap that `proxy_connections_max` reports.
    pub(crate) fn set_connection_cap(&self, max_connections: usize) {
        self.connections_max
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
    }

    /// Counts an accepted connection and keeps it among the open ones until the guard drops.
    pub(crate) fn connection_opened(&self, listener: Listener) -> OpenConnection {
        let label = listener.as_str();
        self.connections.with_label_values(&[label]).inc();
        let open = self.connections_open.with_label_values(&[label]);
        open.inc();
        OpenConnection(open)
    }

    /// Counts a request answered with `status` that ended with `outcome` after `elapsed`
    /// (request head to the end of the response).
    pub(crate) fn request_answered(
        &self,
        listener: Listener,
        status: http::StatusCode,
        outcome: Outcome,
        elapsed: Duration,
    ) {
        let index = match listener {
            Listener::Http => 0,
            Listener::Https => 1,
        };
        let common = (outcome == Outcome::Complete)
            .then(|| COMMON_STATUSES.iter().position(|&c| c == status.as_u16()))
            .flatten();
        let labels = || [listener.as_str(), status.as_str(), outcome.as_str()];
        match common {
            Some(slot) => self.common_answers[index][slot]
                .get_or_init(|| self.http_requests.with_label_values(&labels()))
                .inc(),
            None => self.http_requests.with_label_values(&labels()).inc(),
        }
        self.request_duration_by_listener[index].observe(elapsed.as_secs_f64());
    }

    /// Records a completed TLS handshake.
    pub(crate) fn tls_handshake_completed(&self, elapsed: Duration) {
        self.tls_handshake_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a failed TLS handshake.
    pub(crate) fn tls_handshake_failed(&self, reason: TlsFailure) {
        self.tls_handshake_failures
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// The metrics of backend `label`, its series exported (at 0) from now on.
    pub(crate) fn backend(&self, label: &str) -> BackendMetrics {
        let upstream = &self.upstream;
        let errors = UpstreamFailure::iter()
            .map(|kind| upstream.errors.with_label_values(&[label, kind.as_str()]))
            .collect();
        BackendMetrics {
            request_duration: upstream.request_duration.with_label_values(&[label]),
            errors,
            requests: upstream.requests.with_label_values(&[label]),
            retries: upstream.retries.with_label_values(&[label]),
            healthy: upstream.healthy.with_label_values(&[label]),
            in_flight: upstream.in_flight.with_label_values(&[label]),
            ejections: upstream.ejections.with_label_values(&[label]),
        }
    }

    /// Stops exporting backend `label` (removed from the pool by a reload).
    pub(crate) fn backend_removed(&self, label: &str) {
        let upstream = &self.upstream;
        for kind in UpstreamFailure::iter() {
            let _ = upstream.errors.remove_label_values(&[label, kind.as_str()]);
        }
        for vec in [&upstream.requests, &upstream.retries, &upstream.ejections] {
            let _ = vec.remove_label_values(&[label]);
        }
        for vec in [&upstream.healthy, &upstream.in_flight] {
            let _ = vec.remove_label_values(&[label]);
        }
        let _ = upstream.request_duration.remove_label_values(&[label]);
        let _ = self.upstream_connections.remove_label_values(&[label]);
    }

    /// Counts a retry the budget did not allow.
    pub(crate) fn retry_refused(&self) {
        self.upstream.retries_refused.inc();
    }

    /// Sets whether the pool is failing open (no backend healthy).
    pub(crate) fn set_fail_open(&self, failing_open: bool) {
        self.upstream.fail_open.set(i64::from(failing_open));
    }

    /// Counts a reload or renewal outcome.
    pub(crate) fn reloaded(&self, what: Reloaded, ok: bool) {
        self.reloads
            .with_label_values(&[what.as_str(), if ok { "success" } else { "failure" }])
            .inc();
    }

    /// Sets when `cert` expires, as a Unix time.
    pub(crate) fn certificate_expires(&self, cert: Certificate, unix_seconds: f64) {
        self.certificate_expiry
            .with_label_values(&[cert.as_str()])
            .set(unix_seconds);
    }

    /// Counts a new leaf the state directory could not store.
    pub(crate) fn state_write_failed(&self) {
        self.state_write_failures.inc();
    }

    /// The registry in Prometheus text format.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on a malformed metric family, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// The count of upstream TCP connections opened to `backend` (its configured
    /// `host:port`), exported from now on. Held by the backend's connector, so that a
    /// connection opened after a reload removed the backend does not bring its series back.
    pub(crate) fn upstream_connections(&self, backend: &str) -> IntCounter {
        self.upstream_connections.with_label_values(&[backend])
    }
}

/// The upstream pool's metric families.
#[derive(Clone)]
struct UpstreamMetrics {
    request_duration: HistogramVec,
    errors: IntCounterVec,
    requests: IntCounterVec,
    retries: IntCounterVec,
    retries_refused: IntCounter,
    healthy: IntGaugeVec,
    in_flight: IntGaugeVec,
    ejections: IntCounterVec,
    fail_open: prometheus::IntGauge,
}

/// One backend's series, resolved once so that requests do not look labels up.
#[derive(Clone)]
pub(crate) struct BackendMetrics {
    request_duration: Histogram,
    /// Indexed like `UpstreamFailure::iter()`.
    errors: Vec<IntCounter>,
    requests: IntCounter,
    retries: IntCounter,
    healthy: prometheus::IntGauge,
    in_flight: prometheus::IntGauge,
    ejections: IntCounter,
}

impl BackendMetrics {
    /// Counts a request sent to the backend; it is in flight until the guard drops.
    pub(crate) fn request_sent(&self) -> BackendInFlight {
        self.requests.inc();
        self.in_flight.inc();
        BackendInFlight(self.in_flight.clone())
    }

    /// Records how long the backend took to answer with a head (or fail).
    pub(crate) fn answered(&self, elapsed: Duration) {
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a failed request.
    pub(crate) fn failed(&self, kind: UpstreamFailure) {
        if let Some(counter) = UpstreamFailure::iter()
            .position(|k| k == kind)
            .and_then(|i| self.errors.get(i))
        {
            counter.inc();
        }
    }

    /// Counts a request this backend failed that is retried on another.
    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    /// Counts an ejection for failing live requests.
    pub(crate) fn ejected(&self) {
        self.ejections.inc();
    }

    /// Sets whether the backend is in the pool.
    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.set(i64::from(healthy));
    }
}

/// A request a backend is answering, counted in `proxy_upstream_requests_in_flight`.
pub(crate) struct BackendInFlight(prometheus::IntGauge);

impl Drop for BackendInFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An open client connection, counted in `proxy_connections_open` until dropped.
pub(crate) struct OpenConnection(prometheus::IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_are_exported() {
        let metrics = Metrics::new().expect("metrics register");
        metrics.request_answered(
            Listener::Https,
            http::StatusCode::OK,
            Outcome::Complete,
            Duration::from_millis(1),
        );
        metrics.tls_handshake_failed(TlsFailure::Timeout);
        metrics.backend("b:1").failed(UpstreamFailure::Connect);
        metrics.certificate_expires(Certificate::Leaf, 1.0);
        metrics.reloaded(Reloaded::Tls, true);
        let text = String::from_utf8(metrics.render()).expect("utf8");
        for name in [
            "proxy_http_requests_total",
            "proxy_http_request_duration_seconds",
            "proxy_tls_handshake_duration_seconds",
            "proxy_tls_handshake_failures_total",
            "proxy_connections_open",
            "proxy_connections_total",
            "proxy_upstream_request_duration_seconds",
            "proxy_upstream_errors_total",
            "proxy_upstream_requests_total",
            "proxy_upstream_retries_total",
            "proxy_upstream_retries_refused_total",
            "proxy_upstream_healthy",
            "proxy_upstream_requests_in_flight",
            "proxy_upstream_ejections_total",
            "proxy_upstream_fail_open",
            "proxy_certificate_expiry_timestamp_seconds",
            "proxy_reloads_total",
            "proxy_state_write_failures_total",
            "proxy_build_info",
            "proxy_connections_max",
            "process_resident_memory_bytes",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn answers_are_counted_by_listener_status_and_outcome() {
        let metrics = Metrics::new().expect("metrics register");
        let clone = metrics.clone();
        let answer = |m: &Metrics, listener, code: u16, outcome| {
            let status = http::StatusCode::from_u16(code).expect("status");
            m.request_answered(listener, status, outcome, Duration::from_millis(1));
        };
        // A common answer twice, once through a clone: one series, shared.
        answer(&metrics, Listener::Https, 200, Outcome::Complete);
        answer(&clone, Listener::Https, 200, Outcome::Complete);
        answer(&metrics, Listener::Http, 308, Outcome::Complete);
        answer(&metrics, Listener::Https, 200, Outcome::ClientClosed);
        answer(&metrics, Listener::Https, 418, Outcome::Complete);
        let text = String::from_utf8(metrics.render()).expect("utf8");
        for series in [
            r#"proxy_http_requests_total{code="200",listener="https",outcome="complete"} 2"#,
            r#"proxy_http_requests_total{code="308",listener="http",outcome="complete"} 1"#,
            r#"proxy_http_requests_total{code="200",listener="https",outcome="client_closed"} 1"#,
            r#"proxy_http_requests_total{code="418",listener="https",outcome="complete"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        assert_eq!(
            text.matches("proxy_http_requests_total{").count(),
            4,
            "{text}"
        );
    }

    /// The SLO thresholds the monitoring compares with (`le="0.262144"`: latency;
    /// `le="0.004096"`: accept wait) are exact bounds of both scales, as the encoder prints
    /// them, and the fine scale runs from 1 µs to 67.108864 s.
    #[test]
    fn slo_thresholds_are_exact_bounds_of_both_scales() {
        let metrics = Metrics::new().expect("metrics register");
        metrics.request_answered(
            Listener::Https,
            http::StatusCode::OK,
            Outcome::Complete,
            Duration::from_micros(30),
        );
        metrics.backend("b:1").answered(Duration::from_millis(3));
        let text = String::from_utf8(metrics.render()).expect("utf8");
        for le in ["0.262144", "0.004096"] {
            for series in [
                "proxy_http_request_duration_seconds_bucket{listener=\"https\"",
                "proxy_upstream_request_duration_seconds_bucket{backend=\"b:1\"",
            ] {
                let line = format!("{series},le=\"{le}\"}}");
                assert!(text.contains(&line), "{line} missing from:\n{text}");
            }
            for scale in [Scale::Fine, Scale::Coarse] {
                assert!(
                    bounds(scale).iter().any(|b| b.to_string() == le),
                    "{le} is no bound of {scale:?}"
                );
            }
        }
        let fine: Vec<String> = bounds(Scale::Fine).iter().map(f64::to_string).collect();
        assert_eq!(fine.len(), 192);
        assert_eq!(fine[..3], ["0.000001", "0.000002", "0.000003"]);
        assert_eq!(fine[8], "0.000009");
        assert_eq!(fine.last().map(String::as_str), Some("67.108864"));
        // The request took 30 µs: counted in le=0.00003, not below.
        assert!(text.contains(
            "proxy_http_request_duration_seconds_bucket{listener=\"https\",le=\"0.00003\"} 1"
        ));
        assert!(text.contains(
            "proxy_http_request_duration_seconds_bucket{listener=\"https\",le=\"0.000028\"} 0"
        ));
    }

    /// Every declared label value is exported from the start, before anything is counted.
    #[test]
    fn a_removed_backend_leaves_no_series() {
        let metrics = Metrics::new().expect("metrics register");
        let backend = metrics.backend("gone:1");
        backend.retried();
        metrics.upstream_connections("gone:1").inc();
        let _stays = metrics.backend("stays:1");
        metrics.backend_removed("gone:1");
        let text = String::from_utf8(metrics.render()).expect("utf8");
        let left: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("backend=\"gone:1\""))
            .collect();
        assert!(left.is_empty(), "series of a removed backend: {left:#?}");
        assert!(text.contains("backend=\"stays:1\""), "{text}");
    }

    #[test]
    fn declared_label_values_exist_at_zero() {
        let metrics = Metrics::new().expect("metrics register");
        let _backend = metrics.backend("b:1");
        let text = String::from_utf8(metrics.render()).expect("utf8");
        let expect = |series: String| {
            assert!(
                text.contains(&format!("{series} 0")),
                "{series} missing from:\n{text}"
            );
        };
        for reason in TlsFailure::iter() {
            expect(format!(
                "proxy_tls_handshake_failures_total{{reason=\"{}\"}}",
                reason.as_str()
            ));
        }
        for kind in UpstreamFailure::iter() {
            expect(format!(
                "proxy_upstream_errors_total{{backend=\"b:1\",kind=\"{}\"}}",
                kind.as_str()
            ));
        }
        for what in Reloaded::iter() {
            expect(format!(
                "proxy_reloads_total{{result=\"failure\",what=\"{}\"}}",
                what.as_str()
            ));
        }
        for listener in Listener::iter() {
            expect(format!(
                "proxy_connections_total{{listener=\"{}\"}}",
                listener.as_str()
            ));
        }
        assert_eq!(
            TlsFailure::NoApplicationProtocol.as_str(),
            "no_application_protocol"
        );
    }
}
