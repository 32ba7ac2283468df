//! The shared state of all keys, key selection, and waiting for a key.
//!
//! # Key states
//!
//! Each key is in one of four states, read from two atomics (`deadline`, `in_flight`):
//!
//! ```text
//!   Healthy ──(in_flight reaches the cap)──► AtCap ──(a lease is released)──► Healthy
//!   Healthy | AtCap ──(429)──► Cooling ──(the deadline passes)──► Healthy
//!   Cooling ──(another 429)──► Cooling, deadline = max(deadline, now + wait)
//!   any ──(401/403)──► Disabled (for good)
//! ```
//!
//! `deadline` encodes three states in one word: `0` is "not cooling", [`DISABLED`] is
//! "disabled", anything else is the end of a cool-down in nanoseconds since the pool was
//! built (tokio's monotonic clock, so tests can pause it). Deadlines only grow (`fetch_max`);
//! an expired one is cleared back to `0` by whoever notices, so the common path never reads
//! the clock.
//!
//! The backoff `level` counts consecutive 429s and `generation` counts the cool-downs that
//! raised it. A lease remembers the generation it was reserved in; a 429 raises the level
//! only when no cool-down has started since that lease was reserved (so requests already in
//! flight when the first 429 came back cannot escalate it), and a success resets the level
//! under the same condition.
//!
//! # Waking waiters
//!
//! A caller that finds no key arms a [`Waiter`]: it registers with the pool's [`Notify`]
//! and counts itself in `waiters` *before* re-checking the keys, and sleeps until the
//! earliest cool-down ends. A release decrements `in_flight` and then notifies one waiter if
//! `waiters` is non-zero. Both sides use sequentially consistent operations, so either the
//! releaser sees the waiter or the waiter's re-check sees the freed slot: no lost wake-up,
//! and no notification cost when nobody waits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, futures::OwnedNotified};
use tokio::time::{Instant, Sleep};

use crate::backoff::{Backoff, Classifier, Outcome};
use crate::error::AllKeysDisabled;
use crate::key::KeySet;
use crate::stats::KeyStats;

/// `deadline` value of a disabled key.
const DISABLED: u64 = u64::MAX;

/// Keys scanned together by least-in-flight. Pools up to this size get an exact scan;
/// larger pools take the least loaded key of the first window (from the rotating cursor)
/// that has an available key, which keeps selection O(1) at thousands of keys.
const WINDOW: usize = 16;

/// How the pool chooses among available keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Exact rotation 1, 2, 3, 1, 2, 3 over available keys; unavailable keys are skipped
    /// and the rotation moves past them.
    #[default]
    RoundRobin,
    /// The key with the fewest requests in flight; ties go to the next key in rotation.
    /// Pools of more than 16 keys compare a window of 16 keys starting at the rotation.
    LeastInFlight,
}

/// The shared pool of keys: selection, cool-downs, counters.
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
    slots: Box<[Slot]>,
    keys: KeySet,
    strategy: Strategy,
    /// `u32::MAX` when uncapped.
    cap: u32,
    backoff: Backoff,
    classifier: Classifier,
    /// Time zero of every `deadline`.
    epoch: Instant,
    cursor: Padded<AtomicUsize>,
    waiters: Padded<AtomicUsize>,
    disabled: AtomicUsize,
    notify: Arc<Notify>,
}

/// One key's state, on its own cache lines so that keys do not contend with each other.
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    in_flight: AtomicU32,
    level: AtomicU32,
    generation: AtomicU32,
    deadline: AtomicU64,
    requests: AtomicU64,
    successes: AtomicU64,
    rate_limited: AtomicU64,
    failures: AtomicU64,
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
    backoff: Backoff,
    classifier: Classifier,
}

