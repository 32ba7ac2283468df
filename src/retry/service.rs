//! [`Retry`]: marks each request for retrying, then runs tower's retry loop.

use std::task::{Context, Poll};

use http::Request;
use tower::retry::budget::Budget;
use tower_service::Service;

use crate::BoxError;
use crate::retry::ReplayBody;
use crate::retry::future::ResponseFuture;
use crate::retry::policy::RetryPolicy;
use crate::tried::TriedKeys;

/// Middleware that resends a request refused with `429` on a key it has not tried. Made
/// by [`RetryLayer`](super::RetryLayer).
///
/// Before the first attempt it puts a [`TriedKeys`] record on a replayable request (so
/// [`KeyRotation`](crate::KeyRotation) notes every key used) and credits the retry budget;
/// the attempts themselves are tower's [`Retry`](tower::retry::Retry), which runs the inner
/// service's `poll_ready` again before each one, so each attempt reserves its own key.
///
/// A request with a streaming [`ReplayBody`] is sent once, and whatever comes back passes
/// through.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: tower::retry::Retry<RetryPolicy, S>,
    policy: RetryPolicy,
}

impl<S> Retry<S> {
    pub(crate) fn new(policy: RetryPolicy, inner: S) -> Self {
        Self {
            inner: tower::retry::Retry::new(policy.clone(), inner),
            policy,
        }
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S, B, R> Service<Request<ReplayBody<B>>> for Retry<S>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<R>, Error = BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReplayBody<B>>) -> Self::Future {
        // Every request earns the budget its share, retried or not (as tower's budget
        // expects), so retries stay a fraction of the traffic.
        self.policy.budget.deposit();
        if req.body().is_replayable() && req.extensions().get::<TriedKeys>().is_none() {
            req.extensions_mut().insert(TriedKeys::new());
        }
        self.inner.call(req)
    }
}
