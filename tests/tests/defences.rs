//! Defences a user relies on under abuse: silent, slow and idle connections are closed on time,
//! a pile of them does not starve real clients, and oversized request heads get 431.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_e2e::client::{self, Req, wait_closed};
use proxy_e2e::{Alpn, HTTP, HTTPS, TestEnv};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[test]
fn silent_slow_and_idle_connections_are_closed_on_time() {
    let Some(env) = TestEnv::new("timeouts") else {
        return;
    };
    let proxy = env.serve(&[
        "--tls-handshake-timeout",
        "2s",
        "--header-read-timeout",
        "2s",
        "--idle-timeout",
        "3s",
    ]);
    let tls = proxy.tls();
    // Each limit is twice the configured timeout.
    let handshake_limit = Duration::from_secs(4);
    let header_limit = Duration::from_secs(4);
    let idle_limit = Duration::from_secs(6);

    let results = env.run(|| async move {
        let silent_tcp = async {
            let start = Instant::now();
            let mut s = TcpStream::connect(HTTPS).await.map_err(|e| e.to_string())?;
            wait_closed(&mut s, start, handshake_limit).await
        };
        let silent_after_tls = async {
            let mut c = client::tls_connect(HTTPS, &tls.clone().alpn(Alpn::H1)).await?;
            wait_closed(&mut c.stream, Instant::now(), header_limit).await
        };
        let h2_no_preface = async {
            let mut c = client::tls_connect(HTTPS, &tls.clone().alpn(Alpn::H2)).await?;
            if c.info.alpn.as_deref() != Some("h2") {
                return Err(format!("h2 not negotiated: {:?}", c.info.alpn));
            }
            wait_closed(&mut c.stream, Instant::now(), header_limit).await
        };
        let h2_no_requests = async {
            let c = client::tls_connect(HTTPS, &tls.clone().alpn(Alpn::H2)).await?;
            let start = Instant::now();
            let (_sender, conn): (SendRequest<Full<Bytes>>, _) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(c.stream))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            match tokio::time::timeout(idle_limit, conn).await {
                Ok(_) => Ok(start.elapsed()),
                Err(_) => Err(format!("still open after {idle_limit:?}")),
            }
        };
        let h1_idle_after_request = async {
            let mut c = client::tls_connect(HTTPS, &tls.clone().alpn(Alpn::H1)).await?;
            c.stream
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let resp = client::read_response(&mut c.stream).await?;
            if resp.status != 200 {
                return Err(format!("first request answered {}", resp.status));
            }
            wait_closed(&mut c.stream, Instant::now(), idle_limit).await
        };
        let slowloris = async {
            let start = Instant::now();
            let mut s = TcpStream::connect(HTTP).await.map_err(|e| e.to_string())?;
            let (mut rd, mut wr) = s.split();
            let drip = async {
                for b in
                    b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa".iter()
                {
                    if wr.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // Stay silent afterwards; the read side decides.
                std::future::pending::<()>().await;
            };
            tokio::select! {
                r = wait_closed(&mut rd, start, header_limit) => r,
                () = drip => unreachable!("the drip never ends"),
            }
        };
        tokio::join!(
            silent_tcp,
            silent_after_tls,
            h2_no_preface,
            h2_no_requests,
            h1_idle_after_request,
            slowloris
        )
    });
    let (a, b, c, d, e, f) = results;
    let handshake = Duration::from_secs(2);
    let header_read = Duration::from_secs(2);
    let idle = Duration::from_secs(3);
    // What closed each connection, and when at the earliest it may close.
    let checks = [
        (
            "a TCP connection to 443 that never starts TLS (--tls-handshake-timeout 2s)",
            a,
            handshake,
        ),
        (
            "a TLS connection that never sends a request (--header-read-timeout 2s)",
            b,
            header_read,
        ),
        (
            "an h2 connection that never sends the preface (--header-read-timeout 2s)",
            c,
            header_read,
        ),
        (
            "an h2 connection that sends the preface but no request (--header-read-timeout 2s: \
             the first request is late)",
            d,
            header_read,
        ),
        (
            "a keep-alive HTTP/1.1 connection idle after its request (--idle-timeout 3s, \
             not the 2 s header-read timeout)",
            e,
            idle,
        ),
        (
            "a slowloris client on port 80 sending one byte per 500 ms (--header-read-timeout 2s)",
            f,
            header_read,
        ),
    ];
    let mut failures = Vec::new();
    for (what, result, timeout) in checks {
        match result {
            // Timers may fire a little early by the client's clock, never by a tenth.
            Ok(took) if took < timeout.mul_f64(0.9) => {
                failures.push(format!("{what}: closed after {took:?}, before {timeout:?}"));
            }
            Ok(took) => eprintln!("closed after {took:?}: {what}"),
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "connections the proxy should have closed after their timeout and by twice it:\n{}",
        failures.join("\n")
    );
}

#[test]
fn fifty_silent_connections_do_not_starve_a_real_client() {
    let Some(env) = TestEnv::new("flood") else {
        return;
    };
    let proxy = env.serve(&[]);
    let tls = proxy.tls();
    let outcome = env.run(|| async move {
        let mut silent = Vec::new();
        for i in 0..50 {
            let addr = if i % 5 == 0 { HTTP } else { HTTPS };
            match TcpStream::connect(addr).await {
                Ok(s) => silent.push(s),
                Err(e) => return Err(format!("opening silent connection #{i} to {addr}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut served = Vec::new();
        for alpn in [Alpn::H1, Alpn::H2] {
            let start = Instant::now();
            let resp = tokio::time::timeout(
                Duration::from_secs(3),
                client::https(&tls.clone().alpn(alpn), Req::get("/")),
            )
            .await
            .map_err(|_| format!("{alpn:?} GET / got no answer within 3 s"))??;
            served.push((alpn, resp.status, start.elapsed()));
        }
        let redirect = client::raw_http(HTTP, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await?;
        drop(silent);
        Ok((served, redirect.status))
    });
    let (served, redirect) = outcome
        .unwrap_or_else(|e| panic!("with 50 silent connections open, a real client failed: {e}"));
    for (alpn, status, took) in served {
        assert_eq!(
            status,
            StatusCode::OK,
            "{alpn:?} GET / with 50 silent connections open"
        );
        eprintln!("{alpn:?} served in {took:?} with 50 silent connections open");
    }
    assert_eq!(redirect, 308, "port 80 with 50 silent connections open");
}

#[test]
fn oversized_request_heads_get_431() {
    let Some(env) = TestEnv::new("431") else {
        return;
    };
    let proxy = env.serve(&[]);
    let tls = proxy.tls();

    let big = "a".repeat(20 * 1024);
    let cases = [
        (
            "one 20 KiB header",
            Req::get("/").header("x-big", &big),
            431,
        ),
        (
            "200 headers",
            (0..200).fold(Req::get("/"), |r, i| r.header(&format!("x-h-{i}"), "v")),
            431,
        ),
        (
            "a 10 KiB cookie (under the 16 KiB default)",
            Req::get("/").header("cookie", &"c".repeat(10 * 1024)),
            200,
        ),
        (
            "50 headers (under the default 100)",
            (0..50).fold(Req::get("/"), |r, i| r.header(&format!("x-h-{i}"), "v")),
            200,
        ),
    ];
    for alpn in [Alpn::H1, Alpn::H2] {
        let tls = tls.clone().alpn(alpn);
        for (what, req, want) in cases.clone() {
            let resp = env
                .run(|| client::https(&tls, req))
                .unwrap_or_else(|e| panic!("{alpn:?} request with {what}: {e}"));
            assert_eq!(
                resp.status.as_u16(),
                want,
                "{alpn:?} request with {what}: {resp:?}"
            );
        }
    }

    let request = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    let resp = env
        .run(|| client::raw_http(HTTP, request.as_bytes()))
        .unwrap_or_else(|e| panic!("port 80 request with a 20 KiB header: {e}"));
    assert_eq!(
        resp.status, 431,
        "port 80 request with a 20 KiB header:\n{}",
        resp.head
    );
}

#[test]
fn connection_cap_holds_new_clients_until_a_slot_frees() {
    let Some(env) = TestEnv::new("maxconn") else {
        return;
    };
    let proxy = env.serve(&["--max-connections", "5"]);
    let tls = proxy.tls();
    let (last_slot, capped, freed) = env.run(|| async move {
        let mut silent = Vec::new();
        for i in 0..4 {
            let s = TcpStream::connect(HTTPS)
                .await
                .unwrap_or_else(|e| panic!("silent connection #{i}: {e}"));
            silent.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The cap is the proxy's, whichever listener waits: the idle port 80 holds no slot.
        let last_slot = tokio::time::timeout(
            Duration::from_millis(1500),
            client::https(&tls, Req::get("/")),
        )
        .await;
        silent.push(
            TcpStream::connect(HTTPS)
                .await
                .unwrap_or_else(|e| panic!("silent connection #5: {e}")),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let capped = tokio::time::timeout(
            Duration::from_millis(1500),
            client::https(&tls, Req::get("/")),
        )
        .await;
        drop(silent);
        let freed =
            tokio::time::timeout(Duration::from_secs(5), client::https(&tls, Req::get("/"))).await;
        (last_slot, capped, freed)
    });
    match last_slot {
        Ok(Ok(resp)) => assert_eq!(resp.status, StatusCode::OK),
        Ok(Err(e)) => panic!("with 4 of 5 connections open, a fifth failed: {e}"),
        Err(_) => panic!("with 4 of 5 connections open, a fifth was not served within 1.5 s"),
    }
    if let Ok(Ok(resp)) = capped {
        panic!("with --max-connections 5 and 5 connections open, a sixth was served: {resp:?}");
    }
    match freed {
        Ok(Ok(resp)) => assert_eq!(resp.status, StatusCode::OK),
        Ok(Err(e)) => panic!("after the 5 connections closed, a new client failed: {e}"),
        Err(_) => panic!("after the 5 connections closed, a new client was still not served"),
    }
}

#[test]
fn configured_header_limits_apply() {
    let Some(env) = TestEnv::new("hdrlimits") else {
        return;
    };
    let proxy = env.serve(&["--max-header-bytes", "8192", "--max-headers", "10"]);
    let tls = proxy.tls();
    let cases = [
        (
            "a 9 KiB header (--max-header-bytes 8192)",
            Req::get("/").header("x-big", &"b".repeat(9 * 1024)),
            431,
        ),
        (
            "20 headers (--max-headers 10)",
            (0..20).fold(Req::get("/"), |r, i| r.header(&format!("x-h-{i}"), "v")),
            431,
        ),
        (
            "5 small headers",
            (0..5).fold(Req::get("/"), |r, i| r.header(&format!("x-h-{i}"), "v")),
            200,
        ),
    ];
    for (what, req, want) in cases {
        let resp = env
            .run(|| client::https(&tls, req))
            .unwrap_or_else(|e| panic!("request with {what}: {e}"));
        assert_eq!(resp.status.as_u16(), want, "request with {what}: {resp:?}");
    }
}
