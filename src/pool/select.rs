//! Choosing a key: exact round-robin (smooth weighted when keys have weights) or
//! least-in-flight over a window of keys, both skipping keys that cannot take a request
//! now. Selection reads the clock at most once, and only if some key needs it.

use crate::sync::Ordering;

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
