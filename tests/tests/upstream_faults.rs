//! Backends that misbehave and clients that do: each gets the documented client-visible
//! result within its deadline, over HTTP/1.1 and HTTP/2, is counted with the right outcome
//! and error kind, and has an access-log line that says what happened.

use std::time::Duration;

use http::{Method, StatusCode};
use proxy_e2e::client::{self, Req, Streamed};
use proxy_e2e::upstream::{Behaviour, TestUpstream};
use proxy_e2e::{Alpn, MetricsExt as _, Proxy, TestEnv, poll_until};

/// What a fault must look like from outside.
struct Expected {
    /// The status the client sees.
    status: StatusCode,
    /// Whether the body must break (never a short body that looks complete).
    broken: bool,
    /// The `outcome` label and access-log field.
    outcome: &'static str,
    /// The `kind` of `proxy_upstream_errors_total` that must move.
    kind: &'static str,
    /// The longest the client may wait (its deadline plus scheduling slack).
    within: Duration,
}

/// Runs one GET per protocol against a proxy fronting `behaviour` and checks `expected`.
fn check_fault(test: &str, behaviour: Behaviour, extra: &[&str], expected: Expected) {
    let Some(env) = TestEnv::new(test) else {
        return;
    };
    let (_backend, proxy) = proxy_with(&env, behaviour, extra);
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        let started = std::time::Instant::now();
        let got: Streamed = match env.run(|| client::https_streamed(&tls, Req::get("/"))) {
            Ok(got) => got,
            // HTTP/2: when the reset follows the head at once, the client library may report
            // the reset in place of the head. Broken visibly all the same.
            Err(e) if expected.broken && alpn == Alpn::H2 && e.contains("Reset(") => {
                eprintln!("{test} ({alpn:?}): reset before the head was read: {e}");
                assert!(started.elapsed() <= expected.within, "{test}: {e}");
                continue;
            }
            Err(e) => panic!("{test} ({alpn:?}): no response at all: {e}"),
        };
        eprintln!("{test} ({alpn:?}): {got:?}");
        assert_eq!(got.status, expected.status, "{test} ({alpn:?}): {got:?}");
        assert_eq!(
            got.end.is_err(),
            expected.broken,
            "{test} ({alpn:?}): the body should {}: {got:?}",
            if expected.broken {
                "break visibly"
            } else {
                "end normally"
            }
        );
        assert!(
            got.elapsed <= expected.within,
            "{test} ({alpn:?}): took {:?}, deadline allows {:?}",
            got.elapsed,
            expected.within
        );
    }
    let code = expected.status.as_str();
    let counted = poll_until(Duration::from_secs(5), || {
        let m = env.metrics();
        let n = m.value(
            "proxy_http_requests_total",
            &[("code", code), ("outcome", expected.outcome)],
        );
        (n >= 2.0).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "{test}: proxy_http_requests_total{{code={code}, outcome={}}} did not reach 2:\n{}",
            expected.outcome,
            env.metrics().text
        )
    });
    let errors = counted.expect(
        "proxy_upstream_errors_total",
        &[("backend", "127.0.0.1:8081"), ("kind", expected.kind)],
    );
    assert!(
        errors >= 2.0,
        "{test}: proxy_upstream_errors_total{{kind={}}} is {errors}",
        expected.kind
    );
    let log = proxy.process.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("proxy::access") && l.contains("path=\"/\""))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "{test}: one access line per request:\n{log}"
    );
    for line in lines {
        for field in [
            format!("outcome=\"{}\"", expected.outcome),
            format!("status={code}"),
            "backend=\"127.0.0.1:8081\"".to_owned(),
        ] {
            assert!(line.contains(&field), "{test}: {field} missing from {line}");
        }
    }
}

#[test]
fn a_backend_that_stalls_mid_body_is_cut_at_the_body_deadline() {
    check_fault(
        "stallbody",
        Behaviour::StallMidBody {
            declared: 100_000,
            sent: 1000,
        },
        &["--upstream-body-timeout", "1s"],
        Expected {
            status: StatusCode::OK,
            broken: true,
            outcome: "upstream_timeout",
            kind: "body_timeout",
            within: Duration::from_secs(5),
        },
    );
}

#[test]
fn a_backend_that_closes_mid_body_breaks_the_response_visibly() {
    check_fault(
        "closebody",
        Behaviour::CloseMidBody {
            declared: 100_000,
            sent: 1000,
        },
        &[],
        Expected {
            status: StatusCode::OK,
            broken: true,
            outcome: "upstream_error",
            kind: "body_error",
            within: Duration::from_secs(3),
        },
    );
}

#[test]
fn a_backend_that_never_answers_is_504_at_the_head_deadline() {
    check_fault(
        "neveranswer",
        Behaviour::NeverAnswer,
        &["--upstream-timeout", "1s"],
        Expected {
            status: StatusCode::GATEWAY_TIMEOUT,
            broken: false,
            outcome: "complete",
            kind: "timeout",
            within: Duration::from_secs(5),
        },
    );
}

