//! Prompt-cache affinity: sending every request of one session to the same key, so that the
//! provider's prompt cache (kept per account) stays warm.
//!
//! # The order of a session
//!
//! A request may carry an affinity id (a 64-bit hash of the session's id, from the pool's
//! router). Its top 16 bits put the session in one of 65,536 groups, and each key has a
//! *rank* for each group: the rendezvous (highest-random-weight) hash of the pair, scaled
//! by the key's weight. The key of highest rank is the session's preferred key; the others
//! follow in rank order. A rank depends only on the group and on the key itself (its name,
//! or its value for a key without a name), never on the other keys nor on positions, so:
//!
//! - adding a key moves to it only the groups it now ranks first for (its weight's share);
//!   removing one moves only its own groups, each to the next key of its own order;
//! - replicas with the same keys compute the same orders without talking to each other.
//!
//! Weights: a key's rank is `-ln(u) / weight` for the pair's hash `u` in (0, 1), lowest
//! first (the logarithmic method of weighted rendezvous hashing), which makes a key
//! preferred by a share of groups equal to its share of the weights (within about 1 % at 3
//! keys and 2 % at 16: 65,536 groups are a sample). With equal weights this is the same
//! order as the raw hash's, which is compared as it is (no logarithm).
//!
//! Each group's preferred key is computed when the key set is built or reloaded (a table of
//! one byte per group, 64 KiB, in pools of up to 256 keys with a router), so a request
//! finds its key in one look-up, whatever the number of keys. The rest of its order is
//! ranked only when the preferred key cannot take the request (a spill), or the session
//! is remembered elsewhere. Pools of more keys rank every key per request (the same order).
//!
//! # Spills, and where a session went
//!
//! When the session's first choice cannot take the request now (resting, at its limit, out
//! of quota, disabled), the request waits for it if it comes back within the affinity wait
//! ([`KeyPoolBuilder::affinity_wait`](super::KeyPoolBuilder::affinity_wait)), else spills
//! to the next key of its order that can take it. A spilled session is remembered
//! ([`Memory`]) for a cache lifetime, refreshed by each request: its next requests go to
//! the key it spilled to (now warm) first, not back to the preferred key. A session that is
//! not remembered is on its preferred key; so only spilled sessions take memory.
//!
//! The memory is a fixed table of one-word entries, allocated on the first spill and never
//! grown: a flood of distinct ids evicts older entries (their sessions go back to their
//! preferred keys: a cache miss each), it never grows memory or slows selection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::bucket::Bucket;
use super::lease::Lease;
use super::slot::{Slot, Taken};
use super::state::Availability;
use super::table::Table;
use super::{KeyPool, LazyNow, PoolInner};
use crate::pool_time::PoolTime;
use crate::route::Route;

/// How long a request waits for its session's key by default
/// ([`KeyPoolBuilder::affinity_wait`](super::KeyPoolBuilder::affinity_wait)).
pub(super) const DEFAULT_WAIT: Duration = Duration::from_millis(500);
/// How long a spilled session is remembered by default: the providers' cache lifetime
/// (OpenAI and Anthropic keep a prompt prefix 5 minutes after its last use).
pub(super) const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Spilled sessions remembered at most, by default (8 bytes each: 1 MiB).
pub(super) const DEFAULT_CAPACITY: usize = 1 << 17;

/// Entries per set: one cache line of 8-byte words.
const WAYS: usize = 8;

/// Sessions fall into `2^GROUP_BITS` groups by the top bits of their affinity id; a
/// session's order of keys is its group's. Fixed (never derived from the number of keys),
/// so that a session's group never changes.
const GROUP_BITS: u32 = 16;
/// The number of session groups.
const GROUPS: usize = 1 << GROUP_BITS;
/// Pools of at most this many keys keep each group's preferred key in a table, built with
/// the key set; larger pools rank their keys for each request (the same order, computed).
const TABLE_KEYS: usize = 256;

/// One key's place in every session's order, from the key's identity.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeyPoint {
    /// The key's identity, hashed (never the value itself).
    seed: u64,
    /// `1 / weight`.
    inverse_weight: f64,
}

