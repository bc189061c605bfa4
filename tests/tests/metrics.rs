//! The admin `/metrics` endpoint: every catalogue metric is exported, and the counts match the
//! traffic this test made against a fresh proxy.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use proxy_e2e::client::{self, Req, wait_closed};
use proxy_e2e::{ADMIN, Alpn, HTTP, HTTPS, Metrics, MetricsExt as _, TestEnv, poll_until};
use tokio::io::AsyncWriteExt;

const H1_REQUESTS: usize = 5;
const H2_REQUESTS: usize = 2;
const REDIRECTS: usize = 3;

#[test]
fn metrics_count_the_traffic_made() {
    let Some(env) = TestEnv::new("metrics") else {
        return;
    };
    let proxy = env.serve(&[]);
    let tls = proxy.tls();
    let tls_for_gauge = tls.clone();

    env.run(|| async move {
        for (alpn, n) in [(Alpn::H1, H1_REQUESTS), (Alpn::H2, H2_REQUESTS)] {
            for i in 0..n {
                let resp = client::https(&tls.clone().alpn(alpn), Req::get("/"))
                    .await
                    .unwrap_or_else(|e| panic!("{alpn:?} request #{i}: {e}"));
                assert_eq!(resp.status, 200, "{alpn:?} request #{i}");
            }
        }
        for i in 0..REDIRECTS {
            let resp = client::raw_http(HTTP, b"GET /r HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap_or_else(|e| panic!("port 80 request #{i}: {e}"));
            assert_eq!(resp.status, 308, "port 80 request #{i}");
        }
        // One failed handshake: plain HTTP spoken to the TLS port.
        let mut s = tokio::net::TcpStream::connect(HTTPS)
            .await
            .expect("connecting to 443");
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("writing plain HTTP to 443");
        wait_closed(&mut s, std::time::Instant::now(), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("plain HTTP sent to 443 was not dropped: {e}"));
    });

    let ok = (H1_REQUESTS + H2_REQUESTS) as f64;

    // A connection held open shows in proxy_connections_open.
    let held_tls = tls_for_gauge.clone();
    let open_while_held = env.run(|| async move {
        let _held = client::tls_connect(HTTPS, &held_tls)
            .await
            .unwrap_or_else(|e| panic!("opening a connection to hold: {e}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        client::raw_http(ADMIN, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("scraping /metrics: {e}"))
    });
    let gauge = Metrics::parse(&open_while_held.text())
        .value("proxy_connections_open", &[("listener", "https")]);
    assert_eq!(
        gauge, 1.0,
        "proxy_connections_open{{listener=\"https\"}} with one client connected"
    );

    let m = env.metrics();
    for name in [
        "proxy_http_requests_total",
        "proxy_http_request_duration_seconds",
        "proxy_tls_handshake_duration_seconds",
        "proxy_tls_handshake_failures_total",
        "proxy_connections_open",
        "proxy_connections_total",
        "proxy_certificate_expiry_timestamp_seconds",
        "proxy_build_info",
        "proxy_ebpf_attached",
    ] {
        assert!(
            m.has(name),
            "/metrics lacks {name}; the scrape was:\n{}",
            m.text
        );
    }

    let https_200 = m.expect(
        "proxy_http_requests_total",
        &[("listener", "https"), ("code", "200")],
    );
    assert_eq!(
        https_200, ok,
        "HTTPS 200s counted after {ok} successful requests"
    );
    let http_308 = m.expect(
        "proxy_http_requests_total",
        &[("listener", "http"), ("code", "308")],
    );
    assert_eq!(http_308, REDIRECTS as f64, "port 80 redirects counted");
    assert_eq!(
        m.value("proxy_http_requests_total", &[]),
        ok + REDIRECTS as f64,
        "requests counted in total (admin requests must not be)"
    );
    assert_eq!(
        m.expect(
            "proxy_http_request_duration_seconds_count",
            &[("listener", "https")]
        ),
        ok,
        "HTTPS request duration observations"
    );
    let handshakes = m.expect("proxy_tls_handshake_duration_seconds_count", &[]);
    assert!(
        handshakes >= ok,
        "{handshakes} handshakes observed after {ok} TLS connections"
    );
    let failures = m.expect("proxy_tls_handshake_failures_total", &[]);
    assert!(
        failures >= 1.0,
        "the plain-HTTP-to-443 handshake failure was not counted"
    );
    assert_eq!(
        m.expect("proxy_connections_total", &[("listener", "https")]),
        ok + 2.0,
        "HTTPS connections accepted: {ok} clients, one held open, one that failed its handshake"
    );
    assert_eq!(
        m.expect("proxy_connections_total", &[("listener", "http")]),
        REDIRECTS as f64,
        "port 80 connections accepted"
    );
    poll_until(Duration::from_secs(3), || {
        let m = env.metrics();
        (m.value("proxy_connections_open", &[("listener", "https")]) == 0.0
            && m.value("proxy_connections_open", &[("listener", "http")]) == 0.0)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "proxy_connections_open did not fall back to 0 after every client left:\n{}",
            env.metrics().text
        )
    });

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let leaf = m.expect(
        "proxy_certificate_expiry_timestamp_seconds",
        &[("cert", "leaf")],
    );
    let ca = m.expect(
        "proxy_certificate_expiry_timestamp_seconds",
        &[("cert", "ca")],
    );
    assert!(
        leaf > now,
        "leaf expiry {leaf} is not in the future (now {now})"
    );
    assert!(ca >= leaf, "CA expires ({ca}) before the leaf ({leaf})");
    let days = (leaf - now) / 86400.0;
    assert!(
        (29.0..=31.0).contains(&days),
        "the default leaf lifetime is 30d, but the leaf expires in {days:.2} days"
    );
    assert_eq!(
        m.expect(
            "proxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0,
        "proxy_build_info for version {}",
        env!("CARGO_PKG_VERSION")
    );

    proxy.signal(Signal::SIGHUP);
    poll_until(Duration::from_secs(5), || {
        (env.metrics().value(
            "proxy_reloads_total",
            &[("what", "tls"), ("result", "success")],
        ) >= 1.0)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "SIGHUP did not count proxy_reloads_total{{what=\"tls\",result=\"success\"}}:\n{}",
            env.metrics().text
        )
    });
}

/// The standard families and the build's identity, on a live scrape that `promtool check
/// metrics` accepts: the proxy in upstream mode with eBPF attached, after traffic, so every
/// family it can export is in the scrape.
#[test]
fn a_live_scrape_passes_promtool_and_has_the_standard_families() {
    let Some(env) = TestEnv::new("metrics-standard") else {
        return;
    };
    if !proxy_e2e::require_tool("metrics-standard", "promtool", "apt-get install prometheus") {
        return;
    }
    let _backend = env.backend("127.0.0.1:8080");
    let proxy = env.serve(&[
        "--ebpf",
        "required",
        "--upstream",
        "http://127.0.0.1:8080",
        "--max-connections",
        "1234",
    ]);
    let tls = proxy.tls();
    env.run(|| async move {
        for alpn in [Alpn::H1, Alpn::H2] {
            let resp = client::https(&tls.clone().alpn(alpn), Req::get("/"))
                .await
                .unwrap_or_else(|e| panic!("{alpn:?}: {e}"));
            assert_eq!(resp.status, 200);
        }
    });
    let m = env.metrics();

    // promtool reads the scrape from stdin; any complaint (format or lint) fails the test.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    {
        use std::io::Write as _;
        let mut stdin = promtool.stdin.take().expect("promtool stdin");
        stdin
            .write_all(m.text.as_bytes())
            .expect("writing the scrape to promtool");
    }
    let checked = promtool.wait_with_output().expect("promtool output");
    assert!(
        checked.status.success(),
        "promtool check metrics refused the live scrape ({}):\n{}{}",
        checked.status,
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(m.get(name, &[]).is_some(), "{name} missing:\n{}", m.text);
    }
    let open_fds = m.value("process_open_fds", &[]);
    let max_fds = m.value("process_max_fds", &[]);
    assert!(
        open_fds > 0.0 && open_fds < max_fds,
        "open fds {open_fds} against the limit {max_fds}"
    );
    let started = m.value("process_start_time_seconds", &[]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    assert!(
        (now - 120.0..=now + 1.0).contains(&started),
        "process_start_time_seconds {started} is not this test's proxy (now {now})"
    );
    assert_eq!(m.value("proxy_connections_max", &[]), 1234.0);

    // The build's identity, the same in --version and in the metric.
    let version = proxy_e2e::proxy_cmd_ok(&["--version"]);
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let info = m
        .named("proxy_build_info")
        .next()
        .unwrap_or_else(|| panic!("no proxy_build_info:\n{}", m.text));
    let label = |name: &str| {
        info.label(name)
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("proxy_build_info has no {name} label: {info:?}"))
    };
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        label("ebpf"),
        "embedded",
        "eBPF is attached, so it is embedded"
    );
    let revision = label("revision");
    assert!(
        !revision.is_empty() && version.contains(&format!("revision {revision}")),
        "--version ({version:?}) and proxy_build_info (revision {revision:?}) disagree"
    );
    assert!(
        version.contains("eBPF embedded"),
        "--version says whether the eBPF object is embedded: {version:?}"
    );
}
