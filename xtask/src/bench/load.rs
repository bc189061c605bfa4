//! The load generators and what they print: `wrk` for HTTP/1.1 keep-alive and the plain-HTTP
//! redirect, `h2load` for multiplexed HTTP/2, `openssl s_time` for full (`-new`) and resumed
//! (`-reuse`) TLS handshakes.
//! Building each command line and parsing its report are pure, so they are unit-tested here;
//! running them (inside a namespace, pinned to the client core) is the caller's job.
//!
//! Full handshakes: `wrk` and `h2load` both resume TLS sessions on reconnect without saying
//! so (`wrk` keeps the session across `SSL_clear`, `h2load` reuses its `SSL` object after a
//! clean shutdown), so neither measures a full handshake with `Connection: close`.
//! `openssl s_time -new` builds a fresh `SSL` with no session for every connection: each
//! connection is a full handshake and one `GET / HTTP/1.0`.
//!
//! Resumed handshakes: `openssl s_time -reuse` keeps one `SSL` object and offers, on each
//! connection, the session of the newest ticket the server sent, so it resumes TLS 1.3 against
//! a server that honours each ticket once and sends fresh ones (rustls, the proxy's TLS). h2o
//! 2.2 sends no new ticket after a resumed handshake, and s_time then offers the same ticket
//! again, which h2o accepts; a client that uses each ticket once (rustls, browsers) resumes
//! only two connections in three against it. s_time prints a mark per connection, `r` for a
//! resumed one, so its report proves what each run did.

use anyhow::{Context as _, Result, bail};

/// The address every client targets inside the contender's namespace.
pub(super) const HOST: &str = "127.0.0.1";

/// What a throughput run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Throughput {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second over the measured period.
    pub rps: f64,
    /// Median latency in milliseconds (wrk only).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds (wrk only).
    pub p99_ms: Option<f64>,
    /// Socket errors, non-2xx/3xx answers, failed or timed-out requests.
    pub errors: u64,
}

/// `wrk` arguments: one thread (one client core), `connections` keep-alive connections.
pub(super) fn wrk_args(url: &str, connections: usize, seconds: u64) -> Vec<String> {
    vec![
        "-t1".into(),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".into(),
        url.into(),
    ]
}

/// `h2load` arguments: one thread, `clients` connections with `streams` concurrent streams
/// each, `warm_up` seconds of warm-up (if any) then `seconds` measured.
pub(super) fn h2load_args(
    url: &str,
    clients: usize,
    streams: usize,
    warm_up: u64,
    seconds: u64,
) -> Vec<String> {
    let mut args = vec!["-t1".into(), format!("-c{clients}"), format!("-m{streams}")];
    if warm_up > 0 {
        args.push(format!("--warm-up-time={warm_up}"));
    }
    args.extend([format!("-D{seconds}"), url.into()]);
    args
}

/// What an `openssl s_time` run reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct STime {
    /// Connections completed.
    pub connections: u64,
    /// Response bytes read per connection.
    pub bytes_per_connection: u64,
    /// Connections whose handshake resumed a session (marked `r`).
    pub resumed: u64,
}

/// `openssl s_time` arguments: with `mode` `-new` a new session for every connection, with
/// `-reuse` the last one resumed; each connection fetches `/`.
pub(super) fn s_time_args(mode: &str, seconds: u64) -> Vec<String> {
    vec![
        "s_time".into(),
        "-connect".into(),
        format!("{HOST}:443"),
        mode.into(),
        "-www".into(),
        "/".into(),
        "-time".into(),
        seconds.to_string(),
    ]
}

