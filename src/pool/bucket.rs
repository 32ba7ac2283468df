//! Buckets: what a provider meters apart on one key (usually the model).
//!
//! A pool with a router ([`KeyPoolBuilder::router`](super::KeyPoolBuilder)) keeps, for
//! each (key, bucket), a lane: a [`Slot`](super::slot::Slot) of its own, with the in-flight
//! count, rest, probe, backoff level, learned concurrency limit and quota of that bucket on
//! that key. The key's own slot keeps what is account-wide: disabled, an account-wide rest
//! (a spent balance, an account's daily cap) and its probe. A request for bucket `b` takes
//! key `k` when `k`'s slot and `k`'s lane for `b` both allow ([`Slot::try_take_in`]).
//!
//! ```text
//!   key slot (account-wide)          lanes (per bucket)
//!   ┌──────────────────────┐         ┌─────────────┐ ┌─────────────┐
//!   │ disabled / rest word │ ──────► │ gpt-4o      │ │ gpt-4o-mini │  ...
//!   │ probe                │         │ in flight,  │ │ in flight,  │
//!   │ failures, rejected   │         │ rest, probe,│ │ rest, probe,│
//!   └──────────────────────┘         │ limit, quota│ │ limit, quota│
//!                                    └─────────────┘ └─────────────┘
//! ```
//!
//! Bucket names are interned into small ids ([`BucketId`]) by the pool's router
//! (`route::Buckets`): a known name costs a lookup without allocating, their number is
//! bounded, and names beyond the bound share one overflow bucket, so no caller can grow the
//! pool's state by making names up. Each bucket has its own waiters: a waiter for one
//! bucket is woken by a slot freed or a rest ended in that bucket, never by another's; what
//! concerns every bucket (a key disabled or resting account-wide, a reload) wakes all.
//!
//! Lanes are made on first use, one per (key, bucket) taken, and kept for the key's life.
//!
//! [`Slot::try_take_in`]: super::slot::Slot::try_take_in

use std::sync::{Arc, OnceLock};

use super::Signals;
use crate::route::{BucketId, Buckets};

/// The name the default bucket (requests that name none) shows in stats.
pub(super) const DEFAULT: &str = "(none)";

/// The name the overflow bucket shows in stats.
pub(super) const OVERFLOW: &str = "(other)";

/// One bucket: its id, its name, and its waiters.
pub(super) struct Bucket {
    /// The bucket's id as an index: where each key keeps its lane for it.
    pub(super) index: usize,
    pub(super) name: Box<str>,
    /// The waiters of this bucket, the settings every lane needs, and the lowest
    /// concurrency limit a lane of it learned.
    pub(super) signals: Arc<Signals>,
    /// The pool's bucket names, told when the provider accepts a request in this bucket.
    pub(super) names: Arc<Buckets>,
}

impl Bucket {
    /// The provider accepted a request in this bucket; `candidate`, the request's name if
    /// it was new and sent in the overflow bucket.
    #[inline]
    pub(super) fn confirm(&self, candidate: Option<u64>) {
        self.names.confirm(BucketId(self.index as u16));
        if let Some(hash) = candidate {
            if self.names.confirm_candidate(hash) {
                // Requests of that name waiting here move to its own bucket.
                self.signals.notify_all();
            }
        }
    }
}

/// The state of each bucket, by id, made on first use.
pub(super) struct BucketStates {
    entries: Box<[OnceLock<Arc<Bucket>>]>,
}

impl BucketStates {
    /// Room for `max` named buckets, the default bucket and the overflow bucket.
    pub(super) fn new(max: usize) -> Self {
        Self {
            entries: (0..max + 2).map(|_| OnceLock::new()).collect(),
        }
    }

    /// How many lanes a key keeps room for: one per bucket id.
    pub(super) fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Every bucket made so far.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Bucket>> {
        self.entries.iter().filter_map(OnceLock::get)
    }

    /// The bucket `id`, made on first use (named as `names` knows it, with waiters of its
    /// own from `root`'s settings). `None` for an id beyond the pool's (another pool's).
    #[inline]
    pub(super) fn get(
        &self,
        id: BucketId,
        names: &Arc<Buckets>,
        root: &Signals,
    ) -> Option<&Arc<Bucket>> {
        let entry = self.entries.get(id.index())?;
        Some(entry.get_or_init(|| Self::make(id, names, root)))
    }

