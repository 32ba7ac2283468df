//! The shared state of all keys, key selection, and waiting for a key.
//!
//! # Key states
//!
//! Each key is in one of these states ([`KeyState`]), read from a few atomics of its
//! [`Slot`] by one function, `Slot::status`, which also says when the key can next take a
//! request: selection, waiting, the retry policy and [`KeyPool::snapshot`] all ask it.
//!
//! ```text
//!   Healthy ──(in_flight reaches the limit, or the quota is used up)──► Busy
//!   Busy ──(a lease is released / the quota refills)──► Healthy
//!   Healthy | Busy ──(429, account limit, or headers say the window is used up)──► Resting
//!   any but Disabled ──(quota exhausted: billing, daily quota)──► Resting (a long rest)
//!   Resting ──(another limit)──► Resting, deadline = max(deadline, now + wait)
//!   Resting ──(the deadline passes)──► Probing: exactly one request may go
//!   Probing ──(success)──► Healthy
//!   Probing ──(refused again, or its window used up again)──► Resting
//!   Probing ──(the probe is dropped unanswered)──► Probing: the next caller probes
//!   any ──(401/403)──► Disabled (for good)
//! ```
//!
//! The limit is the configured cap, or lower once a `429` that came back while other
//! requests were in flight on the key taught the pool the provider's concurrency limit
//! (`Slot::learn_refusal`); successes at that limit raise it again slowly.
//!
//! Every rest is for a limit, and a limit may still hold when the rest ends (a `Retry-After`
//! or a window's reset is the provider's guess, and capped): so a rest that starts owes a
//! probe, and the key comes back with one request rather than to every waiter at once.
//!
//! `deadline` encodes three states in one word: `0` is "not cooling", [`DISABLED`] is
//! "disabled", anything else is the end of a cool-down in nanoseconds since the pool was
//! built (tokio's monotonic clock, so tests can pause it). Deadlines only grow (`fetch_max`);
//! an expired one is cleared back to `0` by whoever notices, so the common path never reads
//! the clock. `probe` says whether a key owes a probe, or has one in flight.
//!
//! The backoff `level` counts consecutive 429s and `generation` counts the cool-downs that
//! raised it. A lease remembers the generation it was reserved in; a 429 raises the level
//! only when no cool-down has started since that lease was reserved (so requests already in
//! flight when the first 429 came back cannot escalate it), and a success resets the level
//! under the same condition.
//!
//! # Keys can change at run time
//!
//! The keys live in a [`Table`] behind an `ArcSwap`: selection loads the current table
//! without locking; [`KeyPool::reload`] builds a new table, reusing the slot (and so the
//! state) of every unchanged key, and swaps it in. A lease holds its key's slot, so a key
//! removed while requests are in flight keeps counting them until they finish, and takes no
//! new ones.
//!
//! # Waking waiters
//!
//! A caller that finds no key arms a [`Waiter`]: it registers with the pool's [`Notify`]
//! and counts itself in `waiters` *before* re-checking the keys, and sleeps until the
//! earliest cool-down ends or quota refills. A release decrements `in_flight` and then
//! notifies one waiter if `waiters` is non-zero. Both sides use sequentially consistent
//! operations, so either the releaser sees the waiter or the waiter's re-check sees the
//! freed slot: no lost wake-up, and no notification cost when nobody waits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::{Notify, futures::OwnedNotified};
use tokio::time::{Instant, Sleep};

use crate::backoff::Backoff;
use crate::error::{AllKeysDisabled, NoKeyAvailable};
use crate::key::{ApiKey, KeySet, KeySpec};
use crate::outcome::{Classifier, Outcome};
use crate::quota::{Gcra, Quota};
use crate::stats::{KeyState, KeyStats};
use crate::weights::schedule;

/// `deadline` value of a disabled key.
const DISABLED: u64 = u64::MAX;

/// Keys scanned together by least-in-flight. Pools up to this size get an exact scan;
/// larger pools take the least loaded key of the first window (from the rotating cursor)
/// that has an available key, which keeps selection O(1) at thousands of keys.
const WINDOW: usize = 16;

/// A learned concurrency limit rises by one after this many successes per unit of the
/// limit, each sent with the key at its limit (additive increase: a limit of 2 rises to 3
/// after 32 such successes). Slow on purpose: every step up past the provider's real limit
/// costs a refusal and a rest.
const GROWTH: u32 = 16;

/// The wait budget of a request by default (see [`KeyPoolBuilder::max_wait`]).
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// `probe` states.
const PROBE_NONE: u8 = 0;
const PROBE_OWED: u8 = 1;
const PROBE_IN_FLIGHT: u8 = 2;

/// How the pool chooses among available keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
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
/// use tower_key_rotation::{KeyPool, KeySet, Strategy};
///
/// let pool = KeyPool::builder(KeySet::parse("k1,k2,k3").unwrap())
///     .strategy(Strategy::LeastInFlight)
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

struct PoolInner {
    signals: Arc<Signals>,
    table: ArcSwap<Table>,
    strategy: Strategy,
    default_cap: u32,
    default_quota: Option<Quota>,
    cursor: Padded<AtomicUsize>,
    /// Serialises reloads (readers never take it).
    reload: Mutex<()>,
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
    /// For the rare paths that need every key (an account-wide limit).
    pool: Weak<PoolInner>,
}

/// The keys in force: slots in position order and, for weighted keys, the rotation's
/// schedule.
struct Table {
    slots: Box<[Arc<Slot>]>,
    /// One period of smooth weighted round-robin (slot indices); `None` if all weights are 1.
    schedule: Option<Box<[u32]>>,
}

impl Table {
    fn turns(&self) -> usize {
        self.schedule.as_ref().map_or(self.slots.len(), |s| s.len())
    }

    #[inline]
    fn key_at(&self, turn: usize) -> usize {
        match &self.schedule {
            Some(schedule) => schedule[turn] as usize,
            None => turn,
        }
    }
}

