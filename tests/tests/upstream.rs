//! Reverse-proxy mode: the shipped backend behind the proxy, an upstream that is down or too
//! slow, and a graceful SIGTERM that lets in-flight requests finish.

use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::{Signal, kill};
use proxy_e2e::client::{self, Req};
use proxy_e2e::upstream::{Behaviour, Blackhole, SLOW_BODY, SlowUpstream, TestUpstream, big_body};
use proxy_e2e::{ADMIN, Alpn, HTTPS, MetricsExt as _, TestEnv};

#[test]
fn shipped_backend_behind_the_proxy_over_h1_and_h2() {
    let Some(env) = TestEnv::new("backend") else {
        return;
    };
    let backend = env.backend("127.0.0.1:8080");
    assert!(
        backend.stderr().contains("backend ready"),
        "`proxy backend` did not log \"backend ready\":\n{}",
        backend.stderr()
    );
    let proxy = env.serve(&["--upstream", "http://127.0.0.1:8080"]);
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        let resp = env
            .run(|| client::https(&tls, Req::get("/")))
            .unwrap_or_else(|e| panic!("GET / through the proxy to the backend ({alpn:?}): {e}"));
        assert_eq!(resp.status, StatusCode::OK, "{alpn:?}: {resp:?}");
        assert_eq!(resp.text(), "Hello SRE!", "{alpn:?}: body from the backend");
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{alpn:?}: content type from the backend"
        );
        assert!(
            resp.header("strict-transport-security").is_some(),
            "{alpn:?}: proxied responses lack HSTS"
        );
    }
}

#[test]
fn upstream_down_is_502() {
    let Some(env) = TestEnv::new("updown") else {
        return;
    };
    let proxy = env.serve(&["--upstream", "http://127.0.0.1:8089"]);
    let tls = proxy.tls();
    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("GET / with the upstream down: {e}"));
    assert_eq!(
        resp.status,
        StatusCode::BAD_GATEWAY,
        "upstream down: {resp:?}"
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "a 502 should be text/plain: {resp:?}"
    );
    let m = env.metrics();
    let errors = m.expect("proxy_upstream_errors_total", &[("kind", "connect")]);
    assert!(errors >= 1.0, "upstream connect errors counted: {errors}");
}

#[test]
fn upstream_slower_than_the_timeout_is_504() {
    let Some(env) = TestEnv::new("upslow") else {
        return;
    };
    let _slow = SlowUpstream::start(&env.ns, "127.0.0.1:8081", Duration::from_secs(4));
    let proxy = env.serve(&[
        "--upstream",
        "http://127.0.0.1:8081",
        "--upstream-timeout",
        "1s",
    ]);
    let tls = proxy.tls();
    let started = Instant::now();
    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("GET / with a slow upstream: {e}"));
    let took = started.elapsed();
    assert_eq!(
        resp.status,
        StatusCode::GATEWAY_TIMEOUT,
        "upstream slower than --upstream-timeout 1s: {resp:?}"
    );
    assert!(
        took < Duration::from_millis(3500),
        "the 504 took {took:?}; --upstream-timeout is 1s"
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "a 504 should be text/plain: {resp:?}"
    );
    let m = env.metrics();
    m.expect("proxy_upstream_errors_total", &[("kind", "timeout")]);
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let Some(env) = TestEnv::new("drain") else {
        return;
    };
    let _slow = SlowUpstream::start(&env.ns, "127.0.0.1:8081", Duration::from_secs(2));
    let mut proxy = env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    let tls = proxy.tls();
    let pid = proxy.process.pid();

    let (in_flight, after_term, readyz) = env.run(|| async move {
        let (t1, t2) = (tls.clone().alpn(Alpn::H1), tls.clone().alpn(Alpn::H2));
        let h1 = tokio::spawn(async move { client::https(&t1, Req::get("/")).await });
        let h2 = tokio::spawn(async move { client::https(&t2, Req::get("/")).await });
        tokio::time::sleep(Duration::from_millis(600)).await;
        kill(pid, Signal::SIGTERM).expect("sending SIGTERM to the proxy");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let readyz =
            client::raw_http(ADMIN, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        let after_term =
            tokio::time::timeout(Duration::from_secs(3), client::tls_connect(HTTPS, &tls)).await;
        let h1 = h1.await.expect("h1 request task");
        let h2 = h2.await.expect("h2 request task");
        ([h1, h2], after_term.map(|r| r.map(|c| c.info)), readyz)
    });
    match readyz {
        Ok(r) => assert_eq!(
            r.status, 503,
            "/readyz while draining should be 503 so load balancers stop sending: {}",
            r.head
        ),
        Err(e) => panic!("/readyz while draining did not answer (should be 503): {e}"),
    }
    for (resp, proto) in in_flight.into_iter().zip(["HTTP/1.1", "HTTP/2"]) {
        let resp =
            resp.unwrap_or_else(|e| panic!("{proto} request in flight at SIGTERM was cut: {e}"));
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "{proto} in-flight request: {resp:?}"
        );
        assert_eq!(resp.text(), SLOW_BODY, "{proto} in-flight request body");
    }
    match after_term {
        Ok(Err(refused)) => eprintln!("new connection after SIGTERM: {refused}"),
        Ok(Ok(info)) => {
            panic!("a new connection after SIGTERM was accepted and handshaked: {info:?}")
        }
        Err(_) => panic!("a new connection after SIGTERM hung instead of being refused"),
    }
    let status = proxy
        .process
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the proxy did not exit within 10 s of SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

