//! The figures the bench reports: their JSON keys, their table labels (which name the load's
//! shape, as set on the command line), and which way is better.

/// The load shapes the labels name: HTTP/1.1 connections, HTTP/2 connections × streams, and
/// how many idle connections were held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Shapes {
    pub h1: [usize; 2],
    pub h2: [(usize, usize); 2],
    pub idle: usize,
}

impl Default for Shapes {
    fn default() -> Shapes {
        Shapes {
            h1: [50, 500],
            h2: [(16, 32), (50, 10)],
            idle: 18_000,
        }
    }
}

/// One figure of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Metric {
    H1Rps,
    H1P50Ms,
    H1P99Ms,
    H1CpuUs,
    H1Instructions,
    H1ManyRps,
    H1ManyP99Ms,
    H1ManyCpuUs,
    H1ManyInstructions,
    H2Rps,
    H2CpuUs,
    H2Instructions,
    H2WideRps,
    H2WideCpuUs,
    H2WideInstructions,
    HandshakesPerSec,
    HandshakeCpuUs,
    ResumedPerSec,
    ResumedCpuUs,
    RedirectRps,
    RedirectCpuUs,
    ReverseH1Rps,
    ReverseH1P99Ms,
    ReverseH1CpuUs,
    ReverseH2Rps,
    ReverseH2CpuUs,
    IdleH1RssKib,
    IdleH1SocketKib,
    IdleH1ProbeP99Ms,
    IdleH2RssKib,
    IdleH2SocketKib,
    IdleH2ProbeP99Ms,
    BpfNsPerConnection,
    BpfCallsPerConnection,
    BpfNsPerRequest,
    RssMib,
}

impl Metric {
    pub(super) const ALL: [Metric; 36] = [
        Metric::H1Rps,
        Metric::H1P50Ms,
        Metric::H1P99Ms,
        Metric::H1CpuUs,
        Metric::H1Instructions,
        Metric::H1ManyRps,
        Metric::H1ManyP99Ms,
        Metric::H1ManyCpuUs,
        Metric::H1ManyInstructions,
        Metric::H2Rps,
        Metric::H2CpuUs,
        Metric::H2Instructions,
        Metric::H2WideRps,
        Metric::H2WideCpuUs,
        Metric::H2WideInstructions,
        Metric::HandshakesPerSec,
        Metric::HandshakeCpuUs,
        Metric::ResumedPerSec,
        Metric::ResumedCpuUs,
        Metric::RedirectRps,
        Metric::RedirectCpuUs,
        Metric::ReverseH1Rps,
        Metric::ReverseH1P99Ms,
        Metric::ReverseH1CpuUs,
        Metric::ReverseH2Rps,
        Metric::ReverseH2CpuUs,
        Metric::IdleH1RssKib,
        Metric::IdleH1SocketKib,
        Metric::IdleH1ProbeP99Ms,
        Metric::IdleH2RssKib,
        Metric::IdleH2SocketKib,
        Metric::IdleH2ProbeP99Ms,
        Metric::BpfNsPerConnection,
        Metric::BpfCallsPerConnection,
        Metric::BpfNsPerRequest,
        Metric::RssMib,
    ];

