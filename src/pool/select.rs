//! Choosing a key: exact round-robin (smooth weighted when keys have weights) or
//! least-in-flight over a window of keys, both skipping keys that cannot take a request
//! now. Selection reads the clock at most once, and only if some key needs it.

use crate::sync::Ordering;
use std::sync::Arc;

use super::bucket::Bucket;
use super::lease::Lease;
use super::slot::{Slot, Taken};
use super::table::Table;
use super::{KeyPool, LazyNow, PoolInner, Selection};

/// Keys scanned together by least-in-flight. Pools up to this size get an exact scan;
/// larger pools take the least loaded key of the first window (from the rotating cursor)
/// that has an available key, which keeps selection O(1) at thousands of keys.
const WINDOW: usize = 16;

impl KeyPool {
    /// Reserves an available key now, or returns `None` when every key is cooling down,
    /// busy (at its concurrency limit or out of quota) or disabled. The key counts as in
    /// flight until the [`Lease`] is dropped.
    pub fn try_reserve(&self) -> Option<Lease> {
        let table = self.inner.table.load();
        let mut now = LazyNow::new(&self.inner.signals);
        let (index, taken) = match self.inner.selection {
            Selection::RoundRobin => self.inner.select_round_robin(&table, &mut now),
            Selection::LeastInFlight => self.inner.select_least_in_flight(&table, &mut now),
        }?;
        Some(Lease::new(&table, index, taken))
    }

    /// Reserves an available key among those `allowed` (by 1-based position), scanning in
    /// rotation order and taking the least loaded, a key whose last answer accepted its
    /// credentials before one the provider refused since (so that a retry after a 401 asks
    /// a key known to be good). A slow path for retries that must avoid keys already
    /// tried; `None` if no allowed key is available.
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
                .filter(|&i| allowed(i + 1))
                .filter(|&i| table.slots[i].is_available(&mut now))
                .min_by(|&a, &b| {
                    let (a, b) = (&table.slots[a], &table.slots[b]);
                    let refused = |s: &Slot| s.rejected_streak.load(Ordering::Relaxed) != 0;
                    refused(a).cmp(&refused(b)).then_with(|| compare_load(a, b))
                })?;
            if let Some(taken) = table.slots[best].try_take(&mut now) {
                return Some(Lease::new(&table, best, taken));
            }
        }
        None
    }
}

/// Compares two keys' load: in-flight requests per unit of weight.
pub(super) fn compare_load(a: &Slot, b: &Slot) -> std::cmp::Ordering {
    let load = |s: &Slot| u64::from(s.in_flight.load(Ordering::Relaxed));
    (load(a) * u64::from(b.weight)).cmp(&(load(b) * u64::from(a.weight)))
}

