//! [`ResponseFuture`]: classifies the response and hands the key's lease to the body.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http::Response;
use http::response::Parts;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

use crate::BoxError;
use crate::body::TrackedBody;
use crate::classify::Outcome;
use crate::classify::learned_reset_at;
use crate::pool::Lease;

pin_project! {
    /// Response future of [`KeyRotation`](crate::KeyRotation).
    ///
    /// When the response head arrives, the pool's classifier decides what it means for the
    /// key (success, 429, rejected) and the lease moves into the [`TrackedBody`]. A
    /// classifier that reads error bodies (the provider profiles) first buffers up to its
    /// limit of such a body, then hands it on in full. If this future is dropped first, the
    /// lease is given back.
    ///
    /// A response whose outcome is not [`Outcome::Success`] carries that [`Outcome`] in its
    /// extensions, for layers outside (a retry policy) to read; one that refused the key
    /// ([`Outcome::KeyRejected`]) also carries the [`RejectedKey`](crate::RejectedKey).
    pub struct ResponseFuture<F, B>
    where
        B: Body,
    {
        #[pin]
        state: State<F>,
        lease: Option<Lease>,
        // Boxed: only the rare path (an error body the classifier reads) has one, and
        // inline it would make every response future some 200 bytes larger to move.
        reading: Option<Box<ReadingBody<B>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        /// The inner service's future, with the key's header on its request.
        Calling { #[pin] future: F },
        /// No key could take the request (`poll_ready` found none, or the reservation went
        /// stale): the inner service was never called.
        Refused { error: Option<BoxError> },
    }
}

/// An error body being read for the classifier.
struct ReadingBody<B: Body> {
    head: Parts,
    body: Pin<Box<B>>,
    frames: VecDeque<Frame<B::Data>>,
    bytes: Vec<u8>,
    limit: usize,
}

impl<F, B: Body> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, lease: Lease) -> Self {
        Self {
            state: State::Calling { future },
            lease: Some(lease),
            reading: None,
        }
    }

    pub(crate) fn refused(error: BoxError) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            lease: None,
            reading: None,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    E: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.reading.is_none() {
            let result = match this.state.project() {
                StateProj::Calling { future } => ready!(future.poll(cx)),
                StateProj::Refused { error } => {
                    let error = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Err(error));
                }
            };
            let lease = this
                .lease
                .as_ref()
                .expect("ResponseFuture polled after completion");
            let response = match result {
                Ok(response) => response,
                Err(error) => {
                    let error: BoxError = error.into();
                    // A request that never reached the provider (DNS, connect, TLS) says
                    // nothing about the key: not counted against it.
                    if !lease.classifier().is_unreached(&*error) {
                        lease.record(Outcome::Failure);
                    }
                    drop(this.lease.take());
                    return Poll::Ready(Err(error));
                }
            };
            let classifier = lease.classifier();
            let Some(limit) = classifier.body_limit(response.status()) else {
                let outcome = classifier.classify(response.status(), response.headers());
                let lease = this.lease.take().expect("lease present");
                return Poll::Ready(Ok(finish(response, outcome, lease)));
            };
            let (head, body) = response.into_parts();
            // The rare path (an error the classifier reads): box the body to poll it here
            // and hand it on afterwards.
            *this.reading = Some(Box::new(ReadingBody {
                head,
                body: Box::pin(body),
                frames: VecDeque::new(),
                bytes: Vec::new(),
                limit,
            }));
        }
        let reading = this.reading.as_mut().expect("reading an error body");
        let error = loop {
            if reading.bytes.len() >= reading.limit {
                break None;
            }
            match ready!(reading.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let room = reading.limit - reading.bytes.len();
                        let chunk = data.chunk();
                        reading
                            .bytes
                            .extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    reading.frames.push_back(frame);
                }
                Some(Err(error)) => break Some(error),
                None => break None,
            }
        };
        let ReadingBody {
            head,
            body,
            frames,
            bytes,
            ..
        } = *this.reading.take().expect("reading an error body");
        let lease = this
            .lease
            .take()
            .expect("ResponseFuture polled after completion");
        let outcome = lease
            .classifier()
            .classify_with_body(head.status, &head.headers, &bytes);
        let body = TrackedBody::replaying(body, frames, error);
        Poll::Ready(Ok(finish(Response::from_parts(head, body), outcome, lease)))
    }
}

/// Applies the outcome to the key and moves the lease into the body.
fn finish<B, T>(response: Response<T>, outcome: Outcome, lease: Lease) -> Response<TrackedBody<B>>
where
    B: Body,
    T: Into<TrackedBody<B>>,
{
    // A refusal whose rate-limit headers say a window is used up is about rate, not
    // concurrency: the key must not learn a concurrency limit from it.
    let window_spent = outcome.is_rate_limited()
        && learned_reset_at(response.headers(), std::time::SystemTime::now).is_some();
    lease.record_answer(outcome, window_spent);
    let rejected = (outcome == Outcome::KeyRejected).then(|| lease.rejected_key());
    let mut response = response.map(|body| body.into().track(lease));
    if outcome != Outcome::Success {
        response.extensions_mut().insert(outcome);
    }
    if let Some(rejected) = rejected {
        response.extensions_mut().insert(rejected);
    }
    response
}

impl<F, B: Body> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("lease", &self.lease)
            .field("reading_error_body", &self.reading.is_some())
            .finish()
    }
}
