//! Upstream pools as an operator sees them: a backend killed under load costs no request and
//! comes back when restarted; a failing pool gets at most the retry budget's share of extra
//! requests; power of two choices sends less to a slow backend than round robin does; a
//! reload that replaces a backend drains its requests; a pool whose health checks all fail
//! still serves (fail open); `proxy check` lists the pool.
//!
//! Each test prints its figures (shares, latencies, times, ratios) on stderr; run with
//! `-- --nocapture` to see them.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::pool::{
    Exchange, Traffic, attempts, backend_series, get_on_new_connection, healthy, in_flight,
    keep_alive_load, live_requests, percentile, shipped_backend,
};
use proxy_e2e::upstream::{Behaviour, SLOW_BODY, TestUpstream};
use proxy_e2e::{
    Metrics, Process, Proxy, TestEnv, path_str, poll_until, proxy_bin, proxy_cmd_ok,
    run_with_timeout,
};

const A: &str = "127.0.0.1:8081";
const B: &str = "127.0.0.1:8082";
const C: &str = "127.0.0.1:8083";
/// What the shipped backend answers to `GET /`.
const HELLO: &str = "Hello SRE!";

/// Active checks of the failover test: a restarted backend needs `HEALTHY_THRESHOLD` passed
/// checks, `CHECK_INTERVAL` apart, each within `CHECK_TIMEOUT`.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const HEALTHY_THRESHOLD: u32 = 2;
/// Scheduling on a loaded machine, scrapes and the first request the restarted backend gets.
const SCHEDULING_ALLOWANCE: Duration = Duration::from_millis(1500);

fn url(addr: &str) -> String {
    format!("http://{addr}")
}

/// Starts the proxy with the pool `backends` (one `--upstream` each) and `extra` flags.
fn serve_pool(env: &TestEnv, backends: &[&str], extra: &[&str]) -> Proxy {
    let urls: Vec<String> = backends.iter().map(|b| url(b)).collect();
    let mut args: Vec<&str> = urls
        .iter()
        .flat_map(|u| ["--upstream", u.as_str()])
        .collect();
    args.extend_from_slice(extra);
    env.serve(&args)
}

fn backend_log(addr: &str) -> String {
    format!("backend-{}.stderr", addr.replace([':', '.'], "-"))
}

fn sum_attempts(m: &Metrics, backends: &[&str]) -> f64 {
    backends.iter().map(|b| attempts(m, b)).sum()
}

/// Waits for `proxy_upstream_requests_in_flight` to come back to 0 once the clients have all
/// their answers; panics with the scrape if it does not (a leak would also skew p2c).
fn assert_in_flight_settles(env: &TestEnv, context: &str) {
    let settled = poll_until(Duration::from_secs(10), || {
        (in_flight(&env.metrics()) == 0.0).then_some(())
    });
    assert!(
        settled.is_some(),
        "{context}: every response has ended, yet proxy_upstream_requests_in_flight is not 0:\n{}",
        env.metrics().text
    );
}

/// The exchanges that did not end as `200` with one of `bodies`, described (first ten).
fn failures(exchanges: &[Exchange], bodies: &[&str]) -> (usize, Vec<String>) {
    let failed: Vec<&Exchange> = exchanges.iter().filter(|e| !e.ok_with(bodies)).collect();
    let shown = failed.iter().take(10).map(|e| e.describe()).collect();
    (failed.len(), shown)
}

