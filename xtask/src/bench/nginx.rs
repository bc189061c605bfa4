//! nginx as the reference contender: found or installed from the distribution (`nginx-light`,
//! else `nginx`), and configured in a temporary directory for exactly the proxy's answer: the
//! same certificate and key files, TLS 1.2 and 1.3, HTTP/2, `GET /` → 200 `Hello SRE!` as
//! `text/plain; charset=utf-8` with the proxy's security headers, port 80 → 308 to https; one
//! worker process pinned to the server core; no access log. Its own pid, log and temp paths.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use super::install;

const BIN: &str = "/usr/sbin/nginx";

/// nginx's binary, installing it when allowed (Debian 12 has nginx-light; later releases only
/// nginx); `None` when it cannot be had.
pub(super) fn find_or_install(allow_install: bool) -> Option<PathBuf> {
    install::find_or_install(
        "nginx",
        BIN,
        &["nginx-light", "nginx"],
        "nginx",
        allow_install,
    )
}

/// nginx's version from `nginx -v` ("nginx version: nginx/1.22.1", on standard error).
pub(super) fn version(bin: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(bin).arg("-v").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stderr))
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// What the configuration depends on.
#[derive(Debug, Clone)]
pub(super) struct Settings<'a> {
    /// The prefix directory: pid, error log and temp paths go here.
    pub dir: &'a Path,
    /// The proxy's state directory, holding `leaf.pem` and `leaf.key`.
    pub state_dir: &'a Path,
    /// The core the worker runs on.
    pub cpu: usize,
    pub version: (u32, u32, u32),
    /// Log `$ssl_session_reused` per request to this file (the handshake check), else no log.
    pub resumption_log: Option<&'a Path>,
    /// Connections the worker must hold at once, when above the usual 1024.
    pub max_connections: Option<usize>,
    /// Proxy every request to this `HOST:PORT` (HTTP/1.1, a pool of kept-alive connections)
    /// instead of answering itself.
    pub upstream: Option<&'a str>,
}

/// The nginx.conf for `settings`.
pub(super) fn config(s: &Settings<'_>) -> String {
    let dir = s.dir.display();
    let state = s.state_dir.display();
    // `http2 on` replaced `listen ... http2` in 1.25.1.
    let (listen_h2, http2_on) = if s.version >= (1, 25, 1) {
        ("", "\n        http2 on;")
    } else {
        (" http2", "")
    };
    let access_log = match s.resumption_log {
        Some(path) => format!(
            "log_format resumption '$ssl_session_reused $ssl_protocol $server_protocol';\n    \
             access_log {} resumption;",
            path.display()
        ),
        None => "access_log off;".to_owned(),
    };
    let mask = affinity_mask(s.cpu);
    // nginx closes idle keep-alive connections once fewer than a sixteenth of its connections
    // are free (`ngx_drain_connections`), so holding n takes n × 16/15 of them; one
    // descriptor each, plus the listeners and logs.
    let (connections, rlimit) = match s.max_connections {
        Some(n) => {
            let connections = n * 16 / 15 + 1;
            (
                connections,
                format!("\nworker_rlimit_nofile {};", connections + 256),
            )
        }
        None => (1024, String::new()),
    };
    let (upstream, locations) = match s.upstream {
        // The security fields are the edge's to add, as the proxy does in upstream mode;
        // `Connection ""` keeps the upstream connections alive (nginx sends `close` by default).
        Some(addr) => (
            format!(
                "\n    upstream backend {{\n        server {addr};\n        keepalive 256;\n    }}"
            ),
            format!(
                "        location / {{\n{SECURITY_FIELDS}            proxy_pass http://backend;\n            \
                 proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n        }}"
            ),
        ),
        None => (String::new(), STATIC_LOCATIONS.to_owned()),
    };
    format!(
        r#"# Written by `cargo xtask bench`: the proxy's static answer, certificate and protocols.
worker_processes 1;
worker_cpu_affinity {mask};{rlimit}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    {access_log}
    server_tokens off;
    # nginx closes a keep-alive connection (HTTP/1.1 or h2) after 1000 requests by default
    # and idle ones after 75 s; the proxy does neither within a run.
    keepalive_requests 1000000;
    keepalive_timeout 3600s;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;{upstream}
    server {{
        listen 80;
        listen [::]:80;
        return 308 https://$host$request_uri;
    }}
    server {{
        listen 443 ssl{listen_h2};
        listen [::]:443 ssl{listen_h2};{http2_on}
        ssl_certificate {state}/leaf.pem;
        ssl_certificate_key {state}/leaf.key;
        ssl_protocols TLSv1.2 TLSv1.3;
{locations}
    }}
}}
"#
    )
}

