//! Deadlines that hold for HTTP/1.1 and HTTP/2 alike.
//!
//! Per connection: it must send its first request within the header-read timeout; one with
//! no request in flight for the idle timeout is closed; and one with a response the client
//! has not read for the send timeout is closed (HTTP/2 included: a stream stalled by flow
//! control holds its connection's memory as much as a full socket does, and nginx closes
//! the connection too). Bytes trickling in do not count as activity, so a client cannot
//! keep a connection by sending a byte now and then (slowloris, HTTP/2 pings).
//!
//! Per body: [`IdleTimeout`] breaks off a body, either side's, that sends nothing for too
//! long, with an error naming whose body it was.
//!
//! A request is in flight from its head until its response body is fully sent or dropped.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::http::responses::BoxError;

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
    /// Response bodies being streamed, each with the time since which it has waited for the
    /// client to take what it was handed (0: not waiting).
    streaming: Mutex<Vec<Arc<AtomicU64>>>,
    /// Woken when a body starts streaming.
    streaming_started: Notify,
    /// Why the proxy closed the connection, if it did (for the outcome of its responses).
    closed_by_proxy: AtomicU64,
    /// Set for every connection when the drain deadline passes and the process exits with
    /// connections still open.
    abandoned: Arc<AtomicBool>,
}

/// Why the proxy closed a connection under its responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The client read nothing for the send timeout.
    SendTimeout = 1,
    /// The drain deadline at shutdown passed.
    Drain = 2,
}

