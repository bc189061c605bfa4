//! Clients as a user would run them: TLS trusting only the proxy's CA with HTTP/1.1 or HTTP/2
//! on top (hyper's client connection API), and raw bytes over TCP ([`raw`]) for port 80 so
//! malformed requests go out exactly as written. All of them must run inside a namespace thread.

pub mod raw;

pub use raw::{RawResp, raw_http, read_request, read_response, read_response_for, wait_closed};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::HTTPS;

/// Upper bound for any single client operation (connect, handshake, request).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

const TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13_AND_12: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Which application protocols the client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// Offer only `http/1.1`.
    H1,
    /// Offer only `h2`.
    H2,
    /// Offer `h2` then `http/1.1` (a browser's choice).
    Both,
    /// Offer nothing (HTTP/1.1 is then spoken).
    None,
}

/// How to set up a TLS connection.
#[derive(Clone)]
pub struct TlsOptions {
    roots: Arc<RootCertStore>,
    /// SNI and the name the certificate is checked against; `localhost` by default.
    pub server_name: String,
    /// Offered ALPN protocols; HTTP/1.1 only by default.
    pub alpn: Alpn,
    /// Offer only TLS 1.2 (default: 1.3 and 1.2).
    pub tls12_only: bool,
}

impl TlsOptions {
    /// Trusts exactly the certificates in `pem` (the proxy's CA).
    pub fn trusting_pem(pem: &[u8]) -> TlsOptions {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.unwrap_or_else(|e| panic!("CA PEM does not parse: {e:?}"));
            roots
                .add(cert)
                .unwrap_or_else(|e| panic!("CA certificate rejected as a trust anchor: {e}"));
        }
        assert!(!roots.is_empty(), "the CA PEM holds no certificate");
        TlsOptions::with_roots(roots)
    }

    /// Trusts exactly `roots` (may be empty, to check that the handshake then fails).
    pub fn with_roots(roots: RootCertStore) -> TlsOptions {
        TlsOptions {
            roots: Arc::new(roots),
            server_name: "localhost".into(),
            alpn: Alpn::H1,
            tls12_only: false,
        }
    }

    /// Offers only TLS 1.2, as an older client would.
    pub fn tls12_only(mut self) -> TlsOptions {
        self.tls12_only = true;
        self
    }

    /// Sets the offered ALPN protocols.
    pub fn alpn(mut self, alpn: Alpn) -> TlsOptions {
        self.alpn = alpn;
        self
    }

    /// Sets SNI and the name the certificate must carry.
    pub fn server_name(mut self, name: &str) -> TlsOptions {
        self.server_name = name.into();
        self
    }

    fn config(&self) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(if self.tls12_only {
                TLS12_ONLY
            } else {
                TLS13_AND_12
            })
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = match self.alpn {
            Alpn::H1 => vec![b"http/1.1".to_vec()],
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::None => vec![],
        };
        Arc::new(config)
    }
}

/// What the handshake negotiated.
#[derive(Clone, Debug, Default)]
pub struct TlsInfo {
    /// The negotiated ALPN protocol, e.g. `h2`.
    pub alpn: Option<String>,
    /// The negotiated TLS version.
    pub version: Option<ProtocolVersion>,
    /// The served leaf certificate's serial number, colon separated hex.
    pub serial: String,
}

/// A completed TLS connection.
pub struct TlsConn {
    /// The stream, for tests that speak raw bytes over it.
    pub stream: TlsStream<TcpStream>,
    /// What was negotiated.
    pub info: TlsInfo,
}

