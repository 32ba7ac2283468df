//! The shared state of all keys, key selection, and waiting for a key.
//!
//! # Key states
//!
//! Each key is in one of these states ([`KeyState`]), read from a few atomics of its
//! slot by one function, `Slot::status`, which also says when the key can next take a
//! request: selection, waiting, the retry policy and [`KeyPool::snapshot`] all ask it.
//!
//! ```text
//!   Healthy ──(in_flight reaches the limit, or the quota is used up)──► Busy
//!   Busy ──(a lease is released / the quota refills)──► Healthy
//!   Healthy | Busy ──(429, account limit, or headers say the window is used up)──► Resting
//!   any but Disabled ──(quota exhausted: billing, daily quota)──► Resting (a long rest)
//!   Resting ──(another limit)──► Resting, deadline = max(deadline, now + wait)
//!   Resting ──(the deadline passes)──► Probing: exactly one request may go
//!   Resting, until a window's reset ──(the deadline passes)──► Healthy: every slot
//!   Probing ──(success)──► Healthy
//!   Probing ──(its window used up again, until its reset)──► Resting, until a window's reset
//!   Probing ──(refused again, or its window used up past the cap)──► Resting
//!   Probing ──(the probe is dropped unanswered)──► Probing: the next caller probes
//!   any ──(401/403, and the same request served by another key)──► Disabled (for good)
//! ```
//!
//! The limit is the configured cap, or lower once a `429` that came back while other
//! requests were in flight on the key taught the pool the provider's concurrency limit
//! (`Slot::learn_refusal`); a raise is tried after a back-off that each refused try
//! doubles (`Slot::learn_success`, `Slot::refuse_raise`).
//!
//! # Buckets
//!
//! In a pool with a router, these states are kept per (key, bucket): each key's slot keeps
//! what is account-wide (disabled, an account-wide rest and its probe) and has a lane (a
//! slot of its own) per bucket with the rest (see `bucket`). A request of bucket `b` takes
//! a key when the key's slot and its lane for `b` both allow (`Slot::try_take_in`).
//!
//! Every rest is for a limit, and a limit may still hold when the rest ends (a `Retry-After`
//! is the provider's guess, and capped): so a rest that starts owes a probe, and the key
//! comes back with one request rather than to every waiter at once. One rest is not a
//! guess: a success whose rate-limit headers say the window is used up also say when it
//! resets, the moment the limit is whole again (as OpenAI and Anthropic document it). A rest
//! that lasts until then owes no probe, and the key comes back with every slot; capped
//! short of the reset, it owes one like the others.
//!
//! A key's rest is one word (`rest::Deadline`: not resting, resting until a `PoolTime`
//! (nanoseconds since the pool was built, on tokio's monotonic clock), or disabled); rests
//! only extend, and an expired one is cleared by whoever notices, so the common path never
//! reads the clock. `rest::Probe` says whether a key owes its single probe, or has it
//! running.
//!
//! The backoff `level` counts consecutive 429s and `generation` counts the cool-downs that
//! raised it. A lease remembers the generation it was reserved in; a 429 raises the level
//! only when no cool-down has started since that lease was reserved (so requests already in
//! flight when the first 429 came back cannot escalate it), and a success resets the level
//! under the same condition.
//!
//! # Where things are
//!
//! | module | job |
//! | --- | --- |
//! | `slot` | one key's atomics: take and release (with `record`, the state boundary) |
//! | `bucket` | buckets: each key's lanes, each bucket's waiters |
//! | `rest` | the encodings of a key's rest and probe, one atomic word each |
//! | `record` | applying an answer's outcome: rests, backoff, learned limits, probes |
//! | `state` | when a key, and the pool, can next take a request |
//! | `select` | round-robin and least-in-flight selection |
//! | `table` | the keys in force, and reload |
//! | `wait` | waiting for a key, and why no wake-up is lost |
//! | `lease` | a reserved key, and recording its outcome |
//! | `events` | log lines for what an outcome did |
//! | `shared` | what a state backend reads from the pool and applies to it |
//! | `builder` | the settings |

