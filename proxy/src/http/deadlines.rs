//! Per-connection deadlines that hold for HTTP/1.1 and HTTP/2 alike: a connection must
//! send its first request within the header-read timeout, and one with no request in flight
//! for the idle timeout is closed. Bytes trickling in do not count as activity, so a client
//! cannot keep a connection by sending a byte now and then (slowloris, HTTP/2 pings).
//!
//! A request is in flight from its head until its response body is fully sent or dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::http::responses::{Body, BoxError};

/// What a connection is doing, shared by its service and its watchdog.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Woken when the first request arrives.
    first: Notify,
    /// Milliseconds after `opened` at which the connection last became idle.
    idle_since_ms: AtomicU64,
    changed: Notify,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            first: Notify::new(),
            idle_since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    /// Marks a request in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        if self.requests.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first.notify_waiters();
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// Whether the connection has sent at least one request.
    pub(crate) fn any_request(&self) -> bool {
        self.requests.load(Ordering::Acquire) > 0
    }

    /// Resolves once the connection has sent a request.
    pub(crate) async fn first_request(&self) {
        loop {
            let notified = self.first.notified();
            tokio::pin!(notified);
            // Registered before the check, so a request arriving in between still wakes us.
            notified.as_mut().enable();
            if self.any_request() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves when the connection has broken a deadline: no first request within
    /// `first_request`, or no request in flight for `idle`.
    pub(crate) async fn expired(&self, first_request: Duration, idle: Duration) {
        loop {
            let deadline = if self.requests.load(Ordering::Acquire) == 0 {
                Some(self.opened + first_request)
            } else if self.in_flight.load(Ordering::Acquire) == 0 {
                Some(
                    self.opened
                        + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
                        + idle,
                )
            } else {
                None
            };
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {
                            if self.in_flight.load(Ordering::Acquire) == 0 && Instant::now() >= deadline {
                                return;
                            }
                        }
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    fn end(&self) {
        let elapsed = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(elapsed, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// A request in flight; dropping it ends the request.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its request in flight until it is fully sent or dropped.
pub(crate) struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl TrackedBody {
    pub(crate) fn new(inner: Body, in_flight: InFlight) -> Self {
        TrackedBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_requests() {
        let activity = Activity::new();
        let first = Duration::from_secs(2);
        let idle = Duration::from_secs(5);
        // No request: expires at the first-request deadline.
        let started = Instant::now();
        activity.expired(first, idle).await;
        assert_eq!(started.elapsed().as_secs(), 2);

        // A request in flight never expires; once it ends, the idle clock starts.
        let request = activity.begin();
        let watch = tokio::time::timeout(Duration::from_secs(60), activity.expired(first, idle));
        assert!(
            watch.await.is_err(),
            "a connection with a request in flight must not expire"
        );
        drop(request);
        let ended = Instant::now();
        activity.expired(first, idle).await;
        assert_eq!(ended.elapsed().as_secs(), 5);
    }
}
