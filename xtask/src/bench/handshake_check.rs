//! Shows, on the servers themselves, that the handshake runs are full handshakes: the proxy
//! (with `PROXY_LOG=rustls=trace`) logs a CertificateVerify only in a full handshake, the
//! peers log per request whether the session was resumed (nginx `$ssl_session_reused`,
//! HAProxy `%[ssl_fc_is_resumed]`, h2o `%{ssl.session-reused}x`). `openssl s_time -new` must
//! give only full handshakes; h2load reconnecting with `Connection: close` is run beside it
//! for contrast (it resumes, which is why the bench does not use it). Also creates the
//! proxy's state (CA and leaf) that the peers then serve.

use std::fs;

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{NetNs, command};
use serde_json::{Value, json};

use super::{measure::Bench, report::Contender, servers::pinned};

/// Runs the check in fresh namespaces; fails when `s_time -new` was resumed anywhere.
pub(super) fn check(bench: &Bench, fresh_ns: &mut dyn FnMut() -> Result<NetNs>) -> Result<Value> {
    println!("==> checking on the servers that the handshake runs are full handshakes");
    let ns = fresh_ns()?;
    let log = bench.dir.join("proxy-rustls-trace.log");
    let server = bench.start_proxy(&ns, "off", "rustls=trace,warn", &log)?;
    let read = || fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()));
    let before = rustls_handshakes(&read()?);
    bench.s_time(&ns, 1, 1, "-new")?;
    let after_s_time = rustls_handshakes(&read()?);
    h2load_reconnecting(&ns, bench)?;
    let after_h2load = rustls_handshakes(&read()?);
    drop(server);
    drop(ns);
    let s_time = minus(after_s_time, before);
    let h2load = minus(after_h2load, after_s_time);
    println!(
        "    proxy: s_time -new: {} full, {} resumed; h2load --h1 with Connection: close: {} full, {} resumed",
        s_time.0, s_time.1, h2load.0, h2load.1
    );
    let mut result = json!({
        "proxy_rustls_trace": {
            "s_time_new": {"full": s_time.0, "resumed": s_time.1},
            "h2load_h1_connection_close": {"full": h2load.0, "resumed": h2load.1},
        },
    });
    if s_time.0 + s_time.1 == 0 {
        println!("    (no rustls handshake lines in the proxy's trace: cannot tell on the proxy)");
    } else if s_time.1 > 0 {
        bail!(
            "openssl s_time -new resumed {} sessions on the proxy",
            s_time.1
        );
    }

    for peer in Contender::PEERS {
        if !bench.has(peer) {
            continue;
        }
        let ns = fresh_ns()?;
        let name = format!("{}-check", peer.key());
        let (server, log) = bench.start_peer(&ns, peer, &name, true)?;
        bench.s_time(&ns, 1, 1, "-new")?;
        h2load_reconnecting(&ns, bench)?;
        drop(server);
        let text =
            fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        // s_time sends HTTP/1.0, h2load HTTP/1.1 (the readiness and answer checks use curl
        // with HTTP/1.1 and h2; they are few).
        let (full, resumed) = count_resumption(&text, "HTTP/1.0");
        let (h2_full, h2_resumed) = count_resumption(&text, "HTTP/1.1");
        println!(
            "    {}: s_time -new: {full} full, {resumed} resumed; \
             h2load --h1 with Connection: close: {h2_full} full, {h2_resumed} resumed",
            peer.label()
        );
        result[format!("{}_ssl_session_reused", peer.key())] = json!({
            "s_time_new": {"full": full, "resumed": resumed},
            "h2load_h1_connection_close": {"full": h2_full, "resumed": h2_resumed},
        });
        if resumed > 0 || full == 0 {
            bail!(
                "openssl s_time -new resumed {resumed} of {} sessions on {}",
                full + resumed,
                peer.label()
            );
        }
    }
    Ok(result)
}

/// 100 requests over 2 connections that h2load re-opens after each `Connection: close`.
fn h2load_reconnecting(ns: &NetNs, bench: &Bench) -> Result<()> {
    let mut cmd = pinned(ns, bench.client_cpu, "h2load");
    cmd.args(["--h1", "-H", "Connection: close", "-n", "100", "-c", "2"])
        .arg("https://127.0.0.1/");
    command::output(&mut cmd)?;
    Ok(())
}

/// `(full, resumed)` TLS 1.3 handshakes in rustls trace lines: every handshake sends a
/// ServerHello, only a full one a CertificateVerify.
fn rustls_handshakes(log: &str) -> (u64, u64) {
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count() as u64;
    let hellos = count("sending server hello");
    let full = count("sending certificate-verify");
    (full, hellos.saturating_sub(full))
}

/// Full and resumed handshakes of requests made with `protocol` (`HTTP/1.0`, `HTTP/1.1`) in a
/// peer's resumption log: per request, whether the session was resumed first (nginx `r` or
/// `.`, HAProxy and h2o `1` or `0`) and the protocol last.
fn count_resumption(log: &str, protocol: &str) -> (u64, u64) {
    log.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 2 && fields.last() == Some(&protocol))
        .fold((0, 0), |(full, resumed), fields| match fields[0] {
            "r" | "1" => (full, resumed + 1),
            "." | "0" => (full + 1, resumed),
            _ => (full, resumed),
        })
}

fn minus(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(log: &str, expected: (u64, u64)) {
        assert_eq!(rustls_handshakes(log), expected, "{log}");
    }

    #[test]
    fn counts_resumed_handshakes_in_peer_logs() {
        let nginx =
            ". TLSv1.3 HTTP/1.0\nr TLSv1.3 HTTP/1.1\n. TLSv1.3 HTTP/1.0\n\nr TLSv1.3 HTTP/1.1\n";
        assert_eq!(count_resumption(nginx, "HTTP/1.0"), (2, 0));
        assert_eq!(count_resumption(nginx, "HTTP/1.1"), (0, 2));
        let haproxy = "[NOTICE] (1) : New worker (2) forked\n0 HTTP/1.0\n1 HTTP/1.1\n0 HTTP/1.1\n";
        assert_eq!(count_resumption(haproxy, "HTTP/1.0"), (1, 0));
        assert_eq!(count_resumption(haproxy, "HTTP/1.1"), (1, 1));
        assert_eq!(count_resumption("", "HTTP/1.0"), (0, 0));
    }

    #[test]
    fn counts_full_and_resumed_handshakes() {
        let full = "TRACE rustls::server::tls13: sending server hello Message { .. }\n\
            TRACE rustls::server::tls13: sending encrypted extensions ..\n\
            TRACE rustls::server::tls13: sending certificate Message { .. }\n\
            TRACE rustls::server::tls13: sending certificate-verify Message { .. }\n";
        let resumed = "TRACE rustls::server::tls13: sending server hello Message { .. }\n\
            TRACE rustls::server::tls13: sending encrypted extensions ..\n";
        check(full, (1, 0));
        check(resumed, (0, 1));
        check(&[full, resumed, resumed, full].concat(), (2, 2));
        check("", (0, 0));
    }
}
