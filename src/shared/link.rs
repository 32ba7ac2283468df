//! [`BackendLink`]: what a backend holds of the pool, to read it and to apply the other
//! replicas' changes.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};

use super::key::decode;
use super::*;

/// What a backend may do to the pool it is attached to: read its keys' counts and rests,
/// apply other replicas' changes, report its health.
pub struct BackendLink {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Weak<crate::pool::PoolInner>,
}

impl BackendLink {
    /// This replica's count on every key with a cap that has ever had a lease here (keys
    /// removed by a reload included, until their leases end): leases admitted by the
    /// store (or taken alone while it was away) and not released yet.
    pub fn counts(&self) -> Vec<(Arc<str>, KeyCount)> {
        self.shared
            .cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, cell)| (id.clone(), decode(cell.word.load(Ordering::Acquire))))
            .filter(|(_, count)| count.version != 0)
            .collect()
    }

    /// The count cell of the key `id`, if it ever had one here.
    #[cfg(feature = "redis")]
    pub(crate) fn cell(&self, id: &str) -> Option<Arc<super::key::Cell>> {
        self.shared
            .cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// The ids of the keys in force.
    pub fn keys(&self) -> Vec<Arc<str>> {
        self.pool
            .upgrade()
            .map(|pool| pool.key_ids())
            .unwrap_or_default()
    }

    /// Every key's rest state here: what this replica knows, to merge into the store.
    pub fn rests(&self) -> Vec<LocalRest> {
        self.pool
            .upgrade()
            .map(|pool| pool.local_rests())
            .unwrap_or_default()
    }

    /// Applies another replica's rest, disable or level to the key `id`: a rest only
    /// extends, a disable is for good, a level only rises. Returns whether the key is in
    /// this pool.
    pub fn apply(&self, id: &str, rest: RemoteRest) -> bool {
        self.pool
            .upgrade()
            .is_some_and(|pool| pool.apply_remote(id, rest))
    }

    /// Applies the key `id`'s shared concurrency limit: a newer generation replaces this
    /// replica's limit (never above its cap), the same generation keeps the lower of the
    /// two, an older one is ignored. Returns whether the limit here changed.
    pub fn apply_limit(&self, id: &str, limit: RemoteLimit) -> bool {
        self.pool
            .upgrade()
            .is_some_and(|pool| pool.apply_limit(id, limit, false))
    }

    /// Applies the store's answer to this replica's own [`Op::Limit`] on the key `id` as
    /// it is (the store decides: a change it refused is undone here), unless a later
    /// generation was applied meanwhile. Returns whether the limit here changed.
    pub fn set_limit(&self, id: &str, limit: RemoteLimit) -> bool {
        self.pool
            .upgrade()
            .is_some_and(|pool| pool.apply_limit(id, limit, true))
    }

    /// The pool's raise back-off of learned concurrency limits: the wait before the first
    /// try above a limit learned or served, and the longest wait after refused tries (see
    /// [`Backoff::raise_wait`](crate::Backoff::raise_wait)). The store applies it for
    /// every replica.
    pub fn raise_waits(&self) -> (Duration, Duration) {
        self.pool.upgrade().map_or(
            (Duration::from_secs(300), Duration::from_secs(3600)),
            |pool| pool.raise_waits(),
        )
    }

    /// A lease on the key `id` was released somewhere: waiters may find room on it.
    pub fn freed(&self, id: &str) {
        if let Some(pool) = self.pool.upgrade() {
            pool.freed(id);
        }
    }

    /// Another replica's probe of the key `id` was answered (`back`: the key took it):
    /// this replica owes no probe of its own then, and its waiters may look again.
    pub fn probe_done(&self, id: &str, back: bool) {
        if let Some(pool) = self.pool.upgrade() {
            pool.probe_done(id, back);
        }
    }

    /// Forgets every "the store says full", and wakes every waiter to look again: after
    /// a sync, when releases may have been missed.
    pub fn refresh(&self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.refresh();
        }
    }

    /// The policy in force while degraded.
    pub fn policy(&self) -> DegradedPolicy {
        self.shared.policy
    }

    /// Seats this replica for the degraded policy's deal ([`DegradedPolicy::Split`]): it
    /// is the `rank`-th of the `replicas` alive (ranked by name); the keys in force are
    /// ranked by id; and the turn is taken from the wall clock if the keys' caps add up to
    /// fewer slots than there are replicas.
    pub fn arrange(&self, rank: u32, replicas: u32) {
        let shared = &*self.shared;
        let replicas = replicas.max(1);
        shared.rank.store(rank, Ordering::Relaxed);
        shared.replicas.store(replicas, Ordering::Relaxed);
        let mut keys = self.keys();
        keys.sort_unstable();
        keys.dedup();
        let cells = shared.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let mut slots = 0u64;
        for (position, id) in keys.iter().enumerate() {
            if let Some(cell) = cells.get(id) {
                cell.position.store(
                    u32::try_from(position).unwrap_or(u32::MAX),
                    Ordering::Relaxed,
                );
                slots += u64::from(cell.cap.load(Ordering::Relaxed));
            }
        }
        drop(cells);
        let turn = if slots < u64::from(replicas) {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            u32::try_from(secs / TURN.as_secs() % u64::from(u32::MAX)).unwrap_or(0)
        } else {
            0
        };
        shared.turn.store(turn, Ordering::Relaxed);
    }

    /// The store went away while it admitted this replica's leases (and other replicas'):
    /// under [`DegradedPolicy::Split`], until [`unhold`](Self::unhold), each key takes no
    /// more requests here than it had in flight now (it may replace its own as they end,
    /// up to its share; a key first seen here meanwhile, none), so that the leases the
    /// store admitted and the policy's deal never run beside each other above a key's
    /// cap. Call it before the pool turns degraded ([`set_health`](Self::set_health)).
    /// Returns the hold's number, for [`unhold`](Self::unhold).
    pub fn hold(&self) -> u64 {
        let shared = &*self.shared;
        let number = shared.holds.fetch_add(1, Ordering::AcqRel) + 1;
        let cells = shared.cells.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock: a key seen for the first time from now on holds at 0.
        shared.holding.store(true, Ordering::Release);
        for cell in cells.values() {
            let count = decode(cell.word.load(Ordering::SeqCst)).count;
            cell.hold.store(count.saturating_add(1), Ordering::Release);
        }
        number
    }

    /// Ends the hold `number` (if no later one began): each key takes its whole share of
    /// the degraded policy's deal, and waiters look again. Call it once the leases the
    /// store admitted have had time to end (the backend's time to live).
    pub fn unhold(&self, number: u64) {
        let shared = &*self.shared;
        if shared.holds.load(Ordering::Acquire) != number {
            return;
        }
        {
            let cells = shared.cells.lock().unwrap_or_else(PoisonError::into_inner);
            shared.holding.store(false, Ordering::Release);
            for cell in cells.values() {
                cell.hold.store(0, Ordering::Release);
            }
        }
        self.refresh();
    }

    /// Reports the store's state: `connected` (it answered), `degraded` (the policy
    /// applies), and the replicas alive at the last heartbeat (if known). Waiters look
    /// again when the pool leaves degraded mode.
    pub fn set_health(&self, connected: bool, degraded: bool, replicas: Option<u32>) {
        let shared = &*self.shared;
        shared.connected.store(connected, Ordering::Relaxed);
        if let Some(replicas) = replicas {
            shared.replicas.store(replicas.max(1), Ordering::Relaxed);
        }
        let was = shared.degraded.swap(degraded, Ordering::AcqRel);
        if was != degraded {
            self.refresh();
        }
    }

    /// The health last reported.
    pub fn health(&self) -> BackendHealth {
        self.shared.health()
    }
}

impl fmt::Debug for BackendLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendLink")
            .field("health", &self.shared.health())
            .finish()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("backend", &self.backend)
            .field("health", &self.health())
            .finish()
    }
}