impl PoolInner {
    pub(super) fn select_round_robin(
        &self,
        table: &Table,
        now: &mut LazyNow<'_>,
    ) -> Option<(usize, Taken)> {
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

    pub(super) fn select_least_in_flight(
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
}

/// Selection in a pool with buckets: the same rotation and least-in-flight as above, each
/// key asked the one question of [`Slot::try_take_in`] (its key state and its lane for the
/// bucket both allow), loads compared lane by lane.
impl PoolInner {
    /// Reserves a key for a request of `bucket` (and `cost` tokens) now, if one can take it.
    pub(super) fn try_reserve_in(&self, bucket: &Arc<Bucket>, cost: u64) -> Option<Lease> {
        let table = self.table.load();
        let mut now = LazyNow::costing(&self.signals, cost);
        match self.selection {
            Selection::RoundRobin => self.round_robin_in(&table, bucket, &mut now),
            Selection::LeastInFlight => self.least_in_flight_in(&table, bucket, &mut now),
        }
    }

    fn round_robin_in(
        &self,
        table: &Table,
        bucket: &Arc<Bucket>,
        now: &mut LazyNow<'_>,
    ) -> Option<Lease> {
        let turns = table.turns();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % turns;
        let mut turn = start;
        for skipped in 0..turns {
            let index = table.key_at(turn);
            if let Some((lane, taken)) = table.slots[index].try_take_in(bucket, now) {
                if skipped > 0 {
                    self.cursor.fetch_add(skipped, Ordering::Relaxed);
                }
                return Some(Lease::new_in(table, index, lane, taken));
            }
            turn += 1;
            if turn == turns {
                turn = 0;
            }
        }
        self.cursor.fetch_sub(1, Ordering::Relaxed);
        None
    }

    fn least_in_flight_in(
        &self,
        table: &Table,
        bucket: &Arc<Bucket>,
        now: &mut LazyNow<'_>,
    ) -> Option<Lease> {
        let n = table.slots.len();
        let start = self.cursor.load(Ordering::Relaxed) % n;
        let window = n.min(WINDOW);
        let mut scanned = 0;
        let mut retries = 0;
        while scanned < n {
            let end = (scanned + window).min(n);
            let mut best: Option<(usize, u64, u32)> = None;
            for step in scanned..end {
                let mut index = start + step;
                if index >= n {
                    index -= n;
                }
                let slot = &*table.slots[index];
                if !slot.is_available_in(bucket, now) {
                    continue;
                }
                let in_flight = slot.lanes[bucket.index]
                    .get()
                    .map_or(0, |lane| lane.in_flight.load(Ordering::Relaxed));
                let load = (u64::from(in_flight), slot.weight);
                let better =
                    best.is_none_or(|(_, l, w)| (load.0 * u64::from(w)) < (l * u64::from(load.1)));
                if better {
                    best = Some((index, load.0, load.1));
                    if in_flight == 0 {
                        break;
                    }
                }
            }
            let Some((index, _, _)) = best else {
                scanned = end;
                continue;
            };
            match table.slots[index].try_take_in(bucket, now) {
                Some((lane, taken)) => {
                    self.cursor.store(index + 1, Ordering::Relaxed);
                    return Some(Lease::new_in(table, index, lane, taken));
                }
                None if retries < 4 => retries += 1,
                None => scanned = end,
            }
        }
        None
    }

    /// [`KeyPool::try_reserve_where`] for a request of `bucket`.
    pub(super) fn try_reserve_in_where(
        &self,
        bucket: &Arc<Bucket>,
        cost: u64,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<Lease> {
        let table = self.table.load();
        let n = table.slots.len();
        let start = self.cursor.load(Ordering::Relaxed) % n;
        let mut now = LazyNow::costing(&self.signals, cost);
        let lane_of = |i: usize| table.slots[i].lanes[bucket.index].get();
        for _ in 0..4 {
            let best = (0..n)
                .map(|step| (start + step) % n)
                .filter(|&i| allowed(i + 1))
                .filter(|&i| table.slots[i].is_available_in(bucket, &mut now))
                .min_by_key(|&i| {
                    let lane = lane_of(i);
                    let refused =
                        lane.is_some_and(|lane| lane.rejected_streak.load(Ordering::Relaxed) != 0);
                    let in_flight = lane.map_or(0, |lane| lane.in_flight.load(Ordering::Relaxed));
                    // Load per unit of weight, compared exactly: in flight × (product of
                    // the other weights) is what `compare_load` does pairwise; scaled by
                    // 2^32 / weight is close enough for a slow path.
                    let weight = u64::from(table.slots[i].weight.max(1));
                    (refused, (u64::from(in_flight) << 32) / weight)
                })?;
            if let Some((lane, taken)) = table.slots[best].try_take_in(bucket, &mut now) {
                // The rotation goes on after the key taken (in a pool with buckets, a
                // retry takes its key here, with no reservation from `poll_ready` before).
                self.cursor.store(best + 1, Ordering::Relaxed);
                return Some(Lease::new_in(&table, best, lane, taken));
            }
        }
        None
    }
}