/// A request to send over a [`TlsConn`].
#[derive(Clone, Debug)]
pub struct Req {
    /// The method.
    pub method: Method,
    /// Origin-form path and query.
    pub path: String,
    /// Host header (HTTP/1.1) or `:authority` (HTTP/2).
    pub host: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Req {
    /// A request with `method` for `path` at host `localhost`.
    pub fn new(method: Method, path: &str) -> Req {
        Req {
            method,
            path: path.into(),
            host: "localhost".into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// `GET path`.
    pub fn get(path: &str) -> Req {
        Req::new(Method::GET, path)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = body.into();
        self
    }

    fn build(&self, h2: bool) -> Result<http::Request<Full<Bytes>>, String> {
        let uri = if h2 {
            format!("https://{}{}", self.host, self.path)
        } else {
            self.path.clone()
        };
        let mut builder = http::Request::builder()
            .method(self.method.clone())
            .uri(uri);
        if !h2 {
            builder = builder.header(http::header::HOST, &self.host);
        }
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(self.body.clone()))
            .map_err(|e| format!("building the request: {e}"))
    }
}

/// A response, with what the TLS handshake negotiated.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// HTTP version of the response.
    pub version: http::Version,
    /// The TLS session it came over.
    pub tls: TlsInfo,
}

impl Resp {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects to `addr` (an IP literal and port) and completes a TLS handshake.
pub async fn tls_connect(addr: &str, opts: &TlsOptions) -> Result<TlsConn, String> {
    let tcp = timeout(CLIENT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("TCP connect to {addr} timed out"))?
        .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
    tls_over(tcp, opts).await
}

/// Completes a TLS handshake over an already connected socket.
pub async fn tls_over(tcp: TcpStream, opts: &TlsOptions) -> Result<TlsConn, String> {
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(opts.server_name.clone())
        .map_err(|e| format!("bad server name {:?}: {e}", opts.server_name))?;
    let stream = timeout(
        CLIENT_TIMEOUT,
        TlsConnector::from(opts.config()).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (_, conn) = stream.get_ref();
    let info = TlsInfo {
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        version: conn.protocol_version(),
        serial: conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(serial_of)
            .unwrap_or_default(),
    };
    Ok(TlsConn { stream, info })
}

/// Sends one request over `conn` (HTTP/2 if `h2` was negotiated, else HTTP/1.1) and reads the
/// whole response.
pub async fn send(conn: TlsConn, req: Req) -> Result<Resp, String> {
    timeout(CLIENT_TIMEOUT, send_inner(conn, req))
        .await
        .map_err(|_| format!("no complete response within {CLIENT_TIMEOUT:?}"))?
}

async fn send_inner(conn: TlsConn, req: Req) -> Result<Resp, String> {
    let TlsConn { stream, info } = conn;
    let response = request_over(stream, &info, &req).await?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the body of {} {}: {e}", req.method, req.path))?
        .to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
        version: parts.version,
        tls: info,
    })
}

/// Sends `req` over `stream` (HTTP/2 if `info` says h2 was negotiated, else HTTP/1.1) and
/// returns the response with its body still to read.
async fn request_over(
    stream: TlsStream<TcpStream>,
    info: &TlsInfo,
    req: &Req,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let io = TokioIo::new(stream);
    let h2 = info.alpn.as_deref() == Some("h2");
    let request = req.build(h2)?;
    if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(connection);
        sender.send_request(request).await
    }
    .map_err(|e| format!("{} {}: {e:?}", req.method, req.path))
}

/// A new TLS connection to the proxy's HTTPS port and one request over it.
pub async fn https(opts: &TlsOptions, req: Req) -> Result<Resp, String> {
    let conn = tls_connect(HTTPS, opts).await?;
    send(conn, req).await
}

/// The serial number of a DER certificate, colon separated hex.
pub fn serial_of(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .unwrap_or_else(|e| panic!("the served certificate does not parse: {e}"));
    cert.raw_serial_as_string()
}

/// A response as far as it came: its head, the body bytes that arrived, and how the body
/// ended (`Err` for a broken transfer: HTTP/1.1 closed short of its length or last chunk,
/// HTTP/2 reset).
#[derive(Debug)]
pub struct Streamed {
    /// Status code.
    pub status: StatusCode,
    /// Body bytes received before the end.
    pub received: usize,
    /// How the body ended.
    pub end: Result<(), String>,
    /// From sending the request to the end of the body.
    pub elapsed: std::time::Duration,
}

/// Sends `req` over a new TLS connection and reads the response as far as it comes, without
/// treating a broken body as a failed request.
pub async fn https_streamed(opts: &TlsOptions, req: Req) -> Result<Streamed, String> {
    let conn = tls_connect(HTTPS, opts).await?;
    let started = std::time::Instant::now();
    let TlsConn { stream, info } = conn;
    let response = timeout(CLIENT_TIMEOUT, request_over(stream, &info, &req))
        .await
        .map_err(|_| format!("no response head within {CLIENT_TIMEOUT:?}"))??;
    let status = response.status();
    let mut body = response.into_body();
    let mut received = 0;
    let end = timeout(CLIENT_TIMEOUT, async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => received += frame.data_ref().map_or(0, Bytes::len),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| format!("the body did not end within {CLIENT_TIMEOUT:?}"))?;
    Ok(Streamed {
        status,
        received,
        end,
        elapsed: started.elapsed(),
    })
}