/// The security fields of the proxy's answers, added by the server (the backend has none).
macro_rules! security_fields {
    () => {
        r#"            add_header Strict-Transport-Security "max-age=31536000" always;
            add_header X-Content-Type-Options nosniff always;
            add_header X-Frame-Options DENY always;
            add_header Referrer-Policy no-referrer always;
            add_header Content-Security-Policy "default-src 'none'; frame-ancestors 'none'" always;
"#
    };
}
const SECURITY_FIELDS: &str = security_fields!();

/// The static answer: the proxy's `GET /`, its headers, and 404 for anything else.
const STATIC_LOCATIONS: &str = concat!(
    r#"        location = / {
            default_type "text/plain; charset=utf-8";
"#,
    security_fields!(),
    r#"            return 200 "Hello SRE!";
        }
        location / {
            return 404;
        }"#
);

/// `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'` arguments.
pub(super) fn args(dir: &Path) -> Vec<String> {
    let conf = dir.join("nginx.conf");
    vec![
        "-p".into(),
        dir.display().to_string(),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-g".into(),
        "daemon off;".into(),
    ]
}

/// `worker_cpu_affinity`'s bit mask for one core: `1` for 0, `100` for 2.
fn affinity_mask(cpu: usize) -> String {
    format!("1{}", "0".repeat(cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) {
        assert_eq!(actual, expected);
    }

    #[test]
    fn reads_versions() {
        check(
            parse_version("nginx version: nginx/1.22.1\n"),
            Some((1, 22, 1)),
        );
        check(
            parse_version("nginx version: nginx/1.26.3 (Debian)\n"),
            Some((1, 26, 3)),
        );
        check(parse_version("command not found"), None);
    }

    #[test]
    fn masks_one_core() {
        check(affinity_mask(0), "1".to_owned());
        check(affinity_mask(1), "10".to_owned());
        check(affinity_mask(3), "1000".to_owned());
    }

    #[test]
    fn configures_the_same_answer() {
        let settings = Settings {
            dir: Path::new("/tmp/b"),
            state_dir: Path::new("/tmp/b/state"),
            cpu: 1,
            version: (1, 22, 1),
            resumption_log: None,
            max_connections: None,
            upstream: None,
        };
        let conf = config(&settings);
        for line in [
            "worker_processes 1;",
            "worker_cpu_affinity 10;",
            "pid /tmp/b/nginx.pid;",
            "access_log off;",
            "keepalive_requests 1000000;",
            "keepalive_timeout 3600s;",
            "listen 443 ssl http2;",
            "ssl_certificate /tmp/b/state/leaf.pem;",
            "ssl_certificate_key /tmp/b/state/leaf.key;",
            "ssl_protocols TLSv1.2 TLSv1.3;",
            "default_type \"text/plain; charset=utf-8\";",
            "return 200 \"Hello SRE!\";",
            "return 308 https://$host$request_uri;",
        ] {
            assert!(conf.contains(line), "{line} missing from\n{conf}");
        }
        assert!(!conf.contains("http2 on;"), "{conf}");
        assert!(conf.contains("worker_connections 1024;"), "{conf}");
        assert!(!conf.contains("worker_rlimit_nofile"), "{conf}");
        let many = config(&Settings {
            max_connections: Some(18_100),
            ..settings.clone()
        });
        assert!(many.contains("worker_connections 19307;"), "{many}");
        assert!(many.contains("worker_rlimit_nofile 19563;"), "{many}");
        let newer = config(&Settings {
            version: (1, 26, 0),
            resumption_log: Some(Path::new("/tmp/b/r.log")),
            ..settings.clone()
        });
        assert!(newer.contains("listen 443 ssl;\n"), "{newer}");
        assert!(newer.contains("http2 on;"), "{newer}");
        assert!(
            newer.contains("access_log /tmp/b/r.log resumption;"),
            "{newer}"
        );
        assert!(!conf.contains("proxy_pass"), "{conf}");
        let reverse = config(&Settings {
            upstream: Some("127.0.0.1:8081"),
            ..settings
        });
        for line in [
            "upstream backend {\n        server 127.0.0.1:8081;\n        keepalive 256;",
            "proxy_pass http://backend;",
            "proxy_set_header Connection \"\";",
        ] {
            assert!(reverse.contains(line), "{line} missing from\n{reverse}");
        }
        assert!(!reverse.contains("Hello SRE!"), "{reverse}");
    }
}