impl KeyPoolBuilder {
    /// The selection strategy (default [`Strategy::RoundRobin`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// At most `max` requests in flight per key (default: no cap). Callers beyond every
    /// key's cap wait for a slot.
    ///
    /// # Panics
    ///
    /// If `max` is zero: no request could ever be sent.
    pub fn max_in_flight_per_key(mut self, max: u32) -> Self {
        assert!(max > 0, "max_in_flight_per_key must be at least 1");
        self.cap = max;
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

    /// Builds the pool.
    pub fn build(self) -> KeyPool {
        let slots = (0..self.keys.len()).map(|_| Slot::default()).collect();
        KeyPool {
            inner: Arc::new(PoolInner {
                slots,
                keys: self.keys,
                strategy: self.strategy,
                cap: self.cap,
                backoff: self.backoff,
                classifier: self.classifier,
                epoch: Instant::now(),
                cursor: Padded::default(),
                waiters: Padded::default(),
                disabled: AtomicUsize::new(0),
                notify: Arc::new(Notify::new()),
            }),
        }
    }
}

impl KeyPool {
    /// A pool with default settings: round-robin, no cap, default [`Backoff`] and
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
            backoff: Backoff::default(),
            classifier: Classifier::default(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// Always `false`: a pool holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// The keys, in position order.
    pub fn keys(&self) -> &KeySet {
        &self.inner.keys
    }

    /// The selection strategy.
    pub fn strategy(&self) -> Strategy {
        self.inner.strategy
    }

    /// The classifier responses go through.
    pub fn classifier(&self) -> &Classifier {
        &self.inner.classifier
    }

    /// Reserves an available key now, or returns `None` when every key is cooling down,
    /// at its cap or disabled. The key counts as in flight until the [`Lease`] is dropped.
    pub fn try_reserve(&self) -> Option<Lease> {
        let index = self.inner.select()?;
        Some(self.lease(index))
    }

    /// Reserves an available key among those `allowed` (by 0-based index), scanning in
    /// rotation order and taking the least loaded. A slow path for retries that must avoid
    /// keys already tried; `None` if no allowed key is available.
    pub fn try_reserve_where(&self, allowed: impl Fn(usize) -> bool) -> Option<Lease> {
        let inner = &*self.inner;
        let n = inner.slots.len();
        let start = inner.cursor.load(Ordering::Relaxed) % n;
        let mut now = LazyNow {
            pool: inner,
            nanos: None,
        };
        loop {
            let best = (0..n)
                .map(|step| (start + step) % n)
                .filter(|&i| allowed(i))
                .filter(|&i| !inner.is_resting(&inner.slots[i], &mut now))
                .map(|i| (i, inner.slots[i].in_flight.load(Ordering::Relaxed)))
                .filter(|&(_, in_flight)| in_flight < inner.cap)
                .min_by_key(|&(_, in_flight)| in_flight)?;
            if inner.try_take(&inner.slots[best.0]) {
                return Some(self.lease(best.0));
            }
        }
    }

    fn lease(&self, index: usize) -> Lease {
        let generation = self.inner.slots[index].generation.load(Ordering::Acquire);
        Lease {
            pool: self.clone(),
            index,
            generation,
        }
    }

    /// Reserves a key, or registers `waiter` to be woken when one may be free.
    ///
    /// Returns `Pending` with a wake-up arranged (a slot released, or the earliest
    /// cool-down ending), and an error only when every key is disabled.
    pub fn poll_reserve(
        &self,
        waiter: &mut Waiter,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Lease, AllKeysDisabled>> {
        loop {
            if let Some(lease) = self.try_reserve() {
                waiter.disarm();
                return Poll::Ready(Ok(lease));
            }
            if self.all_disabled() {
                waiter.disarm();
                return Poll::Ready(Err(AllKeysDisabled::new(self.len())));
            }
            let Some(armed) = waiter.armed.as_mut() else {
                // Register interest, then look again before sleeping.
                waiter.arm(self);
                continue;
            };
            if armed.notified.as_mut().poll(cx).is_ready() {
                // A slot was released: look again (and re-register if still nothing).
                waiter.disarm();
                continue;
            }
            if let Some(at) = self.inner.earliest_return() {
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
        self.inner.disabled.load(Ordering::SeqCst) == self.len()
    }

    /// How long until the earliest cooling key comes back, if any key is cooling.
    pub fn earliest_return_in(&self) -> Option<Duration> {
        let at = self.inner.earliest_return()?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    /// Per-key statistics, in position order. Never contains a key value.
    pub fn snapshot(&self) -> Vec<KeyStats> {
        let now = self.inner.now_nanos();
        self.inner
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let deadline = slot.deadline.load(Ordering::Acquire);
                KeyStats {
                    position: i + 1,
                    requests: slot.requests.load(Ordering::Relaxed),
                    successes: slot.successes.load(Ordering::Relaxed),
                    rate_limited: slot.rate_limited.load(Ordering::Relaxed),
                    failures: slot.failures.load(Ordering::Relaxed),
                    in_flight: slot.in_flight.load(Ordering::Relaxed),
                    cooling_down_for: (deadline != DISABLED && deadline > now)
                        .then(|| Duration::from_nanos(deadline - now)),
                    disabled: deadline == DISABLED,
                }
            })
            .collect()
    }
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPool")
            .field("keys", &self.len())
            .field("strategy", &self.inner.strategy)
            .field(
                "max_in_flight_per_key",
                &(self.inner.cap != u32::MAX).then_some(self.inner.cap),
            )
            .field("backoff", &self.inner.backoff)
            .finish()
    }
}

/// The clock, read at most once per selection and only if some key has a deadline.
struct LazyNow<'a> {
    pool: &'a PoolInner,
    nanos: Option<u64>,
}

impl LazyNow<'_> {
    fn get(&mut self) -> u64 {
        *self.nanos.get_or_insert_with(|| self.pool.now_nanos())
    }
}

impl PoolInner {
    fn now_nanos(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(DISABLED - 1)
    }

