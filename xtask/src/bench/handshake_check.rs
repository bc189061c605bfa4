//! Shows, on the servers themselves, that the full-handshake runs are full handshakes and the
//! resumed ones resumed: the proxy (with `PROXY_LOG=rustls=trace`) logs a CertificateVerify
//! only in a full handshake, the peers log per request whether the session was resumed (nginx
//! `$ssl_session_reused`, HAProxy `%[ssl_fc_is_resumed]`, h2o `%{ssl.session-reused}x`).
//! `openssl s_time -new` must give only full handshakes; h2load reconnecting with
//! `Connection: close` is run beside it for contrast (it resumes, which is why the bench does
//! not use it). `openssl s_time -reuse` must resume at least
//! [`resumption::MIN_RESUMED_SHARE`] of its handshakes as the server counts them, as its own
//! marks show in every measured run. Also creates the proxy's state (CA and leaf) that the
//! peers then serve.

use std::fs;

use anyhow::{Context as _, Result, bail};
use proxy_testkit::{NetNs, command};
use serde_json::{Value, json};

use super::{
    measure::Bench,
    report::Contender,
    resumption,
    servers::{Peer, pinned},
};

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
    let client = resumed_run(bench, &ns)?;
    let after_resumption = rustls_handshakes(&read()?);
    drop(server);
    drop(ns);
    let s_time = minus(after_s_time, before);
    let h2load = minus(after_h2load, after_s_time);
    let resumed = minus(after_resumption, after_h2load);
    println!(
        "    proxy: s_time -new: {} full, {} resumed; h2load --h1 with Connection: close: {} full, {} resumed; \
         s_time -reuse: {} full, {} resumed (it marked {} of {} resumed)",
        s_time.0,
        s_time.1,
        h2load.0,
        h2load.1,
        resumed.0,
        resumed.1,
        client.resumed,
        client.handshakes
    );
    let mut result = json!({
        "proxy_rustls_trace": {
            "s_time_new": {"full": s_time.0, "resumed": s_time.1},
            "h2load_h1_connection_close": {"full": h2load.0, "resumed": h2load.1},
            "s_time_reuse": {"full": resumed.0, "resumed": resumed.1},
        },
    });
    if let Some(failure) = judge_resumption("the proxy", &client, resumed)? {
        result["proxy_rustls_trace"]["resumption_failed"] = json!(failure);
    }
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
        let (server, log) = bench.start_peer(
            &ns,
            &Peer {
                contender: peer,
                name: &name,
                resumption_log: true,
                capacity: None,
                upstream: None,
            },
        )?;
        let read =
            || fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()));
        bench.s_time(&ns, 1, 1, "-new")?;
        h2load_reconnecting(&ns, bench)?;
        let before_resumption = read()?.len();
        // The smoke run measures no peer resuming, so it leaves out the proof (a second each).
        let client = if bench.smoke {
            None
        } else {
            Some(resumed_run(bench, &ns)?)
        };
        drop(server);
        let text = read()?;
        let (text, resumption_text) = text.split_at(before_resumption.min(text.len()));
        let client_seen = count_resumption(resumption_text, "HTTP/1.0");
        // s_time sends HTTP/1.0, h2load HTTP/1.1 (the readiness and answer checks use curl
        // with HTTP/1.1 and h2; they are few).
        let (full, resumed) = count_resumption(text, "HTTP/1.0");
        let (h2_full, h2_resumed) = count_resumption(text, "HTTP/1.1");
        let resumption_line = match &client {
            Some(client) => format!(
                "s_time -reuse: {} full, {} resumed (it marked {} of {} resumed)",
                client_seen.0, client_seen.1, client.resumed, client.handshakes
            ),
            None => "resumption not checked (the smoke run measures no peer resuming)".into(),
        };
        println!(
            "    {}: s_time -new: {full} full, {resumed} resumed; \
             h2load --h1 with Connection: close: {h2_full} full, {h2_resumed} resumed; \
             {resumption_line}",
            peer.label(),
        );
        let key = format!("{}_ssl_session_reused", peer.key());
        result[&key] = json!({
            "s_time_new": {"full": full, "resumed": resumed},
            "h2load_h1_connection_close": {"full": h2_full, "resumed": h2_resumed},
        });
        if let Some(client) = &client {
            result[&key]["s_time_reuse"] = json!({"full": client_seen.0, "resumed": client_seen.1});
            if let Some(failure) = judge_resumption(peer.label(), client, client_seen)? {
                result[&key]["resumption_failed"] = json!(failure);
            }
        }
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

/// One `openssl s_time -reuse` for a second.
fn resumed_run(bench: &Bench, ns: &NetNs) -> Result<resumption::Resumptions> {
    bench.s_time(ns, 1, 1, "-reuse")
}

/// Holds s_time's count of resumed handshakes against the server's `(full, resumed)` (which
/// includes s_time's first, full handshake). When both say too few were resumed,
/// that server cannot be measured resuming: the reason, printed loudly, to record. When they
/// disagree, one of the counts is wrong and the bench stops.
fn judge_resumption(
    who: &str,
    client: &resumption::Resumptions,
    (full, resumed): (u64, u64),
) -> Result<Option<String>> {
    let server = resumption::Resumptions {
        handshakes: (full + resumed).saturating_sub(1),
        resumed,
        per_second: 0.0,
    };
    match (
        client.check(who),
        server.check(&format!("{who}, by its own count")),
    ) {
        (Ok(()), Ok(())) => Ok(None),
        (Err(e), Err(_)) => {
            println!("    FAILED: {e:#}; its resumed-handshake line will fail too");
            Ok(Some(format!("{e:#}")))
        }
        (Ok(()), Err(e)) => {
            Err(e.context("s_time marked its handshakes resumed, the server did not"))
        }
        (Err(e), Ok(())) => {
            Err(e.context("the server counted the handshakes resumed, s_time did not"))
        }
    }
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