    #[cold]
    fn make(id: BucketId, names: &Arc<Buckets>, root: &Signals) -> Arc<Bucket> {
        let name: Box<str> = if id == BucketId::DEFAULT {
            DEFAULT.into()
        } else {
            names
                .name(id)
                .map_or_else(|| OVERFLOW.into(), |name| (*name).into())
        };
        Arc::new(Bucket {
            index: id.index(),
            name,
            signals: Arc::new(root.for_bucket()),
            names: names.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;
    use crate::classify::{Outcome, Scope};
    use crate::key::{ApiKey, KeySet, KeySpec};
    use crate::pool::{KeyPool, KeyState, Lease, Waiter};
    use crate::route::{RequestHead, Route, Router};

    /// Buckets by the `x-model` header (these tests reserve by bucket directly).
    #[derive(Debug)]
    struct ByModelHeader;

    impl Router for ByModelHeader {
        fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
            head.headers.get("x-model")?.to_str().ok()
        }
    }

    fn pool(keys: &str) -> KeyPool {
        KeyPool::builder(KeySet::parse(keys).unwrap())
            .router(ByModelHeader)
            .build()
    }

    fn bucket(pool: &KeyPool, name: &str) -> Arc<Bucket> {
        let id = pool.bucket(name);
        pool.inner.bucket_state(id).unwrap().clone()
    }

    fn take(pool: &KeyPool, bucket: &Arc<Bucket>) -> Option<Lease> {
        let lease = pool.inner.try_reserve_in(bucket, 0)?;
        lease.mark_sent();
        Some(lease)
    }

    fn refused(seconds: u64) -> Outcome {
        Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(seconds)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rest_in_one_bucket_leaves_the_keys_other_buckets_serving() {
        let pool = pool("k1");
        let (a, b) = (bucket(&pool, "model-a"), bucket(&pool, "model-b"));
        take(&pool, &a).unwrap().record(refused(2));
        assert!(take(&pool, &a).is_none(), "model-a rests on the key");
        let other = take(&pool, &b).expect("model-b is not resting");
        assert_eq!(other.bucket(), Some("model-b"));
        let stats = pool.bucket_snapshot();
        let state = |name: &str| stats.iter().find(|s| s.bucket == name).unwrap().key.state;
        assert_eq!(state("model-a"), KeyState::Resting);
        assert_eq!(state("model-b"), KeyState::Healthy);
        // The key itself is not resting, and counts both buckets' requests.
        let key = &pool.snapshot()[0];
        assert_eq!(
            (key.state, key.requests, key.rate_limited),
            (KeyState::Healthy, 2, 1)
        );
        drop(other);
        tokio::time::advance(Duration::from_secs(2)).await;
        let probe = take(&pool, &a).expect("back after its rest");
        assert!(probe.is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_account_quota_rests_every_bucket_of_the_key() {
        let pool = pool("k1,k2");
        let (a, b) = (bucket(&pool, "a"), bucket(&pool, "b"));
        let lease = pool.inner.try_reserve_in_where(&a, 0, |p| p == 1).unwrap();
        lease.record(Outcome::QuotaExhausted {
            reset_after: Some(Duration::from_secs(60)),
            scope: Scope::Key,
        });
        drop(lease);
        // Key 1 rests for both buckets; key 2 serves both.
        for bucket in [&a, &b] {
            assert_eq!(take(&pool, bucket).unwrap().position(), 2);
            assert!(
                pool.inner
                    .try_reserve_in_where(bucket, 0, |p| p == 1)
                    .is_none()
            );
        }
        assert_eq!(pool.snapshot()[0].state, KeyState::Resting);
        // Back with one probe (of any bucket), then every bucket.
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = pool.inner.try_reserve_in_where(&b, 0, |p| p == 1).unwrap();
        assert!(probe.is_probe());
        assert!(pool.inner.try_reserve_in_where(&a, 0, |p| p == 1).is_none());
        probe.record(Outcome::Success);
        drop(probe);
        assert!(pool.inner.try_reserve_in_where(&a, 0, |p| p == 1).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_quota_rests_that_bucket_only() {
        let pool = pool("k1");
        let (a, b) = (bucket(&pool, "a"), bucket(&pool, "b"));
        take(&pool, &a).unwrap().record(Outcome::QuotaExhausted {
            reset_after: Some(Duration::from_secs(3600)),
            scope: Scope::Bucket,
        });
        assert!(take(&pool, &a).is_none());
        assert!(take(&pool, &b).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_for_one_bucket_is_woken_by_its_bucket_only() {
        let pool = KeyPool::builder(KeySet::parse("k1").unwrap())
            .max_in_flight_per_key(1)
            .router(ByModelHeader)
            .build();
        let (a, b) = (bucket(&pool, "a"), bucket(&pool, "b"));
        let held_a = take(&pool, &a).unwrap();
        let held_b = take(&pool, &b).unwrap();
        let route_b = Route {
            bucket: pool.bucket("b"),
            ..Route::ANY
        };
        let mut waiter = Waiter::new();
        let mut waiting = tokio_test::task::spawn(poll_fn(|cx| {
            pool.poll_reserve_route(&route_b, &mut waiter, None, cx)
        }));
        assert!(waiting.poll().is_pending());
        // A slot freed in bucket a is no use to a waiter of b: not woken.
        drop(held_a);
        assert!(!waiting.is_woken());
        assert!(waiting.poll().is_pending());
        // A slot freed in b wakes it, and it takes the slot.
        drop(held_b);
        assert!(waiting.is_woken());
        assert!(waiting.poll().is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_wide_event_wakes_every_buckets_waiters() {
        let pool = KeyPool::builder(KeySet::parse("k1,k2").unwrap())
            .max_in_flight_per_key(1)
            .router(ByModelHeader)
            .build();
        let b = bucket(&pool, "b");
        let held: Vec<Lease> = (0..2).map(|_| take(&pool, &b).unwrap()).collect();
        let route_b = Route {
            bucket: pool.bucket("b"),
            ..Route::ANY
        };
        let mut waiter = Waiter::new();
        let mut waiting = tokio_test::task::spawn(poll_fn(|cx| {
            pool.poll_reserve_route(&route_b, &mut waiter, None, cx)
        }));
        assert!(waiting.poll().is_pending());
        // A reload (new keys may be free) concerns every bucket.
        pool.reload(KeySet::parse("k1,k2,k3").unwrap());
        assert!(waiting.is_woken());
        assert!(waiting.poll().is_ready());
        drop(held);
    }

    #[test]
    fn names_beyond_the_bound_share_the_overflow_bucket() {
        let pool = KeyPool::builder(KeySet::parse("k1").unwrap())
            .router(ByModelHeader)
            .max_buckets(2)
            .build();
        let (a, b) = (bucket(&pool, "m1"), bucket(&pool, "m2"));
        assert_eq!((a.index, b.index), (1, 2));
        // A known name keeps its bucket; new ones go to the overflow bucket.
        assert_eq!(bucket(&pool, "m1").index, 1);
        let over = bucket(&pool, "made-up-1");
        assert_eq!((over.index, &*over.name), (3, OVERFLOW));
        assert!(Arc::ptr_eq(&over, &bucket(&pool, "made-up-2")));
        // A rest of the overflow bucket leaves the named ones serving.
        let lease = pool.inner.try_reserve_in(&over, 0).unwrap();
        lease.record(refused(60));
        drop(lease);
        assert!(pool.inner.try_reserve_in(&over, 0).is_none());
        assert!(pool.inner.try_reserve_in(&a, 0).is_some());
        let default = pool.inner.bucket_state(BucketId::DEFAULT).unwrap();
        assert_eq!(&*default.name, DEFAULT);
    }

    #[test]
    fn a_keys_own_limits_in_a_bucket_override_its_cap_there() {
        let spec = |key: &str| {
            KeySpec::new(ApiKey::new(key).unwrap())
                .max_in_flight(8)
                .bucket_max_in_flight("small", 1)
        };
        let keys = KeySet::from_specs(vec![spec("k1")]).unwrap();
        let pool = KeyPool::builder(keys).router(ByModelHeader).build();
        let (small, big) = (bucket(&pool, "small"), bucket(&pool, "big"));
        let held = take(&pool, &small).unwrap();
        assert!(take(&pool, &small).is_none(), "1 in flight for `small`");
        let big_leases: Vec<Lease> = (0..8).map(|_| take(&pool, &big).unwrap()).collect();
        assert!(take(&pool, &big).is_none(), "8 for the others");
        let stats = pool.bucket_snapshot();
        let limit = |name: &str| {
            stats
                .iter()
                .find(|s| s.bucket == name)
                .unwrap()
                .key
                .concurrency_limit
        };
        assert_eq!((limit("small"), limit("big")), (Some(1), Some(8)));
        drop((held, big_leases));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_learned_on_one_key_is_where_the_others_start() {
        let pool = pool("k1,k2,k3");
        let a = bucket(&pool, "a");
        let on = |p: usize| {
            let lease = pool.inner.try_reserve_in_where(&a, 0, |q| q == p).unwrap();
            lease.mark_sent();
            lease
        };
        // Key 2 has a lane for `a` already; key 3 has none yet.
        let early = on(2);
        let leases: Vec<Lease> = (0..3).map(|_| on(1)).collect();
        leases[2].record(refused(0)); // 2 others in flight on key 1
        let stats = pool.bucket_snapshot();
        let limit = |p: usize| {
            stats
                .iter()
                .find(|s| s.key.position == p)
                .map(|s| s.key.concurrency_limit)
        };
        assert_eq!(limit(1), Some(Some(2)));
        assert_eq!(limit(2), Some(Some(2)), "taught: it had learned nothing");
        drop(early);
        let _third = on(3);
        let stats = pool.bucket_snapshot();
        let three = stats.iter().find(|s| s.key.position == 3).unwrap();
        assert_eq!(
            three.key.concurrency_limit,
            Some(2),
            "a new lane starts there"
        );
    }
}
