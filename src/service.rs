//! [`KeyRotation`]: the service that reserves a key in `poll_ready` and uses it in `call`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

use crate::BoxError;
use crate::auth::Placement;
use crate::body::TrackedBody;
use crate::future::ResponseFuture;
use tokio::time::Instant;

use crate::error::{AllKeysDisabled, NoKeyAvailable};
use crate::pool::{Admit, Check, KeyPool, Lease, Reserve, Waiter};
use crate::retry::TriedKeys;
use crate::route::{RequestHead, WaitUntil};

/// Middleware that puts a key from a shared [`KeyPool`] on every request.
///
/// - `poll_ready` first drives the inner service to readiness, then reserves a key (a
///   [`Lease`], counted in flight). With no key available it returns `Pending` and arranges
///   its own wake-up, for at most the pool's wait budget
///   ([`KeyPoolBuilder::max_wait`](crate::KeyPoolBuilder::max_wait), 30 s by default).
/// - `poll_ready` never fails for want of a key: tower says a service whose `poll_ready`
///   failed must be dropped, and behind tower's `Buffer` that would end
///   the service for good, though a reload could bring a key back. When no key can come
///   within the budget ([`NoKeyAvailable`], decided at once when the earliest return is
///   past it) or every key is disabled ([`AllKeysDisabled`]), it is ready and that one call
///   fails with the error.
/// - `call` checks the reservation again (a reload may have removed its key since, or the
///   key may have started resting, or owe its single probe to another request) and trades
///   it for a free key if needed, or sends nothing and fails the call with
///   [`NoKeyAvailable`] (nothing waited) when none is free: a request never goes out on a
///   resting key; then the key's header goes on the request, and the lease travels with
///   the response future and then the response body. A retried request (carrying
///   [`TriedKeys`]) goes to a key it has not tried if one is free.
/// - A service dropped between `poll_ready` and `call` gives its reservation back. `Clone`
///   gives a service with no reservation.
/// - A pool with a [`Router`](crate::route::Router) chooses keys by the request (its model,
///   its session), which `poll_ready` cannot see: there `poll_ready` readies only the inner
///   service, and `call` takes a key for the request's route, or returns a future that
///   waits for one within the budget, holding the readied inner service (a clone of it
///   stays in this service: hence `S: Clone`). See [`route`](crate::route).
///
/// The inner service is driven to readiness first so that a key is never held idle (and
/// counted in flight) while the inner client is still connecting.
///
/// [`NoKeyAvailable`]: crate::NoKeyAvailable
/// [`AllKeysDisabled`]: crate::AllKeysDisabled
///
/// # Panics
///
/// `call` panics if `poll_ready` did not return `Ready(Ok(()))` first, as tower's
/// concurrency limit does.
pub struct KeyRotation<S> {
    inner: S,
    pool: KeyPool,
    placement: Placement,
    reserved: Option<Reserved>,
    waiter: Waiter,
}

/// What `poll_ready` set aside for the next `call`.
#[derive(Debug)]
enum Reserved {
    /// The pool routes requests: the inner service is ready, and `call` chooses the key.
    Routed,
    Lease(Lease),
    /// A lease waiting for the store shared with other replicas to admit it.
    Admitting(Admit),
    /// No key: the call fails with this.
    Refused(Refused),
}

#[derive(Debug)]
enum Refused {
    NoKey(NoKeyAvailable),
    AllDisabled(AllKeysDisabled),
    TooLarge(crate::CostTooLarge),
}

impl From<Refused> for BoxError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::NoKey(e) => e.into(),
            Refused::AllDisabled(e) => e.into(),
            Refused::TooLarge(e) => e.into(),
        }
    }
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
            reserved: None,
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
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(self.inner.poll_ready(cx)).map_err(Into::into)?;
        if self.pool.routes() {
            // The key depends on the request: `call` chooses it.
            self.reserved = Some(Reserved::Routed);
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.poll_reserve(cx));
            match &self.reserved {
                // With a shared state backend, a lease on a capped key waits for the store.
                Some(Reserved::Lease(lease)) if lease.needs_admission() => {}
                Some(Reserved::Admitting(_)) => {}
                _ => return Poll::Ready(Ok(())),
            }
            if ready!(self.poll_admission(cx)) {
                return Poll::Ready(Ok(()));
            }
            // Full across the replicas: that key reads busy here now; look again.
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let reserved = self
            .reserved
            .take()
            .expect("KeyRotation::call without a key: poll_ready must return Ready first");
        let mut lease = match reserved {
            Reserved::Routed => return self.call_routed(req),
            Reserved::Lease(lease) => lease,
            Reserved::Admitting(_) => {
                panic!("KeyRotation::call without a key: poll_ready must return Ready first")
            }
            Reserved::Refused(refused) => return ResponseFuture::refused(refused.into()),
        };
        let tried = req.extensions().get::<TriedKeys>();
        let check = lease.check();
        let retried_on_it = tried.is_some_and(|tried| tried.contains(lease.position()));
        if check != Check::Usable || retried_on_it {
            // A retry prefers a key this request has not been refused on yet; a
            // reservation that went stale since `poll_ready` is traded for any free key.
            let other = tried
                .and_then(|tried| self.pool.try_reserve_where(|p| !tried.contains(p)))
                .or_else(|| {
                    (check != Check::Usable)
                        .then(|| self.pool.try_reserve())
                        .flatten()
                });
            // A lease the store shared with other replicas must admit first (a capped key,
            // or a shared probe) cannot be traded for here: `call` cannot wait for the
            // store, and sending it unasked could exceed the key's cap across the
            // replicas. It is given back, and the call goes on as if no key were free.
            let other = other.filter(|other| !other.needs_admission());
            match (other, check) {
                (Some(other), _) => lease = other,
                // A retry on a tried key that can take it: that is the earliest chance.
                (None, Check::Usable) => {}
                // A key that started resting since `poll_ready` (a refusal came back on
                // it), a removed or disabled key, or one whose single probe is out, must
                // not take it: nothing is sent, and the caller hears when the earliest key
                // is back (`NoKeyAvailable` with nothing waited: a retry layer outside
                // waits for that key within the budget).
                (None, Check::Resting | Check::ProbeRunning | Check::Gone) => {
                    let retry_after = self
                        .pool
                        .earliest_return_in()
                        .filter(|wait| !wait.is_zero())
                        .unwrap_or(Duration::from_secs(1));
                    let error = NoKeyAvailable::new(retry_after, Duration::ZERO);
                    return ResponseFuture::refused(error.into());
                }
            }
        }
        if let Some(tried) = tried {
            tried.insert(lease.position());
        }
        let mut req = req;
        self.placement.apply(&lease, &mut req);
        lease.mark_sent();
        ResponseFuture::new(self.inner.call(req), lease)
    }
}

