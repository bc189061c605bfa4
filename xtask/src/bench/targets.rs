//! The performance goals `cargo xtask bench` reports against (goals, not assertions): the
//! attached proxy over the best peer on each line, over nginx's worker for peak RSS, and over
//! itself detached for the cost of eBPF.

use super::metric::Metric;
use super::report::Contender;

/// A goal: `metric` of the attached proxy divided by that of `over`, against a bound.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    pub goal: &'static str,
    pub metric: Metric,
    pub over: Over,
    pub bound: Bound,
}

/// What a target compares the attached proxy with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Over {
    /// Whichever of nginx, HAProxy and h2o did best on the target's line.
    BestPeer,
    One(Contender),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    pub(super) fn met(self, ratio: f64) -> bool {
        match self {
            Bound::AtLeast(b) => ratio >= b,
            Bound::AtMost(b) => ratio <= b,
        }
    }
}

/// The goals, against the best peer on each line and between eBPF attached and detached
/// (goals, not assertions).
pub(super) const TARGETS: [Target; 20] = {
    use Bound::*;
    use Contender::*;
    use Metric::*;
    use Over::*;
    const fn t(goal: &'static str, metric: Metric, over: Over, bound: Bound) -> Target {
        Target {
            goal,
            metric,
            over,
            bound,
        }
    }
    [
        t(
            "HTTP/1.1 keep-alive server CPU per request ≤ 0.8× the best peer",
            H1CpuUs,
            BestPeer,
            AtMost(0.8),
        ),
        t(
            "HTTP/1.1 keep-alive req/s ≥ 1.25× the best peer (where the server is the limit)",
            H1Rps,
            BestPeer,
            AtLeast(1.25),
        ),
        t(
            "HTTP/1.1 keep-alive p99 ≤ the best peer's",
            H1P99Ms,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "HTTP/1.1 at 500 connections: p99 ≤ the best peer's",
            H1ManyP99Ms,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "HTTP/2 req/s ≥ 1.1× the best peer",
            H2Rps,
            BestPeer,
            AtLeast(1.1),
        ),
        t(
            "HTTP/2 (second shape) req/s ≥ 1.1× the best peer",
            H2WideRps,
            BestPeer,
            AtLeast(1.1),
        ),
        t(
            "server CPU per full handshake ≤ 0.5× the best peer",
            HandshakeCpuUs,
            BestPeer,
            AtMost(0.5),
        ),
        t(
            "plain HTTP → 308 req/s ≥ the best peer",
            RedirectRps,
            BestPeer,
            AtLeast(1.0),
        ),
        t(
            "plain HTTP → 308 server CPU per request ≤ the best peer",
            RedirectCpuUs,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "reverse proxy, HTTP/1.1: server CPU per request ≤ the best peer",
            ReverseH1CpuUs,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "reverse proxy, HTTP/2: server CPU per request ≤ the best peer",
            ReverseH2CpuUs,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "peak RSS under load ≤ nginx worker's",
            RssMib,
            One(Nginx),
            AtMost(1.0),
        ),
        t(
            "memory per idle HTTP/1.1 TLS connection ≤ the best peer",
            IdleH1RssKib,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "memory per idle HTTP/2 TLS connection ≤ the best peer",
            IdleH2RssKib,
            BestPeer,
            AtMost(1.0),
        ),
        t(
            "eBPF: HTTP/1.1 server CPU per request within 2%",
            H1CpuUs,
            One(Detached),
            AtMost(1.02),
        ),
        t(
            "eBPF: HTTP/2 server CPU per request within 2%",
            H2CpuUs,
            One(Detached),
            AtMost(1.02),
        ),
        t(
            "eBPF: CPU per full handshake (per connection) within 2%",
            HandshakeCpuUs,
            One(Detached),
            AtMost(1.02),
        ),
        t(
            "eBPF: redirect server CPU per request within 2%",
            RedirectCpuUs,
            One(Detached),
            AtMost(1.02),
        ),
        t(
            "eBPF: reverse proxy HTTP/1.1 server CPU per request within 2%",
            ReverseH1CpuUs,
            One(Detached),
            AtMost(1.02),
        ),
        t(
            "eBPF: HTTP/1.1 p99 within 5%",
            H1P99Ms,
            One(Detached),
            AtMost(1.05),
        ),
    ]
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_include_their_limit() {
        assert!(Bound::AtLeast(1.25).met(1.25));
        assert!(!Bound::AtLeast(1.25).met(1.2));
        assert!(!Bound::AtMost(0.5).met(0.6));
        assert!(Bound::AtMost(0.5).met(0.5));
    }
}
