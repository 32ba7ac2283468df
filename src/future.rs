//! [`ResponseFuture`]: classifies the response and hands the key's lease to the body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use crate::BoxError;
use crate::backoff::Outcome;
use crate::body::TrackedBody;
use crate::pool::Lease;

pin_project! {
    /// Response future of [`KeyRotation`](crate::KeyRotation).
    ///
    /// When the response head arrives, the pool's classifier decides what it means for the
    /// key (success, 429, rejected) and the lease moves into the [`TrackedBody`]. If this
    /// future is dropped first, the lease is given back.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        lease: Option<Lease>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, lease: Lease) -> Self {
        Self {
            inner,
            lease: Some(lease),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
    E: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let lease = this
            .lease
            .take()
            .expect("ResponseFuture polled after completion");
        match result {
            Ok(response) => {
                let pool = lease.pool();
                let outcome = pool
                    .classifier()
                    .classify(response.status(), response.headers());
                lease.record(outcome);
                Poll::Ready(Ok(response.map(|body| TrackedBody::new(body, lease))))
            }
            Err(error) => {
                lease.record(Outcome::Failure);
                Poll::Ready(Err(error.into()))
            }
        }
    }
}