/// The keys in force, as affinity sees them: each key's point, whether weights differ,
/// and each session group's preferred key.
#[derive(Debug)]
pub(super) struct Ring {
    points: Box<[KeyPoint]>,
    weighted: bool,
    /// Each group's preferred key (an index), by group; empty above [`TABLE_KEYS`] keys,
    /// and in a pool without a router.
    preferred: Box<[u8]>,
}

impl Ring {
    /// The ring of these keys (in position order); with `table`, the table of each
    /// group's preferred key too (what a pool with a router reads for every request).
    pub(super) fn new(slots: &[std::sync::Arc<Slot>], table: bool) -> Self {
        let points: Box<[KeyPoint]> = slots
            .iter()
            .map(|slot| KeyPoint {
                seed: key_seed(slot.spec.name.as_deref(), slot.spec.key.expose_secret()),
                inverse_weight: 1.0 / f64::from(slot.weight.max(1)),
            })
            .collect();
        let weighted = slots.windows(2).any(|w| w[0].weight != w[1].weight);
        Self::of_points(points, weighted, table)
    }

    fn of_points(points: Box<[KeyPoint]>, weighted: bool, table: bool) -> Self {
        let mut ring = Self {
            points,
            weighted,
            preferred: Box::default(),
        };
        if table && !ring.points.is_empty() && ring.points.len() <= TABLE_KEYS {
            ring.preferred = ring.build_table();
        }
        ring
    }

    /// Each group's preferred key: the key of highest rank for the group, lowest position
    /// among equal ranks (as [`order`](Self::order) sorts). Keys of one weight rank as
    /// their raw hashes do, so only the best of each weight is ranked by weight (a
    /// logarithm): a few per group, not one per key.
    fn build_table(&self) -> Box<[u8]> {
        // Keys by weight: (inverse weight, indices in position order).
        let mut classes: Vec<(f64, Vec<usize>)> = Vec::new();
        for (index, point) in self.points.iter().enumerate() {
            match classes
                .iter_mut()
                .find(|(w, _)| w.to_bits() == point.inverse_weight.to_bits())
            {
                Some((_, members)) => members.push(index),
                None => classes.push((point.inverse_weight, vec![index])),
            }
        }
        (0..GROUPS as u64)
            .map(|group| {
                let point = group_point(group);
                let mut best: Option<(u64, usize)> = None;
                for (_, members) in &classes {
                    // The class's best: highest hash (as far as the weighted rank sees
                    // it: its top 53 bits), lowest position among equals.
                    let shift = if self.weighted { 11 } else { 0 };
                    let mut top: Option<(u64, usize)> = None;
                    for &index in members {
                        let hash = mix(point ^ self.points[index].seed) >> shift;
                        if top.is_none_or(|(h, _)| hash > h) {
                            top = Some((hash, index));
                        }
                    }
                    let Some((_, index)) = top else { continue };
                    let rank = self.rank_in(point, index);
                    if best.is_none_or(|(r, i)| rank > r || (rank == r && index < i)) {
                        best = Some((rank, index));
                    }
                }
                // At most TABLE_KEYS (256) keys: an index fits a byte.
                best.map_or(0, |(_, index)| index as u8)
            })
            .collect()
    }

    /// The point of session `id`'s group in every rank (see [`group_point`]).
    #[inline]
    pub(super) fn point(id: u64) -> u64 {
        group_point(id >> (64 - GROUP_BITS))
    }

