//! The connections to one backend: HTTP/1.1 over hyper's connection API, opened by the
//! [`Connector`] and kept alive for the next request.
//!
//! A request takes the connection that went idle last (its socket is the warmest, and the
//! others age out), or opens one. A connection goes back to the idle list when its response
//! body has ended, from the request's own task: no task is spawned and no key is hashed per
//! request, which hyper-util's general-purpose pool does. A response body dropped before its
//! end closes its connection (HTTP/1.1 cannot skip the rest). At most [`MAX_IDLE`]
//! connections wait idle; one idle longer than [`IDLE_TIMEOUT`] is closed.
//!
//! A request that finds its reused connection closed before a byte of it was written (the
//! backend closed the idle connection at the same moment) is sent on the next connection, as
//! any keep-alive client must; on a fresh connection that is an error for the caller.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};

use super::body::RequestBody;
use super::connector::{Connector, UpstreamConnection, UpstreamStream};

/// Idle connections kept per backend; a connection coming back to a full list is closed.
const MAX_IDLE: usize = 256;

/// How long a connection may wait idle before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often idle connections past their time are looked for (besides at every return).
const REAP_INTERVAL: Duration = Duration::from_secs(10);

/// The HTTP/1.1 client of one backend.
pub(crate) struct BackendClient {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    http1: http1::Builder,
    /// Oldest first: requests take from the end.
    idle: Mutex<Vec<IdleConnection>>,
}

struct IdleConnection {
    sender: SendRequest<RequestBody>,
    connection: UpstreamConnection,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be opened.
    #[error("connecting to the backend")]
    Connect(#[source] std::io::Error),
    /// The connection opened but the HTTP/1.1 handshake failed.
    #[error("starting HTTP/1.1 on a new connection")]
    Handshake(#[source] hyper::Error),
    /// Not a byte of the request was written: the fresh connection closed first.
    #[error("the connection closed before the request was sent")]
    Unsent(#[source] hyper::Error),
    /// The request was (at least partly) written; the response failed.
    #[error("sending the request or reading the response")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    /// Whether no connection to the backend could be made.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Handshake(_))
    }

    /// Whether the request certainly never reached the backend.
    pub(crate) fn is_unsent(&self) -> bool {
        !matches!(self, SendError::Exchange(_))
    }
}

impl BackendClient {
    /// A client with no connection yet; `max_buf_size` bounds each connection's read buffer.
    pub(crate) fn new(connector: Connector, max_buf_size: usize) -> Self {
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(max_buf_size);
        let inner = Arc::new(Inner {
            connector,
            http1,
            idle: Mutex::new(Vec::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        BackendClient { inner }
    }

    /// Sends `request` (its URI in origin form, its `Host` set) on an idle connection or a
    /// new one; the response, and the connection it came on.
    pub(crate) async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<ResponseBody>, UpstreamConnection), SendError> {
        loop {
            let (mut sender, connection, reused) = match self.inner.take_idle() {
                Some(idle) => (idle.sender, idle.connection, true),
                None => {
                    let (sender, connection) = self.inner.open().await?;
                    (sender, connection, false)
                }
            };
            // A reused connection finishes the previous exchange before it wants the next;
            // one closed meanwhile is left for the next.
            if reused && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (head, body) = response.into_parts();
                    let mut body = ResponseBody {
                        body,
                        give_back: Some(GiveBack {
                            pool: Arc::downgrade(&self.inner),
                            sender,
                            connection: connection.clone(),
                        }),
                    };
                    if body.body.is_end_stream() {
                        body.give_back();
                    }
                    return Ok((Response::from_parts(head, body), connection));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    Some(_) => return Err(SendError::Unsent(error.into_error())),
                    None => return Err(SendError::Exchange(error.into_error())),
                },
            }
        }
    }

    /// Connections waiting idle now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Inner {
    fn take_idle(&self) -> Option<IdleConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(candidate) = idle.pop() {
            if !candidate.sender.is_closed() && candidate.since.elapsed() < IDLE_TIMEOUT {
                return Some(candidate);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<RequestBody>, connection: UpstreamConnection) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        Self::drop_expired(&mut idle, now);
        if idle.len() < MAX_IDLE {
            idle.push(IdleConnection {
                sender,
                connection,
                since: now,
            });
        }
    }

    /// Closes the connections idle past their time or closed by the backend.
    fn reap(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        Self::drop_expired(&mut idle, Instant::now());
        idle.retain(|c| !c.sender.is_closed());
    }

    fn drop_expired(idle: &mut Vec<IdleConnection>, now: Instant) {
        let expired = idle.partition_point(|c| now.duration_since(c.since) >= IDLE_TIMEOUT);
        idle.drain(..expired);
    }

    async fn open(&self) -> Result<(SendRequest<RequestBody>, UpstreamConnection), SendError> {
        let UpstreamStream { io, connection } =
            self.connector.connect().await.map_err(SendError::Connect)?;
        let (sender, driver) = self
            .http1
            .handshake(io)
            .await
            .map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            // A backend closing a connection is routine; the request it failed says why.
            if let Err(e) = driver.await {
                tracing::debug!(error = %crate::error_chain::error_chain(&e), "upstream connection ended");
            }
        });
        Ok((sender, connection))
    }
}

