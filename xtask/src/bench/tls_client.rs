//! The bench's own TLS client, for what no load generator here does: connections held open
//! idle, and the connection cap's queue. It
//! trusts only the bench's CA, speaks a minimal HTTP/1.1 (one `GET /`, the answer read to the
//! end of its `content-length`) or h2 (the `h2` crate), and runs on a thread that has entered
//! the contender's namespace and is pinned to the client core, with a single-threaded tokio
//! runtime: one core, as the load generators get.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use nix::{sched::CpuSet, unistd::Pid};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::load::HOST;

/// The name the client sends (SNI and Host) and checks the certificate against.
const SERVER_NAME: &str = "localhost";

/// Longest a connect, a handshake or an answer may take before the client gives up.
pub(super) const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The application protocol the client offers (and requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alpn {
    Http1,
    H2,
}

impl Alpn {
    pub(super) fn key(self) -> &'static str {
        match self {
            Alpn::Http1 => "h1",
            Alpn::H2 => "h2",
        }
    }

    fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"http/1.1",
            Alpn::H2 => b"h2",
        }
    }
}

/// A connector trusting only the CA in `ca_pem`, offering `alpn`; it keeps no session, so
/// every handshake is a full one.
pub(super) fn connector(ca_pem: &Path, alpn: Alpn) -> Result<TlsConnector> {
    let pem = std::fs::read(ca_pem).with_context(|| format!("reading {}", ca_pem.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.context("the CA PEM does not parse")?)?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca_pem.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.id().to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A single-threaded runtime for the calling thread, which it first pins to `cpu`.
pub(super) fn runtime_on(cpu: usize) -> Result<tokio::runtime::Runtime> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("pinning the client thread to CPU {cpu}"))?;
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A TCP connection to port 443 of the namespace's loopback.
pub(super) async fn tcp_connect() -> Result<TcpStream> {
    let tcp = timeout(CLIENT_TIMEOUT, TcpStream::connect((HOST, 443)))
        .await
        .context("TCP connect timed out")?
        .context("TCP connect")?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The TLS handshake over `tcp`; fails unless the server chose the protocol offered.
pub(super) async fn handshake(
    connector: &TlsConnector,
    tcp: TcpStream,
    alpn: Alpn,
) -> Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(SERVER_NAME)?;
    let tls = timeout(CLIENT_TIMEOUT, connector.connect(name, tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let chosen = tls.get_ref().1.alpn_protocol();
    if chosen != Some(alpn.id()) {
        bail!(
            "the server chose ALPN {:?}, not {}",
            chosen.map(String::from_utf8_lossy),
            String::from_utf8_lossy(alpn.id())
        );
    }
    Ok(tls)
}

/// `GET /` over HTTP/1.1 on `tls`, its answer read whole; fails unless it is a 200.
/// `close` asks the server to close the connection after answering.
pub(super) async fn get_h1(tls: &mut TlsStream<TcpStream>, close: bool) -> Result<()> {
    let connection = if close { "connection: close\r\n" } else { "" };
    let request = format!("GET / HTTP/1.1\r\nhost: {SERVER_NAME}\r\n{connection}\r\n");
    timeout(CLIENT_TIMEOUT, async {
        tls.write_all(request.as_bytes()).await?;
        let mut answer = Vec::with_capacity(1024);
        let mut buf = [0; 4096];
        loop {
            if body_missing(&answer)? == Some(0) {
                return Ok(());
            }
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                bail!("the server closed before its answer ended");
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .context("HTTP/1.1 answer timed out")?
}

/// An h2 connection on which one `GET /` was answered 200, kept open: dropping it closes it.
pub(super) struct H2Connection {
    _send: h2::client::SendRequest<bytes::Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for H2Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The h2 handshake over `tls` and one `GET /`, read whole.
pub(super) async fn get_h2(tls: TlsStream<TcpStream>) -> Result<H2Connection> {
    timeout(CLIENT_TIMEOUT, async {
        let (send, connection) = h2::client::handshake(tls).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut send = send.ready().await?;
        let request = http::Request::get(format!("https://{SERVER_NAME}/")).body(())?;
        let (response, _) = send.send_request(request, true)?;
        let response = response.await?;
        if response.status() != 200 {
            bail!("h2 GET / answered {}", response.status());
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
        }
        Ok(H2Connection {
            _send: send,
            driver,
        })
    })
    .await
    .context("h2 answer timed out")?
}

/// How many body bytes are still to come once the head of an HTTP/1.1 answer is in `answer`
/// (`None` while the head is incomplete); fails on a status other than 200 or a head without
/// `content-length`.
fn body_missing(answer: &[u8]) -> Result<Option<usize>> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("answered {status:?}");
    }
    let length: usize = lines
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("an answer without content-length")?;
    let have = answer.len() - end - 4;
    Ok(Some(length.saturating_sub(have)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(answer: &str, expected: Result<Option<usize>, &str>) {
        match (body_missing(answer.as_bytes()), expected) {
            (Ok(a), Ok(e)) => assert_eq!(a, e, "{answer:?}"),
            (Err(a), Err(e)) => assert!(format!("{a:#}").contains(e), "{a:#} lacks {e:?}"),
            (a, e) => panic!("{answer:?}: got {a:?}, expected {e:?}"),
        }
    }

    #[test]
    fn reads_an_answer_to_its_end() {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\ndate: x\r\n\r\n";
        check("HTTP/1.1 200 OK\r\ncontent-len", Ok(None));
        check(head, Ok(Some(10)));
        check(&format!("{head}Hello"), Ok(Some(5)));
        check(&format!("{head}Hello SRE!"), Ok(Some(0)));
        check("HTTP/1.1 421 Misdirected\r\n\r\n", Err("421"));
        check("HTTP/1.1 200 OK\r\n\r\n", Err("content-length"));
    }
}