    /// Key `index`'s rank for the group of `point` ([`Ring::point`]): higher goes first.
    #[inline]
    pub(super) fn rank_in(&self, point: u64, index: usize) -> u64 {
        let key = &self.points[index];
        let hash = mix(point ^ key.seed);
        if !self.weighted {
            return hash;
        }
        // u in (0, 1) from the top 53 bits; -ln(u) / weight > 0, lowest first. Positive
        // doubles order as their bits do, so the complement ranks highest first.
        let u = ((hash >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        u64::MAX - (-u.ln() * key.inverse_weight).to_bits()
    }

    /// Of `indices`, the key ranked highest at `point` (the first of equals).
    fn highest(&self, point: u64, indices: impl Iterator<Item = usize>) -> Option<usize> {
        indices
            .map(|index| (self.rank_in(point, index), index))
            .reduce(|best, next| if next.0 > best.0 { next } else { best })
            .map(|(_, index)| index)
    }

    /// The session's preferred key (index) from the table, if the pool keeps one.
    #[inline]
    pub(super) fn preferred_of(&self, id: u64) -> Option<usize> {
        self.preferred
            .get((id >> (64 - GROUP_BITS)) as usize)
            .map(|&index| usize::from(index))
    }

    /// The fingerprint that [`Memory`] keeps for key `index`.
    #[inline]
    pub(super) fn fingerprint(&self, index: usize) -> u16 {
        (self.points[index].seed >> 48) as u16
    }

    /// The session's preferred key (index).
    #[cfg(test)]
    pub(super) fn preferred(&self, id: u64) -> usize {
        self.order(id)[0]
    }

    /// Every key (indices) in the session's order.
    pub(super) fn order(&self, id: u64) -> Vec<usize> {
        let point = Self::point(id);
        let mut order: Vec<usize> = (0..self.points.len()).collect();
        // Highest rank first; equal ranks (never seen in practice) by position.
        order.sort_by_key(|&i| (std::cmp::Reverse(self.rank_in(point, i)), i));
        order
    }
}

/// A session group's point: the group number spread over 64 bits (an odd multiplier is
/// a bijection), so that the groups' ranks of one key are independent.
#[inline]
fn group_point(group: u64) -> u64 {
    mix(group.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A key's identity hashed: its name when it has one (a named key keeps its sessions when
/// its value is replaced), else its value. xxh3, a specified hash whose output is fixed
/// across versions and platforms, so that replicas agree.
fn key_seed(name: Option<&str>, value: &str) -> u64 {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    match name {
        Some(name) => xxh3_64_with_seed(name.as_bytes(), 0x6e61_6d65),
        None => xxh3_64_with_seed(value.as_bytes(), 0x7661_6c75),
    }
}

/// A bijective 64-bit mixer (splitmix64's finaliser): every output bit depends on every
/// input bit, so ranks of one id over different keys are independent.
#[inline]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The pool's affinity settings and its memory of spilled sessions.
pub(super) struct Affinity {
    /// How long a request may wait for its session's first choice before spilling.
    pub(super) wait: Duration,
    ttl_ticks: u64,
    ttl: Duration,
    capacity: usize,
    memory: OnceLock<Memory>,
}

impl Affinity {
    pub(super) fn new(wait: Duration, ttl: Duration, capacity: usize) -> Self {
        Self {
            wait,
            ttl,
            ttl_ticks: ticks_of(ttl).clamp(1, STAMP_MASK / 2),
            capacity,
            memory: OnceLock::new(),
        }
    }

    /// How long a spilled session is remembered.
    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Spilled sessions remembered at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Where session `id` last spilled to, if it is remembered: the key's fingerprint.
    /// Costs one cache line's loads; the clock is read only if the session is there.
    #[inline]
    pub(super) fn recall(&self, id: u64, now: &mut LazyNow<'_>) -> Option<Recalled<'_>> {
        let memory = self.memory.get()?;
        memory.recall(id, now, self.ttl_ticks)
    }

    /// Remembers that session `id` spilled to the key of `fingerprint`.
    #[cold]
    pub(super) fn remember(&self, id: u64, fingerprint: u16, now: &mut LazyNow<'_>) {
        if self.capacity == 0 {
            return;
        }
        let memory = self.memory.get_or_init(|| Memory::new(self.capacity));
        memory.remember(id, fingerprint, ticks(now.get()), self.ttl_ticks);
    }

    /// Sessions remembered now (a scan of the table: for statistics, not the hot path).
    pub(super) fn remembered(&self, now: &mut LazyNow<'_>) -> usize {
        let Some(memory) = self.memory.get() else {
            return 0;
        };
        let tick = ticks(now.get());
        memory
            .sets
            .iter()
            .flat_map(|set| set.0.iter())
            .filter(|cell| {
                let word = cell.load(Ordering::Relaxed);
                word != 0 && age(tick, word) <= self.ttl_ticks
            })
            .count()
    }
}

/// What [`PoolInner::select_affinity`] found for a request of a session.
pub(super) enum Placed {
    /// A key, taken: its lease (made where the key was taken, so that what the take
    /// handed over goes straight into the lease).
    Taken(Lease),
    /// The session's first choice cannot take the request now but comes back
    /// within the affinity wait: wait for it, until `until` at most, then spill.
    Wait {
        availability: Availability,
        until: PoolTime,
    },
    /// No key (of those allowed) can take the request now.
    Nothing,
}

/// How long a request may wait for its session's first choice before it spills.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Patience {
    /// Not at all: spill at once.
    None,
    /// This long from now (the clock is read only if the first choice cannot take it).
    For(Duration),
    /// Until then.
    Until(PoolTime),
}

/// A request waiting for its session's own key: until when at most, and when that key
/// comes back if a time is known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patient {
    pub(crate) until: Instant,
    pub(crate) back_at: Option<Instant>,
    /// The key looked free but another caller took it first: look again at once.
    pub(crate) free: bool,
}

impl KeyPool {
    /// Reserves a key for a request of session `id` among those `allowed` (see
    /// [`PoolInner::select_affinity`]); `Err(Some(_))` if it should wait for its session's
    /// key, `Err(None)` if no allowed key can take it now.
    pub(super) fn reserve_affinity(
        &self,
        id: u64,
        bucket: Option<&Arc<Bucket>>,
        cost: u64,
        patience: Patience,
        allowed: impl Fn(usize) -> bool,
    ) -> Result<Lease, Option<Patient>> {
        let inner = &*self.inner;
        let table = inner.table.load();
        let mut now = LazyNow::costing(&inner.signals, cost);
        match inner.select_affinity(&table, id, bucket, &mut now, patience, allowed) {
            Placed::Taken(lease) => Ok(lease),
            Placed::Wait {
                availability,
                until,
            } => Err(Some(Patient {
                until: inner.signals.instant(until),
                back_at: match availability {
                    Availability::At(at) => Some(inner.signals.instant(at)),
                    _ => None,
                },
                free: availability == Availability::Now,
            })),
            Placed::Nothing => Err(None),
        }
    }

    /// The keys (1-based positions) in the order a request of `route`'s session tries them:
    /// its preferred key first. Empty for a route without affinity. For diagnostics and
    /// tests: allocates.
    pub fn affinity_order(&self, route: &Route) -> Vec<usize> {
        let Some(id) = route.affinity else {
            return Vec::new();
        };
        let table = self.inner.table.load();
        table.ring.order(id).into_iter().map(|i| i + 1).collect()
    }

    /// Sessions remembered now where they spilled (see
    /// [`KeyPoolBuilder::affinity_capacity`](super::KeyPoolBuilder::affinity_capacity)).
    /// Scans the memory: for statistics, not for every request.
    pub fn affinity_remembered(&self) -> usize {
        let mut now = LazyNow::new(&self.inner.signals);
        self.inner.affinity.remembered(&mut now)
    }
}

/// Spill attempts lost to other callers before giving up (each scans the keys once).
const SPILL_TRIES: usize = 4;

impl PoolInner {
    /// Chooses a key for a request of session `id` among the keys `allowed` (by 1-based
    /// position): its first choice (where it last spilled to, if remembered, else its
    /// preferred key), else, if that key does not come back within its `patience`, the
    /// next key of its order that can take it now. Never a key that cannot take it: every
    /// key is taken through `Slot::try_take`. Allocates nothing.
    pub(super) fn select_affinity(
        &self,
        table: &Table,
        id: u64,
        bucket: Option<&Arc<Bucket>>,
        now: &mut LazyNow<'_>,
        patience: Patience,
        allowed: impl Fn(usize) -> bool,
    ) -> Placed {
        let ring = &table.ring;
        let n = table.slots.len();
        let point = Ring::point(id);
        let recalled = self.affinity.recall(id, now);
        // The preferred key: from the table if the pool keeps one and it is allowed, else
        // the allowed key of highest rank.
        let preferred = match ring.preferred_of(id) {
            Some(index) if index < n && allowed(index + 1) => index,
            _ => match ring.highest(point, (0..n).filter(|&index| allowed(index + 1))) {
                Some(index) => index,
                None => return Placed::Nothing,
            },
        };
        // The key the session spilled to, if remembered: of the allowed keys sharing its
        // fingerprint, the one it ranks highest.
        let first = match &recalled {
            None => preferred,
            Some(recalled) => ring
                .highest(
                    point,
                    (0..n).filter(|&index| {
                        ring.fingerprint(index) == recalled.fingerprint() && allowed(index + 1)
                    }),
                )
                .unwrap_or(preferred),
        };
        let slot = &*table.slots[first];
        if let Some((lane, taken)) = take(slot, bucket, now) {
            slot.affinity_hits.fetch_add(1, Ordering::Relaxed);
            if let Some(recalled) = &recalled {
                if first == preferred {
                    recalled.forget();
                } else {
                    recalled.refresh();
                }
            }
            return Placed::Taken(lease(table, first, lane, taken));
        }
        let availability = match bucket {
            Some(bucket) => slot.status_in(bucket, now).1,
            None => slot.status(now).1,
        };
        let patience_until = match patience {
            Patience::None => None,
            Patience::For(wait) => (!wait.is_zero()).then(|| now.get().saturating_add(wait)),
            Patience::Until(until) => Some(until),
        };
        if worth_waiting(availability, patience_until, now) {
            return Placed::Wait {
                availability,
                until: patience_until.unwrap_or(PoolTime::MAX),
            };
        }
        // Spill: the highest-ranked key below `ceiling` that can take the request now.
        let mut ceiling = (u64::MAX, usize::MAX);
        for _ in 0..SPILL_TRIES {
            let mut best: Option<(u64, usize)> = None;
            for index in 0..n {
                if index == first || !allowed(index + 1) {
                    continue;
                }
                let candidate = (ring.rank_in(point, index), index);
                // Below the ceiling in (rank descending, position ascending) order.
                let below = candidate.0 < ceiling.0
                    || (candidate.0 == ceiling.0 && candidate.1 > ceiling.1);
                let better = best.is_none_or(|b| candidate.0 > b.0);
                let slot = &*table.slots[index];
                let available = match bucket {
                    Some(bucket) => slot.is_available_in(bucket, now),
                    None => slot.is_available(now),
                };
                if below && better && available {
                    best = Some(candidate);
                }
            }
            let Some((rank, index)) = best else {
                return Placed::Nothing;
            };
            let slot = &*table.slots[index];
            if let Some((lane, taken)) = take(slot, bucket, now) {
                slot.affinity_spills.fetch_add(1, Ordering::Relaxed);
                if index == preferred {
                    if let Some(recalled) = &recalled {
                        recalled.forget();
                    }
                } else {
                    self.affinity.remember(id, ring.fingerprint(index), now);
                }
                return Placed::Taken(lease(table, index, lane, taken));
            }
            ceiling = (rank, index);
        }
        Placed::Nothing
    }
}

/// The lease of key `index` taken, in its lane if any.
#[inline(always)]
fn lease(table: &Table, index: usize, lane: Option<&Arc<Slot>>, taken: Taken) -> Lease {
    match lane {
        Some(lane) => Lease::new_in(table, index, lane, taken),
        None => Lease::new(table, index, taken),
    }
}

/// Takes key `slot` for a request of `bucket` (its key state and its lane both allowing,
/// in a pool with buckets), handing back the lane taken.
#[inline]
fn take<'t>(
    slot: &'t Slot,
    bucket: Option<&Arc<Bucket>>,
    now: &mut LazyNow<'_>,
) -> Option<(Option<&'t Arc<Slot>>, Taken)> {
    match bucket {
        Some(bucket) => slot
            .try_take_in(bucket, now)
            .map(|(lane, taken)| (Some(lane), taken)),
        None => slot.try_take(now).map(|taken| (None, taken)),
    }
}

/// Should a request wait for its session's first choice (`availability` now), having
/// waited since `since`? It waits if the key comes back before the affinity wait is over:
/// at a known time (a rest ends, quota refills) or when one of its requests ends.
pub(super) fn worth_waiting(
    availability: Availability,
    patience_until: Option<PoolTime>,
    now: &mut LazyNow<'_>,
) -> bool {
    let Some(until) = patience_until else {
        return false;
    };
    if until <= now.get() {
        return false;
    }
    match availability {
        Availability::Now | Availability::OnRelease => true,
        Availability::At(at) => at <= until,
        Availability::Never => false,
    }
}

/// A remembered session's entry, as [`Affinity::recall`] found it.
pub(super) struct Recalled<'a> {
    cell: &'a AtomicU64,
    word: u64,
    tick: u64,
}

impl Recalled<'_> {
    /// The fingerprint of the key the session spilled to.
    pub(super) fn fingerprint(&self) -> u16 {
        ((self.word >> STAMP_BITS) & 0xffff) as u16
    }

