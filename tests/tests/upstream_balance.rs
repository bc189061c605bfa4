//! How a pool spreads load, as an operator sees it: a failing pool gets at most the retry
//! budget's share of extra requests, and power of two choices sends less to a slow backend
//! than round robin does.
//!
//! Each test prints its figures (shares, latencies, ratios) on stderr; run with
//! `-- --nocapture` to see them.

use std::time::{Duration, Instant};

use proxy_e2e::TestEnv;
use proxy_e2e::pool::{
    A, B, C, Exchange, assert_in_flight_settles, attempts, failures, keep_alive_load,
    live_requests, percentile, serve_pool, sum_attempts,
};
use proxy_e2e::upstream::{Behaviour, SLOW_BODY, TestUpstream};

#[test]
fn retries_stay_within_the_budget_when_every_backend_fails() {
    let Some(env) = TestEnv::new("pool-budget") else {
        return;
    };
    // Up but failing: each reads the request and resets the connection.
    let upstreams: Vec<TestUpstream> = [A, B, C]
        .iter()
        .map(|addr| TestUpstream::with(&env.ns, addr, Behaviour::Reset))
        .collect();
    let proxy = serve_pool(&env, &[A, B, C], &[]);
    let tls = proxy.tls();
    let (clients, per_client) = (10, 30);
    let requests = (clients * per_client) as f64;
    let started = Instant::now();
    let exchanges = env.run(|| keep_alive_load(&tls, clients, per_client));
    let elapsed = started.elapsed();
    assert_in_flight_settles(&env, "after the failing requests");
    let m = env.metrics();
    let sent_to_backends = sum_attempts(&m, &[A, B, C]);
    let retries = m.value("proxy_upstream_retries_total", &[]);
    let refused = m.value("proxy_upstream_retries_refused_total", &[]);
    let heads: Vec<String> = upstreams.iter().flat_map(TestUpstream::heads).collect();
    let seen = live_requests(&heads);
    let checks = heads.len() - seen;
    // The budget counts over 10 s in one-second slots: within 9 s every retry saw every
    // request so far. A longer run (a very loaded machine) spans several windows: the retries
    // of each 10 s block are bounded by the share of the requests of that block and the one
    // before, plus the floor.
    let (bound, window) = if elapsed < Duration::from_secs(9) {
        (1.2 * requests + 10.0, "one 10 s window")
    } else {
        let windows = elapsed.as_secs() as f64 / 10.0 + 2.0;
        (
            1.4 * requests + 10.0 * windows.floor(),
            "several 10 s windows",
        )
    };
    eprintln!(
        "retry budget: R = {requests} requests in {elapsed:?} ({window}); attempts = \
         {sent_to_backends} by the proxy's count, {seen} live requests seen by the backends \
         (and {checks} health checks); ratio {:.3}; retries {retries}, \
         refused {refused}; bound {bound}",
        sent_to_backends / requests
    );
    let (not_502, shown) = {
        let bad: Vec<&Exchange> = exchanges.iter().filter(|e| e.status != Some(502)).collect();
        (
            bad.len(),
            bad.iter()
                .take(10)
                .map(|e| e.describe())
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(exchanges.len() as f64, requests);
    assert_eq!(
        not_502, 0,
        "every backend resets: each request should get 502: {shown:#?}"
    );
    assert_eq!(
        sent_to_backends,
        requests + retries,
        "attempts (proxy_upstream_requests_total) should be the requests plus the retries"
    );
    assert_eq!(
        seen as f64, sent_to_backends,
        "the backends saw {seen} requests; the proxy counts {sent_to_backends} attempts"
    );
    assert!(
        sent_to_backends <= bound,
        "{sent_to_backends} attempts for {requests} requests exceeds the budget's {bound}"
    );
    assert!(
        refused > 0.0,
        "proxy_upstream_retries_refused_total did not move although retries were refused:\n{}",
        m.text
    );
    assert!(
        retries >= 10.0,
        "the budget's floor allows 10 retries in any window; only {retries} were made"
    );
}

/// What one balancing policy did with a pool of two fast backends and a slow one.
struct BalanceRun {
    slow_share: f64,
    shares: Vec<f64>,
    upstream_shares: Vec<f64>,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    requests: usize,
    elapsed: Duration,
}

const FAST: Duration = Duration::from_millis(10);
const SLOW: Duration = Duration::from_millis(100);

fn balance_run(policy: &str) -> Option<BalanceRun> {
    let env = TestEnv::new(&format!("pool-balance-{policy}"))?;
    let upstreams = [
        TestUpstream::start(&env.ns, A, FAST),
        TestUpstream::start(&env.ns, B, SLOW),
        TestUpstream::start(&env.ns, C, FAST),
    ];
    let proxy = serve_pool(&env, &[A, B, C], &["--balance", policy]);
    let tls = proxy.tls();
    let started = Instant::now();
    let exchanges = env.run(|| keep_alive_load(&tls, 16, 50));
    let elapsed = started.elapsed();
    let (failed, shown) = failures(&exchanges, &[SLOW_BODY]);
    assert_eq!(failed, 0, "{policy}: requests failed: {shown:#?}");
    assert_in_flight_settles(&env, policy);
    let m = env.metrics();
    let total = sum_attempts(&m, &[A, B, C]);
    let shares: Vec<f64> = [A, B, C].iter().map(|b| attempts(&m, b) / total).collect();
    let seen: Vec<usize> = upstreams
        .iter()
        .map(|u| live_requests(&u.heads()))
        .collect();
    let seen_total = seen.iter().sum::<usize>() as f64;
    let upstream_shares = seen.iter().map(|&n| n as f64 / seen_total).collect();
    assert_eq!(
        total,
        exchanges.len() as f64,
        "{policy}: no request failed, so attempts should equal requests"
    );
    Some(BalanceRun {
        slow_share: shares[1],
        shares,
        upstream_shares,
        p50: percentile(&exchanges, 50.0),
        p90: percentile(&exchanges, 90.0),
        p99: percentile(&exchanges, 99.0),
        requests: exchanges.len(),
        elapsed,
    })
}

#[test]
fn two_choices_send_less_to_a_slow_backend_than_round_robin() {
    let Some(p2c) = balance_run("p2c") else {
        return;
    };
    let Some(round_robin) = balance_run("round-robin") else {
        return;
    };
    for (name, run) in [("p2c", &p2c), ("round-robin", &round_robin)] {
        eprintln!(
            "balance {name}: {} requests in {:?} from 16 kept-alive clients; slow backend \
             ({SLOW:?}, others {FAST:?}) share {:.1}%; shares A/B(slow)/C by the proxy {:.3?}, \
             by the backends {:.3?}; client p50 {:?}, p90 {:?}, p99 {:?}",
            run.requests,
            run.elapsed,
            run.slow_share * 100.0,
            run.shares,
            run.upstream_shares,
            run.p50,
            run.p90,
            run.p99
        );
    }
    assert!(
        p2c.slow_share < 0.20,
        "under p2c the 10x slower backend got {:.1}% of the requests (should be < 20%)",
        p2c.slow_share * 100.0
    );
    assert!(
        (round_robin.slow_share - 1.0 / 3.0).abs() < 0.05,
        "round robin should give each of three backends a third; the slow one got {:.1}%",
        round_robin.slow_share * 100.0
    );
    assert!(
        round_robin.slow_share > p2c.slow_share,
        "round robin gave the slow backend {:.1}%, p2c {:.1}%: p2c should give it less",
        round_robin.slow_share * 100.0,
        p2c.slow_share * 100.0
    );
}