/// One key's state, hot fields first and on their own cache lines so that keys do not
/// contend with each other.
#[repr(align(128))]
struct Slot {
    in_flight: AtomicU32,
    /// The concurrency limit in force: `cap`, or lower once refusals taught the pool the
    /// provider's (`learn_refusal`); never above `cap`, never below 1. `u32::MAX`: none.
    limit: AtomicU32,
    /// Successes sent with the key at its learned `limit` since the limit last changed.
    gains: AtomicU32,
    /// Leases refused for a limit whose slot is not given back yet: still `in_flight`, but
    /// no longer at the provider, so a refusal does not count them as others there.
    refused_open: AtomicU32,
    level: AtomicU32,
    generation: AtomicU32,
    probe: AtomicU8,
    deadline: AtomicU64,
    /// GCRA theoretical arrival time (see `quota`), in pool nanoseconds.
    tat: AtomicU64,
    requests: AtomicU64,
    successes: AtomicU64,
    rate_limited: AtomicU64,
    failures: AtomicU64,
    /// Set by a reload that removed the key: it finishes its requests in flight and takes
    /// no reservation made earlier to the provider.
    retired: AtomicBool,
    /// The configured concurrency cap (`u32::MAX`: none).
    cap: u32,
    weight: u32,
    quota: Option<Gcra>,
    spec: KeySpec,
    /// Header values, built on first use and reused: `Bearer <key>` and the bare key.
    bearer: OnceLock<HeaderValue>,
    bare: OnceLock<HeaderValue>,
    signals: Arc<Signals>,
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

/// Builds a [`KeyPool`]. Made by [`KeyPool::builder`].
#[derive(Debug)]
pub struct KeyPoolBuilder {
    keys: KeySet,
    strategy: Strategy,
    cap: u32,
    quota: Option<Quota>,
    backoff: Backoff,
    classifier: Classifier,
    learn_concurrency: bool,
    max_wait: Option<Duration>,
}

impl KeyPoolBuilder {
    /// The selection strategy (default [`Strategy::RoundRobin`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// At most `max` requests in flight per key (default: no cap), for keys without a cap
    /// of their own ([`KeySpec::max_in_flight`]). Callers beyond every key's cap wait for a
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
    /// ([`KeySpec::quota`]). Callers wait for the earliest key with quota, so requests the
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

    /// Replaces the response classifier (default [`classify`](crate::classify)).
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Whether to learn each key's concurrency limit from refusals (default `true`).
    ///
    /// A `429` that comes back while other requests are in flight on the same key says the
    /// provider limits how many run at once: the key's limit drops to the number of other
    /// requests then in flight (never below 1), so that later callers wait for a slot
    /// instead of being refused. Successes sent with the key at that limit raise it again
    /// slowly (by one after 16 × the limit of them), never above
    /// [`max_in_flight_per_key`](Self::max_in_flight_per_key). The limit in force shows in
    /// [`KeyStats::concurrency_limit`].
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
    /// after the budget ends, the request fails at once with [`NoKeyAvailable`] and its
    /// [`retry_after`](NoKeyAvailable::retry_after), rather than at the end of the budget.
    pub fn max_wait(mut self, max_wait: Option<Duration>) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Builds the pool.
    pub fn build(self) -> KeyPool {
        let inner = Arc::new_cyclic(|pool: &Weak<PoolInner>| {
            let signals = Arc::new(Signals {
                backoff: self.backoff,
                classifier: self.classifier,
                learn_concurrency: self.learn_concurrency,
                max_wait: self.max_wait,
                epoch: Instant::now(),
                waiters: Padded::default(),
                notify: Arc::new(Notify::new()),
                pool: pool.clone(),
            });
            let slots = self
                .keys
                .specs()
                .iter()
                .map(|spec| Slot::new(spec.clone(), self.cap, self.quota, &signals))
                .collect();
            PoolInner {
                table: ArcSwap::from_pointee(Table::new(slots)),
                signals,
                strategy: self.strategy,
                default_cap: self.cap,
                default_quota: self.quota,
                cursor: Padded::default(),
                reload: Mutex::new(()),
            }
        });
        KeyPool { inner }
    }
}

impl Slot {
    fn new(spec: KeySpec, cap: u32, quota: Option<Quota>, signals: &Arc<Signals>) -> Arc<Self> {
        let cap = spec.max_in_flight.unwrap_or(cap);
        Arc::new(Self {
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(cap),
            gains: AtomicU32::new(0),
            refused_open: AtomicU32::new(0),
            level: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            probe: AtomicU8::new(PROBE_NONE),
            deadline: AtomicU64::new(0),
            tat: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            cap,
            weight: spec.weight,
            quota: spec.quota.or(quota).map(|q| q.gcra()),
            spec,
            bearer: OnceLock::new(),
            bare: OnceLock::new(),
            signals: signals.clone(),
        })
    }
}

impl Table {
    fn new(slots: Vec<Arc<Slot>>) -> Self {
        let weights: Vec<u32> = slots.iter().map(|s| s.weight).collect();
        Self {
            schedule: schedule(&weights),
            slots: slots.into_boxed_slice(),
        }
    }
}

/// What [`KeyPool::reload`] changed, by position and name (never by value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadSummary {
    /// Keys new to the pool: their positions in the new order, and names.
    pub added: Vec<(usize, Option<String>)>,
    /// Keys gone: their positions in the old order, and names.
    pub removed: Vec<(usize, Option<String>)>,
    /// Keys whose value or settings changed (their state starts afresh): new positions.
    pub replaced: Vec<(usize, Option<String>)>,
    /// Keys unchanged (their state carries over).
    pub unchanged: usize,
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |keys: &[(usize, Option<String>)]| {
            keys.iter()
                .map(|(position, name)| match name {
                    Some(name) => format!("{position} ({name})"),
                    None => position.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "{} unchanged", self.unchanged)?;
        for (what, keys) in [
            ("added", &self.added),
            ("replaced", &self.replaced),
            ("removed", &self.removed),
        ] {
            if !keys.is_empty() {
                write!(f, "; {what}: key {}", list(keys))?;
            }
        }
        Ok(())
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
            strategy: Strategy::default(),
            cap: u32::MAX,
            quota: None,
            backoff: Backoff::default(),
            classifier: Classifier::default(),
            learn_concurrency: true,
            max_wait: Some(DEFAULT_MAX_WAIT),
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

    /// The selection strategy.
    pub fn strategy(&self) -> Strategy {
        self.inner.strategy
    }

    /// The classifier responses go through.
    pub fn classifier(&self) -> &Classifier {
        &self.inner.signals.classifier
    }

    /// Replaces the keys at run time.
    ///
    /// Keys are matched by name when they have one, else by value. An unchanged key keeps
    /// its state (in flight, cool-down, backoff, counters); a key whose value or settings
    /// changed starts afresh; a removed key takes no new requests while its requests in
    /// flight finish. Logged by position and name, never by value.
    ///
    /// A key that starts afresh does not count the requests its previous incarnation
    /// still has in flight, nor the quota it spent: right after a settings change, that key
    /// may briefly exceed its cap or the provider's window by what was in flight.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::{KeyPool, KeySet};
    ///
    /// let pool = KeyPool::new(KeySet::parse("k1,k2")?);
    /// let summary = pool.reload(KeySet::parse("k2,k3")?);
    /// assert_eq!(summary.to_string(), "1 unchanged; added: key 2; removed: key 1");
    /// assert_eq!(pool.len(), 2);
    /// # Ok::<(), tower_key_rotation::KeyError>(())
    /// ```
    pub fn reload(&self, keys: KeySet) -> ReloadSummary {
        let inner = &*self.inner;
        let _writer = inner.reload.lock().unwrap_or_else(PoisonError::into_inner);
        let old = inner.table.load_full();
        let same_identity = |a: &KeySpec, b: &KeySpec| match (&a.name, &b.name) {
            (Some(x), Some(y)) => x == y,
            (None, None) => a.key.expose_secret() == b.key.expose_secret(),
            _ => false,
        };
        let mut summary = ReloadSummary::default();
        let mut kept = vec![false; old.slots.len()];
        let slots: Vec<Arc<Slot>> = keys
            .specs()
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let label = (i + 1, spec.name.clone());
                let found = old
                    .slots
                    .iter()
                    .position(|slot| same_identity(&slot.spec, spec));
                match found {
                    Some(j) if old.slots[j].spec.same_as(spec) => {
                        kept[j] = true;
                        summary.unchanged += 1;
                        old.slots[j].clone()
                    }
                    Some(j) => {
                        kept[j] = true;
                        // The old incarnation finishes what it has in flight, nothing more.
                        old.slots[j].retired.store(true, Ordering::Release);
                        summary.replaced.push(label);
                        Slot::new(
                            spec.clone(),
                            inner.default_cap,
                            inner.default_quota,
                            &inner.signals,
                        )
                    }
                    None => {
                        summary.added.push(label);
                        Slot::new(
                            spec.clone(),
                            inner.default_cap,
                            inner.default_quota,
                            &inner.signals,
                        )
                    }
                }
            })
            .collect();
        for (j, slot) in old.slots.iter().enumerate() {
            if !kept[j] {
                slot.retired.store(true, Ordering::Release);
                summary.removed.push((j + 1, slot.spec.name.clone()));
            }
        }
        inner.table.store(Arc::new(Table::new(slots)));
        tracing::info!(keys = keys.len(), "keys reloaded: {summary}");
        // New keys may be free: let every waiter look again.
        inner.signals.notify.notify_waiters();
        summary
    }

