//! Test upstreams written here so tests control timing and see exactly what the proxy
//! forwards: a (possibly slow) HTTP/1.1 server recording request heads, or one that answers
//! garbage.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::client;
use crate::netns::NetNs;

/// Body the well-behaved upstream answers with.
pub const SLOW_BODY: &str = "slow ok";

/// How the upstream answers each request.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// 200 [`SLOW_BODY`] after the delay.
    Answer(Duration),
    /// Bytes that are not HTTP.
    Garbage,
    /// 200 with the request body echoed back (and its length in `X-Echo-Length`).
    Echo,
    /// 200 with a body of this many bytes (`0123456789` repeated).
    Big(usize),
    /// This status code with a short text body.
    Status(u16),
    /// 200 declaring `declared` body bytes, sending `sent` of them, then nothing more while
    /// the connection stays open.
    StallMidBody { declared: usize, sent: usize },
    /// 200 declaring `declared` body bytes, sending `sent` of them, then closing.
    CloseMidBody { declared: usize, sent: usize },
    /// Reads the request and never answers (the connection stays open).
    NeverAnswer,
    /// Reads the request and resets the connection (RST, no response byte).
    Reset,
}

/// The body [`Behaviour::Big`] sends: `len` bytes of `0123456789` repeated.
pub fn big_body(len: usize) -> Vec<u8> {
    b"0123456789".iter().copied().cycle().take(len).collect()
}

/// A test upstream; stops on drop (or after 120 s).
pub struct TestUpstream {
    heads: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// The common case: answers 200 [`SLOW_BODY`] after a delay.
pub type SlowUpstream = TestUpstream;

impl TestUpstream {
    /// Binds `addr` inside `ns` (returns once listening); answers after `delay`.
    pub fn start(ns: &NetNs, addr: &str, delay: Duration) -> TestUpstream {
        TestUpstream::with(ns, addr, Behaviour::Answer(delay))
    }

    /// Binds `addr` inside `ns` (returns once listening) and serves with `behaviour`.
    pub fn with(ns: &NetNs, addr: &str, behaviour: Behaviour) -> TestUpstream {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        let addr = addr.to_owned();
        let handle = ns.spawn(move || async move {
            let listener = TcpListener::bind(&addr)
                .await
                .unwrap_or_else(|e| panic!("test upstream: binding {addr}: {e}"));
            let _ = ready_tx.send(());
            let serve = async {
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(answer(sock, behaviour, recorded.clone()));
                }
            };
            tokio::select! {
                () = serve => {}
                _ = stop_rx => {}
                () = tokio::time::sleep(Duration::from_secs(120)) => {}
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the test upstream did not start listening");
        TestUpstream {
            heads,
            stop: Some(stop_tx),
            handle: Some(handle),
        }
    }

    /// The request heads received so far (request line and headers, as sent by the proxy).
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("upstream heads lock").clone()
    }
}

async fn answer(mut sock: TcpStream, behaviour: Behaviour, heads: Arc<Mutex<Vec<String>>>) {
    let Ok(req) = client::read_request(&mut sock).await else {
        return;
    };
    heads
        .lock()
        .expect("upstream heads lock")
        .push(req.head.clone());
    let (status, extra, body): (u16, String, Vec<u8>) = match behaviour {
        Behaviour::Answer(delay) => {
            tokio::time::sleep(delay).await;
            (200, String::new(), SLOW_BODY.as_bytes().to_vec())
        }
        Behaviour::Garbage => {
            let _ = sock.write_all(b"this is not HTTP at all\r\n\r\n").await;
            let _ = sock.shutdown().await;
            return;
        }
        Behaviour::Echo => (
            200,
            format!("X-Echo-Length: {}\r\n", req.body.len()),
            req.body,
        ),
        Behaviour::Big(len) => {
            // Streamed in pieces: many clients may ask for a large body at once.
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            );
            let _ = sock.write_all(head.as_bytes()).await;
            // A multiple of 10 long, so that the pieces continue the pattern of `big_body`.
            let piece = big_body(64_000);
            let mut left = len;
            while left > 0 {
                let n = left.min(piece.len());
                if sock.write_all(&piece[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            let _ = sock.shutdown().await;
            return;
        }
        Behaviour::Status(code) => (code, String::new(), format!("status {code}").into_bytes()),
        Behaviour::StallMidBody { declared, sent } | Behaviour::CloseMidBody { declared, sent } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {declared}\r\n\r\n"
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&big_body(sent)).await;
            let _ = sock.flush().await;
            if matches!(behaviour, Behaviour::StallMidBody { .. }) {
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            return;
        }
        Behaviour::NeverAnswer => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            return;
        }
        Behaviour::Reset => {
            // Linger 0: close() sends RST instead of FIN.
            let _ = sock.set_zero_linger();
            drop(sock);
            return;
        }
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(&body).await;
    let _ = sock.shutdown().await;
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A listener whose accept queue is full and never drained: new connections to it hang in
/// SYN retransmission, as to a host that does not answer. Stops on drop (or after 120 s).
pub struct Blackhole {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Blackhole {
    /// Binds `addr` (an IPv4 literal and port) inside `ns` and fills its accept queue.
    pub fn start(ns: &NetNs, addr: &str) -> Blackhole {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<bool>();
        let addr: std::net::SocketAddr = addr.parse().expect("blackhole address");
        let handle = ns.spawn(move || async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("blackhole socket");
            socket
                .bind(addr)
                .unwrap_or_else(|e| panic!("blackhole: binding {addr}: {e}"));
            let _listener = socket.listen(1).expect("blackhole listen");
            let mut fillers = Vec::new();
            let mut hangs = false;
            for _ in 0..8 {
                match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(s)) => fillers.push(s),
                    Ok(Err(_)) => break,
                    Err(_) => {
                        hangs = true;
                        break;
                    }
                }
            }
            let _ = ready_tx.send(hangs);
            tokio::select! {
                _ = stop_rx => {}
                () = tokio::time::sleep(Duration::from_secs(120)) => {}
            }
        });
        let hangs = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the blackhole did not start");
        assert!(
            hangs,
            "harness: could not make connections to {addr} hang by filling its accept queue"
        );
        Blackhole {
            stop: Some(stop_tx),
            handle: Some(handle),
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
