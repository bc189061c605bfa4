//! The HTTPS listener as a browser sees it: the static answer, ALPN, methods, security headers,
//! TLS versions and a certificate chain that validates against our CA only.

use http::{Method, StatusCode};
use proxy_e2e::client::{self, Req};
use proxy_e2e::{ADMIN, Alpn, HTTPS, TestEnv, TlsOptions};
use rustls::{ProtocolVersion, RootCertStore};

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

#[test]
fn hello_over_https_with_a_client_trusting_only_our_ca() {
    let Some(env) = TestEnv::new("seed") else {
        return;
    };
    let proxy = env.serve(&[]);
    let tls = proxy.tls();
    assert!(
        proxy.process.stderr().contains("proxy ready"),
        "no \"proxy ready\" line on stderr once serving"
    );

    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("a client trusting our CA cannot GET https://localhost/: {e}"));
    assert_eq!(resp.status, StatusCode::OK, "GET / over HTTPS: {resp:?}");
    assert_eq!(resp.text(), "Hello SRE!", "GET / body");
    assert_eq!(
        resp.header("content-type"),
        Some(TEXT_PLAIN),
        "GET / content type"
    );
    assert_eq!(
        resp.tls.version,
        Some(ProtocolVersion::TLSv1_3),
        "a modern client should get TLS 1.3"
    );
    let old_client = tls.clone().tls12_only().alpn(Alpn::Both);
    let resp = env
        .run(|| client::https(&old_client, Req::get("/")))
        .unwrap_or_else(|e| panic!("a TLS 1.2-only client cannot GET /: {e}"));
    assert_eq!(resp.tls.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(resp.tls.alpn.as_deref(), Some("h2"), "h2 over TLS 1.2");
    assert_eq!(resp.text(), "Hello SRE!");

    // The same by IP address: the default names include 127.0.0.1.
    let by_ip = tls.clone().server_name("127.0.0.1");
    let resp = env
        .run(|| client::https(&by_ip, Req::get("/")))
        .unwrap_or_else(|e| panic!("https://127.0.0.1/ is not served with a valid name: {e}"));
    assert_eq!(resp.status, StatusCode::OK);

    // Over IPv6 too: [::]:443 is dual stack and the default names include ::1.
    let v6 = tls.clone().server_name("::1");
    let conn = env
        .run(|| async { client::tls_connect("[::1]:443", &v6).await.map(|c| c.info) })
        .unwrap_or_else(|e| panic!("https://[::1]/ is not served with a valid name: {e}"));
    assert!(!conn.serial.is_empty());

    // And by the machine's host name, also a default name.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim().to_lowercase();
    if is_plain_dns_name(&host) {
        let by_host = tls.clone().server_name(&host);
        env.run(|| client::tls_connect(HTTPS, &by_host))
            .unwrap_or_else(|e| panic!("the host name {host:?} is not on the default leaf: {e}"));
    }

    // A client that trusts nothing, or only some other CA, must refuse our certificate.
    let empty = TlsOptions::with_roots(RootCertStore::empty());
    let err = env
        .run(|| client::tls_connect(HTTPS, &empty))
        .err()
        .expect("a client with an empty root store completed the handshake");
    assert!(err.contains("certificate"), "unexpected failure: {err}");

    let other = TlsOptions::with_roots(foreign_ca());
    let err = env
        .run(|| client::tls_connect(HTTPS, &other))
        .err()
        .expect("a client trusting only a foreign CA accepted our certificate");
    assert!(
        err.to_lowercase().contains("unknownissuer") || err.contains("issuer"),
        "a client trusting a foreign CA should fail with an unknown issuer, got: {err}"
    );

    // A name that is not on the leaf is refused too.
    let wrong_name = tls.server_name("not-us.example");
    let err = env
        .run(|| client::tls_connect(HTTPS, &wrong_name))
        .err()
        .expect("the certificate was accepted for a name it does not carry");
    assert!(err.contains("certificate"), "unexpected failure: {err}");
}

#[test]
fn http2_head_errors_and_security_headers() {
    let Some(env) = TestEnv::new("h2") else {
        return;
    };
    let proxy = env.serve(&[]);

    // A browser offers both protocols and gets h2.
    let both = proxy.tls().alpn(Alpn::Both);
    let resp = env
        .run(|| client::https(&both, Req::get("/")))
        .unwrap_or_else(|e| panic!("GET / offering h2 and http/1.1: {e}"));
    assert_eq!(resp.tls.alpn.as_deref(), Some("h2"), "ALPN did not pick h2");
    assert_eq!(resp.version, http::Version::HTTP_2);
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.text(), "Hello SRE!");

    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = proxy.tls().alpn(alpn);
        let cases = [
            (Req::new(Method::HEAD, "/"), StatusCode::OK),
            (Req::get("/nope"), StatusCode::NOT_FOUND),
            (
                Req::new(Method::POST, "/").body("x=1"),
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (Req::get("/"), StatusCode::OK),
        ];
        for (req, want) in cases {
            let what = format!("{} {} over {alpn:?}", req.method, req.path);
            let resp = env
                .run(|| client::https(&tls, req.clone()))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(resp.status, want, "{what}: {resp:?}");
            assert_eq!(
                resp.header("content-type"),
                Some(TEXT_PLAIN),
                "{what}: content type"
            );
            check_security_headers(&what, &resp);
            match want {
                StatusCode::OK if req.method == Method::HEAD => {
                    assert!(resp.body.is_empty(), "{what}: HEAD returned a body");
                }
                StatusCode::METHOD_NOT_ALLOWED => {
                    assert_eq!(resp.header("allow"), Some("GET, HEAD"), "{what}: Allow");
                }
                _ => {}
            }
        }
    }
}

