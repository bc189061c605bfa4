//! HAProxy as a peer: found or installed from the distribution (`haproxy`), and configured in
//! a temporary directory for exactly the proxy's answer: the same leaf certificate and key
//! (HAProxy wants them in one file, so the bench concatenates them), TLS 1.2 and 1.3, ALPN h2
//! and http/1.1, `GET /` → 200 `Hello SRE!` with the proxy's headers (`http-request return`,
//! no backend), port 80 → 308 to https; one thread pinned to the server core; no log.

use std::path::{Path, PathBuf};

use super::install;

const BIN: &str = "/usr/sbin/haproxy";

/// HAProxy's binary, installing it when allowed; `None` when it cannot be had.
pub(super) fn find_or_install(allow_install: bool) -> Option<PathBuf> {
    install::find_or_install("HAProxy", BIN, &["haproxy"], "haproxy", allow_install)
}

/// What the configuration depends on.
#[derive(Debug, Clone)]
pub(super) struct Settings<'a> {
    /// The directory of the configuration, the pid file and the certificate bundle.
    pub dir: &'a Path,
    /// The core the one thread runs on.
    pub cpu: usize,
    /// Log `%[ssl_fc_is_resumed] %HV` per request to standard output (the handshake check),
    /// else no log.
    pub resumption_log: bool,
    /// Connections it must hold at once, when above the usual 4096.
    pub max_connections: Option<usize>,
    /// Proxy every request to this `HOST:PORT` (HTTP/1.1, idle server connections reused by
    /// any request) instead of answering itself.
    pub upstream: Option<&'a str>,
}

/// The certificate bundle's name in the directory: `leaf.pem` then `leaf.key`.
pub(super) const BUNDLE: &str = "leaf-and-key.pem";

/// The haproxy.cfg for `settings`.
pub(super) fn config(s: &Settings<'_>) -> String {
    let dir = s.dir.display();
    let cpu = s.cpu;
    // HAProxy sizes its descriptors at two per connection (one for a backend) and by default
    // refuses to start when the hard limit is lower; these connections need one each (no
    // backend), so many of them are allowed past that check.
    let (maxconn, limits) = match s.max_connections {
        Some(n) => (n, "\n    no strict-limits"),
        None => (4096, ""),
    };
    let (global_log, log) = if s.resumption_log {
        (
            "\n    log stdout format raw local0",
            "\n    log global\n    log-format \"%[ssl_fc_is_resumed] %HV\"",
        )
    } else {
        ("", "")
    };
    let answer = match s.upstream {
        // `http-reuse always`: like the other contenders' pools, any request may take an idle
        // backend connection (HAProxy's default keeps the first request of a client
        // connection on a connection of its own).
        // The security fields are the edge's to add, as the proxy does in upstream mode.
        Some(addr) => format!(
            "    http-response set-header Strict-Transport-Security \"max-age=31536000\"\n    \
             http-response set-header X-Content-Type-Options nosniff\n    \
             http-response set-header X-Frame-Options DENY\n    \
             http-response set-header Referrer-Policy no-referrer\n    \
             http-response set-header Content-Security-Policy \"default-src 'none'; frame-ancestors 'none'\"\n    \
             default_backend app\nbackend app\n    http-reuse always\n    server app {addr}\n"
        ),
        None => STATIC_ANSWER.to_owned(),
    };
    format!(
        r#"# Written by `cargo xtask bench`: the proxy's static answer, certificate and protocols.
global
    nbthread 1
    cpu-map 1/1 {cpu}
    pidfile {dir}/haproxy.pid
    maxconn {maxconn}{limits}
    ssl-default-bind-options ssl-min-ver TLSv1.2{global_log}
defaults
    mode http{log}
    timeout connect 5s
    timeout server 5s
    # Idle and keep-alive limits far above a run: HAProxy must not close connections the
    # proxy keeps (it has no per-connection request limit).
    timeout client 1h
    timeout http-request 1h
    timeout http-keep-alive 1h
frontend plain
    bind :::80 v4v6
    http-request redirect scheme https code 308
frontend tls
    bind :::443 v4v6 ssl crt {dir}/{BUNDLE} alpn h2,http/1.1
{answer}"#
    )
}

/// The static answer: the proxy's `GET /` with its headers (Date and Server aside), 404 for
/// anything else.
const STATIC_ANSWER: &str = r#"    http-request return status 200 content-type "text/plain; charset=utf-8" string "Hello SRE!" hdr Strict-Transport-Security "max-age=31536000" hdr X-Content-Type-Options nosniff hdr X-Frame-Options DENY hdr Referrer-Policy no-referrer hdr Content-Security-Policy "default-src 'none'; frame-ancestors 'none'" if { path / }
    http-request return status 404 content-type "text/plain; charset=utf-8" string "not found"
"#;

/// `haproxy -db -f DIR/haproxy.cfg` arguments: in the foreground, one process (no master).
pub(super) fn args(dir: &Path) -> Vec<String> {
    vec![
        "-db".into(),
        "-f".into(),
        dir.join("haproxy.cfg").display().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configures_the_same_answer() {
        let settings = Settings {
            dir: Path::new("/tmp/b/haproxy"),
            cpu: 2,
            resumption_log: false,
            max_connections: None,
            upstream: None,
        };
        let conf = config(&settings);
        for line in [
            "nbthread 1",
            "maxconn 4096",
            "cpu-map 1/1 2",
            "ssl-min-ver TLSv1.2",
            "timeout client 1h",
            "timeout http-keep-alive 1h",
            "bind :::443 v4v6 ssl crt /tmp/b/haproxy/leaf-and-key.pem alpn h2,http/1.1",
            "string \"Hello SRE!\"",
            "content-type \"text/plain; charset=utf-8\"",
            "http-request redirect scheme https code 308",
        ] {
            assert!(conf.contains(line), "{line} missing from\n{conf}");
        }
        assert!(!conf.contains("log"), "{conf}");
        let many = config(&Settings {
            max_connections: Some(18_100),
            ..settings.clone()
        });
        assert!(
            many.contains("maxconn 18100\n    no strict-limits\n"),
            "{many}"
        );
        assert!(!conf.contains("strict-limits"), "{conf}");
        let logging = config(&Settings {
            resumption_log: true,
            ..settings.clone()
        });
        assert!(
            logging.contains("log-format \"%[ssl_fc_is_resumed] %HV\""),
            "{logging}"
        );
        let reverse = config(&Settings {
            upstream: Some("127.0.0.1:8081"),
            ..settings
        });
        assert!(
            reverse.contains(
                "    default_backend app\nbackend app\n    http-reuse always\n    server app 127.0.0.1:8081\n"
            ),
            "{reverse}"
        );
        assert!(!reverse.contains("Hello SRE!"), "{reverse}");
    }
}