#[test]
fn killed_backend_costs_no_request_and_rejoins_when_restarted() {
    let Some(env) = TestEnv::new("pool-failover") else {
        return;
    };
    let mut backends: Vec<Process> = [A, B, C]
        .iter()
        .map(|addr| shipped_backend(&env.ns, env.dir.path(), addr, &backend_log(addr)))
        .collect();
    let (interval, timeout, threshold) = (
        format!("{}ms", CHECK_INTERVAL.as_millis()),
        format!("{}ms", CHECK_TIMEOUT.as_millis()),
        HEALTHY_THRESHOLD.to_string(),
    );
    let proxy = serve_pool(
        &env,
        &[A, B, C],
        &[
            "--health-check-interval",
            &interval,
            "--health-check-timeout",
            &timeout,
            "--healthy-threshold",
            &threshold,
        ],
    );
    let tls = proxy.tls();
    let traffic = Traffic::start(
        &env.ns,
        tls.clone(),
        4,
        Duration::from_millis(10),
        Duration::from_secs(180),
    );
    assert!(
        traffic.wait_for_more(60, Duration::from_secs(60)),
        "the load did not get going: {} requests in 60 s",
        traffic.completed()
    );
    let before = env.metrics();
    for addr in [A, B, C] {
        assert!(
            attempts(&before, addr) > 0.0,
            "{addr} got no request before the kill:\n{}",
            before.text
        );
    }

    // One backend dies under load.
    let requests_at_kill = traffic.completed();
    backends[1].signal(Signal::SIGKILL);
    backends[1]
        .wait_exit(Duration::from_secs(10))
        .expect("the backend did not exit on SIGKILL");
    let killed = Instant::now();
    let left = poll_until(Duration::from_secs(20), || {
        (healthy(&env.metrics(), B) == Some(0.0)).then(|| killed.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "20 s after SIGKILL, proxy_upstream_healthy{{backend=\"{B}\"}} is not 0:\n{}",
            env.metrics().text
        )
    });
    eprintln!("failover: {B} killed; out of the pool after {left:?}");

    // Out of the pool, it is sent nothing.
    assert!(
        traffic.wait_for_more(20, Duration::from_secs(60)),
        "the load stalled after the kill"
    );
    let while_out = attempts(&env.metrics(), B);
    assert!(
        traffic.wait_for_more(60, Duration::from_secs(60)),
        "the load stalled after the kill"
    );
    let still_out = attempts(&env.metrics(), B);
    assert_eq!(
        still_out,
        while_out,
        "{B} is out of the pool (healthy 0) yet got {} more attempts over 60 requests",
        still_out - while_out
    );

    // Restarted, it is back within the health checks' time.
    backends[1] = shipped_backend(
        &env.ns,
        env.dir.path(),
        B,
        &format!("restarted-{}", backend_log(B)),
    );
    let restarted = Instant::now();
    let rejoined = poll_until(Duration::from_secs(20), || {
        (attempts(&env.metrics(), B) > still_out).then(|| restarted.elapsed())
    });
    let bound = CHECK_INTERVAL * HEALTHY_THRESHOLD + CHECK_TIMEOUT + SCHEDULING_ALLOWANCE;
    eprintln!(
        "failover: {B} restarted; receiving requests again after {rejoined:?} \
         (bound: {HEALTHY_THRESHOLD} x {CHECK_INTERVAL:?} + {CHECK_TIMEOUT:?} + {SCHEDULING_ALLOWANCE:?} = {bound:?})"
    );
    let rejoined = rejoined.unwrap_or_else(|| {
        panic!(
            "{B} was restarted but got no request within 20 s:\n{}",
            env.metrics().text
        )
    });
    assert!(
        rejoined <= bound,
        "the restarted {B} got traffic only after {rejoined:?}; healthy_threshold x interval + \
         timeout + allowance is {bound:?}"
    );
    assert_eq!(
        healthy(&env.metrics(), B),
        Some(1.0),
        "the restarted backend gets traffic but is not marked healthy"
    );
    assert!(
        traffic.wait_for_more(40, Duration::from_secs(60)),
        "the load stalled after the restart"
    );
    let exchanges = traffic.finish();
    assert_in_flight_settles(&env, "after the failover load");
    let after = env.metrics();
    let (failed, shown) = failures(&exchanges, &[HELLO]);
    let after_kill = exchanges.len() as u64 - requests_at_kill;
    let retries = after.value("proxy_upstream_retries_total", &[("backend", B)])
        - before.value("proxy_upstream_retries_total", &[("backend", B)]);
    let ejections = after.value("proxy_upstream_ejections_total", &[("backend", B)])
        - before.value("proxy_upstream_ejections_total", &[("backend", B)]);
    let log = proxy.process.stderr();
    let check_said_out = log
        .lines()
        .any(|l| l.contains("backend failed its health check") && l.contains(B));
    let retried_lines = log
        .lines()
        .filter(|l| l.contains("proxy::access") && l.contains("retries=1"))
        .count();
    eprintln!(
        "failover: {} requests ({after_kill} from the kill on), {failed} failed; retries from \
         {B}: {retries}; ejections of {B}: {ejections}; health check reported it out: \
         {check_said_out}; access lines with retries=1: {retried_lines}",
        exchanges.len()
    );
    assert_eq!(
        failed, 0,
        "requests failed while a backend died and came back: {shown:#?}"
    );
    assert!(
        retries >= 1.0,
        "no request was retried from the killed {B} (proxy_upstream_retries_total):\n{}",
        after.text
    );
    assert!(
        ejections >= 1.0 || check_said_out,
        "neither proxy_upstream_ejections_total nor the health check log says {B} left:\n{log}"
    );
    assert!(
        retried_lines >= 1,
        "no access line shows a retried request (retries=1)"
    );

    // Every backend stopped: 502 with a reason, and the proxy keeps trying them all.
    for backend in &backends {
        backend.signal(Signal::SIGKILL);
    }
    for backend in &mut backends {
        backend
            .wait_exit(Duration::from_secs(10))
            .expect("a backend did not exit on SIGKILL");
    }
    let base = env.metrics();
    let stopped = Instant::now();
    let mut answers = Vec::new();
    let mut failing_open_after = None;
    while stopped.elapsed() < Duration::from_secs(30) {
        answers.push(env.run(|| get_on_new_connection(&tls)));
        if env.metrics().value("proxy_upstream_fail_open", &[]) == 1.0 {
            failing_open_after = Some(stopped.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let failing_open_after = failing_open_after.unwrap_or_else(|| {
        panic!(
            "30 s after every backend stopped, proxy_upstream_fail_open is not 1:\n{}",
            env.metrics().text
        )
    });
    let after_fail_open = 10;
    for _ in 0..after_fail_open {
        answers.push(env.run(|| get_on_new_connection(&tls)));
    }
    let sent = answers.len() as f64;
    let counted_502 = |m: &Metrics| {
        m.value("proxy_http_requests_total", &[("code", "502")])
            - base.value("proxy_http_requests_total", &[("code", "502")])
    };
    let end = poll_until(Duration::from_secs(10), || {
        let m = env.metrics();
        (counted_502(&m) >= sent).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "the 502s were not all counted within 10 s:\n{}",
            env.metrics().text
        )
    });
    let connect_errors = end.value("proxy_upstream_errors_total", &[("kind", "connect")])
        - base.value("proxy_upstream_errors_total", &[("kind", "connect")]);
    let mut reasons: Vec<String> = answers.iter().map(Exchange::describe).collect();
    reasons.sort();
    reasons.dedup();
    eprintln!(
        "all stopped: {} requests, failing open after {failing_open_after:?}; answers {reasons:?}; \
         502s counted {}; connect errors counted {connect_errors}",
        answers.len(),
        counted_502(&end)
    );
    for answer in &answers {
        assert_eq!(
            answer.status,
            Some(502),
            "with every backend stopped: {}",
            answer.describe()
        );
        assert!(
            answer
                .content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("text/plain"))
                && answer.body.contains("upstream"),
            "a 502 should say why in plain text: {:?} {:?}",
            answer.content_type,
            answer.body
        );
    }
    assert_eq!(
        counted_502(&end),
        sent,
        "proxy_http_requests_total{{code=\"502\"}} should count each of the {sent} 502s"
    );
    assert!(
        connect_errors >= f64::from(after_fail_open),
        "{after_fail_open} requests failed to connect after the pool failed open, but \
         proxy_upstream_errors_total{{kind=\"connect\"}} grew by {connect_errors}"
    );
    assert_eq!(
        end.value("proxy_upstream_fail_open", &[]),
        1.0,
        "proxy_upstream_fail_open with every backend down"
    );
    assert!(
        proxy.process.stderr().contains("failing open"),
        "the log does not say the proxy is failing open"
    );

    // One backend back: the pool is no longer failing open, and the gauge (what an alert
    // watches) says so as soon as the backend is healthy, whether or not requests come.
    backends[0] = shipped_backend(
        &env.ns,
        env.dir.path(),
        A,
        &format!("restarted-{}", backend_log(A)),
    );
    let restarted = Instant::now();
    poll_until(Duration::from_secs(20), || {
        (healthy(&env.metrics(), A) == Some(1.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("the restarted {A} is not healthy after 20 s"));
    let healthy_after = restarted.elapsed();
    let cleared = poll_until(Duration::from_secs(5), || {
        (env.metrics().value("proxy_upstream_fail_open", &[]) == 0.0).then(|| restarted.elapsed())
    });
    eprintln!(
        "recovery: {A} restarted, healthy after {healthy_after:?}; with no request since, \
         proxy_upstream_fail_open cleared after {cleared:?}"
    );
    assert!(
        cleared.is_some(),
        "{A} has been healthy for 5 s, yet proxy_upstream_fail_open is still 1 (no request \
         came since): an alert on it would not clear on an idle proxy"
    );
    let answer = env.run(|| get_on_new_connection(&tls));
    assert!(
        answer.ok_with(&[HELLO]),
        "with {A} back: {}",
        answer.describe()
    );
}

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

/// Writes a config file whose pool is `backends`. B answers after 2 s, so its health check
/// gets a longer deadline than that.
fn write_pool_config(path: &Path, backends: &[&str]) {
    let list: Vec<String> = backends.iter().map(|b| format!("{:?}", url(b))).collect();
    let text = format!(
        "upstream = [{}]\nhealth_check_interval = \"1s\"\nhealth_check_timeout = \"5s\"\n",
        list.join(", ")
    );
    proxy_e2e::write_atomic(path, text.as_bytes());
}

#[test]
fn reload_replaces_a_backend_and_drains_its_requests() {
    let Some(env) = TestEnv::new("pool-reload") else {
        return;
    };
    let _a = shipped_backend(&env.ns, env.dir.path(), A, &backend_log(A));
    let b = TestUpstream::start(&env.ns, B, Duration::from_secs(2));
    let _c = shipped_backend(&env.ns, env.dir.path(), C, &backend_log(C));
    let config = env.path("proxy.toml");
    write_pool_config(&config, &[A, B]);
    let proxy = env.serve(&["--config", path_str(&config)]);
    let tls = proxy.tls();
    let traffic = Traffic::start(
        &env.ns,
        tls,
        4,
        Duration::from_millis(20),
        Duration::from_secs(120),
    );
    assert!(
        traffic.wait_for_more(20, Duration::from_secs(60)),
        "the load did not get going"
    );

    // Reload just after a request reached B, so that it is in flight for most of its 2 s.
    let seen_by_b = live_requests(&b.heads());
    poll_until(Duration::from_secs(30), || {
        (live_requests(&b.heads()) > seen_by_b).then_some(())
    })
    .unwrap_or_else(|| panic!("B ({B}) received no new request in 30 s of load"));
    let before = env.metrics();
    let b_in_flight = before.value("proxy_upstream_requests_in_flight", &[("backend", B)]);
    let mut b_families: Vec<String> = before
        .samples
        .iter()
        .filter(|s| s.label("backend") == Some(B))
        .map(|s| s.name.clone())
        .collect();
    b_families.dedup();
    write_pool_config(&config, &[A, C]);
    proxy.signal(Signal::SIGHUP);
    let hup = Instant::now();
    let gone = poll_until(Duration::from_secs(15), || {
        backend_series(&env.metrics(), B)
            .is_empty()
            .then(Instant::now)
    })
    .unwrap_or_else(|| {
        panic!(
            "15 s after SIGHUP, /metrics still has series of the removed {B}:\n{:#?}",
            backend_series(&env.metrics(), B)
        )
    });
    let c_after = poll_until(Duration::from_secs(15), || {
        (attempts(&env.metrics(), C) > 0.0).then(|| hup.elapsed())
    })
    .unwrap_or_else(|| panic!("15 s after the reload, the new {C} has received nothing"));
    let at_gone = env.metrics();
    // B's requests in flight take up to 2 s more; the load goes on past them.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        traffic.wait_for_more(20, Duration::from_secs(60)),
        "the load stalled after the reload"
    );
    let exchanges = traffic.finish();
    assert_in_flight_settles(&env, "after the reload");
    let end = env.metrics();

    let (failed, shown) = failures(&exchanges, &[HELLO, SLOW_BODY]);
    let from_b = |e: &&Exchange| e.body == SLOW_BODY;
    let drained = exchanges
        .iter()
        .filter(from_b)
        .filter(|e| e.started < gone && e.ended > gone)
        .count();
    let late_to_b: Vec<String> = exchanges
        .iter()
        .filter(from_b)
        .filter(|e| e.started > gone)
        .map(|e| format!("started {:?} after B left", e.started - gone))
        .collect();
    let c_requests = attempts(&end, C);
    let a_after = attempts(&end, A) - attempts(&at_gone, A);
    eprintln!(
        "reload: {} requests, {failed} failed; B had {b_in_flight} in flight at SIGHUP; its \
         series left /metrics {:?} after SIGHUP; {drained} of B's requests finished after that \
         (200); C's first request within {c_after:?}; since then A got {a_after}, C \
         {c_requests} in total; B's series before the reload: {b_families:?}",
        exchanges.len(),
        gone - hup
    );
    assert_eq!(
        failed, 0,
        "requests failed during the reload that replaced a backend: {shown:#?}"
    );
    assert!(
        drained >= 1,
        "no request in flight on B finished after B left the pool (in flight at SIGHUP: \
         {b_in_flight}); its requests were not drained, or the reload was too slow to tell"
    );
    assert!(
        late_to_b.is_empty(),
        "requests sent after B left the pool reached B: {late_to_b:?}"
    );
    assert!(
        c_requests > 0.0 && a_after > 0.0,
        "A: +{a_after}, C: {c_requests}"
    );
    let lingering = backend_series(&end, B);
    assert!(
        lingering.is_empty(),
        "B's series came back after its last requests finished: {lingering:#?}"
    );
    let log = proxy.process.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("backend leaves the pool") && l.contains(B)),
        "the log does not say B left the pool"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("backend joins the pool") && l.contains(C)),
        "the log does not say C joined the pool"
    );
}