    fn select(&self) -> Option<usize> {
        let mut now = LazyNow {
            pool: self,
            nanos: None,
        };
        match self.strategy {
            Strategy::RoundRobin => self.select_round_robin(&mut now),
            Strategy::LeastInFlight => self.select_least_in_flight(&mut now),
        }
    }

    fn select_round_robin(&self, now: &mut LazyNow<'_>) -> Option<usize> {
        let n = self.slots.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut index = start;
        for skipped in 0..n {
            let slot = &self.slots[index];
            if !self.is_resting(slot, now) && self.try_take(slot) {
                if skipped > 0 {
                    // Move the rotation past the keys we skipped, so the next caller
                    // continues after the key we took.
                    self.cursor.fetch_add(skipped, Ordering::Relaxed);
                }
                return Some(index);
            }
            index += 1;
            if index == n {
                index = 0;
            }
        }
        // Nothing available: give the turn back, so waiting callers polling again do not
        // move the rotation on (the next key in turn stays next).
        self.cursor.fetch_sub(1, Ordering::Relaxed);
        None
    }

    fn select_least_in_flight(&self, now: &mut LazyNow<'_>) -> Option<usize> {
        let n = self.slots.len();
        let start = self.cursor.load(Ordering::Relaxed) % n;
        let window = n.min(WINDOW);
        let mut scanned = 0;
        while scanned < n {
            let end = (scanned + window).min(n);
            let mut best: Option<(usize, u32)> = None;
            for step in scanned..end {
                let mut index = start + step;
                if index >= n {
                    index -= n;
                }
                let slot = &self.slots[index];
                let in_flight = slot.in_flight.load(Ordering::Relaxed);
                if in_flight >= self.cap || self.is_resting(slot, now) {
                    continue;
                }
                if best.is_none_or(|(_, least)| in_flight < least) {
                    best = Some((index, in_flight));
                    if in_flight == 0 {
                        break; // cannot do better, and it is the first in rotation
                    }
                }
            }
            match best {
                Some((index, _)) if self.try_take(&self.slots[index]) => {
                    self.cursor.store(index + 1, Ordering::Relaxed);
                    return Some(index);
                }
                // Another caller took the last slot of our choice: look at this window again.
                Some(_) => continue,
                None => scanned = end,
            }
        }
        None
    }

    /// Is the key cooling down or disabled? Clears an expired deadline.
    #[inline]
    fn is_resting(&self, slot: &Slot, now: &mut LazyNow<'_>) -> bool {
        let deadline = slot.deadline.load(Ordering::Acquire);
        if deadline == 0 {
            return false;
        }
        if deadline == DISABLED || deadline > now.get() {
            return true;
        }
        // Cooling => Healthy. A concurrent extension makes this fail, which is right.
        let _ = slot
            .deadline
            .compare_exchange(deadline, 0, Ordering::AcqRel, Ordering::Relaxed);
        false
    }

    /// Takes an in-flight slot if the key is under its cap.
    #[inline]
    fn try_take(&self, slot: &Slot) -> bool {
        if self.cap == u32::MAX {
            slot.in_flight.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        slot.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self, index: usize) {
        // SeqCst pairs with the waiter's registration (see the module docs).
        self.slots[index].in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.notify.notify_one();
        }
    }

    /// The earliest end of a cool-down still in the future.
    fn earliest_return(&self) -> Option<Instant> {
        let now = self.now_nanos();
        self.slots
            .iter()
            .map(|slot| slot.deadline.load(Ordering::Acquire))
            .filter(|&d| d != DISABLED && d > now)
            .min()
            .map(|d| self.epoch + Duration::from_nanos(d))
    }

