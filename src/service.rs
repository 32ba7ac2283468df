//! [`KeyRotation`]: the service that reserves a key in `poll_ready` and uses it in `call`.

use std::fmt;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use tower_service::Service;

use crate::BoxError;
use crate::auth::Placement;
use crate::body::TrackedBody;
use crate::future::ResponseFuture;
use crate::pool::{KeyPool, Lease, Waiter};
use crate::tried::TriedKeys;

/// Middleware that puts a key from a shared [`KeyPool`] on every request.
///
/// - `poll_ready` first drives the inner service to readiness, then reserves a key (a
///   [`Lease`], counted in flight). With no key available it returns `Pending` and arranges
///   its own wake-up; it fails only when every key is disabled.
/// - `call` consumes the reservation: the key's header goes on the request, and the lease
///   travels with the response future and then the response body.
/// - A service dropped between `poll_ready` and `call` gives its reservation back. `Clone`
///   gives a service with no reservation.
///
/// The inner service is driven to readiness first so that a key is never held idle (and
/// counted in flight) while the inner client is still connecting.
///
/// # Panics
///
/// `call` panics if `poll_ready` did not return `Ready(Ok(()))` first, as tower's
/// concurrency limit does.
pub struct KeyRotation<S> {
    inner: S,
    pool: KeyPool,
    placement: Placement,
    lease: Option<Lease>,
    waiter: Waiter,
}

impl<S> KeyRotation<S> {
    /// Wraps `inner`, taking keys from `pool` and placing them as `Authorization: Bearer`.
    pub fn new(inner: S, pool: KeyPool) -> Self {
        Self::from_parts(inner, pool, Placement::default())
    }

    pub(crate) fn from_parts(inner: S, pool: KeyPool, placement: Placement) -> Self {
        Self {
            inner,
            pool,
            placement,
            lease: None,
            waiter: Waiter::new(),
        }
    }

    /// The shared pool.
    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service (any reservation held is given back).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for KeyRotation<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(self.inner.poll_ready(cx)).map_err(Into::into)?;
        if let Some(lease) = &self.lease {
            if lease.is_usable() {
                return Poll::Ready(Ok(()));
            }
            // The reserved key started cooling down (or was disabled) since: trade it for
            // a usable one, or give it back and wait like everyone else.
            if let Some(other) = self.pool.try_reserve() {
                self.lease = Some(other);
                return Poll::Ready(Ok(()));
            }
            self.lease = None;
        }
        let lease = ready!(self.pool.poll_reserve(&mut self.waiter, cx))?;
        self.lease = Some(lease);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut lease = self
            .lease
            .take()
            .expect("KeyRotation::call without a key: poll_ready must return Ready first");
        if let Some(tried) = req.extensions().get::<TriedKeys>() {
            // A retry: prefer a key this request has not been refused on yet.
            if tried.contains(lease.index()) {
                if let Some(untried) = self.pool.try_reserve_where(|i| !tried.contains(i)) {
                    lease = untried;
                }
            }
            tried.insert(lease.index());
        }
        let mut req = req;
        self.placement.apply(&lease, &mut req);
        lease.mark_sent();
        ResponseFuture::new(self.inner.call(req), lease)
    }
}

impl<S: Clone> Clone for KeyRotation<S> {
    fn clone(&self) -> Self {
        Self::from_parts(
            self.inner.clone(),
            self.pool.clone(),
            self.placement.clone(),
        )
    }
}

impl<S: fmt::Debug> fmt::Debug for KeyRotation<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRotation")
            .field("inner", &self.inner)
            .field("pool", &self.pool)
            .field("lease", &self.lease)
            .finish()
    }
}
