//! Host names the proxy serves: parsing them from configuration and from untrusted `Host`
//! headers, and deciding whether a requested host is one of ours.
//!
//! One parser serves both sides, so a name that the certificate covers and a name a client
//! asks for are compared in the same normal form (lowercase, no trailing dot, IPs parsed).

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A DNS name or IP address, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServedName {
    /// A DNS name, lowercase, without a trailing dot; may start with `*.` (wildcard).
    Dns(String),
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
}

/// Why a name or a `Host` header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The input was empty.
    #[error("empty host")]
    Empty,
    /// The DNS name breaks the syntax of RFC 1123 host names.
    #[error("invalid host name {0:?}")]
    InvalidDns(String),
    /// A bracketed IPv6 literal did not parse.
    #[error("invalid IPv6 literal {0:?}")]
    InvalidIpv6(String),
    /// The port after the host is not a number from 1 to 65535.
    #[error("invalid port in {0:?}")]
    InvalidPort(String),
}

impl ServedName {
    /// Parses a configured name: a DNS name (optionally `*.`-wildcard) or a bare IP address.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        if input.is_empty() {
            return Err(NameError::Empty);
        }
        let unbracketed = input
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(input);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let (wildcard, rest) = match input.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, input),
        };
        let dns = normalise_dns(rest)?;
        Ok(Self::Dns(if wildcard { format!("*.{dns}") } else { dns }))
    }

    /// Whether this (possibly wildcard) certificate name covers the requested `host`.
    /// A wildcard matches exactly one leftmost label, as in RFC 6125.
    pub fn covers(&self, host: &ServedName) -> bool {
        match (self, host) {
            (Self::Ip(a), Self::Ip(b)) => a == b,
            (Self::Dns(pattern), Self::Dns(name)) => match pattern.strip_prefix("*.") {
                Some(suffix) => name
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => pattern == name,
            },
            _ => false,
        }
    }

    /// The name as it appears in a URL authority: IPv6 literals in brackets.
    #[cfg(test)]
    pub(crate) fn to_authority_host(&self) -> String {
        let mut host = String::new();
        self.push_authority_host(&mut host);
        host
    }

    /// Appends the name as it appears in a URL authority (IPv6 literals in brackets). The
    /// redirect listener does this per request, so IPv4 skips the formatting machinery.
    pub(crate) fn push_authority_host(&self, out: &mut String) {
        match self {
            Self::Dns(name) => out.push_str(name),
            Self::Ip(IpAddr::V4(v4)) => push_ipv4(out, *v4),
            Self::Ip(IpAddr::V6(v6)) => {
                let _ = write!(out, "[{v6}]");
            }
        }
    }
}

impl fmt::Display for ServedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Dotted decimal, as `Ipv4Addr`'s `Display` writes it.
fn push_ipv4(out: &mut String, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// Parses an untrusted `Host` header value or request authority (`host[:port]`), returning
/// the host. The port, if any, is validated and discarded: redirects use the configured one.
pub fn parse_host_header(value: &str) -> Result<ServedName, NameError> {
    if value.is_empty() {
        return Err(NameError::Empty);
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (literal, after) = rest
            .split_once(']')
            .ok_or_else(|| NameError::InvalidIpv6(value.to_owned()))?;
        let ip: Ipv6Addr = literal
            .parse()
            .map_err(|_| NameError::InvalidIpv6(value.to_owned()))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| NameError::InvalidPort(value.to_owned()))?,
            ),
        };
        (ServedName::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        };
        let name = match host.parse::<Ipv4Addr>() {
            Ok(v4) => ServedName::Ip(IpAddr::V4(v4)),
            Err(_) => ServedName::Dns(normalise_dns(host)?),
        };
        (name, port)
    };
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(NameError::InvalidPort(value.to_owned()));
        }
    }
    Ok(host)
}

/// Lowercases a DNS name, drops one trailing dot and checks RFC 1123 syntax: labels of 1 to
/// 63 letters, digits and inner hyphens, 253 characters in all.
fn normalise_dns(input: &str) -> Result<String, NameError> {
    let invalid = || NameError::InvalidDns(input.to_owned());
    let name = input.strip_suffix('.').unwrap_or(input);
    if name.is_empty() || name.len() > 253 {
        return Err(invalid());
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let well_formed = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !well_formed {
            return Err(invalid());
        }
    }
    // An all-numeric dotted name that failed to parse as IPv4 is not a host name either.
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid());
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_host(input: &str, expected: Result<&str, ()>) {
        let got = parse_host_header(input).map(|n| n.to_authority_host());
        match expected {
            Ok(want) => assert_eq!(got.as_deref(), Ok(want), "input {input:?}"),
            Err(()) => assert!(
                got.is_err(),
                "input {input:?} should be refused, got {got:?}"
            ),
        }
    }

    #[test]
    fn ipv4_hosts_are_written_as_display_writes_them() {
        for octet in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(octet, 0, 255, octet),
                Ipv4Addr::new(10, octet, octet, 9),
            ] {
                let mut written = String::new();
                push_ipv4(&mut written, ip);
                assert_eq!(written, ip.to_string());
            }
        }
    }

    #[test]
    fn host_headers() {
        check_host("localhost", Ok("localhost"));
        check_host("LocalHost.:8080", Ok("localhost"));
        check_host("example.com:443", Ok("example.com"));
        check_host("127.0.0.1", Ok("127.0.0.1"));
        check_host("127.0.0.1:80", Ok("127.0.0.1"));
        check_host("[::1]", Ok("[::1]"));
        check_host("[::1]:80", Ok("[::1]"));
        check_host("[2001:DB8::1]", Ok("[2001:db8::1]"));
        check_host("", Err(()));
        check_host("bad host", Err(()));
        check_host("exa_mple.com", Err(()));
        check_host("a..b", Err(()));
        check_host("-a.com", Err(()));
        check_host("[::1", Err(()));
        check_host("[::1]x", Err(()));
        check_host("::1", Err(()));
        check_host("host:99999", Err(()));
        check_host("host:", Err(()));
        check_host("host:0", Err(()));
        check_host("host:+80", Err(()));
        check_host("user@host", Err(()));
        check_host("256.1.1.1", Err(()));
        check_host("host/path", Err(()));
        check_host(&"a".repeat(64), Err(()));
    }

    fn check_covers(pattern: &str, host: &str, expected: bool) {
        let pattern = ServedName::parse(pattern).expect("pattern parses");
        let host = parse_host_header(host).expect("host parses");
        assert_eq!(pattern.covers(&host), expected, "{pattern} covers {host}");
    }

    #[test]
    fn coverage() {
        check_covers("localhost", "localhost", true);
        check_covers("localhost", "LOCALHOST:443", true);
        check_covers("*.example.com", "www.example.com", true);
        check_covers("*.example.com", "example.com", false);
        check_covers("*.example.com", "a.b.example.com", false);
        check_covers("::1", "[::1]", true);
        check_covers("127.0.0.1", "127.0.0.1:80", true);
        check_covers("localhost", "evil.example", false);
        check_covers("127.0.0.1", "localhost", false);
    }

    #[test]
    fn configured_names() {
        assert_eq!(
            ServedName::parse("[::1]"),
            Ok(ServedName::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(
            ServedName::parse("*.Example.com"),
            Ok(ServedName::Dns("*.example.com".into()))
        );
        assert!(ServedName::parse("exa mple").is_err());
        assert!(ServedName::parse("").is_err());
    }
}
