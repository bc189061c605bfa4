//! What a proxy changes in the headers it forwards: hop-by-hop headers removed (both ways),
//! `Forwarded` and `X-Forwarded-*` added for the backend.
//!
//! This runs on every proxied request, so header names are constants (no parsing) and the
//! client's address is written out once per connection ([`ClientAddress`]).

use std::net::{IpAddr, SocketAddr};

use http::header::{
    CONNECTION, FORWARDED, HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    UPGRADE,
];

/// A client's address as the forwarding headers write it, made once per connection.
#[derive(Debug)]
pub(crate) struct ClientAddress {
    pub(crate) peer: SocketAddr,
    /// The address alone, as `X-Forwarded-For` lists it.
    ip: HeaderValue,
    /// `Forwarded`'s node: IPv6 quoted in brackets (RFC 7239 6).
    node: String,
}

impl ClientAddress {
    pub(crate) fn new(peer: SocketAddr) -> Self {
        let ip = peer.ip().to_canonical();
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V6(_) => format!("\"[{text}]\""),
            IpAddr::V4(_) => text.clone(),
        };
        ClientAddress {
            peer,
            ip: HeaderValue::from_str(&text)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            node,
        }
    }
}

pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (compared as constants, not
    // hashed) spares the removals.
    if !headers
        .keys()
        .any(|name| *name == TRANSFER_ENCODING || HOP_BY_HOP.contains(name))
    {
        return;
    }
    // Headers named by Connection are hop-by-hop too.
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // Framing is the client's business; hyper sets it for the next hop.
    headers.remove(TRANSFER_ENCODING);
}

pub(super) fn add_forwarding(headers: &mut HeaderMap, client: &ClientAddress, host: Option<&str>) {
    let mut forwarded = String::with_capacity(32 + host.map_or(0, str::len));
    forwarded.push_str("for=");
    forwarded.push_str(&client.node);
    forwarded.push_str(";proto=https");
    if let Some(host) = host {
        forwarded.push_str(";host=\"");
        // A quoted-string (RFC 9110 5.6.4): the client's Host is not validated, so a quote
        // or backslash in it is escaped rather than allowed to end the string early.
        for c in host.chars() {
            if matches!(c, '"' | '\\') {
                forwarded.push('\\');
            }
            forwarded.push(c);
        }
        forwarded.push('"');
        if let Ok(value) = HeaderValue::from_str(host) {
            headers.insert(X_FORWARDED_HOST, value.clone());
            if !headers.contains_key(HOST) {
                headers.insert(HOST, value);
            }
        }
    }
    if let Ok(value) = HeaderValue::try_from(forwarded) {
        headers.append(FORWARDED, value);
    }
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => {
            let ip = client.ip.as_bytes();
            let mut list = Vec::with_capacity(existing.len() + 2 + ip.len());
            list.extend_from_slice(existing.as_bytes());
            list.extend_from_slice(b", ");
            list.extend_from_slice(ip);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(list)).ok()
        }
        None => Some(client.ip.clone()),
    };
    if let Some(value) = xff {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_forwarding_added() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut headers);
        let client = ClientAddress::new("[::1]:5000".parse().expect("addr"));
        add_forwarding(&mut headers, &client, Some("localhost"));
        assert!(headers.get("x-secret").is_none());
        assert!(headers.get(CONNECTION).is_none());
        assert!(headers.get("keep-alive").is_none());
        assert_eq!(headers["accept"], "*/*");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "localhost");
        assert_eq!(
            headers["forwarded"],
            "for=\"[::1]\";proto=https;host=\"localhost\""
        );
        assert_eq!(headers[HOST], "localhost");
    }

    #[test]
    fn each_hop_by_hop_header_is_removed_alone() {
        for name in HOP_BY_HOP.iter().chain([&TRANSFER_ENCODING]) {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), HeaderValue::from_static("x"));
            headers.insert("accept", HeaderValue::from_static("*/*"));
            remove_hop_by_hop(&mut headers);
            assert!(headers.get(name).is_none(), "{name} was forwarded");
            assert_eq!(headers["accept"], "*/*");
        }
    }

    #[test]
    fn a_quote_in_the_host_cannot_end_the_forwarded_host_early() {
        let mut headers = HeaderMap::new();
        let client = ClientAddress::new("10.1.2.3:5000".parse().expect("addr"));
        add_forwarding(&mut headers, &client, Some(r#"a";for=evil\"#));
        assert_eq!(
            headers["forwarded"],
            r#"for=10.1.2.3;proto=https;host="a\";for=evil\\""#
        );
    }

    #[test]
    fn a_first_hop_client_is_listed_alone_with_its_plain_address() {
        let mut headers = HeaderMap::new();
        let client = ClientAddress::new("[::ffff:10.1.2.3]:5000".parse().expect("addr"));
        add_forwarding(&mut headers, &client, None);
        assert_eq!(headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(headers["forwarded"], "for=10.1.2.3;proto=https");
        assert!(headers.get(HOST).is_none());
        assert!(headers.get("x-forwarded-host").is_none());
    }
}