#[test]
fn forwarding_headers_added_and_hop_by_hop_removed() {
    let Some(env) = TestEnv::new("fwd") else {
        return;
    };
    let upstream = SlowUpstream::start(&env.ns, "127.0.0.1:8081", Duration::ZERO);
    let proxy = env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        let mut req = Req::get("/fwd/path?a=1&b=%2F").header("x-keep", "yes");
        if alpn == Alpn::H1 {
            req = req
                .header("connection", "keep-alive, x-hop")
                .header("x-hop", "secret")
                .header("keep-alive", "timeout=5")
                .header("proxy-connection", "keep-alive");
        }
        let before = upstream.heads().len();
        let resp = env
            .run(|| client::https(&tls, req))
            .unwrap_or_else(|e| panic!("{alpn:?} GET through the proxy: {e}"));
        assert_eq!(resp.status, StatusCode::OK, "{alpn:?}: {resp:?}");
        assert_eq!(resp.text(), SLOW_BODY, "{alpn:?}: upstream body");
        let heads = upstream.heads();
        assert_eq!(
            heads.len(),
            before + 1,
            "{alpn:?}: the upstream saw {heads:#?}"
        );
        let head = &heads[before];
        let first = head.lines().next().unwrap_or_default();
        assert_eq!(
            first, "GET /fwd/path?a=1&b=%2F HTTP/1.1",
            "{alpn:?}: request line at the upstream"
        );
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let xff = header("x-forwarded-for").unwrap_or_default();
        assert!(
            xff.contains("127.0.0.1"),
            "{alpn:?}: X-Forwarded-For {xff:?} in:\n{head}"
        );
        assert_eq!(
            header("x-forwarded-proto").as_deref(),
            Some("https"),
            "{alpn:?}:\n{head}"
        );
        assert_eq!(
            header("x-forwarded-host").as_deref(),
            Some("localhost"),
            "{alpn:?}:\n{head}"
        );
        let fwd = header("forwarded").unwrap_or_default().to_lowercase();
        assert!(
            fwd.contains("proto=https") && fwd.contains("for=") && fwd.contains("host="),
            "{alpn:?}: Forwarded {fwd:?} should carry for=, host= and proto=https:\n{head}"
        );
        assert_eq!(
            header("x-keep").as_deref(),
            Some("yes"),
            "{alpn:?}: end-to-end header lost:\n{head}"
        );
        for hop in ["keep-alive", "x-hop", "proxy-connection"] {
            assert_eq!(
                header(hop),
                None,
                "{alpn:?}: hop-by-hop {hop} forwarded:\n{head}"
            );
        }
    }
}