    fn record(&self, index: usize, generation: u32, outcome: Outcome) {
        let slot = &self.slots[index];
        let position = index + 1;
        let keys = self.slots.len();
        match outcome {
            Outcome::Success => {
                slot.successes.fetch_add(1, Ordering::Relaxed);
                // Only a request reserved after the last cool-down began proves the key
                // has recovered; a straggler's success does not.
                if slot.level.load(Ordering::Relaxed) != 0
                    && slot.generation.load(Ordering::Acquire) == generation
                {
                    slot.level.store(0, Ordering::Relaxed);
                }
            }
            Outcome::RateLimited { retry_after } => {
                slot.rate_limited.fetch_add(1, Ordering::Relaxed);
                let fresh = slot
                    .generation
                    .compare_exchange(
                        generation,
                        generation.wrapping_add(1),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok();
                let level = if fresh {
                    slot.level.fetch_add(1, Ordering::AcqRel).saturating_add(1)
                } else {
                    slot.level.load(Ordering::Acquire).max(1)
                };
                let wait = self.backoff.wait(level, retry_after);
                let wait_nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                let until = self
                    .now_nanos()
                    .saturating_add(wait_nanos)
                    .min(DISABLED - 1);
                // A deadline only ever extends.
                let previous = slot.deadline.fetch_max(until, Ordering::AcqRel);
                if previous == DISABLED {
                    return;
                }
                if until > previous {
                    tracing::warn!(
                        key = position,
                        keys,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        level,
                        retry_after = retry_after.is_some(),
                        "key {position}/{keys} rate limited; cooling down for {wait:.3?} ({})",
                        if retry_after.is_some() {
                            "Retry-After"
                        } else {
                            "backoff"
                        }
                    );
                }
            }
            Outcome::KeyRejected => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
                if slot.deadline.swap(DISABLED, Ordering::AcqRel) != DISABLED {
                    self.disabled.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(
                        key = position,
                        keys,
                        "key {position}/{keys} rejected by the provider; disabled"
                    );
                    // Waiters must learn if this was the last key.
                    self.notify.notify_waiters();
                }
            }
            Outcome::Failure => {
                slot.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A reserved key: counts as in flight until dropped.
///
/// Made by [`KeyPool::try_reserve`] or [`KeyPool::poll_reserve`]. The service moves it
/// into the response future and then into the response body, so the slot is given back
/// when the body ends, errors or is dropped, or as soon as anything on the way is dropped.
pub struct Lease {
    pool: KeyPool,
    index: usize,
    generation: u32,
}

impl Lease {
    /// 0-based index of the reserved key in [`KeyPool::keys`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// 1-based position of the reserved key, as logs show it (`key 2/3`).
    pub fn position(&self) -> usize {
        self.index + 1
    }

    /// The pool the key belongs to.
    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    /// Is the key still usable (not cooling down, not disabled)? A repeated `poll_ready`
    /// asks this of a reservation it holds.
    pub fn is_usable(&self) -> bool {
        let inner = &*self.pool.inner;
        let mut now = LazyNow {
            pool: inner,
            nanos: None,
        };
        !inner.is_resting(&inner.slots[self.index], &mut now)
    }

    /// Counts the request as sent with this key and logs `Using key i/n`.
    pub fn mark_sent(&self) {
        let inner = &*self.pool.inner;
        inner.slots[self.index]
            .requests
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            key = self.position(),
            keys = inner.slots.len(),
            "Using key {}/{}",
            self.position(),
            inner.slots.len()
        );
    }

    /// Applies a response's [`Outcome`] to the key: cool down, disable, or count.
    pub fn record(&self, outcome: Outcome) {
        self.pool.inner.record(self.index, self.generation, outcome);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.inner.release(self.index);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease(key {}/{})", self.position(), self.pool.len())
    }
}

/// A caller's registration for a wake-up while no key is free. Keep one per caller (a
/// service holds one) and pass it to [`KeyPool::poll_reserve`].
#[derive(Default)]
pub struct Waiter {
    armed: Option<Armed>,
    /// Kept across waits so that waiting again does not allocate a new timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

struct Armed {
    pool: KeyPool,
    notified: Pin<Box<OwnedNotified>>,
}

impl Waiter {
    /// A waiter not yet registered anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    fn arm(&mut self, pool: &KeyPool) {
        let mut notified = Box::pin(pool.inner.notify.clone().notified_owned());
        notified.as_mut().enable();
        pool.inner.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.armed = Some(Armed {
            pool: pool.clone(),
            notified,
        });
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.pool.inner.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("armed", &self.armed.is_some())
            .finish()
    }
}
