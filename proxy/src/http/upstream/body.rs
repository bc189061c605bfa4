//! The request body as sent upstream: one that can be sent again on another backend as long
//! as no byte of it has been taken, so that a request whose connection failed is retried
//! with its body intact, and never one whose body is partly gone.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;

use crate::http::responses::BoxError;

type Source = crate::http::deadlines::IdleTimeout<hyper::body::Incoming>;

/// A client's request body on its way to a backend.
pub(crate) struct RequestBody {
    /// Where the body waits until the first attempt to send it takes it.
    unsent: Arc<Mutex<Option<Source>>>,
    taken: Option<Source>,
    started: Arc<AtomicBool>,
    /// Set, and notified, once the whole body has been handed to a backend.
    sent: Arc<(AtomicBool, Notify)>,
    end_stream: bool,
    size_hint: SizeHint,
}

impl RequestBody {
    pub(super) fn new(source: Source) -> Self {
        let end_stream = source.is_end_stream();
        let size_hint = source.size_hint();
        RequestBody {
            unsent: Arc::new(Mutex::new(Some(source))),
            taken: None,
            started: Arc::new(AtomicBool::new(false)),
            sent: Arc::new((AtomicBool::new(end_stream), Notify::new())),
            end_stream,
            size_hint,
        }
    }

    /// Resolves once the whole body has been handed to a backend (at once for a request
    /// without one): the response head's deadline runs from there, so that a long upload
    /// is not mistaken for a slow backend.
    pub(super) async fn sent(&self) {
        let (done, notify) = &*self.sent;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn mark_sent(&self) {
        let (done, notify) = &*self.sent;
        if !done.swap(true, Ordering::AcqRel) {
            notify.notify_waiters();
        }
    }

    /// The same body for another attempt, if no byte of it has been taken (an empty body
    /// always can be sent again).
    pub(super) fn again(&self) -> Option<RequestBody> {
        if self.started.load(Ordering::Acquire) && !self.end_stream {
            return None;
        }
        Some(RequestBody {
            unsent: self.unsent.clone(),
            taken: None,
            started: self.started.clone(),
            sent: self.sent.clone(),
            end_stream: self.end_stream,
            size_hint: self.size_hint,
        })
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            if this.end_stream {
                return Poll::Ready(None);
            }
            this.started.store(true, Ordering::Release);
            this.taken = this.unsent.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let Some(source) = this.taken.as_mut() else {
            // Taken by an attempt that is still running: this one has nothing to send.
            return Poll::Ready(Some(Err("request body already sent".into())));
        };
        let polled = Pin::new(&mut *source).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.mark_sent(),
            Poll::Ready(Some(Ok(_))) if source.is_end_stream() => this.mark_sent(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.end_stream || self.taken.as_ref().is_some_and(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}