    /// Reserves an available key now, or returns `None` when every key is cooling down,
    /// busy (at its concurrency limit or out of quota) or disabled. The key counts as in
    /// flight until the [`Lease`] is dropped.
    pub fn try_reserve(&self) -> Option<Lease> {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        let (index, taken) = match self.inner.strategy {
            Strategy::RoundRobin => self.inner.select_round_robin(&table, &mut now),
            Strategy::LeastInFlight => self.inner.select_least_in_flight(&table, &mut now),
        }?;
        Some(Lease::new(&table, index, taken))
    }

    /// Reserves an available key among those `allowed` (by 0-based index), scanning in
    /// rotation order and taking the least loaded. A slow path for retries that must avoid
    /// keys already tried; `None` if no allowed key is available.
    pub fn try_reserve_where(&self, allowed: impl Fn(usize) -> bool) -> Option<Lease> {
        let inner = &*self.inner;
        let table = inner.table.load();
        let n = table.slots.len();
        let start = inner.cursor.load(Ordering::Relaxed) % n;
        let mut now = LazyNow::new(&inner.signals);
        // Losing a race for the chosen key looks again, a few times at most.
        for _ in 0..4 {
            let best = (0..n)
                .map(|step| (start + step) % n)
                .filter(|&i| allowed(i))
                .filter(|&i| table.slots[i].is_available(&mut now))
                .min_by(|&a, &b| compare_load(&table.slots[a], &table.slots[b]))?;
            if let Some(taken) = table.slots[best].try_take(&mut now) {
                return Some(Lease::new(&table, best, taken));
            }
        }
        None
    }

