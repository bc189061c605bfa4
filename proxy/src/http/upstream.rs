//! Upstream mode: forward HTTPS requests to the backing service over a pooled HTTP/1.1
//! client, with `Forwarded`/`X-Forwarded-*` added, hop-by-hop headers removed and deadlines;
//! failures become 502/504 with a plain-text reason and are counted by kind.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::ebpf::KernelObserver;
use crate::error_chain::error_chain;
use crate::http::responses::{Body, text};
use crate::http::upstream_connector::Connector;
use crate::telemetry::metrics::{LabelValue as _, Metrics, UpstreamFailure};

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

/// A pooled client for the configured upstream.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: Client<Connector, Incoming>,
    authority: http::uri::Authority,
    timeout: Duration,
    metrics: Metrics,
}

impl Upstream {
    pub(crate) fn new(
        config: &UpstreamConfig,
        metrics: Metrics,
        kernel: Option<Arc<KernelObserver>>,
    ) -> Self {
        let authority = config
            .uri
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("127.0.0.1:80"));
        // The backend label: `host:port` as configured. Resolved once, here.
        let backend: Arc<str> = authority.as_str().into();
        let addrs = match backend.to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                tracing::warn!(%backend, error = %e, "the upstream's address does not resolve");
                Vec::new()
            }
        };
        if let Some(kernel) = &kernel {
            kernel.set_backends(&[backend.to_string()]);
        }
        let connector = Connector::new(
            backend,
            addrs,
            config.connect_timeout,
            kernel,
            metrics.clone(),
        );
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Upstream {
            client,
            authority,
            timeout: config.timeout,
            metrics,
        }
    }

    /// Forwards `request` from client `peer` and returns the upstream's response, or a
    /// 502/504 explaining why there is none.
    pub(crate) async fn forward(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let original_host = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                request
                    .headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let path_and_query = request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
            .to_owned();
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build();
        let Ok(uri) = uri else {
            return text(
                StatusCode::BAD_REQUEST,
                "request target cannot be forwarded\n",
            );
        };
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        remove_hop_by_hop(headers);
        add_forwarding(headers, peer, original_host.as_deref());

        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, self.client.request(request)).await;
        self.metrics.upstream_request_finished(started.elapsed());
        match outcome {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    UpstreamFailure::Connect
                } else {
                    UpstreamFailure::Protocol
                };
                self.metrics.upstream_failed(kind);
                let kind = kind.as_str();
                tracing::warn!(error = %error_chain(&e), kind, %peer, "upstream request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("upstream unavailable ({kind} error)\n"),
                )
            }
            Err(_) => {
                self.metrics.upstream_failed(UpstreamFailure::Timeout);
                tracing::warn!(timeout = ?self.timeout, %peer, "upstream timed out");
                text(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
            }
        }
    }
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
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

fn add_forwarding(headers: &mut HeaderMap, peer: SocketAddr, host: Option<&str>) {
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
