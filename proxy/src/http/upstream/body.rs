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
    /// `None` for a request without a body (most are): nothing to share, hand over or wait
    /// for, and nothing allocated.
    shared: Option<Arc<Shared>>,
    taken: Option<Source>,
}

/// What the attempts of one request share about its body.
struct Shared {
    /// Where the body waits until the first attempt to send it takes it.
    unsent: Mutex<Option<Source>>,
    started: AtomicBool,
    /// Set, and notified, once the whole body has been handed to a backend.
    sent: AtomicBool,
    sent_notify: Notify,
    size_hint: SizeHint,
}

impl RequestBody {
    pub(super) fn new(source: Source) -> Self {
        if source.is_end_stream() {
            return RequestBody {
                shared: None,
                taken: None,
            };
        }
        RequestBody {
            shared: Some(Arc::new(Shared {
                size_hint: source.size_hint(),
                unsent: Mutex::new(Some(source)),
                started: AtomicBool::new(false),
                sent: AtomicBool::new(false),
                sent_notify: Notify::new(),
            })),
            taken: None,
        }
    }

    /// A body with nothing in it.
    #[cfg(test)]
    pub(super) fn empty() -> Self {
        RequestBody {
            shared: None,
            taken: None,
        }
    }

    /// Resolves once the whole body has been handed to a backend (at once for a request
    /// without one): the response head's deadline runs from there, so that a long upload
    /// is not mistaken for a slow backend.
    pub(super) async fn sent(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        loop {
            let notified = shared.sent_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.sent.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// The same body for another attempt, if no byte of it has been taken (an empty body
    /// always can be sent again).
    pub(super) fn again(&self) -> Option<RequestBody> {
        match &self.shared {
            Some(shared) if shared.started.load(Ordering::Acquire) => None,
            shared => Some(RequestBody {
                shared: shared.clone(),
                taken: None,
            }),
        }
    }
}

impl Shared {
    fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.sent_notify.notify_waiters();
        }
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
        let Some(shared) = &this.shared else {
            return Poll::Ready(None);
        };
        if this.taken.is_none() {
            shared.started.store(true, Ordering::Release);
            this.taken = shared
                .unsent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        let Some(source) = this.taken.as_mut() else {
            // Taken by an attempt that is still running: this one has nothing to send.
            return Poll::Ready(Some(Err("request body already sent".into())));
        };
        let polled = Pin::new(&mut *source).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => shared.mark_sent(),
            Poll::Ready(Some(Ok(_))) if source.is_end_stream() => shared.mark_sent(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.shared.is_none() || self.taken.as_ref().is_some_and(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.shared
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |shared| shared.size_hint)
    }
}