#[test]
fn a_backend_that_answers_garbage_is_502() {
    check_fault(
        "garbage",
        Behaviour::Garbage,
        &[],
        Expected {
            status: StatusCode::BAD_GATEWAY,
            broken: false,
            outcome: "complete",
            kind: "protocol",
            within: Duration::from_secs(3),
        },
    );
}

#[test]
fn a_backend_that_resets_is_502_alone_and_retried_in_a_pool() {
    check_fault(
        "reset",
        Behaviour::Reset,
        &[],
        Expected {
            status: StatusCode::BAD_GATEWAY,
            broken: false,
            outcome: "complete",
            kind: "protocol",
            within: Duration::from_secs(3),
        },
    );

    // With a healthy second backend, a GET that met the reset is retried there: no byte of
    // a response came back, and GET is idempotent.
    let Some(env) = TestEnv::new("resetpool") else {
        return;
    };
    let _reset = TestUpstream::with(&env.ns, "127.0.0.1:8081", Behaviour::Reset);
    let _good = env.backend("127.0.0.1:8082");
    let proxy = env.serve(&[
        "--upstream",
        "http://127.0.0.1:8081,http://127.0.0.1:8082",
        "--balance",
        "round-robin",
        // Keep the resetting backend in the pool, so that every other request meets it.
        "--eject-after",
        "0",
        "--health-check-path",
        "/",
    ]);
    let tls = proxy.tls();
    for i in 0..10 {
        let resp = env
            .run(|| client::https(&tls, Req::get("/")))
            .unwrap_or_else(|e| panic!("GET {i} with one resetting backend: {e}"));
        assert_eq!(resp.status, StatusCode::OK, "GET {i}: {resp:?}");
        assert_eq!(resp.text(), "Hello SRE!");
    }
    let m = env.metrics();
    let retries = m.expect(
        "proxy_upstream_retries_total",
        &[("backend", "127.0.0.1:8081")],
    );
    assert!(
        retries >= 4.0,
        "retries from the resetting backend: {retries}"
    );
    // A POST is not idempotent: its failure after the request was sent is not retried.
    let statuses: Vec<StatusCode> = (0..2)
        .map(|_| {
            env.run(|| client::https(&tls, Req::new(Method::POST, "/").body("not to be repeated")))
                .expect("a response")
                .status
        })
        .collect();
    assert!(
        statuses.contains(&StatusCode::BAD_GATEWAY),
        "one of two POSTs met the resetting backend and must not have been retried: {statuses:?}"
    );
}

/// A proxy fronting a test upstream with `behaviour`, with `extra` flags.
fn proxy_with(env: &TestEnv, behaviour: Behaviour, extra: &[&str]) -> (TestUpstream, Proxy) {
    let backend = TestUpstream::with(&env.ns, "127.0.0.1:8081", behaviour);
    let mut args = vec!["--upstream", "http://127.0.0.1:8081"];
    args.extend_from_slice(extra);
    (backend, env.serve(&args))
}

#[test]
fn a_request_body_sent_too_slowly_is_408_at_the_client_body_deadline() {
    let Some(env) = TestEnv::new("slowbody") else {
        return;
    };
    let (_backend, proxy) = proxy_with(&env, Behaviour::Echo, &["--client-body-timeout", "1s"]);
    let tls = proxy.tls();
    let (answer, waited) = env.run(|| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = client::tls_connect(proxy_e2e::HTTPS, &tls)
            .await
            .expect("TLS connection");
        let started = std::time::Instant::now();
        conn.stream
            .write_all(
                b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly ten b",
            )
            .await
            .expect("write the head and 10 bytes");
        // The other 90 bytes never come.
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            conn.stream.read_to_end(&mut answer),
        )
        .await;
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });
    eprintln!("slow request body: answered after {waited:?}: {answer:?}");
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a request body stalled past --client-body-timeout 1s should get 408: {answer:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "408 after {waited:?} with a 1 s deadline"
    );
    let m = env.metrics();
    m.expect(
        "proxy_http_requests_total",
        &[("code", "408"), ("outcome", "client_timeout")],
    );
}