mod affinity;
mod booking;
mod bucket;
mod builder;
mod events;
mod lease;
#[cfg(all(test, tkr_loom))]
mod loom_tests;
mod record;
mod rejected;
mod rest;
mod routed;
mod select;
mod shared;
mod slot;
mod state;
mod stats;
mod table;
mod wait;

use crate::sync::{AtomicU32, AtomicUsize, Notify, Ordering};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::classify::Classifier;
use crate::key::KeySet;
use crate::pool_time::PoolTime;
use crate::quota::Quota;
use crate::route::{Buckets, Router};

use crate::shared::{BackendHealth, Shared};

pub use builder::KeyPoolBuilder;
pub(crate) use lease::Check;
pub use lease::{Admit, Lease, TokenReservation};
pub use rejected::RejectedKey;
pub(crate) use state::PoolAvailability;
pub use stats::{BucketStats, KeyState, KeyStats};
pub use table::ReloadSummary;
pub(crate) use wait::{Reserve, Waiter};

use bucket::BucketStates;
use rest::RestWord;
use table::Table;

/// How the pool chooses among available keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selection {
    /// Exact rotation 1, 2, 3, 1, 2, 3 over available keys (smooth weighted rotation when
    /// keys have weights); unavailable keys are skipped and the rotation moves past them.
    #[default]
    RoundRobin,
    /// The key with the fewest requests in flight per unit of weight; ties go to the next
    /// key in rotation. Pools of more than 16 keys compare a window of 16 keys starting at
    /// the rotation.
    LeastInFlight,
}

/// The shared pool of keys: selection, cool-downs, quotas, counters.
///
/// Cheap to clone (an `Arc`); every clone is the same pool. Give the same pool to every
/// [`KeyRotationLayer`](crate::KeyRotationLayer) that must share the keys' limits.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::{KeyPool, KeySet, Selection};
///
/// let pool = KeyPool::builder(KeySet::parse("k1,k2,k3").unwrap())
///     .selection(Selection::LeastInFlight)
///     .max_in_flight_per_key(2)
///     .build();
///
/// let lease = pool.try_reserve().expect("a fresh pool has free keys");
/// assert_eq!(lease.position(), 1);
/// assert_eq!(pool.snapshot()[0].in_flight, 1);
/// drop(lease);
/// assert_eq!(pool.snapshot()[0].in_flight, 0);
/// ```
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<PoolInner>,
}

/// The pool's state (a [`BackendLink`](crate::shared::BackendLink) holds a weak reference).
pub(crate) struct PoolInner {
    signals: Arc<Signals>,
    table: ArcSwap<Table>,
    selection: Selection,
    default_cap: u32,
    default_quota: Option<Quota>,
    cursor: Padded<AtomicUsize>,
    /// Affinity's settings and its memory of spilled sessions.
    affinity: affinity::Affinity,
    /// Serialises reloads (readers never take it).
    reload: Mutex<()>,
    /// Reads each request's route; `None`: keys are reserved in `poll_ready`.
    router: Option<Arc<dyn Router>>,
    /// Bucket names interned into small ids.
    buckets: Arc<Buckets>,
    /// Per-bucket state (waiters, learned limits) in a pool with a router; `None`: one
    /// bucket, the key (see `bucket`).
    bucket_states: Option<BucketStates>,
}

