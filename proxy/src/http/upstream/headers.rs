//! What a proxy changes in the headers it forwards: hop-by-hop headers removed (both ways),
//! `Forwarded` and `X-Forwarded-*` added for the backend.

use std::net::SocketAddr;

use http::header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
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
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // Framing is the client's business; hyper sets it for the next hop.
    headers.remove(http::header::TRANSFER_ENCODING);
}

pub(super) fn add_forwarding(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&str>) {
    let ip = peer.ip().to_canonical();
    let for_node = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let mut forwarded = format!("for={for_node};proto=https");
    if let Some(host) = host {
        forwarded.push_str(&format!(";host=\"{host}\""));
        if let Ok(value) = HeaderValue::from_str(host) {
            headers.insert("x-forwarded-host", value.clone());
            if !headers.contains_key(HOST) {
                headers.insert(HOST, value);
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.append("forwarded", value);
    }
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
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
        add_forwarding(
            &mut headers,
            "[::1]:5000".parse().expect("addr"),
            Some("localhost"),
        );
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
}