/// The resident memory of `pid` in KiB.
fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn clients_that_stop_reading_are_cut_at_the_send_deadline_with_bounded_memory() {
    let Some(env) = TestEnv::new("stopreading") else {
        return;
    };
    const CLIENTS: usize = 100;
    // Larger than what the kernel's socket buffers on both sides of a loopback connection hold.
    const BODY: usize = 256 << 20;
    let (_backend, proxy) = proxy_with(
        &env,
        Behaviour::Big(BODY),
        &["--send-timeout", "3s", "--upstream-timeout", "30s"],
    );
    let pid = proxy.process.pid();
    let before = rss_kib(pid);
    let tls = proxy.tls();
    let tls_h2 = proxy.tls().alpn(Alpn::H2);
    let (rss_while_stalled, cut) = env.run(|| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stalled = Vec::new();
        for _ in 0..CLIENTS {
            let mut conn = client::tls_connect(proxy_e2e::HTTPS, &tls)
                .await
                .expect("TLS connection");
            conn.stream
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .expect("request");
            // Read a little, so the response is flowing, then never read again.
            let mut first = [0u8; 1024];
            let _ = conn.stream.read(&mut first).await;
            stalled.push(conn);
        }
        // One HTTP/2 client that stops reading too: flow control stalls the stream.
        let h2 = tokio::spawn(async move {
            let conn = client::tls_connect(proxy_e2e::HTTPS, &tls_h2)
                .await
                .expect("TLS connection");
            let io = hyper_util::rt::TokioIo::new(conn.stream);
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            let driver = tokio::spawn(connection);
            let request = http::Request::get("https://localhost/")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("response head");
            // Hold the body unread until the proxy gives up on it.
            let ended = tokio::time::timeout(Duration::from_secs(15), driver).await;
            drop(response);
            ended.is_ok()
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(pid);
        // Reading would let the responses flow again: wait past the deadline first, then
        // every stalled connection must turn out closed by the proxy.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut cut = 0;
        for mut conn in stalled {
            let mut sink = vec![0u8; 64 << 10];
            let closed = tokio::time::timeout(Duration::from_secs(15), async {
                loop {
                    match conn.stream.read(&mut sink).await {
                        Ok(0) | Err(_) => return true,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .unwrap_or(false);
            if closed {
                cut += 1;
            }
        }
        let h2_cut = h2.await.unwrap_or(false);
        assert!(
            h2_cut,
            "the HTTP/2 connection whose client stopped reading was not closed"
        );
        (rss, cut)
    });
    let grew = rss_while_stalled.saturating_sub(before);
    eprintln!(
        "{CLIENTS} clients not reading an {} MiB response: proxy RSS {before} KiB -> {rss_while_stalled} KiB (+{grew} KiB, {} KiB per client); {cut} cut",
        BODY >> 20,
        grew / CLIENTS as u64
    );
    assert_eq!(
        cut, CLIENTS,
        "every stalled client is cut at the send deadline"
    );
    // Bounded: each connection holds its buffers (hyper's, TLS's, the upstream read), not the
    // response; 100 × 8 MiB would be 800 MiB.
    assert!(
        grew < 64 * 1024,
        "RSS grew by {grew} KiB for {CLIENTS} stalled clients"
    );
    let m = poll_until(Duration::from_secs(10), || {
        let m = env.metrics();
        (m.value(
            "proxy_http_requests_total",
            &[("outcome", "client_timeout")],
        ) >= (CLIENTS + 1) as f64)
            .then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "stalled clients not counted as client_timeout:\n{}",
            env.metrics().text
        )
    });
    m.expect("proxy_connections_open", &[("listener", "https")]);
}

#[test]
fn a_client_that_leaves_before_the_answer_is_counted_as_499_client_closed() {
    let Some(env) = TestEnv::new("clientleaves") else {
        return;
    };
    let (_backend, proxy) = proxy_with(&env, Behaviour::Answer(Duration::from_secs(3)), &[]);
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        env.run(|| async move {
            // Gives up on the answer after 300 ms: HTTP/1.1 closes the connection, HTTP/2
            // resets the stream.
            let _ = tokio::time::timeout(
                Duration::from_millis(300),
                client::https(&tls, Req::get("/")),
            )
            .await;
        });
    }
    let m = poll_until(Duration::from_secs(10), || {
        let m = env.metrics();
        (m.value(
            "proxy_http_requests_total",
            &[("code", "499"), ("outcome", "client_closed")],
        ) >= 2.0)
            .then_some(m)
    });
    assert!(
        m.is_some(),
        "two clients that left before the answer: not counted as 499 client_closed:\n{}",
        env.metrics().text
    );
    let log = proxy.process.stderr();
    let left = log
        .lines()
        .filter(|l| {
            l.contains("proxy::access") && l.contains("status=499") && l.contains("client_closed")
        })
        .count();
    assert_eq!(left, 2, "access lines for the clients that left:\n{log}");
}

#[test]
fn a_long_upload_is_not_taken_for_a_slow_backend() {
    let Some(env) = TestEnv::new("longupload") else {
        return;
    };
    // The upload takes 2 s, twice the head deadline; its gaps stay far below the body's.
    let (_backend, proxy) = proxy_with(&env, Behaviour::Echo, &["--upstream-timeout", "1s"]);
    let tls = proxy.tls();
    let answer = env.run(|| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = client::tls_connect(proxy_e2e::HTTPS, &tls)
            .await
            .expect("TLS connection");
        conn.stream
            .write_all(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\nConnection: close\r\n\r\n")
            .await
            .expect("head");
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.stream.write_all(b"0123456789").await.expect("a piece");
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.stream.read_to_end(&mut answer))
            .await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a 2 s upload with --upstream-timeout 1s: {answer:?}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("x-echo-length: 100"),
        "the backend got the whole body: {answer:?}"
    );
}