/// Reads `wrk --latency` output.
pub(super) fn parse_wrk(out: &str) -> Result<Throughput> {
    let rps = value_after(out, "Requests/sec:").context("no `Requests/sec:` line")?;
    let requests = out
        .lines()
        .find_map(|line| {
            let (count, rest) = line.trim().split_once(' ')?;
            rest.starts_with("requests in")
                .then(|| count.parse().ok())?
        })
        .context("no `N requests in` line")?;
    let percentile = |p: &str| {
        out.lines().find_map(|line| {
            let (key, value) = line.trim().split_once(char::is_whitespace)?;
            (key == p).then(|| duration_ms(value.trim()))?
        })
    };
    let mut errors = 0;
    if let Some(line) = out.lines().find(|l| l.trim().starts_with("Socket errors:")) {
        // "Socket errors: connect 0, read 12, write 0, timeout 0"
        errors += line
            .split(',')
            .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(n) = value_after(out, "Non-2xx or 3xx responses:") {
        errors += n as u64;
    }
    Ok(Throughput {
        requests,
        rps,
        p50_ms: Some(percentile("50%").context("no 50% latency")?),
        p99_ms: Some(percentile("99%").context("no 99% latency")?),
        errors,
    })
}

/// Reads `h2load` output; fails unless the connections spoke HTTP/2.
pub(super) fn parse_h2load(out: &str) -> Result<Throughput> {
    let protocol = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("Application protocol:"))
        .map(str::trim);
    if protocol != Some("h2") {
        bail!("h2load did not negotiate h2 (application protocol: {protocol:?})");
    }
    // "finished in 10.00s, 123456.70 req/s, 4.50MB/s"
    let rps = out
        .lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix("finished in ")?;
            let field = rest.split(", ").find(|f| f.ends_with(" req/s"))?;
            field.trim_end_matches(" req/s").parse().ok()
        })
        .context("no `finished in ... req/s` line")?;
    // "requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, 0 errored, 0 timeout"
    let line = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("requests:"))
        .context("no `requests:` line")?;
    let count = |name: &str| {
        line.split(',').find_map(|part| {
            let (n, what) = part.trim().split_once(' ')?;
            (what == name).then(|| n.parse::<u64>().ok())?
        })
    };
    Ok(Throughput {
        requests: count("succeeded").context("no succeeded count")?,
        rps,
        p50_ms: None,
        p99_ms: None,
        errors: ["failed", "errored", "timeout"]
            .iter()
            .filter_map(|name| count(name))
            .sum(),
    })
}

