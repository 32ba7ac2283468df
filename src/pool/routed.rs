//! Reserving a key for a request's [`Route`] (see [`crate::route`]).

use std::sync::Arc;

use super::KeyPool;
use super::lease::Lease;
use crate::route::{BucketId, RequestHead, Route, affinity_hash};

impl KeyPool {
    /// Does this pool route requests ([`KeyPoolBuilder::router`](super::KeyPoolBuilder::router))?
    /// Then [`KeyRotation`](crate::KeyRotation) chooses keys in `call`.
    #[inline]
    pub fn routes(&self) -> bool {
        self.inner.router.is_some()
    }

    /// The route of a request: its bucket (interned; the overflow bucket past the bound)
    /// and its affinity hash, as the pool's router reads them. [`Route::ANY`] without a
    /// router.
    pub fn route(&self, head: &RequestHead<'_>) -> Route {
        let Some(router) = &self.inner.router else {
            return Route::ANY;
        };
        Route {
            bucket: router
                .bucket(head)
                .map_or(BucketId::DEFAULT, |name| self.inner.buckets.intern(name)),
            affinity: router.affinity(head).map(affinity_hash),
        }
    }

    /// The id of the bucket named `name`, added if new (and within the bound).
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
    pub fn try_reserve_route(&self, route: &Route) -> Option<Lease> {
        match self.inner.bucket_state(route.bucket) {
            Some(bucket) => self.inner.try_reserve_in(bucket),
            None => self.try_reserve(),
        }
    }

    /// Reserves a key among those `allowed` (by 1-based position) that can take a request
    /// of `route` now, as [`try_reserve_where`](Self::try_reserve_where) does.
    pub fn try_reserve_route_where(
        &self,
        route: &Route,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<Lease> {
        match self.inner.bucket_state(route.bucket) {
            Some(bucket) => self.inner.try_reserve_in_where(bucket, allowed),
            None => self.try_reserve_where(allowed),
        }
    }
}
