//! The answer every contender must give, checked before it is measured, so that all of them
//! do the same work: `GET /` over HTTP/1.1 and over h2 → 200, body `Hello SRE!` and exactly
//! the proxy's static answer's header fields (names and values) apart from [`IGNORED`]; plain
//! HTTP → 308 with the same Location. The redirect's body and its other fields are left free:
//! clients do not read them, and each server words them its own way.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use proxy_testkit::NetNs;

use super::{load::HOST, servers::curl};

/// The fields of the proxy's `GET /` answer (lower-case names, as h2 sends them).
pub(super) const HELLO_FIELDS: [(&str, &str); 7] = [
    ("content-type", "text/plain; charset=utf-8"),
    ("content-length", "10"),
    ("strict-transport-security", "max-age=31536000"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
];

/// Fields a contender may send or not, whatever their value: the time and the server's name
/// change nothing a client does with the answer.
pub(super) const IGNORED: [&str; 2] = ["date", "server"];

/// `connection: keep-alive` on HTTP/1.1 says what 1.1 means anyway; any other value counts.
const IGNORED_CONNECTION: &str = "keep-alive";

/// The body of the proxy's `GET /` answer.
const HELLO: &str = "Hello SRE!";

/// Checks the answer of the server in `ns`; fails listing every difference.
pub(super) fn check(ns: &NetNs) -> Result<()> {
    let mut problems = Vec::new();
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let text = curl(ns, &[flag, "-i"], &format!("https://{HOST}/"))?;
        problems.extend(
            hello_problems(&text, version)
                .into_iter()
                .map(|p| format!("GET / over {version}: {p}")),
        );
    }
    let text = curl(ns, &["-i"], &format!("http://{HOST}/a?b=1"))?;
    problems.extend(
        redirect_problems(&text)
            .into_iter()
            .map(|p| format!("plain HTTP: {p}")),
    );
    if !problems.is_empty() {
        bail!("\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// A response as `curl -i` prints it: the status line's version and code, the fields
/// (lower-case names, in order), the body.
#[derive(Debug, PartialEq)]
struct Response {
    version: String,
    status: String,
    fields: Vec<(String, String)>,
    body: String,
}

fn parse(text: &str) -> Option<Response> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))?;
    let mut lines = head.lines();
    let mut status_line = lines.next()?.split_whitespace();
    let version = status_line.next()?.to_owned();
    let status = status_line.next()?.to_owned();
    let fields = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    Some(Response {
        version,
        status,
        fields,
        body: body.to_owned(),
    })
}

/// What differs from the proxy's `GET /` answer over `version` (`HTTP/1.1`, `HTTP/2`).
fn hello_problems(text: &str, version: &str) -> Vec<String> {
    let Some(response) = parse(text) else {
        return vec![format!("unreadable response {text:?}")];
    };
    let mut problems = Vec::new();
    if response.version != version {
        problems.push(format!("spoke {}", response.version));
    }
    if response.status != "200" {
        problems.push(format!("status {}", response.status));
    }
    if response.body != HELLO {
        problems.push(format!("body {:?}, expected {HELLO:?}", response.body));
    }
    let mut got: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in &response.fields {
        let ignored = IGNORED.contains(&name.as_str())
            || (name == "connection" && value.eq_ignore_ascii_case(IGNORED_CONNECTION));
        if !ignored {
            got.entry(name).or_default().push(value);
        }
    }
    for (name, want) in HELLO_FIELDS {
        match got.remove(name) {
            None => problems.push(format!("- {name}: {want}")),
            Some(values) if values != [want] => {
                problems.push(format!("- {name}: {want}"));
                problems.extend(values.iter().map(|v| format!("+ {name}: {v}")));
            }
            Some(_) => {}
        }
    }
    for (name, values) in got {
        problems.extend(values.iter().map(|v| format!("+ {name}: {v}")));
    }
    problems
}

/// What differs from the proxy's redirect of `http://HOST/a?b=1`: 308 to the same URL over
/// https.
fn redirect_problems(text: &str) -> Vec<String> {
    let Some(response) = parse(text) else {
        return vec![format!("unreadable response {text:?}")];
    };
    let want = format!("https://{HOST}/a?b=1");
    let mut problems = Vec::new();
    if response.status != "308" {
        problems.push(format!("status {}, expected 308", response.status));
    }
    let locations: Vec<&str> = response
        .fields
        .iter()
        .filter(|(name, _)| name == "location")
        .map(|(_, value)| value.as_str())
        .collect();
    if locations != [want.as_str()] {
        problems.push(format!("location {locations:?}, expected {want:?}"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(actual: Vec<String>, expected: &[&str]) {
        assert_eq!(actual, expected);
    }

    const PROXY_H1: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\n\
        strict-transport-security: max-age=31536000\r\nx-content-type-options: nosniff\r\n\
        x-frame-options: DENY\r\nreferrer-policy: no-referrer\r\n\
        content-security-policy: default-src 'none'; frame-ancestors 'none'\r\n\
        content-length: 10\r\ndate: Mon, 30 Nov 2026 19:48:36 GMT\r\n\r\nHello SRE!";

    #[test]
    fn accepts_the_proxy_answer() {
        check(hello_problems(PROXY_H1, "HTTP/1.1"), &[]);
        let h2 = PROXY_H1.replace("HTTP/1.1 200 OK", "HTTP/2 200 ");
        check(hello_problems(&h2, "HTTP/2"), &[]);
        // h2o and nginx capitalise names on HTTP/1.1 and add a keep-alive Connection field.
        let keep_alive = PROXY_H1
            .replace("content-length", "Content-Length")
            .replace(
                "\r\n\r\n",
                "\r\nConnection: keep-alive\r\nServer: h2o\r\n\r\n",
            );
        check(hello_problems(&keep_alive, "HTTP/1.1"), &[]);
    }

    #[test]
    fn lists_every_difference() {
        let other = PROXY_H1
            .replace("text/plain; charset=utf-8", "text/plain")
            .replace("x-frame-options: DENY\r\n", "")
            .replace("\r\n\r\nHello SRE!", "\r\netag: \"1\"\r\n\r\nHello SRE!\n");
        check(
            hello_problems(&other, "HTTP/2"),
            &[
                "spoke HTTP/1.1",
                "body \"Hello SRE!\\n\", expected \"Hello SRE!\"",
                "- content-type: text/plain; charset=utf-8",
                "+ content-type: text/plain",
                "- x-frame-options: DENY",
                "+ etag: \"1\"",
            ],
        );
        let close = PROXY_H1.replace("\r\n\r\n", "\r\nconnection: close\r\n\r\n");
        check(hello_problems(&close, "HTTP/1.1"), &["+ connection: close"]);
        check(
            hello_problems("", "HTTP/1.1"),
            &["unreadable response \"\""],
        );
    }

    #[test]
    fn checks_the_redirect() {
        let ok = "HTTP/1.1 308 Permanent Redirect\r\ncontent-length: 0\r\n\
            location: https://127.0.0.1/a?b=1\r\n\r\n";
        check(redirect_problems(ok), &[]);
        check(
            redirect_problems(&ok.replace("308", "301").replace("/a?b=1", "/")),
            &[
                "status 301, expected 308",
                "location [\"https://127.0.0.1/\"], expected \"https://127.0.0.1/a?b=1\"",
            ],
        );
    }
}
