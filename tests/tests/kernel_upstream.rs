//! The kernel's view of the proxy's own connections to its backend, for real: the eBPF
//! program loaded by the proxy, real upstream connections in a private namespace, and
//! conditions injected in the kernel (a SYN-ACK lost by nftables, a port nothing listens on,
//! a backend that never answers the SYN) showing up in `proxy_upstream_tcp_*` as exactly
//! what happened, and nothing of other processes' connections to the same backend.
//!
//! Every test starts the proxy with `--ebpf required`: on this machine (root with BPF) a
//! proxy that cannot attach fails the test instead of silently serving without metrics.

use std::time::{Duration, Instant};

use http::StatusCode;
use proxy_e2e::client::{self, Req};
use proxy_e2e::kernel::{drop_syn_acks_from, log_number, nft, poll_metrics};
use proxy_e2e::upstream::{Blackhole, SLOW_BODY, TestUpstream};
use proxy_e2e::{Metrics, MetricsExt as _, Proxy, TestEnv, require_tool};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// Answers each request and closes the connection (`Connection: close`), so every proxied
/// request opens one new upstream connection.
const BACKEND: &str = "127.0.0.1:8081";

fn serve(env: &TestEnv, backend: &str, extra: &[&str]) -> Proxy {
    let upstream = format!("http://{backend}");
    let mut args = vec!["--ebpf", "required", "--upstream", &upstream];
    args.extend_from_slice(extra);
    let proxy = env.serve(&args);
    assert_eq!(
        env.metrics()
            .value("proxy_ebpf_attached", &[("program", "sock_ops")]),
        1.0,
        "eBPF should be attached"
    );
    proxy
}

/// `n` requests through the proxy, each answered by the backend with `status`.
fn requests(env: &TestEnv, proxy: &Proxy, n: u32, status: StatusCode) -> Vec<client::Resp> {
    let tls = proxy.tls();
    (0..n)
        .map(|i| {
            let resp = env
                .run(|| client::https(&tls, Req::get("/")))
                .unwrap_or_else(|e| panic!("request {i} through the proxy: {e}"));
            assert_eq!(resp.status, status, "request {i}: {resp:?}");
            resp
        })
        .collect()
}

/// The HTTPS access-log lines the proxy has written so far.
fn access_lines(proxy: &Proxy) -> Vec<String> {
    proxy
        .process
        .stderr()
        .lines()
        .filter(|l| l.contains("proxy::access") && l.contains("listener=\"https\""))
        .map(str::to_owned)
        .collect()
}

fn backend_value(metrics: &Metrics, name: &str, backend: &str) -> f64 {
    metrics.expect(name, &[("backend", backend)])
}

