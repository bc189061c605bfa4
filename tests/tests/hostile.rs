//! Hostile clients, the fast subset of the reliability battery: while silent TLS connections,
//! HTTP/2 connections that never send their preface, TLS garbage and thousands of malformed
//! requests on both ports hammer the proxy, a well-behaved client keeps being served, the
//! proxy does not crash, and its memory stays small.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proxy_e2e::client::{self, Alpn, Req};
use proxy_e2e::{HTTP, HTTPS, TestEnv};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// Malformed requests, sent on both ports.
const MALFORMED: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"NOT-A-METHOD-\x7f / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\r\n\r\n\r\n",
    b"GET http://[::1/ HTTP/1.1\r\n\r\n",
];
const SILENT_TLS: usize = 200;
const SILENT_H2: usize = 50;
const MALFORMED_TOTAL: usize = 10_000;
/// The proxy's peak resident memory must stay under this under the whole attack.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

#[test]
fn hostile_clients_do_not_stop_a_well_behaved_one() {
    let Some(env) = TestEnv::new("hostile") else {
        return;
    };
    // A request that never completes (only blank lines) is held for the header-read timeout:
    // keep it short so the battery finishes in seconds.
    let proxy = env.serve(&["--header-read-timeout", "2s"]);
    let tls = proxy.tls();

    let unloaded = well_behaved_latencies(&env, &tls, 30);

    let attacking = Arc::new(AtomicBool::new(true));
    let attack = env.ns.spawn({
        let tls = tls.clone();
        let attacking = attacking.clone();
        move || async move { attack(tls, attacking).await }
    });
    // The well-behaved client, while the attack runs.
    let started = Instant::now();
    let mut loaded = Vec::new();
    while !attack.is_finished() && started.elapsed() < Duration::from_secs(90) {
        loaded.extend(well_behaved_latencies(&env, &tls, 1));
        // A client at its own pace, not a second load generator.
        std::thread::sleep(Duration::from_millis(100));
    }
    attacking.store(false, Ordering::Release);
    let report = attack.join().expect("the attack thread");
    // And after it.
    loaded.extend(well_behaved_latencies(&env, &tls, 5));

    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.process.pid()))
        .unwrap_or_default();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the proxy is gone (crashed?):\n{}", proxy.process.stderr()));
    eprintln!(
        "hostile battery: {report}; well-behaved p99 unloaded {:?}, under attack {:?} ({} requests); proxy peak RSS {} KiB",
        p99(&unloaded),
        p99(&loaded),
        loaded.len(),
        peak_kib
    );
    assert!(
        report.malformed_answered_or_closed >= MALFORMED_TOTAL,
        "the attack did not run fully: {report}"
    );
    assert!(
        peak_kib < RSS_LIMIT_KIB,
        "peak RSS {peak_kib} KiB over the {RSS_LIMIT_KIB} KiB limit"
    );
    assert!(
        loaded.len() >= 10,
        "the well-behaved client made only {} requests",
        loaded.len()
    );
}

/// `n` sequential requests on new TLS connections; panics if one fails (that is the test).
fn well_behaved_latencies(env: &TestEnv, tls: &client::TlsOptions, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let started = Instant::now();
            let resp = env
                .run(|| client::https(tls, Req::get("/")))
                .unwrap_or_else(|e| {
                    panic!("a well-behaved client was not served during the attack: {e}")
                });
            assert_eq!(resp.text(), "Hello SRE!");
            started.elapsed()
        })
        .collect()
}

fn p99(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted
        .get((sorted.len() * 99 / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[derive(Debug, Default)]
struct AttackReport {
    silent_tls: usize,
    silent_h2: usize,
    malformed_answered_or_closed: usize,
}

impl std::fmt::Display for AttackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} silent TLS, {} preface-less h2, {} malformed requests",
            self.silent_tls, self.silent_h2, self.malformed_answered_or_closed
        )
    }
}

async fn attack(tls: client::TlsOptions, attacking: Arc<AtomicBool>) -> AttackReport {
    let mut report = AttackReport::default();
    // Connections that complete TLS and then say nothing, held open.
    let mut held = Vec::new();
    for _ in 0..SILENT_TLS {
        if let Ok(conn) = client::tls_connect(HTTPS, &tls).await {
            held.push(conn);
            report.silent_tls += 1;
        }
    }
    let h2 = tls.clone().alpn(Alpn::H2);
    for _ in 0..SILENT_H2 {
        if let Ok(conn) = client::tls_connect(HTTPS, &h2).await {
            held.push(conn);
            report.silent_h2 += 1;
        }
    }
    // Malformed requests: plain on :80, inside TLS (every tenth) or as TLS garbage on :443.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MALFORMED_TOTAL {
        if !attacking.load(Ordering::Acquire) {
            break;
        }
        let request = MALFORMED[i % MALFORMED.len()];
        let tls = tls.clone();
        // Each ends when the proxy answered (400/431...) or closed the connection.
        tasks.spawn(async move {
            if i % 2 == 0 {
                let _ = client::raw_http(HTTP, request).await;
            } else if i % 10 == 1 {
                if let Ok(mut conn) = client::tls_connect(HTTPS, &tls).await {
                    let _ = conn.stream.write_all(request).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        client::read_response(&mut conn.stream),
                    )
                    .await;
                }
            } else if let Ok(mut tcp) = TcpStream::connect(HTTPS).await {
                // Not TLS at all.
                let _ = tcp.write_all(request).await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), client::read_response(&mut tcp))
                        .await;
            }
        });
        // Bounded concurrency: the client runs on the same two cores.
        while tasks.len() >= 128 {
            if let Some(Ok(())) = tasks.join_next().await {
                report.malformed_answered_or_closed += 1;
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if done.is_ok() {
            report.malformed_answered_or_closed += 1;
        }
    }
    drop(held);
    report
}

#[test]
fn http2_rapid_reset_is_cut_off_and_others_are_served() {
    let Some(env) = TestEnv::new("rapid-reset") else {
        return;
    };
    let proxy = env.serve(&[]);
    let tls = proxy.tls();
    const ATTEMPTS: usize = 20_000;
    let h2 = tls.clone().alpn(Alpn::H2);
    // Open a stream and cancel it at once, as fast as possible (CVE-2023-44487).
    let (opened, outcome) = env.run(|| async move {
        let conn = client::tls_connect(HTTPS, &h2)
            .await
            .unwrap_or_else(|e| panic!("h2 connect: {e}"));
        let (mut sender, connection) = h2::client::handshake(conn.stream)
            .await
            .expect("h2 handshake");
        let driver = tokio::spawn(connection);
        let mut opened = 0;
        let mut outcome = String::from("never cut off");
        for _ in 0..ATTEMPTS {
            let ready = match sender.clone().ready().await {
                Ok(ready) => ready,
                Err(e) => {
                    outcome = e.to_string();
                    break;
                }
            };
            sender = ready;
            let request = http::Request::get("https://localhost/")
                .body(())
                .expect("request");
            match sender.send_request(request, true) {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    opened += 1;
                }
                Err(e) => {
                    outcome = e.to_string();
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        driver.abort();
        (opened, outcome)
    });
    eprintln!("rapid reset: {opened} streams opened and cancelled before: {outcome}");
    assert!(
        opened < ATTEMPTS,
        "the proxy let {ATTEMPTS} streams be opened and reset on one connection"
    );
    // The proxy is alive and serves everybody else.
    let latencies = well_behaved_latencies(&env, &tls, 5);
    assert_eq!(latencies.len(), 5);
}
