//! Hostile clients, the fast subset of the reliability battery: while silent TLS connections,
//! HTTP/2 connections that never send their preface, TLS garbage, thousands of malformed
//! requests on both ports, or a thousand slowloris connections (`slowhttptest`) hammer the
//! proxy, a well-behaved client keeps being served, the proxy does not crash, and its memory
//! stays small. The soak (`PROXY_SOAK=1`) sends ten times as many malformed requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proxy_e2e::client::{self, Alpn, Req};
use proxy_e2e::{
    HTTP, HTTPS, Proxy, TestEnv, require_tool, run_with_timeout, soak, soak_figure, usage,
};
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
const MALFORMED_TOTAL_SOAK: usize = 100_000;
const SLOWLORIS: usize = 1000;
/// The proxy's peak resident memory must stay under this under the whole attack.
const RSS_LIMIT_KIB: u64 = 64 * 1024;
/// Held by the tests that measure a well-behaved client's latency, so that one test's attack
/// (on the same two cores) does not load another's measurement.
static LATENCY_MEASURED: Mutex<()> = Mutex::new(());

#[test]
fn hostile_clients_do_not_stop_a_well_behaved_one() {
    let Some(env) = TestEnv::new("hostile") else {
        return;
    };
    let _alone = LATENCY_MEASURED
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let malformed_total = if soak() {
        MALFORMED_TOTAL_SOAK
    } else {
        MALFORMED_TOTAL
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
        move || async move { attack(tls, attacking, malformed_total).await }
    });
    // The well-behaved client, while the attack runs.
    let started = Instant::now();
    let mut loaded = Vec::new();
    while !attack.is_finished() && started.elapsed() < Duration::from_secs(600) {
        loaded.extend(well_behaved_latencies(&env, &tls, 1));
        // A client at its own pace, not a second load generator.
        std::thread::sleep(Duration::from_millis(100));
    }
    attacking.store(false, Ordering::Release);
    let report = attack.join().expect("the attack thread");
    // And after it.
    loaded.extend(well_behaved_latencies(&env, &tls, 5));

    let peak_kib = peak_rss_kib(&proxy);
    eprintln!(
        "hostile battery: {report}; well-behaved p99 unloaded {:?}, under attack {:?} ({} requests); proxy peak RSS {} KiB",
        p99(&unloaded),
        p99(&loaded),
        loaded.len(),
        peak_kib
    );
    soak_figure(
        "hostile clients",
        &format!(
            "{report}: well-behaved p99 {} ms vs {} ms unloaded ({} requests, 0 failed); peak RSS {:.1} MiB",
            millis(p99(&loaded)),
            millis(p99(&unloaded)),
            loaded.len(),
            peak_kib as f64 / 1024.0
        ),
    );
    assert!(
        report.malformed_answered_or_closed >= malformed_total,
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

/// The proxy's peak resident memory since it started (`VmHWM`); panics if it is gone.
fn peak_rss_kib(proxy: &Proxy) -> u64 {
    usage::memory(proxy.process.pid())
        .map(|memory| memory.peak_kib)
        .unwrap_or_else(|_| panic!("the proxy is gone (crashed?):\n{}", proxy.process.stderr()))
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
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

async fn attack(
    tls: client::TlsOptions,
    attacking: Arc<AtomicBool>,
    malformed_total: usize,
) -> AttackReport {
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
    for i in 0..malformed_total {
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
    soak_figure(
        "HTTP/2 rapid reset",
        &format!("cut off after {opened} cancelled streams: {outcome}"),
    );
    assert!(
        opened < ATTEMPTS,
        "the proxy let {ATTEMPTS} streams be opened and reset on one connection"
    );
    // The proxy is alive and serves everybody else.
    let latencies = well_behaved_latencies(&env, &tls, 5);
    assert_eq!(latencies.len(), 5);
}

/// The proxy's header-read timeout, left at its default: the deadline slowloris runs into.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// However fast the unloaded client is, a p99 under attack within the latency SLO's threshold
/// (monitoring/: 99% of requests under 250 ms) is still fine: on loopback the unloaded p99 is
/// a few milliseconds, and the attack's TLS handshakes share two cores with the client.
const LOADED_P99_FLOOR: Duration = Duration::from_millis(250);

#[test]
fn slowloris_connections_are_closed_at_the_header_deadline_while_others_are_served() {
    let Some(env) = TestEnv::new("slowloris") else {
        return;
    };
    if !require_tool("slowloris", "slowhttptest", "apt-get install slowhttptest") {
        return;
    }
    let _alone = LATENCY_MEASURED
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let proxy = env.serve(&[]);
    let tls = proxy.tls();
    let unloaded = well_behaved_latencies(&env, &tls, 30);

    // 1000 TLS connections at 200 a second, each sending an unfinished request head and then
    // a header line every 5 s. slowhttptest ends by itself once every connection is closed,
    // or at its 60 s limit.
    let report = env.path("slowloris");
    let mut cmd = env.ns.command("slowhttptest");
    cmd.args(["-H", "-c", &SLOWLORIS.to_string(), "-r", "200", "-i", "5"])
        .args([
            "-l",
            "60",
            "-p",
            "3",
            "-u",
            "https://localhost/",
            "-g",
            "-o",
        ])
        .arg(&report);
    let attack = std::thread::spawn(move || run_with_timeout(cmd, Duration::from_secs(120)));
    let started = Instant::now();
    let mut loaded = Vec::new();
    while !attack.is_finished() && started.elapsed() < Duration::from_secs(120) {
        loaded.extend(well_behaved_latencies(&env, &tls, 1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = attack.join().expect("the slowhttptest thread");
    let elapsed = started.elapsed();
    let peak_kib = peak_rss_kib(&proxy);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let csv = std::fs::read_to_string(report.with_extension("csv")).unwrap_or_else(|e| {
        panic!(
            "slowhttptest wrote no report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let seconds = SlowlorisSeconds::parse(&csv);
    let held = seconds.iter().map(|s| s.connected).max().unwrap_or(0);
    // slowhttptest stops when its last connection is closed, before writing that second's
    // line: once it says so, every connection it opened was closed by the proxy.
    let all_closed = stdout.contains("No open connections left");
    let opened = seconds
        .iter()
        .map(|s| s.closed + s.connected)
        .max()
        .unwrap_or(0);
    let closed = if all_closed {
        opened
    } else {
        seconds.last().map_or(0, |s| s.closed)
    };
    let (fastest, slowest) = close_delays(&seconds);
    let (p99_loaded, p99_unloaded) = (p99(&loaded), p99(&unloaded));
    let bound = (p99_unloaded * 2).max(LOADED_P99_FLOOR);
    soak_figure(
        "1000 slowloris connections (slowhttptest -H)",
        &format!(
            "{closed} of {SLOWLORIS} closed by the proxy {fastest}-{slowest} s after connecting \
             (header-read timeout {} s), {held} held at once; well-behaved p99 {} ms vs {} ms \
             unloaded ({} requests, 0 failed); peak RSS {:.1} MiB",
            HEADER_READ_TIMEOUT.as_secs(),
            millis(p99_loaded),
            millis(p99_unloaded),
            loaded.len(),
            peak_kib as f64 / 1024.0
        ),
    );

    assert!(
        all_closed,
        "slowhttptest still had connections open after {elapsed:?}: the proxy did not close \
         them all:\n{stdout}"
    );
    assert!(
        held >= SLOWLORIS * 9 / 10,
        "the attack held only {held} connections at once:\n{csv}"
    );
    assert_eq!(
        closed, SLOWLORIS,
        "not all {SLOWLORIS} slowloris connections were opened and then closed by the proxy:\n{csv}"
    );
    let deadline = HEADER_READ_TIMEOUT.as_secs() + 3;
    assert!(
        slowest <= deadline,
        "slowloris connections were kept up to {slowest} s (header lines trickling in must not \
         extend the {HEADER_READ_TIMEOUT:?} deadline):\n{csv}"
    );
    assert!(
        peak_kib < RSS_LIMIT_KIB,
        "peak RSS {peak_kib} KiB over the {RSS_LIMIT_KIB} KiB limit"
    );
    assert!(
        loaded.len() >= 20,
        "the well-behaved client made only {} requests",
        loaded.len()
    );
    assert!(
        p99_loaded <= bound,
        "well-behaved p99 {p99_loaded:?} under slowloris, over {bound:?} (2x unloaded \
         {p99_unloaded:?}, at least {LOADED_P99_FLOOR:?})"
    );
}

/// One line of slowhttptest's CSV report: connection counts at a second of the test.
#[derive(Debug, Clone, Copy)]
struct SlowlorisSeconds {
    second: u64,
    closed: usize,
    connected: usize,
}

impl SlowlorisSeconds {
    /// Parses `Seconds,Closed,Pending,Connected,Service Available` lines.
    fn parse(csv: &str) -> Vec<SlowlorisSeconds> {
        csv.lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(',').map(str::trim).collect();
                Some(SlowlorisSeconds {
                    second: fields.first()?.parse().ok()?,
                    closed: fields.get(1)?.parse().ok()?,
                    connected: fields.get(3)?.parse().ok()?,
                })
            })
            .collect()
    }
}

/// The shortest and longest time, in whole seconds, from a connection's opening to its close:
/// the n-th connection closed is matched with the n-th connection opened (all hold the same
/// deadline, so they close in the order they opened).
fn close_delays(seconds: &[SlowlorisSeconds]) -> (u64, u64) {
    let opened_by = |count: usize| {
        seconds
            .iter()
            .find(|s| s.closed + s.connected >= count)
            .map_or(0, |s| s.second)
    };
    let mut delays = seconds
        .windows(2)
        .filter(|w| w[1].closed > w[0].closed)
        .flat_map(|w| {
            // The first and the last connection closed during this second.
            [w[0].closed + 1, w[1].closed].map(|n| w[1].second.saturating_sub(opened_by(n)))
        });
    let first = delays.next().unwrap_or(0);
    delays.fold((first, first), |(lo, hi), d| (lo.min(d), hi.max(d)))
}
