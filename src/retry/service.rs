//! [`Retry`]: marks each request for retrying and starts its [`ResponseFuture`].

use std::task::{Context, Poll};

use http::Request;
use tokio::time::Instant;
use tower::retry::budget::Budget;
use tower_service::Service;

use crate::BoxError;
use crate::retry::ReplayBody;
use crate::retry::TriedKeys;
use crate::retry::future::ResponseFuture;
use crate::retry::policy::RetryPolicy;
use crate::route::WaitUntil;

/// Middleware that sends a refused request again, on a key it has not tried if one is
/// free, else on the earliest key that comes back within the request's wait budget. Made
/// by [`RetryLayer`](super::RetryLayer).
///
/// Before the first attempt it puts a [`TriedKeys`] record on a replayable request (so
/// [`KeyRotation`](crate::KeyRotation) notes every key used) and credits the retry budget.
/// Each further attempt runs the inner service's `poll_ready` again, on a clone of the
/// inner service, so each attempt reserves its own key; that wait ends with the request's
/// budget ([`NoKeyAvailable`](crate::NoKeyAvailable)), counted from the moment the request
/// first waited in this service's `poll_ready`.
///
/// A request with a streaming [`ReplayBody`] is sent once, and whatever comes back passes
/// through.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    policy: RetryPolicy,
    /// When the caller now being readied started waiting (its first `Pending`).
    waiting_since: Option<Instant>,
}

impl<S> Retry<S> {
    pub(crate) fn new(policy: RetryPolicy, inner: S) -> Self {
        Self {
            inner,
            policy,
            waiting_since: None,
        }
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
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
        let ready = self.inner.poll_ready(cx);
        if ready.is_pending() {
            // The request's wait budget counts from here.
            self.waiting_since.get_or_insert_with(Instant::now);
        }
        ready
    }

    fn call(&mut self, mut req: Request<ReplayBody<B>>) -> Self::Future {
        let now = Instant::now();
        let arrival = self.waiting_since.take().unwrap_or(now);
        // Every request earns the budget its share, retried or not (as tower's budget
        // expects), so retries stay a fraction of the traffic.
        self.policy.budget.deposit();
        if req.body().is_replayable() && req.extensions().get::<TriedKeys>().is_none() {
            req.extensions_mut().insert(TriedKeys::new());
        }
        if self.policy.pool.routes() {
            // A routed request waits for its key in the key layer's future: within this
            // request's budget, retries included. The end goes on the request's record of
            // tried keys when it has one (no extension of its own to insert and copy).
            if let Some(end) = self
                .policy
                .pool
                .max_wait()
                .and_then(|w| arrival.checked_add(w))
            {
                match req.extensions().get::<TriedKeys>() {
                    Some(tried) => tried.set_wait_until(end),
                    None => {
                        req.extensions_mut().insert(WaitUntil(end));
                    }
                }
            }
        }
        let policy = self.policy.clone();
        let next = policy.replay(&req);
        // This (ready) service takes the first attempt; a clone the further ones.
        let service = self.inner.clone();
        let future = self.inner.call(req);
        ResponseFuture::new(future, service, policy, next, arrival, now - arrival)
    }
}
