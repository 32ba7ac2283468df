//! Reserving a key for a request's [`Route`] (see [`crate::route`]).

use std::sync::Arc;

use super::KeyPool;
use super::affinity::Patience;
use super::lease::Lease;
use crate::route::{BucketId, RequestHead, Route, affinity_hash};

impl KeyPool {
    /// Does this pool route requests ([`KeyPoolBuilder::router`](super::KeyPoolBuilder::router))?
    /// Then [`KeyRotation`](crate::KeyRotation) chooses keys in `call`.
    #[inline]
    pub fn routes(&self) -> bool {
        self.inner.router.is_some()
    }

    /// The route of a request: its bucket and its affinity hash, as the pool's router reads
    /// them. [`Route::ANY`] without a router.
    ///
    /// A bucket name new to the pool gets a bucket of its own at once while few names
    /// wait for the provider's first acceptance; beyond that (and beyond
    /// [`max_buckets`](super::KeyPoolBuilder::max_buckets)) its requests share the overflow
    /// bucket until one of them is accepted (a 2xx answer: [`Lease::confirm_bucket`]).
    /// Names the provider refuses, such as made-up models, therefore cannot take the
    /// buckets of the models callers really use.
    pub fn route(&self, head: &RequestHead<'_>) -> Route {
        let Some(router) = &self.inner.router else {
            return Route::ANY;
        };
        let (bucket, candidate) = router
            .bucket(head)
            .map_or((BucketId::DEFAULT, None), |name| {
                self.inner.buckets.route(name)
            });
        Route {
            bucket,
            affinity: router.affinity(head).map(affinity_hash),
            candidate,
            tokens: router.tokens(head).unwrap_or(0),
        }
    }

    /// The id of the bucket named `name`, added if new (and within the bound), as a name
    /// the provider accepts: for names the program trusts, not names read from requests
    /// (those go through [`route`](Self::route)).
    pub fn bucket(&self, name: &str) -> BucketId {
        self.inner.buckets.intern(name)
    }

    /// The name of bucket `id`; `None` for the default bucket, the overflow bucket, and
    /// ids this pool never gave.
    pub fn bucket_name(&self, id: BucketId) -> Option<Arc<str>> {
        self.inner.buckets.name(id)
    }

    /// Reserves a key that can take a request of `route` now, or `None`. Without a bucket
    /// or affinity in the route, as [`try_reserve`](Self::try_reserve).
    ///
    /// A route with an affinity (a request naming its session) takes its session's own key:
    /// the key it last spilled to if remembered, else its preferred key. When that key
    /// cannot take it now, the request spills to the next key of the session's order that
    /// can, unless its key comes back within the
    /// [affinity wait](super::KeyPoolBuilder::affinity_wait): then `None`, and a caller
    /// that waits ([`KeyRotation`](crate::KeyRotation) does) gets that key when it comes
    /// back, or spills at the end of the affinity wait.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::route::{RequestHead, Router};
    /// use tower_key_rotation::{KeyPool, KeySet};
    ///
    /// #[derive(Debug)]
    /// struct SessionHeader;
    ///
    /// impl Router for SessionHeader {
    ///     fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
    ///         head.headers.get("x-session-id").map(|v| v.as_bytes())
    ///     }
    /// }
    ///
    /// let pool = KeyPool::builder(KeySet::parse("k1,k2,k3")?)
    ///     .router(SessionHeader)
    ///     .build();
    /// let request = http::Request::builder()
    ///     .header("x-session-id", "conversation-42")
    ///     .body(())?;
    /// let route = pool.route(&RequestHead::of(&request));
    /// let first = pool.try_reserve_route(&route).expect("a free key").position();
    /// // Every request of the session goes to the same key.
    /// for _ in 0..10 {
    ///     assert_eq!(pool.try_reserve_route(&route).unwrap().position(), first);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_reserve_route(&self, route: &Route) -> Option<Lease> {
        let bucket = self.inner.bucket_state(route.bucket);
        let lease = match (route.affinity, bucket) {
            (Some(id), bucket) => self
                .reserve_affinity(
                    id,
                    bucket,
                    route.tokens,
                    Patience::For(self.inner.affinity.wait),
                    |_| true,
                )
                .ok(),
            (None, Some(bucket)) => self.inner.try_reserve_in(bucket, route.tokens),
            (None, None) => self.try_reserve(),
        };
        lease.map(|lease| lease.with_candidate(route.candidate))
    }

    /// Reserves a key among those `allowed` (by 1-based position) that can take a request
    /// of `route` now, as [`try_reserve_where`](Self::try_reserve_where) does.
    pub fn try_reserve_route_where(
        &self,
        route: &Route,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<Lease> {
        let bucket = self.inner.bucket_state(route.bucket);
        let lease = match (route.affinity, bucket) {
            // A retry: the next allowed key of the session's order, at once.
            (Some(id), bucket) => self
                .reserve_affinity(id, bucket, route.tokens, Patience::None, allowed)
                .ok(),
            (None, Some(bucket)) => self
                .inner
                .try_reserve_in_where(bucket, route.tokens, allowed),
            // As an unrouted call does (a key reserved in `poll_ready`, traded in `call` if
            // the request was refused on it): the next key in rotation if allowed, so that
            // the rotation moves on as it would without a router.
            (None, None) => self
                .try_reserve()
                .filter(|lease| allowed(lease.position()))
                .or_else(|| self.try_reserve_where(allowed)),
        };
        lease.map(|lease| lease.with_candidate(route.candidate))
    }
}