impl Activity {
    /// A new connection's activity; `abandoned` is the server's flag for the drain deadline.
    pub(crate) fn new(abandoned: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            first: Notify::new(),
            idle_since_ms: AtomicU64::new(0),
            streaming: Mutex::new(Vec::new()),
            streaming_started: Notify::new(),
            closed_by_proxy: AtomicU64::new(0),
            abandoned,
        })
    }

    /// Milliseconds since the connection opened; never 0, which means "not waiting".
    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Records that the proxy is closing the connection, and why.
    pub(crate) fn close_by_proxy(&self, why: Closed) {
        self.closed_by_proxy.store(why as u64, Ordering::Release);
    }

    /// Why the proxy closed the connection, if it did.
    pub(crate) fn closed_by_proxy(&self) -> Option<Closed> {
        match self.closed_by_proxy.load(Ordering::Acquire) {
            1 => Some(Closed::SendTimeout),
            2 => Some(Closed::Drain),
            _ if self.abandoned.load(Ordering::Acquire) => Some(Closed::Drain),
            _ => None,
        }
    }

    /// Resolves when a response body has waited for the client to read it for `timeout`.
    pub(crate) async fn send_stalled(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let started = self.streaming_started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            let (any, oldest) = {
                let streaming = self.streaming.lock().unwrap_or_else(|e| e.into_inner());
                let oldest = streaming
                    .iter()
                    .map(|since| since.load(Ordering::Acquire))
                    .filter(|since| *since != 0)
                    .min();
                (!streaming.is_empty(), oldest)
            };
            match oldest {
                Some(since) if self.now_ms().saturating_sub(since) >= timeout_ms => return,
                Some(since) => {
                    let at = self.opened + Duration::from_millis(since.saturating_add(timeout_ms));
                    tokio::time::sleep_until(at).await;
                }
                // A body that starts waiting now is found at the next look, within `timeout`.
                None if any => tokio::time::sleep(timeout).await,
                None => started.await,
            }
        }
    }

    /// Marks a request in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        if self.requests.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first.notify_waiters();
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
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
    ///
    /// The timer is lazy: requests starting and ending do not touch it (no timer to re-arm
    /// and no wake-up of the connection's task per request). It wakes at the deadline it
    /// last saw, or every `idle` while a request is in flight, and then looks again; a
    /// deadline that moved on is slept to, so the connection closes at its true deadline.
    pub(crate) async fn expired(&self, first_request: Duration, idle: Duration) {
        loop {
            let now = Instant::now();
            let wake = if self.requests.load(Ordering::Acquire) == 0 {
                self.opened + first_request
            } else if self.in_flight.load(Ordering::Acquire) == 0 {
                self.opened
                    + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
                    + idle
            } else {
                now + idle
            };
            if wake <= now {
                return;
            }
            tokio::time::sleep_until(wake).await;
        }
    }

    fn end(&self) {
        let elapsed = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(elapsed, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
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

/// A streaming response body's record of when it began waiting for the client; dropping
/// it stops the watch.
#[derive(Debug)]
pub(crate) struct SendWatch {
    activity: Arc<Activity>,
    waiting_since: Arc<AtomicU64>,
}

impl SendWatch {
    /// Starts watching a body of `activity`'s connection, waiting for the client from now.
    pub(crate) fn start(activity: &Arc<Activity>) -> Self {
        let waiting_since = Arc::new(AtomicU64::new(activity.now_ms()));
        activity
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(waiting_since.clone());
        activity.streaming_started.notify_waiters();
        SendWatch {
            activity: activity.clone(),
            waiting_since,
        }
    }

    /// The body handed over a frame: from now it waits for the client to take it.
    pub(crate) fn handed_over(&self) {
        self.waiting_since
            .store(self.activity.now_ms(), Ordering::Release);
    }

    /// The client side asked for more: the body no longer waits for it.
    pub(crate) fn asked(&self) {
        self.waiting_since.store(0, Ordering::Release);
    }
}

impl Drop for SendWatch {
    fn drop(&mut self) {
        let mut streaming = self
            .activity
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        streaming.retain(|since| !Arc::ptr_eq(since, &self.waiting_since));
    }
}

/// Whose body sent nothing for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyDeadline {
    /// The backend's response body.
    #[error("the backend sent no response body data within the body timeout")]
    Upstream,
    /// The client's request body.
    #[error("the client sent no request body data within the client body timeout")]
    Client,
}

/// A body that fails with [`BodyDeadline`] when its source sends nothing for `timeout`
/// while it is being read. Time the reader spends elsewhere does not count.
pub(crate) struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    side: BodyDeadline,
    /// Made the first time the source has nothing ready: most bodies come whole with
    /// their head and never need a timer.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Set when the deadline fired, for those who see only the consequences.
    fired: Option<Arc<AtomicBool>>,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, timeout: Duration, side: BodyDeadline) -> Self {
        IdleTimeout {
            inner,
            timeout,
            side,
            sleep: None,
            armed: false,
            fired: None,
        }
    }

    /// Also sets `flag` when the deadline fires.
    pub(crate) fn flagging(mut self, flag: Arc<AtomicBool>) -> Self {
        self.fired = Some(flag);
        self
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !this.armed {
                    sleep.as_mut().reset(Instant::now() + timeout);
                    this.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(fired) = &this.fired {
                            fired.store(true, Ordering::Release);
                        }
                        Poll::Ready(Some(Err(Box::new(this.side))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
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
        let activity = Activity::new(Arc::default());
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

    #[tokio::test(start_paused = true)]
    async fn a_request_ending_while_the_timer_sleeps_moves_the_deadline() {
        let activity = Activity::new(Arc::default());
        let (first, idle) = (Duration::from_secs(2), Duration::from_secs(5));
        let started = Instant::now();
        let first_request = activity.begin();
        let watch = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(first, idle).await }
        });
        // In flight for 3 s, idle for 4 s, another request for 1 s: never 5 s idle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(first_request);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let second_request = activity.begin();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(second_request);
        assert!(!watch.is_finished(), "expired with no 5 s idle period");
        watch.await.expect("watchdog");
        // Idle from 8 s: the deadline is 13 s, not an earlier wake-up of the timer.
        assert_eq!(started.elapsed().as_secs(), 13);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_the_client_does_not_take_stalls_its_connection() {
        let activity = Activity::new(Arc::default());
        let timeout = Duration::from_secs(60);
        let watch = SendWatch::start(&activity);
        let started = Instant::now();
        // Asked again within the deadline: not stalled.
        tokio::time::sleep(Duration::from_secs(50)).await;
        watch.asked();
        watch.handed_over();
        activity.send_stalled(timeout).await;
        assert_eq!(
            started.elapsed().as_secs(),
            110,
            "60 s after the last hand-over"
        );
        drop(watch);
        let quiet = tokio::time::timeout(Duration::from_secs(600), activity.send_stalled(timeout));
        assert!(quiet.await.is_err(), "no streaming body, no stall");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_body_fails_naming_its_side() {
        use http_body_util::BodyExt as _;
        /// A body whose source never sends.
        struct Silent;
        impl HttpBody for Silent {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Poll::Pending
            }
        }
        let body = Silent;
        let fired = Arc::new(AtomicBool::new(false));
        let mut body = IdleTimeout::new(body, Duration::from_secs(5), BodyDeadline::Upstream)
            .flagging(fired.clone());
        let started = Instant::now();
        let error = body
            .frame()
            .await
            .expect("a frame")
            .expect_err("the deadline fires");
        assert_eq!(started.elapsed().as_secs(), 5);
        assert!(matches!(
            error.downcast_ref::<BodyDeadline>(),
            Some(BodyDeadline::Upstream)
        ));
        assert!(fired.load(Ordering::Acquire));
    }
}
