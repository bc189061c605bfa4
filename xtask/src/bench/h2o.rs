//! h2o as a peer: found or installed from the distribution (`h2o`), and configured in a
//! temporary directory for exactly the proxy's answer: the same certificate and key files,
//! TLS 1.2 and 1.3, ALPN h2 and http/1.1 (h2o's default), `GET /` → 200 `Hello SRE!` with the
//! proxy's headers, port 80 → 308 to https; one thread, pinned to the server core by the
//! bench; no access log.
//!
//! h2o 2.2 has no directive answering a fixed string: its file handler would add
//! `last-modified`, `etag` and `accept-ranges`, so the answer comes from an mruby handler
//! returning one prebuilt response. Its redirect handler takes a fixed URL, not the request's
//! Host, so the Location names the bench's address (every client here asks for it).

use std::path::{Path, PathBuf};

use super::{install, load::HOST};

const BIN: &str = "/usr/bin/h2o";

/// h2o's binary, installing it when allowed; `None` when it cannot be had.
pub(super) fn find_or_install(allow_install: bool) -> Option<PathBuf> {
    install::find_or_install("h2o", BIN, &["h2o"], "h2o", allow_install)
}

/// What the configuration depends on.
#[derive(Debug, Clone)]
pub(super) struct Settings<'a> {
    /// The directory of the configuration and the error log.
    pub dir: &'a Path,
    /// The proxy's state directory, holding `leaf.pem` and `leaf.key`.
    pub state_dir: &'a Path,
    /// Log `%{ssl.session-reused}x %H` per request to this file (the handshake check), else
    /// no access log.
    pub resumption_log: Option<&'a Path>,
    /// Connections it must hold at once, when above its default 1024.
    pub max_connections: Option<usize>,
    /// Proxy every request to this `HOST:PORT` (HTTP/1.1, kept-alive connections) instead of
    /// answering itself.
    pub upstream: Option<&'a str>,
}

/// The h2o.conf for `settings`.
pub(super) fn config(s: &Settings<'_>) -> String {
    let dir = s.dir.display();
    let state = s.state_dir.display();
    let access_log = match s.resumption_log {
        Some(path) => format!(
            "\naccess-log:\n  path: {}\n  format: \"%{{ssl.session-reused}}x %H\"",
            path.display()
        ),
        None => String::new(),
    };
    let max_connections = s
        .max_connections
        .map_or_else(String::new, |n| format!("\nmax-connections: {n}"));
    let answer = match s.upstream {
        // The security fields are the edge's to add, as the proxy does in upstream mode; h2o
        // takes one field per `header.set`, repeated.
        Some(addr) => format!(
            "        proxy.reverse.url: \"http://{addr}/\"\n\
             {0}\"strict-transport-security: max-age=31536000\"\n\
             {0}\"x-content-type-options: nosniff\"\n\
             {0}\"x-frame-options: DENY\"\n\
             {0}\"referrer-policy: no-referrer\"\n\
             {0}\"content-security-policy: default-src 'none'; frame-ancestors 'none'\"\n",
            "        header.set: "
        ),
        None => STATIC_ANSWER.to_owned(),
    };
    format!(
        r#"# Written by `cargo xtask bench`: the proxy's static answer, certificate and protocols.
num-threads: 1
error-log: {dir}/error.log
send-server-name: OFF
# h2o closes idle connections after 10 s by default; the proxy does not within a run.
http1-request-timeout: 3600
http2-idle-timeout: 3600{max_connections}{access_log}
hosts:
  "plain":
    listen:
      port: 80
    paths:
      "/":
        redirect:
          url: "https://{HOST}/"
          status: 308
  "tls":
    listen:
      port: 443
      ssl:
        certificate-file: {state}/leaf.pem
        key-file: {state}/leaf.key
        minimum-version: TLSv1.2
        # Off: neverbleed signs in a second process, which the proxy and the others do not.
        neverbleed: OFF
        # Off: no OCSP responder to ask, and no helper process beside the server.
        ocsp-update-interval: 0
    paths:
      "/":
{answer}"#
    )
}

/// The static answer: one prebuilt response for `GET /`, 404 for anything else.
const STATIC_ANSWER: &str = r#"        mruby.handler: |
          hello = [200, {"content-type" => "text/plain; charset=utf-8", "content-length" => "10", "strict-transport-security" => "max-age=31536000", "x-content-type-options" => "nosniff", "x-frame-options" => "DENY", "referrer-policy" => "no-referrer", "content-security-policy" => "default-src 'none'; frame-ancestors 'none'"}, ["Hello SRE!"]]
          not_found = [404, {"content-type" => "text/plain; charset=utf-8"}, ["not found\n"]]
          Proc.new do |env|
            env["PATH_INFO"] == "/" ? hello : not_found
          end
"#;

/// `h2o -c DIR/h2o.conf` arguments.
pub(super) fn args(dir: &Path) -> Vec<String> {
    vec!["-c".into(), dir.join("h2o.conf").display().to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configures_the_same_answer() {
        let settings = Settings {
            dir: Path::new("/tmp/b/h2o"),
            state_dir: Path::new("/tmp/b/state"),
            resumption_log: None,
            max_connections: None,
            upstream: None,
        };
        let conf = config(&settings);
        for line in [
            "num-threads: 1",
            "http1-request-timeout: 3600",
            "http2-idle-timeout: 3600",
            "certificate-file: /tmp/b/state/leaf.pem",
            "key-file: /tmp/b/state/leaf.key",
            "minimum-version: TLSv1.2",
            "url: \"https://127.0.0.1/\"",
            "status: 308",
            "\"content-type\" => \"text/plain; charset=utf-8\"",
            "[\"Hello SRE!\"]",
        ] {
            assert!(conf.contains(line), "{line} missing from\n{conf}");
        }
        assert!(!conf.contains("access-log"), "{conf}");
        assert!(!conf.contains("max-connections"), "{conf}");
        let many = config(&Settings {
            max_connections: Some(18_100),
            ..settings.clone()
        });
        assert!(many.contains("\nmax-connections: 18100\n"), "{many}");
        let logging = config(&Settings {
            resumption_log: Some(Path::new("/tmp/b/h2o/r.log")),
            ..settings.clone()
        });
        assert!(
            logging.contains("path: /tmp/b/h2o/r.log\n  format: \"%{ssl.session-reused}x %H\""),
            "{logging}"
        );
        let reverse = config(&Settings {
            upstream: Some("127.0.0.1:8081"),
            ..settings
        });
        assert!(
            reverse
                .contains("      \"/\":\n        proxy.reverse.url: \"http://127.0.0.1:8081/\"\n"),
            "{reverse}"
        );
        assert!(!reverse.contains("Hello SRE!"), "{reverse}");
    }
}