/// Closes idle connections past their time until the client is gone.
async fn reap(pool: Weak<Inner>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.reap(),
            None => return,
        }
    }
}

/// A response body from a backend; its connection goes back to the idle list when it ends.
pub(crate) struct ResponseBody {
    body: Incoming,
    give_back: Option<GiveBack>,
}

struct GiveBack {
    pool: Weak<Inner>,
    sender: SendRequest<RequestBody>,
    connection: UpstreamConnection,
}

impl ResponseBody {
    fn give_back(&mut self) {
        if let Some(GiveBack {
            pool,
            sender,
            connection,
        }) = self.give_back.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.put_idle(sender, connection);
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            // A broken exchange leaves the connection unusable: it closes with the sender.
            Some(Err(_)) => self.give_back = None,
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use crate::telemetry::metrics::Metrics;

    fn client(addr: std::net::SocketAddr) -> (BackendClient, Metrics) {
        let metrics = Metrics::new().expect("metrics");
        let connector = Connector::new(
            "test:1".into(),
            vec![addr],
            Duration::from_secs(2),
            None,
            &metrics,
        );
        (BackendClient::new(connector, 64 * 1024), metrics)
    }

    fn get() -> Request<RequestBody> {
        Request::get("/")
            .header(http::header::HOST, "test")
            .body(RequestBody::empty())
            .expect("request")
    }

    /// A backend that answers every request on a connection with `answer` (closing the
    /// connection after each answer if `close`), and counts the connections it accepted.
    async fn backend(answer: &'static [u8]) -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
        backend_closing(answer, false).await
    }

    async fn backend_closing(
        answer: &'static [u8],
        close: bool,
    ) -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(Mutex::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                *count.lock().expect("count") += 1;
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if stream.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn body_text(response: Response<ResponseBody>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf8")
    }

    /// Sends `times` requests one after the other, each answered `hello`.
    async fn fetch_hello(client: &BackendClient, times: usize) {
        for _ in 0..times {
            let (response, _) = client.send(get()).await.expect("answer");
            assert_eq!(body_text(response).await, "hello");
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_has_ended() {
        let (addr, accepted) = backend(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let (client, metrics) = client(addr);
        fetch_hello(&client, 3).await;
        assert_eq!(
            *accepted.lock().expect("count"),
            1,
            "one connection for three"
        );
        assert_eq!(client.idle_count(), 1);
        let text = String::from_utf8(metrics.render()).expect("utf8");
        assert!(
            text.contains("proxy_upstream_connections_total{backend=\"test:1\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_body_still_being_read_keeps_its_connection_to_itself() {
        let (addr, accepted) = backend(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let (client, _) = client(addr);
        let (first, _) = client.send(get()).await.expect("answer");
        // The first body is unread: the second request needs a connection of its own.
        let (second, _) = client.send(get()).await.expect("answer");
        assert_eq!(*accepted.lock().expect("count"), 2);
        assert_eq!(body_text(second).await, "hello");
        assert_eq!(body_text(first).await, "hello");
        assert_eq!(client.idle_count(), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_does_not_come_back() {
        let (addr, _) = backend(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let (client, _) = client(addr);
        let (response, _) = client.send(get()).await.expect("answer");
        drop(response);
        assert_eq!(client.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closes_is_not_reused() {
        // Says it closes: the client must not put the connection back for reuse.
        let (addr, accepted) =
            backend(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
                .await;
        let (client, _) = client(addr);
        fetch_hello(&client, 2).await;
        assert_eq!(*accepted.lock().expect("count"), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used() {
        // Closes after each answer without saying so: every idle connection dies under the
        // client, and the next request goes on a new connection without an error.
        let (addr, accepted) =
            backend_closing(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", true).await;
        let (client, _) = client(addr);
        fetch_hello(&client, 5).await;
        assert_eq!(*accepted.lock().expect("count"), 5);
    }

    #[tokio::test]
    async fn the_first_response_on_a_connection_says_so() {
        let (addr, _) = backend(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let (client, _) = client(addr);
        let (response, connection) = client.send(get()).await.expect("answer");
        assert_eq!(response.status(), http::StatusCode::NO_CONTENT);
        assert!(connection.first_response());
        // A body that is empty from the start gives the connection back at once.
        assert_eq!(client.idle_count(), 1);
        drop(response);
        let (_, again) = client.send(get()).await.expect("answer");
        assert!(!again.first_response(), "the second request reused it");
    }

    #[tokio::test]
    async fn no_backend_is_a_connect_error() {
        let dead = {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            closed.local_addr().expect("addr")
        };
        let (client, _) = client(dead);
        let Err(error) = client.send(get()).await else {
            panic!("a refused connection answered");
        };
        assert!(error.is_connect() && error.is_unsent(), "{error:?}");
    }
}
