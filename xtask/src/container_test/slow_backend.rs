//! The backend the containerised proxy forwards to in the drain check: plain HTTP/1.1 in the
//! test's namespace, answering `GET /slow` only after a delay (the request in flight when the
//! container is stopped) and anything else at once (the proxy's health checks), one request
//! per connection. `proxy backend` has no delay to offer.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use proxy_testkit::NetNs;

/// The body of the slow answer, which the client must receive whole.
pub(super) const SLOW_BODY: &str = "slow answer, drained\n";

/// Serves until dropped.
pub(super) struct SlowBackend {
    port: u16,
    slow_requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl SlowBackend {
    /// Listens on every address of `ns` (the containers reach it through the bridge's
    /// gateway); `/slow` is answered after `delay`.
    pub(super) fn start(ns: &NetNs, delay: Duration) -> Result<SlowBackend> {
        let slow_requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (port_tx, port_rx) = mpsc::channel();
        let (count, stopped) = (slow_requests.clone(), stop.clone());
        ns.spawn(move || {
            let listener = match TcpListener::bind("0.0.0.0:0").and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(listener) => listener,
                Err(e) => {
                    let _ = port_tx.send(Err(e));
                    return;
                }
            };
            let _ = port_tx.send(listener.local_addr().map(|a| a.port()));
            // Polled, so that dropping the backend ends the thread.
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let count = count.clone();
                        std::thread::spawn(move || answer(stream, delay, &count));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the slow backend did not start")?
            .context("the slow backend could not listen")?;
        Ok(SlowBackend {
            port,
            slow_requests,
            stop,
        })
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    /// How many `/slow` requests have arrived (answered or not).
    pub(super) fn slow_requests(&self) -> usize {
        self.slow_requests.load(Ordering::SeqCst)
    }
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn answer(mut stream: TcpStream, delay: Duration, slow_requests: &AtomicUsize) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let body = if path == "/slow" {
        slow_requests.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
        SLOW_BODY
    } else {
        "Hello SRE!"
    };
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
}