/// What every slot needs to reach on its own: settings applied to outcomes, the clock, and
/// the waiters. Slots hold it, so a lease needs only its slot.
struct Signals {
    backoff: Backoff,
    classifier: Classifier,
    /// Learn each key's concurrency limit from refusals (see `Slot::learn_refusal`).
    learn_concurrency: bool,
    /// How long a request may wait for a key, from its arrival; `None`: for ever.
    max_wait: Option<Duration>,
    /// Time zero of every `deadline` and quota state.
    epoch: Instant,
    waiters: Padded<AtomicUsize>,
    notify: Arc<Notify>,
    /// Requests waiting for their session's own key (see `affinity`), and their wake-up:
    /// apart from `waiters`, whose `notify_one` a request that wants one key must not take.
    patient: Padded<AtomicUsize>,
    patient_notify: Arc<Notify>,
    /// For the rare paths that need every key (an account-wide limit).
    pool: Weak<PoolInner>,
    /// The state shared with other replicas, if a backend is set.
    shared: Option<Arc<Shared>>,
    /// The pool's own signals in a pool with buckets: what wakes every waiter must also
    /// wake each bucket's (see `notify_all`). `false` for a bucket's signals, and in a pool
    /// without buckets.
    fan_out: bool,
    /// The lowest concurrency limit a key (or, for a bucket's signals, a lane of the
    /// bucket) learned from refusals of its own (`u32::MAX`: none yet): keys that learned
    /// nothing yet, and lanes made later, start from it (see `Slot::teach_untaught`).
    learned: AtomicU32,
    /// Each (key, bucket)'s token quota, unless learned ([`KeyPoolBuilder::token_quota_per_key`]).
    token_quota: Option<crate::TokenQuota>,
    /// The period of token limits learned from headers ([`KeyPoolBuilder::token_window`]).
    token_window: Duration,
}

