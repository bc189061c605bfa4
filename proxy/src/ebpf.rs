//! The seam for the kernel observer. The eBPF program (crate `proxy-ebpf`) is loaded and
//! attached here before the listeners are created, and its collectors register into the
//! same metrics registry as the application metrics.
//!
//! This build carries no eBPF program yet: the proxy serves without kernel metrics and
//! says so once, and `proxy_ebpf_attached{program="sock_ops"}` reads 0.

use crate::metrics::Metrics;

/// Whether kernel observation is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EbpfStatus {
    /// The program is loaded and attached.
    Attached,
    /// Not attached; the proxy serves without kernel metrics.
    Unavailable,
}

/// Loads and attaches the kernel observer, reporting the outcome in `metrics`.
pub fn attach(metrics: &Metrics) -> EbpfStatus {
    metrics
        .ebpf_attached
        .with_label_values(&["sock_ops"])
        .set(0);
    tracing::warn!(
        "kernel metrics unavailable: this build has no eBPF program; serving without them"
    );
    EbpfStatus::Unavailable
}
