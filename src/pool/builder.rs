//! [`KeyPoolBuilder`]: the pool's settings.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::sync::{AtomicU32, Notify};
use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::affinity::Affinity;
use super::slot::Slot;
use super::table::Table;
use super::{BucketStates, KeyPool, Padded, PoolInner, Selection, Signals};
use crate::backoff::Backoff;
use crate::classify::Classifier;
use crate::key::KeySet;
use crate::quota::Quota;
use crate::route::{Buckets, Router};
use crate::shared::{BackendLink, DegradedPolicy, Shared, StateBackend};
use crate::tokens::TokenQuota;

/// The wait budget of a request by default (see [`KeyPoolBuilder::max_wait`]).
pub(super) const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// Builds a [`KeyPool`]. Made by [`KeyPool::builder`].
#[derive(Debug)]
pub struct KeyPoolBuilder {
    pub(super) keys: KeySet,
    pub(super) selection: Selection,
    pub(super) cap: u32,
    pub(super) quota: Option<Quota>,
    pub(super) backoff: Backoff,
    pub(super) classifier: Classifier,
    pub(super) learn_concurrency: bool,
    pub(super) max_wait: Option<Duration>,
    pub(super) affinity_wait: Duration,
    pub(super) affinity_ttl: Duration,
    pub(super) affinity_capacity: usize,
    pub(super) backend: Option<Arc<dyn StateBackend>>,
    pub(super) degraded: DegradedPolicy,
    pub(super) router: Option<Arc<dyn Router>>,
    pub(super) max_buckets: usize,
    pub(super) token_quota: Option<TokenQuota>,
    pub(super) token_window: Duration,
}

impl KeyPoolBuilder {
    /// How a key is chosen among the available ones (default [`Selection::RoundRobin`]).
    pub fn selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// At most `max` requests in flight per key (default: no cap), for keys without a cap
    /// of their own ([`KeySpec::max_in_flight`](crate::KeySpec::max_in_flight)). Callers beyond every key's cap wait for a
    /// slot.
    ///
    /// # Panics
    ///
    /// If `max` is zero: no request could ever be sent.
    pub fn max_in_flight_per_key(mut self, max: u32) -> Self {
        assert!(max > 0, "max_in_flight_per_key must be at least 1");
        self.cap = max;
        self
    }