#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl KeyPool {
    /// A pool with default settings: round-robin, no cap, no quota, default [`Backoff`] and
    /// [`classify`](crate::classify).
    pub fn new(keys: KeySet) -> Self {
        Self::builder(keys).build()
    }

    /// Starts building a pool over `keys`.
    pub fn builder(keys: KeySet) -> KeyPoolBuilder {
        KeyPoolBuilder {
            keys,
            selection: Selection::default(),
            cap: u32::MAX,
            quota: None,
            backoff: Backoff::default(),
            classifier: Classifier::default(),
            learn_concurrency: true,
            max_wait: Some(builder::DEFAULT_MAX_WAIT),
            affinity_wait: affinity::DEFAULT_WAIT,
            affinity_ttl: affinity::DEFAULT_TTL,
            affinity_capacity: affinity::DEFAULT_CAPACITY,
            backend: None,
            degraded: Default::default(),
            router: None,
            max_buckets: crate::route::DEFAULT_MAX_BUCKETS,
            token_quota: None,
            token_window: crate::tokens::DEFAULT_WINDOW,
        }
    }

    /// Number of keys now.
    pub fn len(&self) -> usize {
        self.inner.table.load().slots.len()
    }

    /// Always `false`: a pool holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How keys are chosen.
    pub fn selection(&self) -> Selection {
        self.inner.selection
    }

    /// The classifier responses go through.
    pub fn classifier(&self) -> &Classifier {
        &self.inner.signals.classifier
    }

    /// `true` once every key has been disabled (401/403): waiting cannot help.
    pub fn all_disabled(&self) -> bool {
        let table = self.inner.table.load();
        table.slots.iter().all(|slot| slot.deadline.is_disabled())
    }

    /// How long until some key can take a request: `Some(ZERO)` if one can now, the time
    /// until the earliest rest ends or quota refills if every key is resting, `None` if no
    /// time is known (every usable key is busy until a request ends, or all are disabled).
    pub fn earliest_return_in(&self) -> Option<Duration> {
        match self.inner.availability() {
            PoolAvailability::Now => Some(Duration::ZERO),
            PoolAvailability::At(at) => Some(
                self.inner
                    .signals
                    .instant(at)
                    .saturating_duration_since(Instant::now()),
            ),
            PoolAvailability::OnRelease { .. } | PoolAvailability::Never => None,
        }
    }

    /// When some key can next take a request.
    pub(crate) fn availability(&self) -> PoolAvailability {
        self.inner.availability()
    }

    /// The instant of a pool time (as [`PoolAvailability::At`] gives it).
    pub(crate) fn instant(&self, at: PoolTime) -> Instant {
        self.inner.signals.instant(at)
    }

    /// Could some key among those `allowed` (by 1-based position) take a request now?
    pub(crate) fn can_take_now(&self, allowed: impl Fn(usize) -> bool) -> bool {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        table.slots.iter().enumerate().any(|(i, slot)| {
            allowed(i + 1)
                && slot.is_available(&mut now)
                && slot.status_any(&mut now).1 == state::Availability::Now
        })
    }

    /// The wait budget of each request ([`KeyPoolBuilder::max_wait`]).
    pub fn max_wait(&self) -> Option<Duration> {
        self.inner.signals.max_wait
    }

    /// The state backend's health, if the pool shares its state with other replicas
    /// ([`KeyPoolBuilder::state_backend`]).
    pub fn backend_health(&self) -> Option<BackendHealth> {
        self.inner
            .signals
            .shared
            .as_ref()
            .map(|shared| shared.health())
    }

    /// Requests waiting for a key right now (in `KeyRotation::poll_ready`).
    pub fn waiting(&self) -> usize {
        let count = |signals: &Signals| {
            signals.waiters.load(Ordering::Relaxed) + signals.patient.load(Ordering::Relaxed)
        };
        let buckets = self.inner.bucket_states.iter().flat_map(BucketStates::iter);
        count(&self.inner.signals) + buckets.map(|bucket| count(&bucket.signals)).sum::<usize>()
    }

    /// Per-key statistics, in position order. Never contains a key value.
    ///
    /// In a pool with buckets, a key's counts and in-flight numbers are those of all its
    /// buckets together, its concurrency limit the lowest of its buckets', and it reads
    /// resting when it rests account-wide or every bucket it served rests (until the
    /// soonest is back); [`bucket_snapshot`] shows each (key, bucket).
    ///
    /// [`bucket_snapshot`]: Self::bucket_snapshot
    pub fn snapshot(&self) -> Vec<KeyStats> {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        table
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let mut stats = slot_stats(slot, &mut now);
                // A key with lanes: counts summed; its limit the tightest lane's; resting
                // (until the soonest lane is back) when every lane used so far rests.
                let mut all_resting = true;
                let mut soonest: Option<Duration> = None;
                let mut lanes = 0;
                for lane in slot.made_lanes() {
                    let lane = slot_stats(lane, &mut now);
                    lanes += 1;
                    stats.requests += lane.requests;
                    stats.successes += lane.successes;
                    stats.rate_limited += lane.rate_limited;
                    stats.failures += lane.failures;
                    stats.rejected += lane.rejected;
                    stats.in_flight += lane.in_flight;
                    stats.sent += lane.sent;
                    stats.reserved += lane.reserved;
                    stats.tokens_reserved += lane.tokens_reserved;
                    stats.tokens_used += lane.tokens_used;
                    stats.token_limit = match (stats.token_limit, lane.token_limit) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    stats.token_wait = match (stats.token_wait, lane.token_wait) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    stats.probing |= lane.probing;
                    stats.concurrency_limit =
                        match (stats.concurrency_limit, lane.concurrency_limit) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    match lane.cooling_down_for {
                        Some(rest) => soonest = Some(soonest.map_or(rest, |s| s.min(rest))),
                        None => all_resting = false,
                    }
                }
                if lanes > 0 && all_resting && stats.cooling_down_for.is_none() {
                    stats.cooling_down_for = soonest;
                    if stats.state == KeyState::Healthy {
                        stats.state = KeyState::Resting;
                    }
                }
                KeyStats {
                    position: i + 1,
                    ..stats
                }
            })
            .collect()
    }

    /// Per-(key, bucket) statistics in a pool with buckets: each key's buckets in the order
    /// they were first used, keys in position order. Empty in a pool without buckets.
    ///
    /// A bucket shows once a request of it took the key. Never contains a key value.
    pub fn bucket_snapshot(&self) -> Vec<BucketStats> {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        let mut all = Vec::new();
        for (i, slot) in table.slots.iter().enumerate() {
            for lane in slot.made_lanes() {
                let Some(bucket) = &lane.bucket else { continue };
                let mut stats = slot_stats(lane, &mut now);
                stats.position = i + 1;
                // The key's account-wide state comes first.
                let (key_state, _) = slot.status_in(bucket, &mut now);
                if matches!(
                    key_state,
                    KeyState::Disabled | KeyState::Resting | KeyState::Probing
                ) && stats.state != KeyState::Resting
                {
                    stats.state = key_state;
                }
                // So does its rest, when longer (a rest of every bucket of the key).
                let now_at = now.get();
                match slot.deadline.read() {
                    RestWord::Until(until) if until > now_at => {
                        let key_rest = until.saturating_duration_since(now_at);
                        stats.cooling_down_for = stats.cooling_down_for.max(Some(key_rest));
                    }
                    RestWord::Disabled => stats.disabled = true,
                    RestWord::Until(_) | RestWord::Clear => {}
                }
                all.push(BucketStats {
                    bucket: bucket.name.to_string(),
                    key: stats,
                });
            }
        }
        all
    }
}