#[test]
fn only_tls_1_2_and_1_3_and_the_leaf_is_strict_rfc5280() {
    let Some(env) = TestEnv::new("tlsver") else {
        return;
    };
    let proxy = env.serve(&[]);
    let ca = proxy.state_dir.join("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");

    for (version, accepted) in [
        ("-tls1", false),
        ("-tls1_1", false),
        ("-tls1_2", true),
        ("-tls1_3", true),
    ] {
        let out = env.openssl(&[
            "s_client",
            "-connect",
            HTTPS,
            "-servername",
            "localhost",
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
            "-CAfile",
            ca,
            version,
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let handshake_done = out.status.success() && text.contains("New, TLSv1");
        if accepted {
            assert!(
                handshake_done,
                "openssl s_client {version} could not connect (or verify the chain):\n{text}"
            );
        } else {
            assert!(
                !handshake_done,
                "openssl s_client {version} completed a handshake; TLS < 1.2 must be refused:\n{text}"
            );
            assert!(
                !text.contains("no protocols available"),
                "openssl refused {version} by itself, so the test proved nothing:\n{text}"
            );
        }
    }

    let leaf = proxy.state_dir.join("leaf.pem");
    let out = env.openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        ca,
        leaf.to_str().expect("utf-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with(": OK"),
        "`openssl verify -x509_strict` rejects the leaf: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_security_headers(what: &str, resp: &proxy_e2e::Resp) {
    let hsts = resp.header("strict-transport-security").unwrap_or_default();
    assert!(
        hsts.contains("max-age=31536000"),
        "{what}: Strict-Transport-Security is {hsts:?}"
    );
    for (name, want) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
    ] {
        assert_eq!(resp.header(name), Some(want), "{what}: header {name}");
    }
}

/// A root store holding only a CA that has nothing to do with the proxy.
fn foreign_ca() -> RootCertStore {
    let key = rcgen::KeyPair::generate().expect("generating a key");
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA certificate parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("self-signing a foreign CA");
    let mut roots = RootCertStore::empty();
    roots
        .add(cert.der().clone())
        .expect("adding the foreign CA to a root store");
    roots
}

#[test]
fn local_ca_survives_a_restart_and_health_endpoints_answer() {
    let Some(env) = TestEnv::new("restart") else {
        return;
    };
    let mut proxy = env.serve(&[]);
    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let resp = env
            .run(|| client::raw_http(ADMIN, request.as_bytes()))
            .unwrap_or_else(|e| panic!("admin {path}: {e}"));
        assert_eq!(resp.status, 200, "admin {path}: {}", resp.head);
        assert_eq!(resp.text().trim(), body, "admin {path} body");
    }
    let trusted = proxy.tls();
    let ca_before = proxy.ca_pem();
    for (file, want) in [("", 0o700), ("ca.key", 0o600), ("leaf.key", 0o600)] {
        use std::os::unix::fs::PermissionsExt;
        let path = proxy.state_dir.join(file);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, want, "permissions of {}: {mode:o}", path.display());
    }
    // SIGINT (Ctrl-C) drains and exits 0 like SIGTERM.
    proxy.signal(nix::sys::signal::Signal::SIGINT);
    let status = proxy
        .process
        .wait_exit(std::time::Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the proxy did not exit within 10 s of SIGINT"));
    assert_eq!(status.code(), Some(0), "exit status after SIGINT");
    drop(proxy);

    let proxy = env.serve(&[]);
    assert_eq!(
        proxy.ca_pem(),
        ca_before,
        "a restart replaced the local CA: every browser that trusted it breaks"
    );
    let resp = env
        .run(|| client::https(&trusted, Req::get("/")))
        .unwrap_or_else(|e| panic!("after a restart, a client trusting the CA fails: {e}"));
    assert_eq!(resp.status, StatusCode::OK);
}

/// Whether `name` is an ordinary DNS name (LDH labels, not all digits) that the proxy would
/// put on its default leaf; odd host names are left out of the default names, so not tested.
fn is_plain_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "localhost"
        && !name.chars().all(|c| c.is_ascii_digit() || c == '.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}
