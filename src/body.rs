//! [`TrackedBody`]: keeps the key in flight until the response body is done.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::pool::Lease;

pin_project! {
    /// Response body of [`KeyRotation`](crate::KeyRotation).
    ///
    /// The request counts as in flight on its key until this body yields its last frame,
    /// yields an error, or is dropped, so a streamed (SSE) answer keeps its key busy for as
    /// long as it streams.
    #[derive(Debug)]
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B: Body> TrackedBody<B> {
    pub(crate) fn new(inner: B, lease: Lease) -> Self {
        // A body that is already over (e.g. empty) may never be polled: release now.
        let lease = (!inner.is_end_stream()).then_some(lease);
        Self { inner, lease }
    }
}

impl<B> TrackedBody<B> {
    /// A reference to the wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Unwraps the body. The key is released.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let done = match &frame {
            Some(Ok(_)) => this.inner.is_end_stream(),
            None | Some(Err(_)) => true,
        };
        if done {
            // Ended or failed: the key is free again.
            drop(this.lease.take());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