    /// Reserves a key, or registers `waiter` to be woken when one may be free.
    ///
    /// Returns `Pending` with a wake-up arranged (a slot released, keys reloaded, the
    /// earliest cool-down ending or quota refilling, or `deadline`). Gives up with
    /// [`Reserve::NoKey`] when `deadline` has passed, or at once when the earliest key comes
    /// back only after it (a deadline of `None` waits for ever), and with
    /// [`Reserve::AllDisabled`] when every key is disabled.
    pub fn poll_reserve(
        &self,
        waiter: &mut Waiter,
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Reserve> {
        loop {
            if let Some(lease) = self.try_reserve() {
                waiter.disarm();
                return Poll::Ready(Reserve::Lease(lease));
            }
            let now = Instant::now();
            let started = *waiter.since.get_or_insert(now);
            let availability = self.inner.availability();
            let give_up = |retry_after: Duration| {
                Poll::Ready(Reserve::NoKey(NoKeyAvailable::new(
                    retry_after,
                    now.saturating_duration_since(started),
                )))
            };
            let earliest = match availability {
                // Free since `try_reserve` looked: look again.
                PoolAvailability::Now => continue,
                PoolAvailability::Never => {
                    waiter.disarm();
                    return Poll::Ready(Reserve::AllDisabled(AllKeysDisabled::new(self.len())));
                }
                PoolAvailability::OnRelease { earliest } => {
                    earliest.map(|at| self.inner.signals.instant(at))
                }
                PoolAvailability::At(at) => {
                    let at = self.inner.signals.instant(at);
                    if deadline.is_some_and(|deadline| at > deadline) {
                        // Waiting cannot help: say so now, not at the deadline.
                        waiter.disarm();
                        return give_up(at.saturating_duration_since(now));
                    }
                    Some(at)
                }
            };
            if let Some(deadline) = deadline.filter(|&deadline| deadline <= now) {
                waiter.disarm();
                let retry_after = earliest.map_or(Duration::from_secs(1), |at| {
                    at.saturating_duration_since(deadline.max(now))
                });
                return give_up(retry_after.max(Duration::from_millis(1)));
            }
            let Some(armed) = waiter.armed.as_mut() else {
                // Register interest, then look again before sleeping.
                waiter.arm(self);
                continue;
            };
            if armed.notified.as_mut().poll(cx).is_ready() {
                // A slot was released: look again (and re-register if still nothing).
                waiter.rearm();
                continue;
            }
            let wake_at = match (earliest, deadline) {
                (Some(at), Some(deadline)) => Some(at.min(deadline)),
                (at, deadline) => at.or(deadline),
            };
            if let Some(at) = wake_at {
                let sleep = waiter
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if sleep.deadline() != at || sleep.is_elapsed() {
                    sleep.as_mut().reset(at);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    }

    /// `true` once every key has been disabled (401/403): waiting cannot help.
    pub fn all_disabled(&self) -> bool {
        let table = self.inner.table.load();
        table
            .slots
            .iter()
            .all(|slot| slot.deadline.load(Ordering::SeqCst) == DISABLED)
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

    /// The instant of a time in pool nanoseconds (as [`PoolAvailability::At`] gives it).
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.inner.signals.instant(nanos)
    }

    /// Could some key among those `allowed` (by 0-based index) take a request now?
    pub(crate) fn can_take_now(&self, allowed: impl Fn(usize) -> bool) -> bool {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        table
            .slots
            .iter()
            .enumerate()
            .any(|(i, slot)| allowed(i) && slot.is_available(&mut now))
    }

    /// The wait budget of each request ([`KeyPoolBuilder::max_wait`]).
    pub fn max_wait(&self) -> Option<Duration> {
        self.inner.signals.max_wait
    }

    /// Requests waiting for a key right now (in [`poll_reserve`](Self::poll_reserve)).
    pub fn waiting(&self) -> usize {
        self.inner.signals.waiters.load(Ordering::Relaxed)
    }

    /// Per-key statistics, in position order. Never contains a key value.
    pub fn snapshot(&self) -> Vec<KeyStats> {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        let now_nanos = now.get();
        table
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let deadline = slot.deadline.load(Ordering::Acquire);
                let quota_at = slot.quota.map_or(0, |q| q.available_at(&slot.tat));
                let limit = slot.limit.load(Ordering::Relaxed);
                KeyStats {
                    position: i + 1,
                    name: slot.spec.name.clone(),
                    account: slot.spec.account.clone(),
                    weight: slot.weight,
                    requests: slot.requests.load(Ordering::Relaxed),
                    successes: slot.successes.load(Ordering::Relaxed),
                    rate_limited: slot.rate_limited.load(Ordering::Relaxed),
                    failures: slot.failures.load(Ordering::Relaxed),
                    in_flight: slot.in_flight.load(Ordering::Relaxed),
                    concurrency_limit: (limit != u32::MAX).then_some(limit),
                    state: slot.status(&mut now).0,
                    cooling_down_for: (deadline != DISABLED && deadline > now_nanos)
                        .then(|| Duration::from_nanos(deadline - now_nanos)),
                    quota_wait: (quota_at > now_nanos)
                        .then(|| Duration::from_nanos(quota_at - now_nanos)),
                    probing: slot.probe.load(Ordering::Relaxed) != PROBE_NONE,
                    disabled: deadline == DISABLED,
                }
            })
            .collect()
    }
}

/// What [`KeyPool::poll_reserve`] ends with.
#[derive(Debug)]
pub enum Reserve {
    /// A key, reserved.
    Lease(Lease),
    /// No key within the deadline.
    NoKey(NoKeyAvailable),
    /// Every key is disabled.
    AllDisabled(AllKeysDisabled),
}

/// When some key of the pool can next take a request: the keys' [`Availability`] combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolAvailability {
    /// A key can take one now.
    Now,
    /// A key frees when one of its requests ends; `earliest` is the earliest timed return
    /// of the others, if any.
    OnRelease { earliest: Option<u64> },
    /// Every usable key rests or waits for quota; the earliest is back at this time (pool
    /// nanoseconds).
    At(u64),
    /// Every key is disabled.
    Never,
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("KeyPool")
            .field("keys", &self.len())
            .field("strategy", &inner.strategy)
            .field(
                "max_in_flight_per_key",
                &(inner.default_cap != u32::MAX).then_some(inner.default_cap),
            )
            .field("quota_per_key", &inner.default_quota)
            .field("backoff", &inner.signals.backoff)
            .finish()
    }
}

/// The clock, read at most once per selection and only if some key needs it.
struct LazyNow<'a> {
    signals: &'a Signals,
    nanos: Option<u64>,
}

impl<'a> LazyNow<'a> {
    fn new(signals: &'a Signals) -> Self {
        Self {
            signals,
            nanos: None,
        }
    }

    fn get(&mut self) -> u64 {
        *self.nanos.get_or_insert_with(|| self.signals.now_nanos())
    }
}

impl Signals {
    fn now_nanos(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(DISABLED - 1)
    }

    /// The instant of a time in pool nanoseconds.
    fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    fn wake_one(&self) {
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.notify.notify_one();
        }
    }
}

/// Compares two keys' load: in-flight requests per unit of weight.
fn compare_load(a: &Slot, b: &Slot) -> std::cmp::Ordering {
    let load = |s: &Slot| u64::from(s.in_flight.load(Ordering::Relaxed));
    (load(a) * u64::from(b.weight)).cmp(&(load(b) * u64::from(a.weight)))
}

impl PoolInner {
    fn select_round_robin(&self, table: &Table, now: &mut LazyNow<'_>) -> Option<(usize, Taken)> {
        let turns = table.turns();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % turns;
        let mut turn = start;
        for skipped in 0..turns {
            let index = table.key_at(turn);
            if let Some(taken) = table.slots[index].try_take(now) {
                if skipped > 0 {
                    // Move the rotation past the keys we skipped, so the next caller
                    // continues after the key we took.
                    self.cursor.fetch_add(skipped, Ordering::Relaxed);
                }
                return Some((index, taken));
            }
            turn += 1;
            if turn == turns {
                turn = 0;
            }
        }
        // Nothing available: give the turn back, so waiting callers polling again do not
        // move the rotation on (the next key in turn stays next).
        self.cursor.fetch_sub(1, Ordering::Relaxed);
        None
    }