#[test]
fn upstream_speaking_garbage_is_502() {
    let Some(env) = TestEnv::new("upgarbage") else {
        return;
    };
    let _bad = TestUpstream::with(&env.ns, "127.0.0.1:8081", Behaviour::Garbage);
    let proxy = env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    let tls = proxy.tls();
    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("GET / with an upstream answering garbage: {e}"));
    assert_eq!(
        resp.status,
        StatusCode::BAD_GATEWAY,
        "garbage upstream: {resp:?}"
    );
    let m = env.metrics();
    m.expect("proxy_upstream_errors_total", &[("kind", "protocol")]);
}

#[test]
fn drain_timeout_bounds_shutdown() {
    let Some(env) = TestEnv::new("draintimeout") else {
        return;
    };
    let _slow = SlowUpstream::start(&env.ns, "127.0.0.1:8081", Duration::from_secs(20));
    let mut proxy = env.serve(&[
        "--upstream",
        "http://127.0.0.1:8081",
        "--drain-timeout",
        "1s",
        "--upstream-timeout",
        "30s",
    ]);
    let tls = proxy.tls();
    let pid = proxy.process.pid();
    let signalled = env.run(|| async move {
        let stuck = tokio::spawn(async move { client::https(&tls, Req::get("/")).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill(pid, Signal::SIGTERM).expect("sending SIGTERM to the proxy");
        let at = Instant::now();
        let _ = tokio::time::timeout(Duration::from_secs(6), stuck).await;
        at
    });
    let status = proxy
        .process
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!("with --drain-timeout 1s the proxy was still running 5 s after SIGTERM")
        });
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "with --drain-timeout 1s shutdown took {took:?} (exit {status})"
    );
    // The request the drain deadline cut is the proxy's failure, not the client's.
    let log = proxy.process.stderr();
    assert!(
        log.lines().any(|l| l.contains("proxy::access")
            && l.contains("status=503")
            && l.contains("outcome=\"aborted\"")),
        "the request cut at the drain deadline should be logged as 503 aborted:\n{log}"
    );
}

#[test]
fn bodies_stream_both_ways_and_upstream_statuses_pass_through() {
    let Some(echo_env) = TestEnv::new("upecho") else {
        return;
    };
    let Some(big_env) = TestEnv::new("upbig") else {
        return;
    };
    let Some(status_env) = TestEnv::new("upstatus") else {
        return;
    };

    let _echo = TestUpstream::with(&echo_env.ns, "127.0.0.1:8081", Behaviour::Echo);
    let proxy = echo_env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    let upload = big_body(256 * 1024);
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        let req = Req::new(http::Method::POST, "/upload").body(upload.clone());
        let resp = echo_env
            .run(|| client::https(&tls, req))
            .unwrap_or_else(|e| panic!("{alpn:?} POST of 256 KiB through the proxy: {e}"));
        assert_eq!(resp.status, StatusCode::OK, "{alpn:?} POST: {resp:?}");
        assert_eq!(
            resp.header("x-echo-length"),
            Some("262144"),
            "{alpn:?}: bytes of the 256 KiB upload that reached the upstream"
        );
        assert!(
            resp.body[..] == upload[..],
            "{alpn:?}: the echoed upload differs"
        );
    }

    let len = 2 * 1024 * 1024;
    let _big = TestUpstream::with(&big_env.ns, "127.0.0.1:8081", Behaviour::Big(len));
    let proxy = big_env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        let resp = big_env
            .run(|| client::https(&tls, Req::get("/big")))
            .unwrap_or_else(|e| panic!("{alpn:?} GET of a 2 MiB upstream body: {e}"));
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(
            resp.body.len(),
            len,
            "{alpn:?}: length of a 2 MiB upstream body"
        );
        assert!(
            resp.body[..] == big_body(len)[..],
            "{alpn:?}: the 2 MiB body is corrupted"
        );
    }

    let _status = TestUpstream::with(&status_env.ns, "127.0.0.1:8081", Behaviour::Status(503));
    let proxy = status_env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    let tls = proxy.tls();
    let resp = status_env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("GET / with an upstream answering 503: {e}"));
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the upstream's own 503 should reach the client unchanged: {resp:?}"
    );
    assert_eq!(resp.text(), "status 503", "the upstream's 503 body");
}