#[test]
fn failing_health_checks_everywhere_fail_open() {
    let Some(env) = TestEnv::new("pool-failopen") else {
        return;
    };
    let _backends: Vec<Process> = [A, B, C]
        .iter()
        .map(|addr| shipped_backend(&env.ns, env.dir.path(), addr, &backend_log(addr)))
        .collect();
    let proxy = serve_pool(
        &env,
        &[A, B, C],
        &[
            "--health-check-path",
            "/nonexistent",
            "--health-check-interval",
            "500ms",
            "--unhealthy-threshold",
            "3",
        ],
    );
    let started = Instant::now();
    let all_out = poll_until(Duration::from_secs(20), || {
        let m = env.metrics();
        [A, B, C]
            .iter()
            .all(|b| healthy(&m, b) == Some(0.0))
            .then(|| started.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "20 s of health checks answered 404, yet not every backend is unhealthy:\n{}",
            env.metrics().text
        )
    });
    let tls = proxy.tls();
    let exchanges: Vec<Exchange> = (0..30)
        .map(|_| env.run(|| get_on_new_connection(&tls)))
        .collect();
    let m = env.metrics();
    let (failed, shown) = failures(&exchanges, &[HELLO]);
    let per_backend: Vec<f64> = [A, B, C].iter().map(|b| attempts(&m, b)).collect();
    let log = proxy.process.stderr();
    let reported_out = [A, B, C]
        .iter()
        .filter(|b| {
            log.lines().any(|l| {
                l.contains("backend failed its health check") && l.contains(*b) && l.contains("404")
            })
        })
        .count();
    eprintln!(
        "fail open: every backend unhealthy {all_out:?} after start (3 checks 500 ms apart); \
         {} requests, {failed} failed; attempts A/B/C {per_backend:?}; fail_open gauge {}; \
         {reported_out} backends logged out for answering 404",
        exchanges.len(),
        m.value("proxy_upstream_fail_open", &[])
    );
    assert_eq!(
        failed, 0,
        "with every backend failing its health check, requests should still be served: \
         {shown:#?}"
    );
    assert_eq!(
        m.value("proxy_upstream_fail_open", &[]),
        1.0,
        "proxy_upstream_fail_open:\n{}",
        m.text
    );
    assert!(
        per_backend.iter().all(|&n| n > 0.0),
        "failing open should use every backend: attempts {per_backend:?}"
    );
    assert!(
        log.contains("failing open"),
        "the log does not say the proxy is failing open"
    );
    assert_eq!(
        reported_out, 3,
        "each backend should be logged out of the pool with the 404 its check got"
    );
}

#[test]
fn check_lists_every_backend_of_the_pool() {
    let Some(env) = TestEnv::new("pool-check") else {
        return;
    };
    let state = env.path("state");
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
    ]);
    for args in [
        vec![
            "--upstream".to_owned(),
            url(A),
            "--upstream".to_owned(),
            url(B),
            "--upstream".to_owned(),
            url(C),
        ],
        vec!["--upstream".to_owned(), [url(A), url(B), url(C)].join(",")],
    ] {
        let mut cmd = env.ns.command(proxy_bin());
        cmd.args([
            "check",
            "--state-dir",
            path_str(&state),
            "--name",
            "localhost",
        ])
        .args(&args);
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("proxy check {}:\n{stdout}", args.join(" "));
        assert!(
            out.status.success(),
            "proxy check {args:?} failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        for backend in [A, B, C] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.trim() == format!("upstream http://{backend}")),
                "proxy check {args:?} does not list {backend}:\n{stdout}"
            );
        }
    }
}