#[test]
fn the_kernel_counts_exactly_the_proxys_own_upstream_connections() {
    let Some(env) = TestEnv::new("kernel-upstream-exact") else {
        return;
    };
    let backend = TestUpstream::start(&env.ns, BACKEND, Duration::ZERO);
    // Health checks open connections of their own, many during the test: not the proxy's
    // traffic, so not counted.
    let proxy = serve(&env, BACKEND, &["--health-check-interval", "50ms"]);

    // Every kernel series of the configured backend exists at 0 before any connection.
    let before = env.metrics();
    for name in [
        "proxy_upstream_tcp_connections_total",
        "proxy_upstream_tcp_connect_failures_total",
        "proxy_upstream_tcp_retransmits_total",
        "proxy_upstream_tcp_connect_duration_seconds_count",
        "proxy_upstream_tcp_rtt_seconds_count",
    ] {
        assert_eq!(
            backend_value(&before, name, BACKEND),
            0.0,
            "{name} before any upstream connection"
        );
    }

    // Another process's connections to the same backend port, before and between the
    // proxy's: the kernel sees them all, the proxy's metrics must not.
    const DIRECT: usize = 5;
    let direct = || {
        env.run(|| async {
            for _ in 0..DIRECT {
                let mut stream = TcpStream::connect(BACKEND)
                    .await
                    .unwrap_or_else(|e| panic!("connecting straight to the backend: {e}"));
                let _ = stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: direct\r\n\r\n")
                    .await;
                client::read_response(&mut stream)
                    .await
                    .unwrap_or_else(|e| panic!("the backend's answer to a direct request: {e}"));
            }
        });
    };
    direct();
    const N: u32 = 6;
    let responses = requests(&env, &proxy, N / 2, StatusCode::OK);
    direct();
    let mut more = requests(&env, &proxy, N - N / 2, StatusCode::OK);
    let mut responses = responses;
    responses.append(&mut more);
    for resp in &responses {
        assert_eq!(resp.text(), SLOW_BODY);
    }

    // Connections are counted at ESTABLISHED, before the proxy's connect() returns; RTT when
    // they close (the backend closes each after its answer).
    let n = f64::from(N);
    poll_metrics(&env, |m| {
        (m.value(
            "proxy_upstream_tcp_rtt_seconds_count",
            &[("backend", BACKEND)],
        ) >= n)
            .then_some(())
    });
    let checks = proxy_e2e::poll_until(Duration::from_secs(10), || {
        let checks = backend
            .heads()
            .iter()
            .filter(|head| head.contains("proxy-health-check"))
            .count();
        (checks >= 5).then_some(checks)
    })
    .unwrap_or(0);
    // Read again after the checks: none of them may have been counted.
    let after = env.metrics();
    let kernel = backend_value(&after, "proxy_upstream_tcp_connections_total", BACKEND);
    let own = backend_value(&after, "proxy_upstream_connections_total", BACKEND);
    eprintln!(
        "{N} proxied requests, {} direct connections, {checks} health checks: kernel counted {kernel}, proxy {own}",
        2 * DIRECT
    );
    assert!(
        checks >= 5,
        "only {checks} health checks ran during the test"
    );
    assert_eq!(own, n, "the proxy's own count of upstream connections");
    assert_eq!(
        kernel, own,
        "the kernel's count must equal the proxy's: direct connections to the backend are not ours"
    );
    for (name, expected) in [
        ("proxy_upstream_tcp_connect_duration_seconds_count", n),
        ("proxy_upstream_tcp_rtt_seconds_count", n),
        ("proxy_upstream_tcp_connect_failures_total", 0.0),
        ("proxy_upstream_tcp_retransmits_total", 0.0),
    ] {
        assert_eq!(backend_value(&after, name, BACKEND), expected, "{name}");
    }
    for direction in ["sent", "received"] {
        assert_eq!(
            after.expect(
                "proxy_upstream_tcp_resets_total",
                &[("backend", BACKEND), ("direction", direction)]
            ),
            0.0,
            "resets {direction}: the backend closes cleanly"
        );
    }
    // Loopback connects take microseconds.
    let connect_sum = backend_value(
        &after,
        "proxy_upstream_tcp_connect_duration_seconds_sum",
        BACKEND,
    );
    assert!(
        connect_sum > 0.0 && connect_sum < 0.05 * n,
        "connect time sum {connect_sum}s for {N} loopback connections"
    );
    // The listener side counted the client connections, not the upstream ones.
    assert_eq!(
        after.value("proxy_tcp_connections_total", &[("listener", "https")]),
        n
    );

    // Each request came on a new upstream connection: each access line has its connect time.
    let lines = access_lines(&proxy);
    assert_eq!(
        lines.len(),
        N as usize,
        "access lines:\n{}",
        lines.join("\n")
    );
    for line in &lines {
        let connect_ms = log_number(line, "upstream_connect_ms")
            .unwrap_or_else(|| panic!("no upstream_connect_ms in: {line}"));
        assert!(
            connect_ms < 50.0,
            "loopback connect of {connect_ms} ms: {line}"
        );
    }
}

