//! The application metrics of the catalogue (design.md), in one registry served on the admin
//! listener. The eBPF collectors register into the same registry (see `ebpf`).
//!
//! Label values are bounded: listeners, status codes, fixed failure reasons and kinds.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets for request and TLS handshake durations: 1 ms to ~16 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 16.0,
];

/// Every application metric, registered once at start-up.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub tls_handshake_duration: Histogram,
    pub tls_handshake_failures: IntCounterVec,
    pub connections_open: IntGaugeVec,
    pub connections: IntCounterVec,
    pub upstream_request_duration: Histogram,
    pub upstream_errors: IntCounterVec,
    pub certificate_expiry: prometheus::GaugeVec,
    pub reloads: IntCounterVec,
    pub state_write_failures: IntCounter,
    pub ebpf_attached: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric. Fails only on a programming error (a duplicate or
    /// malformed name), which the unit test below catches.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let histogram = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let metric = Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            )?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };

        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "proxy_http_request_duration_seconds",
                "Time from request head to response head.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["listener"],
        )?;
        registry.register(Box::new(http_request_duration.clone()))?;
        let certificate_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "proxy_certificate_expiry_timestamp_seconds",
                "Unix time at which the served leaf or its CA expires.",
            ),
            &["cert"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let state_write_failures = IntCounter::new(
            "proxy_state_write_failures_total",
            "New leaves the state directory could not store (read-only or full); each is served \
             from memory.",
        )?;
        registry.register(Box::new(state_write_failures.clone()))?;

        let build_info = gauge(
            "proxy_build_info",
            "Always 1; the version label says which build runs.",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let metrics = Metrics {
            http_requests: counter(
                "proxy_http_requests_total",
                "HTTP requests answered, by listener and status code.",
                &["listener", "code"],
            )?,
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
            connections: counter(
                "proxy_connections_total",
                "Client connections accepted.",
                &["listener"],
            )?,
            upstream_request_duration: histogram(
                "proxy_upstream_request_duration_seconds",
                "Time for the upstream to answer with a response head.",
            )?,
            upstream_errors: counter(
                "proxy_upstream_errors_total",
                "Upstream requests that failed, by kind.",
                &["kind"],
            )?,
            certificate_expiry,
            reloads: counter(
                "proxy_reloads_total",
                "Reloads and renewals, by what was reloaded and the result.",
                &["what", "result"],
            )?,
            state_write_failures,
            ebpf_attached: gauge(
                "proxy_ebpf_attached",
                "1 if the eBPF program is attached, else 0.",
                &["program"],
            )?,
            registry,
        };
        metrics
            .registry
            .register(Box::new(crate::listen_queue::ListenQueueCollector::new()?))?;
        // Known label values exist from the start (at 0), so rates and ratios over them are
        // 0 rather than absent before the first failure.
        for reason in crate::tls::FAILURE_REASONS {
            metrics.tls_handshake_failures.with_label_values(&[reason]);
        }
        for kind in crate::upstream::ERROR_KINDS {
            metrics.upstream_errors.with_label_values(&[kind]);
        }
        for (what, result) in [
            ("config", "failure"),
            ("tls", "failure"),
            ("renewal", "failure"),
        ] {
            metrics.reloads.with_label_values(&[what, result]);
        }
        for listener in ["http", "https"] {
            metrics.connections_open.with_label_values(&[listener]);
            metrics.connections.with_label_values(&[listener]);
            metrics.http_request_duration.with_label_values(&[listener]);
        }
        Ok(metrics)
    }

    /// Counts a reload or renewal outcome.
    pub fn count_reload(&self, what: &str, ok: bool) {
        self.reloads
            .with_label_values(&[what, if ok { "success" } else { "failure" }])
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on a malformed metric family, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_are_exported() {
        let metrics = Metrics::new().expect("metrics register");
        metrics
            .http_requests
            .with_label_values(&["https", "200"])
            .inc();
        metrics
            .tls_handshake_failures
            .with_label_values(&["timeout"])
            .inc();
        metrics
            .upstream_errors
            .with_label_values(&["connect"])
            .inc();
        metrics
            .certificate_expiry
            .with_label_values(&["leaf"])
            .set(1.0);
        metrics.count_reload("tls", true);
        metrics
            .ebpf_attached
            .with_label_values(&["sock_ops"])
            .set(0);
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
            "proxy_certificate_expiry_timestamp_seconds",
            "proxy_reloads_total",
            "proxy_state_write_failures_total",
            "proxy_build_info",
            "proxy_ebpf_attached",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
    }
}