    fn select_least_in_flight(
        &self,
        table: &Table,
        now: &mut LazyNow<'_>,
    ) -> Option<(usize, Taken)> {
        let n = table.slots.len();
        let start = self.cursor.load(Ordering::Relaxed) % n;
        let window = n.min(WINDOW);
        let mut scanned = 0;
        // Losing a race for the chosen key rescans the window, a few times at most.
        let mut retries = 0;
        while scanned < n {
            let end = (scanned + window).min(n);
            let mut best: Option<&Slot> = None;
            let mut best_index = 0;
            for step in scanned..end {
                let mut index = start + step;
                if index >= n {
                    index -= n;
                }
                let slot = &*table.slots[index];
                if !slot.is_available(now) {
                    continue;
                }
                if best.is_none_or(|b| compare_load(slot, b).is_lt()) {
                    best = Some(slot);
                    best_index = index;
                    if slot.in_flight.load(Ordering::Relaxed) == 0 {
                        break; // cannot do better, and it is the first in rotation
                    }
                }
            }
            match best.map(|slot| slot.try_take(now)) {
                Some(Some(taken)) => {
                    self.cursor.store(best_index + 1, Ordering::Relaxed);
                    return Some((best_index, taken));
                }
                // Another caller took the last slot of our choice: look at this window again.
                Some(None) if retries < 4 => retries += 1,
                Some(None) | None => scanned = end,
            }
        }
        None
    }

    /// When some key can next take a request: every key's [`Availability`], combined.
    /// Waiting (`poll_reserve`), the retry policy and `earliest_return_in` all ask this.
    pub(crate) fn availability(&self) -> PoolAvailability {
        let table = self.table.load();
        let mut now = LazyNow::new(&self.signals);
        let mut on_release = false;
        let mut earliest: Option<u64> = None;
        for slot in table.slots.iter() {
            match slot.status(&mut now).1 {
                Availability::Now => return PoolAvailability::Now,
                Availability::OnRelease => on_release = true,
                Availability::At(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
                Availability::Never => {}
            }
        }
        match (on_release, earliest) {
            (true, earliest) => PoolAvailability::OnRelease { earliest },
            (false, Some(at)) => PoolAvailability::At(at),
            (false, None) => PoolAvailability::Never,
        }
    }
}

impl Slot {
    /// Is the key cooling down or disabled? Clears an expired deadline.
    #[inline]
    fn is_resting(&self, now: &mut LazyNow<'_>) -> bool {
        let deadline = self.deadline.load(Ordering::Acquire);
        if deadline == 0 {
            return false;
        }
        if deadline == DISABLED || deadline > now.get() {
            return true;
        }
        // Cooling => Healthy. A concurrent extension makes this fail, which is right.
        let _ = self
            .deadline
            .compare_exchange(deadline, 0, Ordering::AcqRel, Ordering::Relaxed);
        false
    }

    /// The key's state and when it can next take a request: the one answer that
    /// selection, waiting, the retry policy and [`KeyPool::snapshot`] all use. The states
    /// are those of the module docs' diagram; a key owing its probe reads `Healthy` (the next
    /// taker probes).
    fn status(&self, now: &mut LazyNow<'_>) -> (KeyState, Availability) {
        let deadline = self.deadline.load(Ordering::Acquire);
        if deadline == DISABLED {
            return (KeyState::Disabled, Availability::Never);
        }
        let quota_at = self.quota.map_or(0, |q| q.available_at(&self.tat));
        if deadline != 0 && deadline > now.get() {
            // Cooling or Suspended: back (to its probe) at the deadline, or when the quota
            // refills if later.
            return (KeyState::Resting, Availability::At(deadline.max(quota_at)));
        }
        if self.probe.load(Ordering::Acquire) == PROBE_IN_FLIGHT {
            // Probing: the probe's answer wakes every waiter.
            return (KeyState::Probing, Availability::OnRelease);
        }
        if self.in_flight.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed) {
            return (KeyState::Busy, Availability::OnRelease);
        }
        if quota_at != 0 && quota_at > now.get() {
            return (KeyState::Busy, Availability::At(quota_at));
        }
        (KeyState::Healthy, Availability::Now)
    }

    /// Could a request take this key now? (A hint: `try_take` decides, and agrees unless
    /// another caller changes the key in between.)
    #[inline]
    fn is_available(&self, now: &mut LazyNow<'_>) -> bool {
        // Clears an expired deadline, so that the next look need not read the clock.
        !self.is_resting(now) && self.status(now).1 == Availability::Now
    }

