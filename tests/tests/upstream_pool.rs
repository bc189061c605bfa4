//! Who is in an upstream pool, as an operator sees it: a backend killed under load costs no
//! request and comes back when restarted; a reload that replaces a backend drains its
//! requests; a pool whose health checks all fail still serves (fail open); `proxy check`
//! lists the pool. How the pool spreads load is `upstream_balance.rs`.
//!
//! Each test prints its figures (times, counts) on stderr; run with
//! `-- --nocapture` to see them.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::pool::{
    A, B, C, Exchange, HELLO, Traffic, assert_in_flight_settles, attempts, backend_series,
    failures, get_on_new_connection, healthy, live_requests, serve_pool, url,
};
use proxy_e2e::upstream::{SLOW_BODY, TestUpstream};
use proxy_e2e::{
    Metrics, Process, TestEnv, path_str, poll_until, proxy_bin, proxy_cmd_ok, run_with_timeout,
};

/// Active checks of the failover test: a restarted backend needs `HEALTHY_THRESHOLD` passed
/// checks, `CHECK_INTERVAL` apart, each within `CHECK_TIMEOUT`.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const HEALTHY_THRESHOLD: u32 = 2;
/// Scheduling on a loaded machine, scrapes and the first request the restarted backend gets.
const SCHEDULING_ALLOWANCE: Duration = Duration::from_millis(1500);

#[test]
fn killed_backend_costs_no_request_and_rejoins_when_restarted() {
    let Some(env) = TestEnv::new("pool-failover") else {
        return;
    };
    let mut backends: Vec<Process> = [A, B, C].iter().map(|addr| env.backend(addr)).collect();
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
    backends[1] = env.backend(B);
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
    backends[0] = env.backend(A);
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
    let _a = env.backend(A);
    let b = TestUpstream::start(&env.ns, B, Duration::from_secs(2));
    let _c = env.backend(C);
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
    let _backends: Vec<Process> = [A, B, C].iter().map(|addr| env.backend(addr)).collect();
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
