//! The streams of one HTTP/2 connection, run by the connection's own task. hyper hands each
//! stream to an executor; spawning a task per stream costs a task's allocation, its
//! scheduling and its wake-ups, and the connection task flushes after each stream that
//! answers, so answers ready together went out in several writes. Run here, every stream
//! the connection started is polled right after it, and the answers they produced go out
//! together the next time it runs. A connection's streams share its core, as its frames do,
//! which is how nginx, HAProxy and h2o serve a connection too.
//!
//! Streams end with their connection: when it closes (the client left, a deadline, the drain
//! deadline), their requests end as the client leaving or as aborted, with their upstream
//! requests cancelled instead of running on for nobody.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor hyper is given for one connection: it queues the streams the connection
/// starts, for [`WithStreams`] to run.
#[derive(Clone, Default)]
pub(super) struct ConnectionStreams {
    started: Arc<Mutex<Vec<Stream>>>,
}

impl<F> hyper::rt::Executor<F> for ConnectionStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::pin(stream));
    }
}

pin_project_lite::pin_project! {
    /// A connection future with the streams it started: polls the connection, then its
    /// streams; ends when the connection does.
    pub(super) struct WithStreams<C> {
        #[pin]
        connection: C,
        started: Arc<Mutex<Vec<Stream>>>,
        running: FuturesUnordered<Stream>,
    }
}

impl<C> WithStreams<C> {
    /// `connection`, whose streams go to `executor`.
    pub(super) fn new(connection: C, executor: &ConnectionStreams) -> Self {
        WithStreams {
            connection,
            started: executor.started.clone(),
            running: FuturesUnordered::new(),
        }
    }

    /// The connection itself (to ask it to shut down gracefully).
    pub(super) fn connection(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().connection
    }
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.connection.poll(cx) {
            return Poll::Ready(output);
        }
        this.running.extend(
            this.started
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .drain(..),
        );
        // Until every stream waits (or none is left). A stream that answered woke the
        // connection, which then sends what all of them answered.
        while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor as _;

    use super::*;

    /// A connection that starts three streams on its first poll, then waits for them to
    /// finish; the streams need two polls each.
    #[tokio::test]
    async fn streams_run_with_their_connection_and_end_with_it() {
        let executor = ConnectionStreams::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let spawner = executor.clone();
        let counted = finished.clone();
        let mut started = false;
        let connection = std::future::poll_fn(move |cx| {
            if !started {
                started = true;
                for _ in 0..3 {
                    let counted = counted.clone();
                    spawner.execute(async move {
                        tokio::task::yield_now().await;
                        counted.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
            if counted.load(Ordering::SeqCst) == 3 {
                Poll::Ready("closed")
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            WithStreams::new(connection, &executor),
        )
        .await;
        assert_eq!(result, Ok("closed"));
        assert_eq!(finished.load(Ordering::SeqCst), 3);
    }

    /// Streams still running when their connection ends are dropped with it.
    #[tokio::test]
    async fn streams_are_dropped_with_their_connection() {
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let executor = ConnectionStreams::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        let guard = Dropped(dropped.clone());
        executor.execute(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        let mut polls = 0;
        let connection = std::future::poll_fn(move |cx| {
            polls += 1;
            if polls == 2 {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        WithStreams::new(connection, &executor).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