/// One slot's statistics (a key's own, or a lane's), at position 0.
fn slot_stats(slot: &slot::Slot, now: &mut LazyNow<'_>) -> KeyStats {
    let now_at = now.get();
    let rest = slot.deadline.read();
    let quota_at = slot
        .quota
        .map_or(PoolTime::EPOCH, |q| q.available_at(&slot.tat));
    let limit = slot.limit();
    // Two loads, not one moment: a lease moving between them could show more sent than in
    // flight.
    let in_flight = slot.in_flight.load(Ordering::Acquire);
    let sent = slot.sent.load(Ordering::Acquire).min(in_flight);
    KeyStats {
        position: 0,
        name: slot.spec.name.clone(),
        account: slot.spec.account.clone(),
        weight: slot.weight,
        requests: slot.requests.load(Ordering::Relaxed),
        successes: slot.successes.load(Ordering::Relaxed),
        rate_limited: slot.rate_limited.load(Ordering::Relaxed),
        failures: slot.failures.load(Ordering::Relaxed),
        rejected: slot.rejected.load(Ordering::Relaxed),
        affinity_hits: slot.affinity_hits.load(Ordering::Relaxed),
        affinity_spills: slot.affinity_spills.load(Ordering::Relaxed),
        in_flight,
        sent,
        reserved: in_flight.saturating_sub(sent),
        concurrency_limit: (limit != u32::MAX).then_some(limit),
        state: slot.status(now).0,
        cooling_down_for: match rest {
            RestWord::Until(until) if until > now_at => {
                Some(until.saturating_duration_since(now_at))
            }
            _ => None,
        },
        quota_wait: (quota_at > now_at).then(|| quota_at.saturating_duration_since(now_at)),
        probing: slot.probe.is_pending(),
        disabled: rest == RestWord::Disabled,
        tokens_reserved: slot.tokens.reserved.load(Ordering::Relaxed),
        tokens_used: slot.tokens.used.load(Ordering::Relaxed),
        token_limit: slot.tokens.limit(),
        token_wait: slot.tokens.wait(1, now_at).filter(|wait| !wait.is_zero()),
    }
}

impl PoolInner {
    /// The state of bucket `id`, in a pool with buckets (`None` without a router).
    #[inline]
    fn bucket_state(&self, id: crate::route::BucketId) -> Option<&Arc<bucket::Bucket>> {
        self.bucket_states
            .as_ref()?
            .get(id, &self.buckets, &self.signals)
    }
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("KeyPool")
            .field("keys", &self.len())
            .field("selection", &inner.selection)
            .field(
                "max_in_flight_per_key",
                &(inner.default_cap != u32::MAX).then_some(inner.default_cap),
            )
            .field("quota_per_key", &inner.default_quota)
            .field("backoff", &inner.signals.backoff)
            .field("affinity_wait", &inner.affinity.wait)
            .field("affinity_ttl", &inner.affinity.ttl())
            .field("affinity_capacity", &inner.affinity.capacity())
            .finish()
    }
}