#[test]
fn a_lost_syn_ack_from_the_backend_shows_as_a_second_of_connect_time() {
    let Some(env) = TestEnv::new("kernel-upstream-syn-ack") else {
        return;
    };
    if !require_tool("kernel-upstream-syn-ack", "nft", "apt-get install nftables") {
        return;
    }
    let _backend = TestUpstream::start(&env.ns, BACKEND, Duration::ZERO);
    let proxy = serve(&env, BACKEND, &["--upstream-connect-timeout", "5s"]);

    // The backend's first SYN-ACK is lost; the proxy's kernel retransmits the SYN after its
    // initial 1 s timeout (the backend resends its SYN-ACK about then too).
    drop_syn_acks_from(&env.ns, 8081);
    let started = Instant::now();
    let client = env.ns.spawn({
        let tls = proxy.tls();
        move || async move { client::https(&tls, Req::get("/")).await }
    });
    std::thread::sleep(Duration::from_millis(300));
    nft(&env.ns, &["delete", "table", "inet", "e2e"]);
    let resp = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("request after a lost SYN-ACK: {e}"));
    let took = started.elapsed();
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the SYN-ACK was not lost: the request took {took:?}"
    );

    let metrics = poll_metrics(&env, |m| {
        (m.value(
            "proxy_upstream_tcp_rtt_seconds_count",
            &[("backend", BACKEND)],
        ) >= 1.0)
            .then_some(())
    });
    assert_eq!(
        backend_value(
            &metrics,
            "proxy_upstream_tcp_connect_duration_seconds_count",
            BACKEND
        ),
        1.0
    );
    let connect = backend_value(
        &metrics,
        "proxy_upstream_tcp_connect_duration_seconds_sum",
        BACKEND,
    );
    let fast = metrics.expect(
        "proxy_upstream_tcp_connect_duration_seconds_bucket",
        &[("backend", BACKEND), ("le", "0.524288")],
    );
    let retransmits = backend_value(&metrics, "proxy_upstream_tcp_retransmits_total", BACKEND);
    let lines = access_lines(&proxy);
    let line = lines.first().expect("an access-log line");
    let logged_ms = log_number(line, "upstream_connect_ms")
        .unwrap_or_else(|| panic!("no upstream_connect_ms in: {line}"));
    eprintln!(
        "request {took:?}; kernel connect time: histogram {connect:.6} s, upstream_connect_time \
         {logged_ms} ms; retransmits {retransmits}"
    );
    assert!(
        (0.9..3.0).contains(&connect),
        "connect time {connect}s should show the ~1 s SYN retransmission"
    );
    assert_eq!(
        fast, 0.0,
        "the slow connect must not land in a sub-second bucket"
    );
    assert!(
        (logged_ms / 1000.0 - connect).abs() < 0.001,
        "upstream_connect_time ({logged_ms} ms) and the histogram ({connect} s) disagree"
    );
    assert!(
        retransmits >= 1.0,
        "the retransmitted SYN should be counted, got {retransmits}"
    );
    assert_eq!(
        backend_value(
            &metrics,
            "proxy_upstream_tcp_connect_failures_total",
            BACKEND
        ),
        0.0
    );
}

#[test]
fn a_refused_connect_is_a_connect_failure() {
    let Some(env) = TestEnv::new("kernel-upstream-refused") else {
        return;
    };
    // Nothing listens there: each SYN is answered with a reset.
    const DOWN: &str = "127.0.0.1:8089";
    let proxy = serve(&env, DOWN, &[]);
    const N: u32 = 3;
    requests(&env, &proxy, N, StatusCode::BAD_GATEWAY);
    let metrics = env.metrics();
    let n = f64::from(N);
    assert_eq!(
        metrics.expect("proxy_upstream_errors_total", &[("kind", "connect")]),
        n
    );
    assert_eq!(
        backend_value(&metrics, "proxy_upstream_tcp_connect_failures_total", DOWN),
        n,
        "every refused connect is a connect failure"
    );
    assert_eq!(
        backend_value(&metrics, "proxy_upstream_tcp_connections_total", DOWN),
        0.0
    );
    assert_eq!(
        metrics.value("proxy_upstream_connections_total", &[("backend", DOWN)]),
        0.0
    );
    // A refused connect is not a reset of a connection, and has no RTT.
    assert_eq!(
        metrics.expect(
            "proxy_upstream_tcp_resets_total",
            &[("backend", DOWN), ("direction", "received")]
        ),
        0.0
    );
    assert_eq!(
        backend_value(&metrics, "proxy_upstream_tcp_rtt_seconds_count", DOWN),
        0.0
    );
}

#[test]
fn a_connect_the_backend_never_answers_is_a_connect_failure_at_the_deadline() {
    let Some(env) = TestEnv::new("kernel-upstream-blackhole") else {
        return;
    };
    // A full accept queue: the backend's kernel drops the proxy's SYNs.
    const SILENT: &str = "127.0.0.1:8090";
    let _blackhole = Blackhole::start(&env.ns, SILENT);
    let proxy = serve(&env, SILENT, &["--upstream-connect-timeout", "1500ms"]);
    let started = Instant::now();
    requests(&env, &proxy, 1, StatusCode::BAD_GATEWAY);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "the 502 came after {took:?}, before the 1.5 s connect deadline"
    );
    let metrics = env.metrics();
    let retransmits = backend_value(&metrics, "proxy_upstream_tcp_retransmits_total", SILENT);
    eprintln!("502 after {took:?}; SYNs retransmitted: {retransmits}");
    assert_eq!(
        backend_value(
            &metrics,
            "proxy_upstream_tcp_connect_failures_total",
            SILENT
        ),
        1.0,
        "the connect given up at the deadline is a connect failure"
    );
    assert_eq!(
        backend_value(&metrics, "proxy_upstream_tcp_connections_total", SILENT),
        0.0
    );
    assert!(
        retransmits >= 1.0,
        "the SYN retransmitted after 1 s should be counted, got {retransmits}"
    );
    let log = proxy.process.stderr();
    assert!(
        log.contains("no connection within 1.5s"),
        "the warning should say the connect timed out:\n{log}"
    );
}