/// Reads `openssl s_time` output: the connections completed and the bytes read per
/// connection, from "1524 connections in 3 real seconds, 168 bytes read per connection", and
/// the resumed ones from the marks it prints per connection (`r` resumed; `*`, `t` or `3` a
/// new session by TLS version).
pub(super) fn parse_s_time(out: &str) -> Result<STime> {
    let line = out
        .lines()
        .find(|line| line.contains(" real seconds"))
        .context("no `N connections in T real seconds` line")?;
    let connections = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("unreadable connection count")?;
    let bytes = line
        .split(", ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let resumed = out
        .lines()
        .filter(|line| !line.is_empty() && line.chars().all(|c| "r*t3".contains(c)))
        .map(|line| line.matches('r').count() as u64)
        .sum();
    Ok(STime {
        connections,
        bytes_per_connection: bytes,
        resumed,
    })
}

/// The number after `key` on the first line containing it.
fn value_after(out: &str, key: &str) -> Option<f64> {
    out.lines().find_map(|line| {
        let (_, rest) = line.split_once(key)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A wrk duration (`668.00us`, `12.47ms`, `1.02s`, `2.00m`) in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1e3),
        "ms" => Some(number),
        "s" => Some(number * 1e3),
        "m" => Some(number * 60e3),
        "h" => Some(number * 3600e3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ https://127.0.0.1/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms    2.78ms  26.82ms   86.48%
    Req/Sec    42.00k    16.68k   98.76k    83.33%
  Latency Distribution
     50%  668.00us
     75%    2.91ms
     90%    5.84ms
     99%   12.47ms
  125710 requests in 3.02s, 39.20MB read
Requests/sec:  41691.89
Transfer/sec:     13.00MB
";

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 1s of warm-up time and 3s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 98765.43 req/s, 3.10MB/s
requests: 296296 total, 296800 started, 296296 done, 296290 succeeded, 4 failed, 2 errored, 0 timeout
status codes: 296290 2xx, 0 3xx, 0 4xx, 0 5xx
";

    fn check<T: PartialEq + std::fmt::Debug>(actual: Result<T>, expected: Result<T, &str>) {
        match (actual, expected) {
            (Ok(a), Ok(e)) => assert_eq!(a, e),
            (Err(a), Err(e)) => assert!(format!("{a:#}").contains(e), "{a:#} lacks {e:?}"),
            (a, e) => panic!("got {a:?}, expected {e:?}"),
        }
    }

    #[test]
    fn parses_wrk() {
        check(
            parse_wrk(WRK),
            Ok(Throughput {
                requests: 125_710,
                rps: 41_691.89,
                p50_ms: Some(0.668),
                p99_ms: Some(12.47),
                errors: 0,
            }),
        );
        let with_errors = WRK.replace(
            "Requests/sec:",
            "  Socket errors: connect 1, read 12, write 0, timeout 3\n  \
             Non-2xx or 3xx responses: 5\nRequests/sec:",
        );
        check(
            parse_wrk(&with_errors).map(|t| t.errors),
            Ok(1 + 12 + 3 + 5),
        );
        check(
            parse_wrk(&WRK.replace("     99%   12.47ms", "     99%    1.50s")).map(|t| t.p99_ms),
            Ok(Some(1500.0)),
        );
        check(
            parse_wrk("unable to connect to 127.0.0.1:443 Connection refused"),
            Err("Requests/sec"),
        );
        check(
            parse_wrk(&WRK.replace("     99%   12.47ms\n", "")),
            Err("no 99% latency"),
        );
    }

    #[test]
    fn parses_h2load() {
        check(
            parse_h2load(H2LOAD),
            Ok(Throughput {
                requests: 296_290,
                rps: 98_765.43,
                p50_ms: None,
                p99_ms: None,
                errors: 6,
            }),
        );
        check(
            parse_h2load(&H2LOAD.replace("protocol: h2", "protocol: http/1.1")),
            Err("did not negotiate h2"),
        );
        check(
            parse_h2load("starting benchmark...\nNo protocol negotiated. Aborted.\n"),
            Err("did not negotiate h2"),
        );
    }

    #[test]
    fn parses_s_time() {
        let s_time = |connections, bytes_per_connection, resumed| STime {
            connections,
            bytes_per_connection,
            resumed,
        };
        let out = "Collecting connection statistics for 2 seconds\n*****\n\n\
            5 connections in 0.76s; 2005.26 connections/user sec, bytes read 840\n\
            5 connections in 3 real seconds, 168 bytes read per connection\n";
        check(parse_s_time(out), Ok(s_time(5, 168, 0)));
        let reuse = "\n\nNow timing with session id reuse.\nstarting\nrrr*r\n\n\
            5 connections in 0.01s; 500.00 connections/user sec, bytes read 1635\n\
            5 connections in 1 real seconds, 327 bytes read per connection\n";
        check(parse_s_time(reuse), Ok(s_time(5, 327, 4)));
        check(
            parse_s_time("0 connections in 2 real seconds, 0 bytes read per connection"),
            Ok(s_time(0, 0, 0)),
        );
        check(
            parse_s_time("connect: Connection refused"),
            Err("real seconds"),
        );
    }

    #[test]
    fn reads_wrk_durations() {
        for (text, expected) in [
            ("668.00us", Some(0.668)),
            ("12.47ms", Some(12.47)),
            ("1.50s", Some(1500.0)),
            ("2.00m", Some(120_000.0)),
            ("12.47", None),
            ("fast", None),
        ] {
            assert_eq!(duration_ms(text), expected, "{text}");
        }
    }

    #[test]
    fn builds_command_lines() {
        assert_eq!(
            wrk_args("https://127.0.0.1/", 64, 8).join(" "),
            "-t1 -c64 -d8s --latency https://127.0.0.1/"
        );
        assert_eq!(
            h2load_args("https://127.0.0.1/", 16, 32, 1, 8).join(" "),
            "-t1 -c16 -m32 --warm-up-time=1 -D8 https://127.0.0.1/"
        );
        assert_eq!(
            h2load_args("https://127.0.0.1/", 50, 10, 0, 1).join(" "),
            "-t1 -c50 -m10 -D1 https://127.0.0.1/"
        );
        assert_eq!(
            s_time_args("-new", 8).join(" "),
            "s_time -connect 127.0.0.1:443 -new -www / -time 8"
        );
        assert_eq!(
            s_time_args("-reuse", 2).join(" "),
            "s_time -connect 127.0.0.1:443 -reuse -www / -time 2"
        );
    }
}
