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
    /// removed by a reload included, until their leases end), and clears the flag that
    /// coalesces [`Op::Counts`].
    pub fn counts(&self) -> Vec<(Arc<str>, KeyCount)> {
        self.shared.dirty.store(false, Ordering::Release);
        self.shared
            .cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, cell)| (id.clone(), decode(cell.word.load(Ordering::Acquire))))
            .filter(|(_, count)| count.version != 0)
            .collect()
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
            .is_some_and(|pool| pool.apply_limit(id, limit))
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

    /// Would the degraded policy admit a lease that makes `count` on a key with `cap`?
    /// (A quota is split by the pool itself: see [`DegradedPolicy::Split`].)
    /// (For an [`Acquire`] whose call to the store failed.)
    pub fn admits_degraded(&self, count: u32, cap: u32) -> bool {
        let replicas = self.shared.replicas.load(Ordering::Relaxed);
        count <= self.shared.policy.share(cap, replicas)
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