    /// Takes an in-flight slot (and a unit of quota) if the key is usable now.
    #[inline]
    fn try_take(&self, now: &mut LazyNow<'_>) -> Option<Taken> {
        // Read before anything else, so that a lease never carries a generation newer
        // than its take: a cool-down starts by raising the generation (`rate_limited`),
        // and a lease reserved before that is a straggler whose 429 must not escalate.
        // The AcqRel increment below keeps this load before the take.
        let generation = self.generation.load(Ordering::Acquire);
        if self.is_resting(now) {
            return None;
        }
        let probe = match self.probe.load(Ordering::Acquire) {
            PROBE_NONE => false,
            // Suspended => Probing: exactly one caller wins the probe.
            PROBE_OWED => {
                self.probe
                    .compare_exchange(
                        PROBE_OWED,
                        PROBE_IN_FLIGHT,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .ok()?;
                true
            }
            _ => return None,
        };
        // Quota first: giving a unit back needs no wake-up, while giving back an in-flight
        // slot would (and would wake this very caller if it is waiting).
        let now_nanos = if self.quota.is_some() { now.get() } else { 0 };
        let mut tat_after = 0;
        if let Some(quota) = self.quota {
            let Some(after) = quota.try_take(&self.tat, now_nanos) else {
                self.unprobe(probe);
                return None;
            };
            tat_after = after;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let in_flight = if limit == u32::MAX {
            Some(self.in_flight.fetch_add(1, Ordering::AcqRel))
        } else {
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .ok()
        };
        if let Some(before) = in_flight {
            return Some(Taken {
                probe,
                generation,
                at_limit: before.saturating_add(1) >= limit,
                tat_after,
            });
        }
        if let Some(quota) = self.quota {
            quota.refund(&self.tat, tat_after, now_nanos);
        }
        self.unprobe(probe);
        None
    }

    /// A refusal on a lease: if other requests were in flight on the key when it came
    /// back, the provider limits concurrency, and its limit is at most what was in flight
    /// besides this request. Lowers `limit` to that (never below 1).
    ///
    /// `refused`: the other leases refused whose slots are not given back yet (the
    /// caller counted this one in `refused_open`, and its drop takes it out again).
    fn learn_refusal(&self, refused: u32) -> Option<u32> {
        if !self.signals.learn_concurrency {
            return None;
        }
        // This lease still counts, and so do others already refused whose slots are not
        // given back yet; neither is at the provider.
        let others = self
            .in_flight
            .load(Ordering::Acquire)
            .saturating_sub(1)
            .saturating_sub(refused);
        if others == 0 {
            // Alone on the key: a limit of rate, not of concurrency.
            return None;
        }
        self.gains.store(0, Ordering::Relaxed);
        let previous = self
            .limit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |limit| {
                (others < limit).then_some(others)
            })
            .ok()?;
        Some(previous)
    }

    /// A success on a lease taken with the key at its learned limit: after `GROWTH` ×
    /// limit of them, the limit rises by one (additive increase), up to `cap`.
    fn learn_success(&self) {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit >= self.cap {
            return;
        }
        let gains = self.gains.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if gains >= limit.saturating_mul(GROWTH) {
            self.gains.store(0, Ordering::Relaxed);
            let _ = self.limit.compare_exchange(
                limit,
                limit.saturating_add(1).min(self.cap),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            // One more slot: a waiter may take it.
            self.signals.wake_one();
        }
    }

    /// Gives back a probe won by a caller that could not take the key after all.
    fn unprobe(&self, probe: bool) {
        if probe {
            self.probe.store(PROBE_OWED, Ordering::Release);
        }
    }

    fn release(&self) {
        // SeqCst pairs with the waiter's registration (see the module docs).
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.signals.wake_one();
    }

    fn header(&self, bearer: bool) -> &HeaderValue {
        if bearer {
            self.bearer
                .get_or_init(|| self.spec.key.header_value("Bearer "))
        } else {
            self.bare.get_or_init(|| self.spec.key.header_value(""))
        }
    }

    /// Rests the key until at least `wait` from now.
    fn extend(&self, wait: Duration) -> Rest {
        let wait_nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        let now = self.signals.now_nanos();
        let until = now.saturating_add(wait_nanos).min(DISABLED - 1);
        // A deadline only ever extends.
        let previous = self.deadline.fetch_max(until, Ordering::AcqRel);
        if previous == DISABLED || until <= previous {
            Rest::Unchanged
        } else if previous <= now {
            // A new moment at which this key comes back. A waiter that armed no timer
            // (every key was busy for reasons other than time) would not hear of it if the
            // one caller woken by a release gave up: let every waiter recompute its timer.
            if self.signals.waiters.load(Ordering::SeqCst) != 0 {
                self.signals.notify.notify_waiters();
            }
            Rest::Started
        } else {
            Rest::Extended
        }
    }

    /// Rests the key for a limit (a 429, an account's limit, a window the headers say is
    /// used up): a rest that starts owes a probe. (One that extends owes one already.)
    fn rest_for_limit(&self, wait: Duration) -> Rest {
        let rest = self.extend(wait);
        if rest == Rest::Started {
            self.owe_probe();
        }
        rest
    }

    /// After a cool-down for a limit, the key comes back with one probe request rather than
    /// to every waiter at once (which would earn a burst of 429s if the limit still holds).
    fn owe_probe(&self) {
        let _ = self.probe.compare_exchange(
            PROBE_NONE,
            PROBE_OWED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// A 429 on a lease of `generation`: raise the level if fresh, rest the key.
    fn rate_limited(
        &self,
        generation: u32,
        retry_after: Option<Duration>,
    ) -> (Duration, u32, Rest) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        let fresh = self
            .generation
            .compare_exchange(
                generation,
                generation.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        let level = if fresh {
            self.level.fetch_add(1, Ordering::AcqRel).saturating_add(1)
        } else {
            self.level.load(Ordering::Acquire).max(1)
        };
        let wait = self.signals.backoff.wait(level, retry_after);
        (wait, level, self.rest_for_limit(wait))
    }

    fn succeeded(&self, generation: u32) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        // Only a request reserved after the last cool-down began proves the key has
        // recovered; a straggler's success does not.
        if self.level.load(Ordering::Relaxed) != 0
            && self.generation.load(Ordering::Acquire) == generation
        {
            self.level.store(0, Ordering::Relaxed);
        }
    }
}

/// What `Slot::try_take` hands to the lease it makes.
#[derive(Debug, Clone, Copy)]
struct Taken {
    /// The lease is the key's single probe after a rest.
    probe: bool,
    /// The key's cool-down generation, read before the take.
    generation: u32,
    /// The take filled the key up to its concurrency limit (a success then counts
    /// towards raising a learned limit).
    at_limit: bool,
    /// The quota state the take left: its unit ends there (0 without a quota).
    tat_after: u64,
}

/// When a key can next take a request (see `Slot::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Availability {
    /// Now.
    Now,
    /// When one of its requests ends (at its concurrency limit, or its probe running): no
    /// time is known, but the release or the probe's answer wakes waiters.
    OnRelease,
    /// At this time (pool nanoseconds): its rest ends or its quota refills.
    At(u64),
    /// Never: disabled.
    Never,
}

/// What a cool-down did to a key's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// The key was usable and now rests: worth a warning.
    Started,
    /// The key was resting and now rests longer.
    Extended,
    /// The key already rested at least as long (or is disabled).
    Unchanged,
}

/// What [`Slot::try_take`] took, for the [`Lease`].
#[derive(Debug, Clone, Copy)]
/// A wait as people write it: `850 ms`, `2.5 s`, `3 min 20 s`, `1 h 5 min`.
struct Wait(Duration);

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let s = self.0.as_secs();
        match s {
            0 => write!(f, "{ms} ms"),
            1..60 => write!(f, "{:.1} s", self.0.as_secs_f64()),
            60..3600 => write!(f, "{} min {} s", s / 60, s % 60),
            _ => write!(f, "{} h {} min", s / 3600, s / 60 % 60),
        }
    }
}