/// The clock, read at most once per selection and only if some key needs it.
///
/// Also what the selection is for: the tokens of the request (0: no cost, the token quotas
/// are not asked), so that every key's `try_take` and `status` answer for that request.
struct LazyNow<'a> {
    signals: &'a Signals,
    now: Option<PoolTime>,
    cost: u64,
    /// How far ahead (nanoseconds) the request may book its tokens (see `booking`).
    ahead: u64,
}

impl<'a> LazyNow<'a> {
    fn new(signals: &'a Signals) -> Self {
        Self {
            signals,
            now: None,
            cost: 0,
            ahead: 0,
        }
    }

    /// For a request of `cost` tokens.
    fn costing(signals: &'a Signals, cost: u64) -> Self {
        Self {
            signals,
            now: None,
            cost,
            ahead: 0,
        }
    }

    fn get(&mut self) -> PoolTime {
        *self.now.get_or_insert_with(|| self.signals.now())
    }
}

impl Signals {
    /// The pool time now.
    fn now(&self) -> PoolTime {
        PoolTime::after_epoch(Instant::now().saturating_duration_since(self.epoch))
    }

    /// The pool time of an instant.
    fn pool_time(&self, at: Instant) -> PoolTime {
        PoolTime::after_epoch(at.saturating_duration_since(self.epoch))
    }

    /// The instant of a pool time.
    fn instant(&self, at: PoolTime) -> Instant {
        self.epoch + at.since_epoch()
    }

    fn wake_one(&self) {
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.notify.notify_one();
        }
        // Requests waiting for their session's own key (affinity) each wait for one key:
        // a release wakes them all, so that none takes a wake-up another could use.
        if self.patient.load(Ordering::SeqCst) != 0 {
            self.patient_notify.notify_waiters();
        }
    }

    /// Wakes every waiter these signals reach: in a pool with buckets, the pool's signals
    /// reach every bucket's waiters (a key disabled or resting account-wide, a reload); a
    /// bucket's reach its own.
    fn notify_all(&self) {
        self.notify.notify_waiters();
        if self.fan_out {
            self.notify_buckets();
        }
    }

    #[cold]
    fn notify_buckets(&self) {
        if let Some(pool) = self.pool.upgrade() {
            for bucket in pool.bucket_states.iter().flat_map(BucketStates::iter) {
                bucket.signals.notify.notify_waiters();
            }
        }
    }

    /// Is anyone waiting whom `notify_all` would wake?
    fn any_waiting(&self) -> bool {
        if self.waiters.load(Ordering::SeqCst) != 0 {
            return true;
        }
        self.fan_out
            && self.pool.upgrade().is_some_and(|pool| {
                pool.bucket_states
                    .iter()
                    .flat_map(BucketStates::iter)
                    .any(|bucket| bucket.signals.waiters.load(Ordering::SeqCst) != 0)
            })
    }

    /// A bucket's signals: these settings, with waiters of its own.
    fn for_bucket(&self) -> Self {
        Self {
            backoff: self.backoff,
            classifier: self.classifier.clone(),
            learn_concurrency: self.learn_concurrency,
            max_wait: self.max_wait,
            epoch: self.epoch,
            waiters: Padded::default(),
            notify: Arc::new(Notify::new()),
            patient: Padded::default(),
            patient_notify: Arc::new(Notify::new()),
            pool: self.pool.clone(),
            // Buckets are this replica's own (see `shared`): the key's account-wide state
            // is what the replicas share.
            shared: None,
            fan_out: false,
            learned: AtomicU32::new(u32::MAX),
            token_quota: self.token_quota,
            token_window: self.token_window,
        }
    }
}
