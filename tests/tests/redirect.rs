//! Port 80: every request is sent to HTTPS with a 308 keeping path and query, and nothing is
//! ever redirected to a host we do not serve.

use proxy_e2e::client;
use proxy_e2e::{HTTP, RawResp, TestEnv};

/// Sends `request` to `addr` and checks status and Location (`None` = must have no Location).
fn check(env: &TestEnv, addr: &str, request: &str, status: u16, location: Option<&str>) -> RawResp {
    let resp = env
        .run(|| client::raw_http(addr, request.as_bytes()))
        .unwrap_or_else(|e| panic!("{request:?} to {addr}: {e}"));
    assert_eq!(
        resp.status,
        status,
        "{request:?} to {addr}: wrong status; response:\n{}{}",
        resp.head,
        resp.text()
    );
    assert_eq!(
        resp.header("location"),
        location,
        "{request:?} to {addr}: wrong Location; response:\n{}",
        resp.head
    );
    if status != 308 {
        let ct = resp.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("text/plain"),
            "{request:?}: a {status} should explain itself in text/plain, got {ct:?}"
        );
    }
    resp
}

#[test]
fn redirects_to_https_keeping_path_and_query() {
    let Some(env) = TestEnv::new("redirect") else {
        return;
    };
    let _proxy = env.serve(&[]);

    let cases: &[(&str, &str, &str)] = &[
        (
            HTTP,
            "GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "https://localhost/a/b?x=1&y=2",
        ),
        (
            HTTP,
            "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "https://localhost/",
        ),
        (
            HTTP,
            "GET /p?q HTTP/1.1\r\nHost: localhost:80\r\n\r\n",
            "https://localhost/p?q",
        ),
        (
            HTTP,
            "GET /Case HTTP/1.1\r\nHost: LocalHost\r\n\r\n",
            "https://localhost/Case",
        ),
        (
            HTTP,
            "GET /%7Euser/a%20b?q=%2F&r= HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "https://localhost/%7Euser/a%20b?q=%2F&r=",
        ),
        (
            HTTP,
            "GET /ip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "https://127.0.0.1/ip",
        ),
        (
            "[::1]:80",
            "GET /v6?z=1 HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            "https://[::1]/v6?z=1",
        ),
        (
            "[::1]:80",
            "GET /v6 HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            "https://[::1]/v6",
        ),
        (
            HTTP,
            "GET http://localhost/abs?q=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "https://localhost/abs?q=1",
        ),
        (
            HTTP,
            "POST /form?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\na=1&b=2",
            "https://localhost/form?x=1",
        ),
        (
            HTTP,
            "GET /old HTTP/1.0\r\nHost: localhost\r\n\r\n",
            "https://localhost/old",
        ),
        // The absolute-form authority wins over the Host header (RFC 9112 3.2.2).
        (
            HTTP,
            "GET http://localhost/abs HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            "https://localhost/abs",
        ),
        // A path that looks like a network path stays a path on our host.
        (
            HTTP,
            "GET //evil.example/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "https://localhost//evil.example/x",
        ),
        (
            HTTP,
            "HEAD /h HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "https://localhost/h",
        ),
    ];
    for (addr, request, location) in cases {
        check(&env, addr, request, 308, Some(location));
    }
}

#[test]
fn rejects_missing_malformed_and_foreign_hosts() {
    let Some(env) = TestEnv::new("badhost") else {
        return;
    };
    let _proxy = env.serve(&[]);

    let bad: &[(&str, u16)] = &[
        ("GET / HTTP/1.0\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: bad host\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: exa_mple..com\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: host:99999\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 421),
        ("GET /x?y=1 HTTP/1.1\r\nHost: evil.example:80\r\n\r\n", 421),
        (
            "GET http://evil.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
            421,
        ),
        // Two Host headers must be rejected (RFC 9112 3.2).
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",
            400,
        ),
        ("GET / HTTP/1.1\r\nHost: user@evil.example\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    ];
    for (request, status) in bad {
        let resp = check(&env, HTTP, request, *status, None);
        assert!(
            !resp.text().is_empty(),
            "{request:?}: a {status} should say why in its body"
        );
    }
}

#[test]
fn public_https_port_is_written_into_location() {
    let Some(env) = TestEnv::new("pubport") else {
        return;
    };
    let _proxy = env.serve(&["--public-https-port", "8443"]);
    check(
        &env,
        HTTP,
        "GET /a/b?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        308,
        Some("https://localhost:8443/a/b?x=1"),
    );
    check(
        &env,
        "[::1]:80",
        "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        308,
        Some("https://[::1]:8443/"),
    );
}

#[test]
fn config_file_env_and_https_listen_port_shape_the_location() {
    let Some(file_env) = TestEnv::new("cfgfile") else {
        return;
    };
    let Some(var_env) = TestEnv::new("cfgenv") else {
        return;
    };
    let Some(port_env) = TestEnv::new("cfgport") else {
        return;
    };

    let config = file_env.path("proxy.toml");
    std::fs::write(
        &config,
        "public_https_port = 9443\nnames = [\"localhost\", \"app.test\"]\n",
    )
    .expect("writing the config file");
    let proxy = file_env.serve(&["--config", config.to_str().expect("utf-8 path")]);
    check(
        &file_env,
        HTTP,
        "GET /x HTTP/1.1\r\nHost: app.test\r\n\r\n",
        308,
        Some("https://app.test:9443/x"),
    );
    let tls = proxy.tls().server_name("app.test");
    let resp = file_env
        .run(|| client::https(&tls, proxy_e2e::Req::get("/")))
        .unwrap_or_else(|e| panic!("a name from the config file is not on the leaf: {e}"));
    assert_eq!(resp.status, 200);

    let _proxy = var_env.serve_with_env(
        &[],
        &[
            ("PROXY_PUBLIC_HTTPS_PORT", "7443"),
            ("PROXY_NAMES", "localhost,app2.test"),
        ],
    );
    check(
        &var_env,
        HTTP,
        "GET /y HTTP/1.1\r\nHost: app2.test\r\n\r\n",
        308,
        Some("https://app2.test:7443/y"),
    );
    check(
        &var_env,
        HTTP,
        "GET /y HTTP/1.1\r\nHost: localhost\r\n\r\n",
        308,
        Some("https://localhost:7443/y"),
    );

    let proxy = port_env.serve(&["--https-listen", "[::]:8443"]);
    check(
        &port_env,
        HTTP,
        "GET /z HTTP/1.1\r\nHost: localhost\r\n\r\n",
        308,
        Some("https://localhost:8443/z"),
    );
    let tls = proxy.tls();
    let conn = port_env
        .run(|| async {
            client::tls_connect("127.0.0.1:8443", &tls)
                .await
                .map(|c| c.info)
        })
        .unwrap_or_else(|e| panic!("--https-listen [::]:8443 does not serve TLS on 8443: {e}"));
    assert!(!conn.serial.is_empty());
}