/// `key 2/3` or `key 2/3 (name)`, for logs.
struct Label<'a> {
    position: usize,
    keys: usize,
    name: Option<&'a str>,
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}/{}", self.position, self.keys)?;
        match self.name {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

/// A reserved key: counts as in flight until dropped.
///
/// Made by [`KeyPool::try_reserve`] or [`KeyPool::poll_reserve`]. The service moves it
/// into the response future and then into the response body, so the slot is given back
/// when the body ends, errors or is dropped, or as soon as anything on the way is dropped.
pub struct Lease {
    slot: Arc<Slot>,
    index: usize,
    keys: usize,
    generation: u32,
    /// Taken with the key at its concurrency limit.
    at_limit: bool,
    /// Where the quota unit this lease took ends: a refund gives back only what of it is
    /// still unused (see `Gcra::refund`).
    tat_after: u64,
    /// `SENT`, `PROBE`, `RESOLVED`, `REFUSED` bits. Only the lease's owner writes them, so a plain
    /// load and store suffice (no locked read-modify-write on the hot path); atomic only
    /// so that a lease is `Sync`.
    flags: AtomicU8,
}

const SENT: u8 = 1;
const PROBE: u8 = 2;
const RESOLVED: u8 = 4;
/// Refused for a limit: counted in the slot's `refused_open` until dropped.
const REFUSED: u8 = 8;

impl Lease {
    fn new(table: &Table, index: usize, taken: Taken) -> Self {
        Self {
            slot: table.slots[index].clone(),
            index,
            keys: table.slots.len(),
            generation: taken.generation,
            at_limit: taken.at_limit,
            tat_after: taken.tat_after,
            flags: AtomicU8::new(if taken.probe { PROBE } else { 0 }),
        }
    }

    fn set_flag(&self, flag: u8) {
        let flags = self.flags.load(Ordering::Relaxed);
        self.flags.store(flags | flag, Ordering::Relaxed);
    }

    fn label(&self) -> Label<'_> {
        Label {
            position: self.index + 1,
            keys: self.keys,
            name: self.slot.spec.name.as_deref(),
        }
    }

    /// 0-based index of the reserved key (in the pool's order when it was reserved).
    pub fn index(&self) -> usize {
        self.index
    }

    /// 1-based position of the reserved key, as logs show it (`key 2/3`).
    pub fn position(&self) -> usize {
        self.index + 1
    }

    /// The reserved key's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.slot.spec.name.as_deref()
    }

    /// The reserved key, for custom placements.
    pub fn key(&self) -> &ApiKey {
        &self.slot.spec.key
    }

    /// The reserved key's header value, `Bearer <key>` (if `bearer`) or the bare key,
    /// built once per key and marked sensitive.
    pub fn header_value(&self, bearer: bool) -> &HeaderValue {
        self.slot.header(bearer)
    }

    /// Is this lease the single probe request of a key coming back from a suspension?
    pub fn is_probe(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & PROBE != 0
    }

    /// The classifier of the pool the key belongs to.
    pub fn classifier(&self) -> &Classifier {
        &self.slot.signals.classifier
    }

    /// May this reservation still be sent? Not if, since it was made, its key was removed
    /// or replaced by a reload, started resting, was disabled, or came to owe its single
    /// probe after a rest to another request. `poll_ready` and `call` ask this of a
    /// reservation made earlier.
    ///
    /// A key owing its probe makes this reservation the probe, if no other request has
    /// claimed it yet: a ready request may as well be the one.
    #[inline]
    pub fn is_usable(&self) -> bool {
        let slot = &*self.slot;
        // Every request asks: the common answer in three plain loads, inlined.
        if !slot.retired.load(Ordering::Acquire)
            && slot.deadline.load(Ordering::Acquire) == 0
            && slot.probe.load(Ordering::Acquire) == PROBE_NONE
        {
            return true;
        }
        self.is_usable_slow()
    }

    /// `is_usable` when the key is retired, has a deadline or a probe state.
    #[cold]
    #[inline(never)]
    fn is_usable_slow(&self) -> bool {
        let slot = &*self.slot;
        if slot.retired.load(Ordering::Acquire) || slot.is_resting(&mut LazyNow::new(&slot.signals))
        {
            return false;
        }
        if self.is_probe() {
            return true;
        }
        match slot.probe.load(Ordering::Acquire) {
            PROBE_NONE => true,
            PROBE_OWED => {
                let claimed = slot
                    .probe
                    .compare_exchange(
                        PROBE_OWED,
                        PROBE_IN_FLIGHT,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok();
                if claimed {
                    self.set_flag(PROBE);
                }
                claimed
            }
            _ => false,
        }
    }

    /// Counts the request as sent with this key and logs `Using key i/n`.
    pub fn mark_sent(&self) {
        self.set_flag(SENT);
        self.slot.requests.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            key = self.position(),
            keys = self.keys,
            "Using {}",
            self.label()
        );
    }

    /// Applies a response's [`Outcome`] to the key: cool down, suspend, disable, or count.
    pub fn record(&self, outcome: Outcome) {
        let slot = &*self.slot;
        let label = self.label();
        let (position, keys) = (self.position(), self.keys);
        if matches!(outcome, Outcome::Success | Outcome::LimitReached { .. }) && self.at_limit {
            slot.learn_success();
        }
        match outcome {
            Outcome::Success => slot.succeeded(self.generation),
            Outcome::LimitReached { reset_after } => {
                slot.succeeded(self.generation);
                // A rest for a limit, as after a 429: capped the same way, and ended by a
                // probe (the window may not have reset when the headers said).
                let wait = slot.signals.backoff.cap(reset_after);
                if slot.rest_for_limit(wait) == Rest::Started {
                    tracing::info!(
                        key = position,
                        keys,
                        wait_ms = millis(wait),
                        "{label} used up its window; resting for {} (rate-limit headers), then one probe request",
                        Wait(wait)
                    );
                }
            }
            Outcome::RateLimited { retry_after } => {
                if self.flags.load(Ordering::Relaxed) & REFUSED == 0 {
                    self.set_flag(REFUSED);
                    let refused = slot.refused_open.fetch_add(1, Ordering::AcqRel);
                    if let Some(before) = slot.learn_refusal(refused) {
                        self.log_learned(before);
                    }
                }
                let (wait, level, rest) = slot.rate_limited(self.generation, retry_after);
                let why = if retry_after.is_some() {
                    "Retry-After"
                } else {
                    "backoff"
                };
                match rest {
                    Rest::Started => tracing::warn!(
                        key = position,
                        keys,
                        wait_ms = millis(wait),
                        level,
                        "{label} rate limited; cooling down for {} ({why})",
                        Wait(wait)
                    ),
                    Rest::Extended => tracing::debug!(
                        key = position,
                        keys,
                        wait_ms = millis(wait),
                        "{label} rate limited again; cooling down until {} from now ({why})",
                        Wait(wait)
                    ),
                    Rest::Unchanged => {}
                }
            }
            Outcome::AccountLimited { retry_after } => {
                let (wait, _, rest) = slot.rate_limited(self.generation, retry_after);
                let mates = self.rest_account(wait);
                if rest == Rest::Started || mates > 0 {
                    tracing::warn!(
                        key = position,
                        keys,
                        wait_ms = millis(wait),
                        "{label} hit its account's limit; it and {mates} other key(s) of the account cool down for {}",
                        Wait(wait)
                    );
                }
            }
            Outcome::QuotaExhausted { reset_after } => {
                slot.rate_limited.fetch_add(1, Ordering::Relaxed);
                let backoff = &slot.signals.backoff;
                let wait =
                    reset_after.map_or(backoff.quota_wait, |w| w.min(backoff.max_quota_wait));
                let rest = slot.extend(wait);
                // Healthy => Suspended (a probe in flight settles below).
                slot.owe_probe();
                if rest != Rest::Unchanged {
                    tracing::warn!(
                        key = position,
                        keys,
                        wait_ms = millis(wait),
                        "{label} quota exhausted; suspended for {}, then one probe request",
                        Wait(wait)
                    );
                }
            }
            Outcome::KeyRejected => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                if slot.deadline.swap(DISABLED, Ordering::SeqCst) != DISABLED {
                    tracing::warn!(
                        key = position,
                        keys,
                        "{label} rejected by the provider; disabled"
                    );
                    // Waiters must learn if this was the last key.
                    slot.signals.notify.notify_waiters();
                }
            }
            Outcome::Failure => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.is_probe() {
            self.set_flag(RESOLVED);
            // A used-up window rests the key again, and a rest ends with a probe.
            let back = match outcome {
                Outcome::Success => true,
                Outcome::LimitReached { reset_after } => {
                    slot.signals.backoff.cap(reset_after).is_zero()
                }
                _ => false,
            };
            // Probing => Healthy on success; else Probing => Suspended: another probe once
            // the rest (if any) is over.
            slot.probe.store(
                if back { PROBE_NONE } else { PROBE_OWED },
                Ordering::Release,
            );
            if back {
                tracing::debug!(
                    key = position,
                    keys,
                    "{label} answered its probe; back in rotation"
                );
                // Everyone waiting for this key may go now.
                slot.signals.notify.notify_waiters();
            }
        }
    }

    /// Logs a concurrency limit learned from a refusal (it was `before`).
    fn log_learned(&self, before: u32) {
        let limit = self.slot.limit.load(Ordering::Relaxed);
        let label = self.label();
        let before = if before == u32::MAX {
            "none".to_string()
        } else {
            before.to_string()
        };
        tracing::info!(
            key = self.position(),
            keys = self.keys,
            limit,
            "{label} refused with {limit} other request(s) in flight; at most {limit} at once from now on (was {before})"
        );
    }

    /// Rests every other key of this key's account for `wait`; returns how many.
    fn rest_account(&self, wait: Duration) -> usize {
        let Some(account) = self.slot.spec.account.as_deref() else {
            return 0;
        };
        let Some(pool) = self.slot.signals.pool.upgrade() else {
            return 0;
        };
        let table = pool.table.load();
        table
            .slots
            .iter()
            .filter(|s| !Arc::ptr_eq(s, &self.slot) && s.spec.account.as_deref() == Some(account))
            .filter(|s| s.rest_for_limit(wait) != Rest::Unchanged)
            .count()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Drop for Lease {
    fn drop(&mut self) {
        let flags = *self.flags.get_mut();
        if flags & SENT == 0 {
            // Reserved but never sent: what is left of its quota unit goes back. Only a
            // quota reads the clock.
            if let Some(quota) = self.slot.quota {
                let now = self.slot.signals.now_nanos();
                quota.refund(&self.slot.tat, self.tat_after, now);
            }
        }
        if flags & PROBE != 0 && flags & RESOLVED == 0 {
            // The probe never got an answer: the next caller may probe.
            self.slot.probe.store(PROBE_OWED, Ordering::Release);
        }
        if flags & REFUSED != 0 {
            self.slot.refused_open.fetch_sub(1, Ordering::AcqRel);
        }
        self.slot.release();
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({})", self.label())
    }
}

/// A caller's registration for a wake-up while no key is free. Keep one per caller (a
/// service holds one) and pass it to [`KeyPool::poll_reserve`].
#[derive(Default)]
pub struct Waiter {
    armed: Option<Armed>,
    /// When this caller started waiting (the first time no key was free), until it gets a
    /// key or gives up.
    pub(crate) since: Option<Instant>,
    /// Kept across waits so that waiting again does not allocate a new timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

struct Armed {
    signals: Arc<Signals>,
    notified: Pin<Box<OwnedNotified>>,
}

impl Waiter {
    /// A waiter not yet registered anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    fn arm(&mut self, pool: &KeyPool) {
        let signals = pool.inner.signals.clone();
        let mut notified = Box::pin(signals.notify.clone().notified_owned());
        notified.as_mut().enable();
        signals.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.armed = Some(Armed { signals, notified });
    }

    /// Done waiting (a key, or given up).
    fn disarm(&mut self) {
        self.armed = None;
        self.since = None;
    }

    /// Woken: the registration is used up; the next look registers again.
    fn rearm(&mut self) {
        self.armed = None;
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.signals.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("armed", &self.armed.is_some())
            .field("since", &self.since)
            .finish()
    }
}