#[test]
fn unanswered_upstream_connect_gives_up_after_the_connect_timeout() {
    let Some(env) = TestEnv::new("upconnect") else {
        return;
    };
    let _hole = Blackhole::start(&env.ns, "127.0.0.1:8082");
    let proxy = env.serve(&[
        "--upstream",
        "http://127.0.0.1:8082",
        "--upstream-connect-timeout",
        "1s",
        "--upstream-timeout",
        "10s",
    ]);
    let tls = proxy.tls();
    let started = Instant::now();
    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("GET / with an upstream that never answers SYN: {e}"));
    let took = started.elapsed();
    assert!(
        resp.status == StatusCode::BAD_GATEWAY || resp.status == StatusCode::GATEWAY_TIMEOUT,
        "an upstream that never accepts should give 502 or 504: {resp:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "with --upstream-connect-timeout 1s the answer took {took:?}"
    );
    let m = env.metrics();
    let errors = m.value("proxy_upstream_errors_total", &[]);
    assert!(
        errors >= 1.0,
        "the connect timeout was not counted in proxy_upstream_errors_total:\n{}",
        m.text
    );
}

/// In upstream mode each client connection may hold a backend connection too: the proxy
/// raises its open-file limit towards twice the connection cap, and says when the hard limit
/// stops it short.
#[test]
fn the_open_file_limit_is_raised_for_the_connection_cap_or_reported() {
    let Some(env) = TestEnv::new("nofile") else {
        return;
    };
    if !proxy_e2e::require_tool("nofile", "prlimit", "apt-get install util-linux") {
        return;
    }
    let _backend = env.backend("127.0.0.1:8080");
    let limits = |pid: nix::unistd::Pid| {
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .expect("/proc limits")
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_owned())
            .expect("Max open files")
    };
    for (cap, soft_after, warned) in [("1000", "2256", false), ("2000", "3000", true)] {
        let dir = env.path(&format!("cap{cap}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let proxy = proxy_e2e::Proxy::start_via(
            &env.ns,
            &dir,
            &["prlimit", "--nofile=1024:3000", "--"],
            &[
                "--upstream",
                "http://127.0.0.1:8080",
                "--max-connections",
                cap,
            ],
            &[],
            || {},
        );
        let log = proxy.process.stderr();
        assert_eq!(
            limits(proxy.process.pid()),
            soft_after,
            "--max-connections {cap}: soft open-file limit after start:\n{log}"
        );
        assert!(
            log.contains("raised the open-file limit"),
            "--max-connections {cap}: no line saying the limit was raised:\n{log}"
        );
        assert_eq!(
            log.contains("below what the connection cap needs"),
            warned,
            "--max-connections {cap} under a hard limit of 3000:\n{log}"
        );
    }
}

/// The shipped backend keeps an idle keep-alive connection longer than the proxy's pool does
/// (30 s), so the proxy reuses it after a pause instead of racing the backend's close: after
/// 12 s idle (past hyper's 10 s default the backend once used), the second request goes over
/// the first request's connection.
#[test]
fn the_shipped_backend_keeps_pooled_connections_past_ten_seconds() {
    let Some(env) = TestEnv::new("backend-keepalive") else {
        return;
    };
    let _backend = env.backend("127.0.0.1:8080");
    let proxy = env.serve(&["--upstream", "http://127.0.0.1:8080"]);
    let tls = proxy.tls();
    let opened = |env: &TestEnv| {
        env.metrics().value(
            "proxy_upstream_connections_total",
            &[("backend", "127.0.0.1:8080")],
        )
    };
    for pause in [Duration::ZERO, Duration::from_secs(12)] {
        std::thread::sleep(pause);
        let resp = env
            .run(|| client::https(&tls, Req::get("/")))
            .unwrap_or_else(|e| panic!("GET / after {pause:?}: {e}"));
        assert_eq!(resp.status, StatusCode::OK, "after {pause:?}: {resp:?}");
    }
    assert_eq!(
        opened(&env),
        1.0,
        "the proxy opened a new upstream connection after 12 s idle: the backend closed the pooled one"
    );
}
