//! Scrapes of the admin `/metrics` as the tests read them: the testkit's parser, plus the
//! assertion that a sample is there, which names it and shows the whole scrape when it is not.

pub use proxy_testkit::metrics::Metrics;

/// [`Metrics`] queries that fail the test.
pub trait MetricsExt {
    /// Panics, quoting the scrape, unless a sample matches; returns the summed value.
    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64;
}

impl MetricsExt for Metrics {
    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "/metrics has no sample {name}{labels:?}; the scrape was:\n{}",
                self.text
            )
        })
    }
}
