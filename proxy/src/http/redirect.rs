//! The plain-HTTP listener's only job: answer every request with a 308 to the same host,
//! path and query over HTTPS, for hosts the certificate covers; 400 for a missing or
//! malformed host, 421 for a host we do not serve. A Location is never built from an
//! unvalidated byte of the request.

use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{HOST, HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};

use crate::http::responses::{Body, text};
use crate::names::{ServedName, parse_host_header};

/// What the redirect listener decided for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Redirect to this absolute https URL.
    Redirect(String),
    /// Refuse with this status and plain-text reason.
    Refuse(StatusCode, String),
}

/// Decides the answer for `request`; `serves` says whether a host is on our certificate and
/// `https_port` is the public HTTPS port for the Location.
pub fn decide<B>(
    request: &Request<B>,
    serves: impl Fn(&ServedName) -> bool,
    https_port: u16,
) -> Decision {
    let bad = |reason: String| Decision::Refuse(StatusCode::BAD_REQUEST, reason);
    // An absolute-form request target carries the authority and takes precedence (RFC 9112 3.2.2).
    let host_value = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => {
            let mut hosts = request.headers().get_all(HOST).iter();
            let (Some(value), None) = (hosts.next(), hosts.next()) else {
                return bad("missing or repeated Host header\n".into());
            };
            match value.to_str() {
                Ok(value) => value,
                Err(_) => return bad("Host header is not ASCII\n".into()),
            }
        }
    };
    let host = match parse_host_header(host_value) {
        Ok(host) => host,
        Err(e) => return bad(format!("bad Host header: {e}\n")),
    };
    if !serves(&host) {
        return Decision::Refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this server does not serve {host}\n"),
        );
    }
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    if !path_and_query.starts_with('/') {
        return bad("request target must be a path\n".into());
    }
    // Built in one string: a redirect is the whole work of this listener.
    let mut location = String::with_capacity(64 + path_and_query.len());
    location.push_str("https://");
    host.push_authority_host(&mut location);
    if https_port != 443 {
        let _ = write!(location, ":{https_port}");
    }
    push_percent_encoding_non_ascii(&mut location, path_and_query);
    Decision::Redirect(location)
}

/// Appends the target byte for byte except bytes a URI may not hold raw (RFC 3986:
/// non-ASCII and controls), which are percent-encoded, so that the Location is a valid URI.
fn push_percent_encoding_non_ascii(out: &mut String, target: &str) {
    for byte in target.bytes() {
        if byte.is_ascii_graphic() {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// The HTTP response for a decision.
pub(crate) fn respond(decision: Decision) -> Response<Body> {
    match decision {
        Decision::Redirect(location) => {
            // The body names the Location too; the header shares the body's bytes.
            const SAYS: &str = "redirecting to ";
            let mut body = String::with_capacity(SAYS.len() + location.len() + 1);
            body.push_str(SAYS);
            body.push_str(&location);
            body.push('\n');
            let body = Bytes::from(body);
            match HeaderValue::from_maybe_shared(body.slice(SAYS.len()..body.len() - 1)) {
                Ok(value) => {
                    let mut response = text(StatusCode::PERMANENT_REDIRECT, body);
                    response.headers_mut().insert(LOCATION, value);
                    response
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    "request target cannot be redirected\n",
                ),
            }
        }
        Decision::Refuse(status, reason) => text(status, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(target: &str, host: Option<&str>, port: u16, expected: Result<&str, u16>) {
        let mut builder = Request::builder().uri(target);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        let request = builder.body(()).expect("request");
        let ours = ["localhost", "127.0.0.1", "::1", "*.example.com"]
            .map(|n| ServedName::parse(n).expect("name"));
        let decision = decide(&request, |host| ours.iter().any(|n| n.covers(host)), port);
        match (decision, expected) {
            (Decision::Redirect(location), Ok(want)) => {
                assert_eq!(location, want, "{target} Host {host:?}")
            }
            (Decision::Refuse(status, _), Err(want)) => {
                assert_eq!(status.as_u16(), want, "{target} Host {host:?}")
            }
            (got, want) => panic!("{target} Host {host:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn redirects_keep_host_path_and_query() {
        check("/", Some("localhost"), 443, Ok("https://localhost/"));
        check(
            "/a/b?x=1&y=2",
            Some("localhost"),
            443,
            Ok("https://localhost/a/b?x=1&y=2"),
        );
        check(
            "/%7Euser?q=%20",
            Some("localhost"),
            443,
            Ok("https://localhost/%7Euser?q=%20"),
        );
        check(
            "/caf\u{e9}",
            Some("localhost"),
            443,
            Ok("https://localhost/caf%C3%A9"),
        );
        check("/", Some("LOCALHOST:80"), 443, Ok("https://localhost/"));
        check("/", Some("localhost"), 8443, Ok("https://localhost:8443/"));
        check("/", Some("[::1]:80"), 443, Ok("https://[::1]/"));
        check(
            "/x",
            Some("127.0.0.1"),
            8443,
            Ok("https://127.0.0.1:8443/x"),
        );
        check(
            "/",
            Some("www.example.com"),
            443,
            Ok("https://www.example.com/"),
        );
        check(
            "http://localhost:80/abs?q",
            Some("evil.example"),
            443,
            Ok("https://localhost/abs?q"),
        );
    }

    #[test]
    fn bad_or_foreign_hosts_are_refused() {
        check("/", None, 443, Err(400));
        check("/", Some(""), 443, Err(400));
        check("/", Some("bad host"), 443, Err(400));
        check("/", Some("exa_mple..com"), 443, Err(400));
        check("/", Some("[::1"), 443, Err(400));
        check("/", Some("host:99999"), 443, Err(400));
        check("/", Some("evil.example"), 443, Err(421));
        check("/", Some("example.com"), 443, Err(421));
        check("http://evil.example/", Some("localhost"), 443, Err(421));
        check("*", Some("localhost"), 443, Err(400));
    }

    #[test]
    fn repeated_host_is_refused() {
        let request = Request::builder()
            .uri("/")
            .header(HOST, "localhost")
            .header(HOST, "evil.example")
            .body(())
            .expect("request");
        assert!(matches!(
            decide(&request, |_| true, 443),
            Decision::Refuse(StatusCode::BAD_REQUEST, _)
        ));
    }
}