impl<S> KeyRotation<S> {
    /// Sends a request of a routing pool with a key that can take its route now, or
    /// returns a future that waits for one (holding this readied service; a clone stays).
    fn call_routed<B, ResBody>(&mut self, mut req: Request<B>) -> ResponseFuture<S, B, ResBody>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
        ResBody: http_body::Body,
    {
        let route = self.pool.route(&RequestHead::of(&req));
        let tried = req.extensions().get::<TriedKeys>();
        // A retry prefers a key this request has not been refused on yet.
        let lease = tried
            .filter(|tried| !tried.is_empty())
            .and_then(|tried| {
                self.pool
                    .try_reserve_route_where(&route, |p| !tried.contains(p))
            })
            .or_else(|| self.pool.try_reserve_route(&route))
            // A lease the store must admit waits for it in the future.
            .filter(|lease| !lease.needs_admission());
        if let Some(lease) = lease {
            if let Some(tried) = tried {
                tried.insert(lease.position());
            }
            self.placement.apply(&lease, &mut req);
            lease.mark_sent();
            return ResponseFuture::new(self.inner.call(req), lease);
        }
        let now = Instant::now();
        let budget_end = self.pool.max_wait().and_then(|wait| now.checked_add(wait));
        // A retry's attempt stops where the request's budget does.
        let until = tried
            .and_then(TriedKeys::wait_until)
            .or_else(|| req.extensions().get::<WaitUntil>().map(|until| until.0));
        let deadline = match (until, budget_end) {
            (Some(until), Some(end)) => Some(until.min(end)),
            (Some(until), None) => Some(until),
            (None, end) => end,
        };
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::routing(
            ready,
            req,
            route,
            self.pool.clone(),
            self.placement.clone(),
            deadline,
        )
    }

    /// Waits for the store shared with other replicas to admit the reserved lease; `false`
    /// (and no reservation) if it refused. Out of line: only a shared pool gets here.
    #[inline(never)]
    fn poll_admission(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let admit = match self.reserved.take() {
            Some(Reserved::Lease(lease)) => lease.admit(),
            Some(Reserved::Admitting(admit)) => admit,
            reserved => {
                self.reserved = reserved;
                return Poll::Ready(true);
            }
        };
        let Reserved::Admitting(admit) = self.reserved.insert(Reserved::Admitting(admit)) else {
            unreachable!("just inserted");
        };
        match ready!(Pin::new(admit).poll(cx)) {
            Some(lease) => {
                self.reserved = Some(Reserved::Lease(lease));
                Poll::Ready(true)
            }
            None => {
                self.reserved = None;
                Poll::Ready(false)
            }
        }
    }

    /// Reserves a key for the next call (or decides that it fails), waiting within the
    /// pool's budget.
    #[inline]
    fn poll_reserve(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.reserved {
            Some(Reserved::Routed) => return Poll::Ready(()),
            Some(Reserved::Lease(lease)) if lease.is_usable() => return Poll::Ready(()),
            Some(Reserved::Admitting(_)) => return Poll::Ready(()),
            // The reserved key was removed, started resting or was disabled since: trade it
            // for a usable one, or give it back and wait like everyone else.
            Some(Reserved::Lease(_)) => {
                self.reserved = self.pool.try_reserve().map(Reserved::Lease)
            }
            // A refusal is decided afresh: a key may have come back since.
            Some(Reserved::Refused(_)) => self.reserved = None,
            None => {}
        }
        if self.reserved.is_none() {
            self.reserved = self.pool.try_reserve().map(Reserved::Lease);
        }
        if self.reserved.is_some() {
            // Done waiting, if it had waited: give up the registration, and let the next
            // wait count afresh.
            self.waiter.reset();
            return Poll::Ready(());
        }
        // The slow path: wait for a key, within the budget counted from the first look.
        let since = *self.waiter.since.get_or_insert_with(Instant::now);
        let deadline = self
            .pool
            .max_wait()
            .and_then(|wait| since.checked_add(wait));
        self.reserved = Some(
            match ready!(self.pool.poll_reserve(&mut self.waiter, deadline, cx)) {
                Reserve::Lease(lease) => Reserved::Lease(lease),
                Reserve::NoKey(e) => Reserved::Refused(Refused::NoKey(e)),
                Reserve::AllDisabled(e) => Reserved::Refused(Refused::AllDisabled(e)),
                Reserve::TooLarge(e) => Reserved::Refused(Refused::TooLarge(e)),
            },
        );
        Poll::Ready(())
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
            .field("reserved", &self.reserved)
            .finish()
    }
}