    pub(super) fn key(self) -> &'static str {
        match self {
            Metric::H1Rps => "h1_requests_per_second",
            Metric::H1P50Ms => "h1_p50_ms",
            Metric::H1P99Ms => "h1_p99_ms",
            Metric::H1CpuUs => "h1_server_cpu_us_per_request",
            Metric::H1Instructions => "h1_server_instructions_per_request",
            Metric::H1ManyRps => "h1_many_requests_per_second",
            Metric::H1ManyP99Ms => "h1_many_p99_ms",
            Metric::H1ManyCpuUs => "h1_many_server_cpu_us_per_request",
            Metric::H1ManyInstructions => "h1_many_server_instructions_per_request",
            Metric::H2Rps => "h2_requests_per_second",
            Metric::H2CpuUs => "h2_server_cpu_us_per_request",
            Metric::H2Instructions => "h2_server_instructions_per_request",
            Metric::H2WideRps => "h2_wide_requests_per_second",
            Metric::H2WideCpuUs => "h2_wide_server_cpu_us_per_request",
            Metric::H2WideInstructions => "h2_wide_server_instructions_per_request",
            Metric::HandshakesPerSec => "full_handshakes_per_second",
            Metric::HandshakeCpuUs => "server_cpu_us_per_full_handshake",
            Metric::ResumedPerSec => "resumed_handshakes_per_second",
            Metric::ResumedCpuUs => "server_cpu_us_per_resumed_handshake",
            Metric::RedirectRps => "redirect_requests_per_second",
            Metric::RedirectCpuUs => "redirect_server_cpu_us_per_request",
            Metric::ReverseH1Rps => "reverse_h1_requests_per_second",
            Metric::ReverseH1P99Ms => "reverse_h1_p99_ms",
            Metric::ReverseH1CpuUs => "reverse_h1_server_cpu_us_per_request",
            Metric::ReverseH2Rps => "reverse_h2_requests_per_second",
            Metric::ReverseH2CpuUs => "reverse_h2_server_cpu_us_per_request",
            Metric::IdleH1RssKib => "idle_h1_server_rss_kib_per_connection",
            Metric::IdleH1SocketKib => "idle_h1_kernel_tcp_kib_per_connection",
            Metric::IdleH1ProbeP99Ms => "idle_h1_probe_p99_ms",
            Metric::IdleH2RssKib => "idle_h2_server_rss_kib_per_connection",
            Metric::IdleH2SocketKib => "idle_h2_kernel_tcp_kib_per_connection",
            Metric::IdleH2ProbeP99Ms => "idle_h2_probe_p99_ms",
            Metric::BpfNsPerConnection => "bpf_ns_per_connection",
            Metric::BpfCallsPerConnection => "bpf_calls_per_connection",
            Metric::BpfNsPerRequest => "bpf_ns_per_keep_alive_request",
            Metric::RssMib => "peak_rss_mib",
        }
    }

    /// The table's label, naming the shape of the load behind the figure.
    pub(super) fn label(self, shapes: &Shapes) -> String {
        let h1 = |i: usize| format!("HTTP/1.1 keep-alive ×{}", shapes.h1[i]);
        let h2 = |i: usize| format!("HTTP/2 {}×{} streams", shapes.h2[i].0, shapes.h2[i].1);
        let idle = |protocol: &str| format!("{} idle {protocol}", shapes.idle);
        match self {
            Metric::H1Rps => format!("{}, req/s", h1(0)),
            Metric::H1P50Ms => format!("{}, p50 ms", h1(0)),
            Metric::H1P99Ms => format!("{}, p99 ms", h1(0)),
            Metric::H1CpuUs => format!("{}, server CPU µs/req", h1(0)),
            Metric::H1Instructions => format!("{}, server instructions/req", h1(0)),
            Metric::H1ManyRps => format!("{}, req/s", h1(1)),
            Metric::H1ManyP99Ms => format!("{}, p99 ms", h1(1)),
            Metric::H1ManyCpuUs => format!("{}, server CPU µs/req", h1(1)),
            Metric::H1ManyInstructions => format!("{}, server instructions/req", h1(1)),
            Metric::H2Rps => format!("{}, req/s", h2(0)),
            Metric::H2CpuUs => format!("{}, server CPU µs/req", h2(0)),
            Metric::H2Instructions => format!("{}, server instructions/req", h2(0)),
            Metric::H2WideRps => format!("{}, req/s", h2(1)),
            Metric::H2WideCpuUs => format!("{}, server CPU µs/req", h2(1)),
            Metric::H2WideInstructions => format!("{}, server instructions/req", h2(1)),
            Metric::HandshakesPerSec => "full TLS handshakes/s (client-bound)".into(),
            Metric::HandshakeCpuUs => "server CPU µs per full handshake".into(),
            Metric::ResumedPerSec => "resumed TLS 1.3 handshakes/s (client-bound)".into(),
            Metric::ResumedCpuUs => "server CPU µs per resumed handshake".into(),
            Metric::RedirectRps => "plain HTTP → 308, req/s".into(),
            Metric::RedirectCpuUs => "plain HTTP → 308, server CPU µs/req".into(),
            Metric::ReverseH1Rps => format!("reverse proxy, {}, req/s", h1(0)),
            Metric::ReverseH1P99Ms => format!("reverse proxy, {}, p99 ms", h1(0)),
            Metric::ReverseH1CpuUs => format!("reverse proxy, {}, server CPU µs/req", h1(0)),
            Metric::ReverseH2Rps => format!("reverse proxy, {}, req/s", h2(0)),
            Metric::ReverseH2CpuUs => format!("reverse proxy, {}, server CPU µs/req", h2(0)),
            Metric::IdleH1RssKib => format!("{}: server RSS KiB/conn", idle("HTTP/1.1")),
            Metric::IdleH1SocketKib => format!("{}: kernel TCP KiB/conn", idle("HTTP/1.1")),
            Metric::IdleH1ProbeP99Ms => format!("{}: p99 ms of 4 active", idle("HTTP/1.1")),
            Metric::IdleH2RssKib => format!("{}: server RSS KiB/conn", idle("h2")),
            Metric::IdleH2SocketKib => format!("{}: kernel TCP KiB/conn", idle("h2")),
            Metric::IdleH2ProbeP99Ms => format!("{}: p99 ms of 4 active", idle("h2")),
            Metric::BpfNsPerConnection => "eBPF programs, ns per full-handshake connection".into(),
            Metric::BpfCallsPerConnection => "eBPF program runs per connection".into(),
            Metric::BpfNsPerRequest => format!("eBPF programs, ns per request ({})", h1(0)),
            Metric::RssMib => "peak RSS under load, MiB".into(),
        }
    }

    /// Whether a larger figure is the better one (throughput), or a smaller (latency, CPU,
    /// memory).
    pub(super) fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::H1Rps
                | Metric::H1ManyRps
                | Metric::H2Rps
                | Metric::H2WideRps
                | Metric::HandshakesPerSec
                | Metric::ResumedPerSec
                | Metric::RedirectRps
                | Metric::ReverseH1Rps
                | Metric::ReverseH2Rps
        )
    }

    pub(super) fn decimals(self) -> usize {
        match self {
            Metric::H1Rps
            | Metric::H1ManyRps
            | Metric::H2Rps
            | Metric::H2WideRps
            | Metric::HandshakesPerSec
            | Metric::ResumedPerSec
            | Metric::RedirectRps
            | Metric::ReverseH1Rps
            | Metric::ReverseH2Rps
            | Metric::H1Instructions
            | Metric::H1ManyInstructions
            | Metric::H2Instructions
            | Metric::H2WideInstructions
            | Metric::BpfNsPerConnection
            | Metric::BpfNsPerRequest => 0,
            Metric::H1P50Ms
            | Metric::H1P99Ms
            | Metric::H1ManyP99Ms
            | Metric::ReverseH1P99Ms
            | Metric::IdleH1ProbeP99Ms
            | Metric::IdleH2ProbeP99Ms
            | Metric::IdleH1SocketKib
            | Metric::IdleH2SocketKib => 2,
            Metric::H1CpuUs
            | Metric::H1ManyCpuUs
            | Metric::H2CpuUs
            | Metric::H2WideCpuUs
            | Metric::HandshakeCpuUs
            | Metric::ResumedCpuUs
            | Metric::RedirectCpuUs
            | Metric::ReverseH1CpuUs
            | Metric::ReverseH2CpuUs
            | Metric::IdleH1RssKib
            | Metric::IdleH2RssKib
            | Metric::BpfCallsPerConnection
            | Metric::RssMib => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_shapes() {
        let shapes = Shapes::default();
        assert_eq!(
            Metric::H1Rps.label(&shapes),
            "HTTP/1.1 keep-alive ×50, req/s"
        );
        assert_eq!(
            Metric::H2WideCpuUs.label(&shapes),
            "HTTP/2 50×10 streams, server CPU µs/req"
        );
        assert_eq!(
            Metric::IdleH2RssKib.label(&shapes),
            "18000 idle h2: server RSS KiB/conn"
        );
        let keys: std::collections::BTreeSet<_> = Metric::ALL.iter().map(|m| m.key()).collect();
        assert_eq!(keys.len(), Metric::ALL.len(), "keys are unique");
    }
}