    /// The session went there again: it stays remembered for another lifetime. Writes only
    /// when the stamp's tick changed (about once a second per busy session).
    #[inline]
    pub(super) fn refresh(&self) {
        if self.word & STAMP_MASK != self.tick {
            let word = (self.word & !STAMP_MASK) | self.tick;
            let _ =
                self.cell
                    .compare_exchange(self.word, word, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// The session went back to its preferred key: it need not be remembered.
    pub(super) fn forget(&self) {
        let _ = self
            .cell
            .compare_exchange(self.word, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

// An entry: tag (24 bits) | key fingerprint (16 bits) | stamp (24 bits). 0: empty.
const STAMP_BITS: u32 = 24;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;
/// A tick of the stamp: 2^30 ns, about 1.07 s. 24 bits of them wrap after 208 days; an
/// entry left untouched that long may look fresh again for one lifetime (it then only
/// points its session at a key it once used, and only if that key can take it).
const TICK_SHIFT: u32 = 30;

fn ticks_of(duration: Duration) -> u64 {
    let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    nanos.div_ceil(1 << TICK_SHIFT)
}

fn ticks(at: PoolTime) -> u64 {
    (at.as_nanos() >> TICK_SHIFT) & STAMP_MASK
}

fn age(tick: u64, word: u64) -> u64 {
    tick.wrapping_sub(word & STAMP_MASK) & STAMP_MASK
}

fn tag(id: u64) -> u64 {
    // The top 24 bits (the set comes from the low ones); never 0, which marks an empty entry.
    (id >> 40).max(1)
}

/// One cache line of entries.
#[repr(align(64))]
#[derive(Default)]
struct Set([AtomicU64; WAYS]);

/// Where spilled sessions went: a set-associative table of one-word entries (tag, key
/// fingerprint, stamp), lock-free. Races between two requests of one session lose at most
/// an update (the session then goes to its preferred key or stays where it was: a cache
/// miss at worst, never a key that cannot take it, since every key is taken through
/// `Slot::try_take`).
struct Memory {
    sets: Box<[Set]>,
    mask: usize,
}

impl Memory {
    fn new(capacity: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).next_power_of_two();
        Self {
            sets: (0..sets).map(|_| Set::default()).collect(),
            mask: sets - 1,
        }
    }

    fn set(&self, id: u64) -> &Set {
        // Truncation intended: the low bits choose the set.
        &self.sets[(id as usize) & self.mask]
    }

    #[inline]
    fn recall(&self, id: u64, now: &mut LazyNow<'_>, ttl_ticks: u64) -> Option<Recalled<'_>> {
        let tag = tag(id);
        for cell in &self.set(id).0 {
            let word = cell.load(Ordering::Relaxed);
            if word >> (STAMP_BITS + 16) != tag {
                continue;
            }
            let tick = ticks(now.get());
            if age(tick, word) > ttl_ticks {
                let _ = cell.compare_exchange(word, 0, Ordering::Relaxed, Ordering::Relaxed);
                return None;
            }
            return Some(Recalled { cell, word, tick });
        }
        None
    }

    fn remember(&self, id: u64, fingerprint: u16, tick: u64, ttl_ticks: u64) {
        let tag = tag(id);
        let word = (tag << (STAMP_BITS + 16)) | (u64::from(fingerprint) << STAMP_BITS) | tick;
        // The session's own entry, else an empty or expired one, else the oldest.
        let mut victim: Option<(&AtomicU64, u64, u64)> = None;
        for cell in &self.set(id).0 {
            let old = cell.load(Ordering::Relaxed);
            let rank = if old >> (STAMP_BITS + 16) == tag {
                u64::MAX
            } else if old == 0 || age(tick, old) > ttl_ticks {
                u64::MAX - 1
            } else {
                age(tick, old)
            };
            if victim.is_none_or(|(_, _, best)| rank > best) {
                victim = Some((cell, old, rank));
            }
        }
        if let Some((cell, old, _)) = victim {
            // Lost to a concurrent writer: that entry stays (this session is not remembered).
            let _ = cell.compare_exchange(old, word, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()))
    }

    fn ring(weights: &[u32]) -> Ring {
        let points = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| KeyPoint {
                seed: key_seed(Some(&format!("key-{i}")), ""),
                inverse_weight: 1.0 / f64::from(w),
            })
            .collect();
        Ring::of_points(points, weights.windows(2).any(|w| w[0] != w[1]), true)
    }

    #[test]
    fn sessions_spread_over_keys_by_weight() {
        for weights in [&[1, 1, 1][..], &[3, 1][..], &[1, 2, 5][..]] {
            let ring = ring(weights);
            let mut counts = vec![0u32; weights.len()];
            let n = 60_000;
            for id in ids(n) {
                counts[ring.preferred(id)] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, &count) in counts.iter().enumerate() {
                let expected = n as f64 * f64::from(weights[i]) / f64::from(total);
                let off = (f64::from(count) - expected).abs() / expected;
                assert!(
                    off < 0.03,
                    "weights {weights:?}: key {i} got {count}, {expected}"
                );
            }
        }
    }

    /// The share of session groups each key of `ring` is preferred by, from the table.
    fn table_shares(ring: &Ring) -> Vec<f64> {
        let mut counts = vec![0u32; ring.points.len()];
        for group in 0..GROUPS as u64 {
            counts[ring
                .preferred_of(group << (64 - GROUP_BITS))
                .expect("a table")] += 1;
        }
        counts
            .iter()
            .map(|&c| f64::from(c) / GROUPS as f64)
            .collect()
    }

    #[test]
    fn the_table_holds_each_groups_first_key_in_its_order() {
        for weights in [
            &[1, 1, 1][..],
            &[3, 1][..],
            &[1, 2, 5, 2, 1][..],
            &[1; 16][..],
        ] {
            let ring = ring(weights);
            for group in 0..GROUPS as u64 {
                let id = (group << (64 - GROUP_BITS)) | (group * 7919);
                assert_eq!(
                    ring.preferred_of(id),
                    Some(ring.order(id)[0]),
                    "weights {weights:?}, group {group}"
                );
            }
        }
    }

    #[test]
    fn the_table_shares_sessions_by_weight() {
        for weights in [
            &[1, 1, 1][..],
            &[3, 1][..],
            &[1, 2, 5][..],
            &[1; 16][..],
            &[2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4][..],
        ] {
            let shares = table_shares(&ring(weights));
            let total: u32 = weights.iter().sum();
            for (i, share) in shares.iter().enumerate() {
                let expected = f64::from(weights[i]) / f64::from(total);
                let off = (share - expected).abs() / expected;
                assert!(
                    off < 0.05,
                    "weights {weights:?}: key {i} preferred by {share:.4}, weight's share {expected:.4}"
                );
            }
        }
    }

    /// Adding a key moves to it about its share of sessions, and no others; removing it
    /// moves back exactly those. Measured on the table, as requests read it.
    #[test]
    fn adding_or_removing_a_key_moves_only_its_share_of_sessions() {
        for (n, weight) in [(3, 1), (16, 1), (16, 3)] {
            let mut weights = vec![1; n];
            let before = ring(&weights);
            weights.push(weight);
            let after = ring(&weights);
            let mut moved = 0;
            for group in 0..GROUPS as u64 {
                let id = group << (64 - GROUP_BITS);
                let (old, new) = (before.preferred_of(id), after.preferred_of(id));
                if old != new {
                    moved += 1;
                    assert_eq!(new, Some(n), "a session moved, to another old key");
                }
            }
            let moved = f64::from(moved) / GROUPS as f64;
            let share = f64::from(weight) / f64::from(weights.iter().sum::<u32>());
            assert!(
                (moved - share).abs() < 0.05 * share,
                "{n} keys + 1 of weight {weight}: moved {moved:.4}, its share {share:.4}"
            );
            println!(
                "{n} keys + 1 of weight {weight}: moved {moved:.4} of sessions (its share {share:.4})"
            );
        }
    }

    #[test]
    fn equal_weights_rank_by_the_raw_hash() {
        let ring = ring(&[2, 2, 2]);
        let weighted = Ring::of_points(ring.points.clone(), true, false);
        for id in ids(1000) {
            assert_eq!(ring.order(id), weighted.order(id));
        }
    }

    #[test]
    fn memory_recalls_refreshes_expires_and_forgets() {
        let memory = Memory::new(64);
        let ttl = 4;
        memory.remember(7, 0xabcd, 10, ttl);
        let find = |tick: u64| {
            let tag = tag(7);
            memory.set(7).0.iter().find_map(|cell| {
                let word = cell.load(Ordering::Relaxed);
                (word >> 40 == tag && age(tick, word) <= ttl).then_some(Recalled {
                    cell,
                    word,
                    tick,
                })
            })
        };
        let found = find(12).expect("remembered");
        assert_eq!(found.fingerprint(), 0xabcd);
        found.refresh();
        assert!(find(16).is_some(), "refreshed at tick 12, alive at 16");
        assert!(find(17).is_none(), "expired after 4 ticks without use");
        find(16).expect("still there").forget();
        assert!(find(16).is_none());
    }

    #[test]
    fn a_full_set_evicts_its_oldest_entry() {
        let memory = Memory::new(WAYS); // one set
        for id in 1..=WAYS as u64 {
            memory.remember(id << 40, id as u16, id, 1000);
        }
        memory.remember(99 << 40, 99, 50, 1000);
        let fingerprints: Vec<u64> = memory.sets[0]
            .0
            .iter()
            .map(|c| (c.load(Ordering::Relaxed) >> STAMP_BITS) & 0xffff)
            .collect();
        assert!(
            !fingerprints.contains(&1),
            "the oldest went: {fingerprints:?}"
        );
        assert!(fingerprints.contains(&99));
        assert!(fingerprints.contains(&2));
    }

    proptest::proptest! {
        /// Removing a key moves only the sessions it was preferred by, each to the next
        /// key of its own order; every session's order of the other keys is unchanged.
        #[test]
        fn removing_a_key_moves_only_its_sessions(
            weights in proptest::collection::vec(1u32..6, 2..9),
            removed in 0usize..8,
            salt in proptest::prelude::any::<u64>(),
        ) {
            let removed = removed % weights.len();
            let before = ring(&weights);
            let kept: Vec<usize> = (0..weights.len()).filter(|&i| i != removed).collect();
            let after = Ring::of_points(
                kept.iter().map(|&i| before.points[i]).collect(),
                kept.windows(2).any(|w| weights[w[0]] != weights[w[1]]),
                false,
            );
            for id in ids(500).map(|id| id ^ salt) {
                let old: Vec<usize> = before.order(id).into_iter().filter(|&i| i != removed).collect();
                let new: Vec<usize> = after.order(id).into_iter().map(|j| kept[j]).collect();
                proptest::prop_assert_eq!(old, new);
            }
        }
    }

    #[test]
    fn the_memory_never_grows() {
        let memory = Memory::new(1000);
        let sets = memory.sets.len();
        for id in ids(100_000) {
            memory.remember(id, 1, 1, 1000);
        }
        assert_eq!(memory.sets.len(), sets);
        assert_eq!(sets * WAYS, 1024);
    }
}