    /// A request quota per key (default: none), for keys without a quota of their own
    /// ([`KeySpec::quota`](crate::KeySpec::quota)). Callers wait for the earliest key with quota, so requests the
    /// provider would refuse are never sent.
    pub fn quota_per_key(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// How rate-limited keys rest (see [`Backoff`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Replaces the response classifier (default [`classify::generic`](crate::classify::generic)).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Whether to learn each key's concurrency limit from refusals (default `true`).
    ///
    /// A `429` that comes back while other requests are in flight on the same key (in a
    /// pool with buckets: the same key and bucket) says the provider limits how many run at
    /// once: the key's limit drops to the number of other requests then in flight (never
    /// below 1), so that later callers wait for a slot instead of being refused. Keys that
    /// have learned nothing yet start from that limit too (keys of one tier share limits).
    ///
    /// The limit rises again by one at a time, never above
    /// [`max_in_flight_per_key`](Self::max_in_flight_per_key): a raise is tried 5 minutes
    /// after the limit was learned, once the key was busy at its limit; a refused try lowers
    /// the limit back without resting the key (its limit holds) and doubles the wait before
    /// the next (up to an hour); a served one holds (the waits:
    /// [`Backoff::raise_wait`](crate::Backoff::raise_wait)). The limit in force shows in
    /// [`KeyStats::concurrency_limit`](crate::pool::KeyStats::concurrency_limit).
    ///
    /// With a [state backend](Self::state_backend) the replicas learn together: the "other
    /// requests in flight" are every replica's, the limit, the back-off and the single try
    /// of a raise are the store's (see [`shared`](crate::shared)).
    pub fn learn_concurrency(mut self, learn: bool) -> Self {
        self.learn_concurrency = learn;
        self
    }

    /// How long a request may wait for a key, counted from its arrival and across all its
    /// attempts (default 30 s; `None`: for ever).
    ///
    /// [`KeyRotation::poll_ready`](crate::KeyRotation) waits at most this long for a key,
    /// and the [retry](crate::retry) waits for a key to take a refused request again only
    /// within what is left. When the earliest key comes back (a rest ends, quota refills)
    /// after the budget ends, the request fails at once with [`NoKeyAvailable`](crate::NoKeyAvailable) and its
    /// [`retry_after`](crate::NoKeyAvailable::retry_after), rather than at the end of the budget.
    pub fn max_wait(mut self, max_wait: Option<Duration>) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// How long a request of a session waits for its session's key when that key cannot
    /// take it now but comes back sooner (default 500 ms): a request ends on it, or its
    /// rest ends or its quota refills within this time. Past it, or when the key comes back
    /// later, the request spills at once to the next key of the session's order. Zero:
    /// spill at once. Waiting stays within [`max_wait`](Self::max_wait).
    ///
    /// Only requests that carry an affinity id wait so.
    pub fn affinity_wait(mut self, wait: Duration) -> Self {
        self.affinity_wait = wait;
        self
    }

    /// How long a session that spilled to another key is remembered after its last request
    /// (default 5 minutes, the providers' prompt-cache lifetime): its requests go to that
    /// key (now warm) first, not back to its preferred key.
    pub fn affinity_ttl(mut self, ttl: Duration) -> Self {
        self.affinity_ttl = ttl;
        self
    }

    /// Spilled sessions remembered at most (default 131,072; 8 bytes each, allocated on the
    /// first spill). Past it, the oldest of a few entries is forgotten (its session goes
    /// back to its preferred key). Zero: spilled sessions are not remembered.
    pub fn affinity_capacity(mut self, sessions: usize) -> Self {
        self.affinity_capacity = sessions;
        self
    }

    /// Shares the keys' state with other processes through `backend` (default: none, the
    /// state lives in this pool alone). See [`shared`](crate::shared) for what is shared
    /// and how.
    ///
    /// # Panics
    ///
    /// [`build`](Self::build) panics if the backend needs a runtime (the Redis one spawns
    /// its tasks on Tokio's) and is called outside one.
    pub fn state_backend(mut self, backend: impl StateBackend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// What each replica does alone while the state backend is unreachable (default
    /// [`DegradedPolicy::Split`]).
    pub fn degraded_policy(mut self, policy: DegradedPolicy) -> Self {
        self.degraded = policy;
        self
    }

    /// Routes each request by what it carries ([`Router`]): the bucket the provider
    /// meters it in (its model, say) and the session it belongs to. Default: none, and keys
    /// are reserved in `poll_ready` before the request is seen.
    ///
    /// With a router, [`KeyRotation`](crate::KeyRotation) chooses the key in `call`, for
    /// the request's [`Route`](crate::route::Route): at once if a key can take it, else its
    /// response future waits for one within the wait budget (see [`route`](crate::route)).
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::route::{RequestHead, Router};
    /// use tower_key_rotation::{KeyPool, KeySet};
    ///
    /// #[derive(Debug)]
    /// struct ByModelHeader;
    ///
    /// impl Router for ByModelHeader {
    ///     fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
    ///         head.headers.get("x-model")?.to_str().ok()
    ///     }
    /// }
    ///
    /// let pool = KeyPool::builder(KeySet::parse("k1,k2").unwrap())
    ///     .router(ByModelHeader)
    ///     .build();
    /// assert!(pool.routes());
    /// ```
    pub fn router(mut self, router: impl Router) -> Self {
        self.router = Some(Arc::new(router));
        self
    }

    /// At most `max` named buckets are tracked apart (default
    /// [`DEFAULT_MAX_BUCKETS`](crate::route::DEFAULT_MAX_BUCKETS)); requests naming further
    /// buckets share one overflow bucket, so that callers inventing names cannot grow the
    /// pool's state. Names read from requests take buckets of their own only once the
    /// provider accepts a request in them, beyond a few (8) provisional ones (see
    /// [`KeyPool::route`]); names given in the key set's bucket limits count from the start.
    ///
    /// # Panics
    ///
    /// If `max` is above 65,533 (bucket ids are 16 bits).
    pub fn max_buckets(mut self, max: usize) -> Self {
        assert!(
            max <= usize::from(u16::MAX) - 2,
            "max_buckets must be at most 65533"
        );
        self.max_buckets = max;
        self
    }

    /// A token quota for each (key, bucket) (default: none, until learned): a request of
    /// `n` tokens takes `n` units of it, and waits until they fit within its wait budget.
    ///
    /// A request's tokens are what its [`Route`](crate::route::Route) carries, read by the
    /// pool's [`Router::tokens`](crate::route::Router::tokens): only a pool with a
    /// [router](Self::router) knows them (keys are otherwise reserved before the request is
    /// seen), and requests without tokens cost what they cost without this quota. A request
    /// of more tokens than a whole window fails at once with
    /// [`CostTooLarge`](crate::CostTooLarge). Without a configured quota, a (key, bucket)
    /// learns its limit from the first answer whose headers report one
    /// (`x-ratelimit-limit-tokens`, `anthropic-ratelimit-tokens-limit`), and every answer's
    /// remaining tokens hold its quota no looser than the provider's.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::route::{RequestHead, Router};
    /// use tower_key_rotation::{KeyPool, KeySet, TokenQuota};
    ///
    /// /// The caller's estimate of a request's tokens, in a header.
    /// #[derive(Debug)]
    /// struct Estimated;
    ///
    /// impl Router for Estimated {
    ///     fn tokens(&self, head: &RequestHead<'_>) -> Option<u64> {
    ///         head.headers.get("x-tokens")?.to_str().ok()?.parse().ok()
    ///     }
    /// }
    ///
    /// let pool = KeyPool::builder(KeySet::parse("k1")?)
    ///     .router(Estimated)
    ///     .token_quota_per_key(TokenQuota::per_minute(10_000))
    ///     .build();
    /// let request = |tokens: u64| http::Request::builder().header("x-tokens", tokens).body(());
    /// let big = pool.route(&RequestHead::of(&request(8_000)?));
    /// let held = pool.try_reserve_route(&big).expect("8,000 of 10,000 fit");
    /// held.mark_sent();
    /// assert!(pool.try_reserve_route(&big).is_none(), "another 8,000 must wait");
    /// let small = pool.route(&RequestHead::of(&request(2_000)?));
    /// assert!(pool.try_reserve_route(&small).is_some());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn token_quota_per_key(mut self, quota: TokenQuota) -> Self {
        self.token_quota = Some(quota);
        self
    }

    /// The window of token limits learned from the provider's headers (default a minute,
    /// as OpenAI and Anthropic meter tokens per minute): a learned limit of `n` refills `n`
    /// tokens over this long.
    ///
    /// # Panics
    ///
    /// If `window` is zero.
    pub fn token_window(mut self, window: Duration) -> Self {
        assert!(!window.is_zero(), "token_window must be longer than zero");
        self.token_window = window;
        self
    }

    /// Builds the pool.
    ///
    /// # Panics
    ///
    /// With a [state backend](Self::state_backend) that spawns tasks, outside a Tokio
    /// runtime.
    pub fn build(self) -> KeyPool {
        let shared = self
            .backend
            .map(|backend| Shared::new(backend, self.degraded, self.learn_concurrency));
        let (shared, ops) = match shared {
            Some((shared, ops)) => (Some(shared), Some(ops)),
            None => (None, None),
        };
        let inner = Arc::new_cyclic(|pool: &Weak<PoolInner>| {
            let signals = Arc::new(Signals {
                backoff: self.backoff,
                classifier: self.classifier,
                learn_concurrency: self.learn_concurrency,
                max_wait: self.max_wait,
                epoch: Instant::now(),
                waiters: Padded::default(),
                notify: Arc::new(Notify::new()),
                patient: Padded::default(),
                patient_notify: Arc::new(Notify::new()),
                pool: pool.clone(),
                shared: shared.clone(),
                fan_out: self.router.is_some(),
                learned: AtomicU32::new(u32::MAX),
                token_quota: self.token_quota,
                token_window: self.token_window,
            });
            let bucket_states = self
                .router
                .is_some()
                .then(|| BucketStates::new(self.max_buckets));
            let lanes = bucket_states.as_ref().map_or(0, BucketStates::capacity);
            let slots = self
                .keys
                .specs()
                .iter()
                .map(|spec| Slot::new(spec.clone(), self.cap, self.quota, &signals, lanes))
                .collect();
            PoolInner {
                table: ArcSwap::from_pointee(Table::new(slots, self.router.is_some())),
                signals,
                selection: self.selection,
                default_cap: self.cap,
                default_quota: self.quota,
                cursor: Padded::default(),
                affinity: Affinity::new(
                    self.affinity_wait,
                    self.affinity_ttl,
                    self.affinity_capacity,
                ),
                reload: Mutex::new(()),
                router: self.router,
                buckets: Arc::new(configured_buckets(&self.keys, self.max_buckets)),
                bucket_states,
            }
        });
        if let (Some(shared), Some(ops)) = (shared, ops) {
            let link = BackendLink {
                shared: shared.clone(),
                pool: Arc::downgrade(&inner),
            };
            shared.backend.attach(link, ops);
        }
        KeyPool { inner }
    }
}

/// The pool's bucket names, with those the key set configures limits for interned first:
/// the operator named them, so they need no acceptance by the provider.
fn configured_buckets(keys: &KeySet, max: usize) -> Buckets {
    let buckets = Buckets::new(max);
    for limits in keys.specs().iter().flat_map(|spec| &spec.buckets) {
        buckets.intern(&limits.name);
    }
    buckets
}
