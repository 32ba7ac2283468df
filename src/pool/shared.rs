//! What a state backend ([`BackendLink`](crate::shared::BackendLink)) reads from the pool
//! and applies to it: the keys' ids and rests, other replicas' changes, releases announced
//! by the store. Slow paths (a linear scan of the keys): they run on the backend's task,
//! not on the request path.

use std::sync::Arc;

use super::rest::RestWord;
use super::slot::Slot;
use super::{LazyNow, PoolInner, Table};
use crate::shared::{LocalRest, RemoteLimit, RemoteRest};

/// Every key's own slot and the lanes it has made (in a pool with buckets each lane is
/// shared under its own id).
fn shared_slots(table: &Table) -> impl Iterator<Item = &Arc<Slot>> {
    table
        .slots
        .iter()
        .flat_map(|slot| std::iter::once(slot).chain(slot.made_lanes()))
}

impl PoolInner {
    /// The store ids of the keys in force.
    pub(crate) fn key_ids(&self) -> Vec<Arc<str>> {
        let table = self.table.load();
        shared_slots(&table)
            .filter_map(|slot| Some(slot.shared.as_ref()?.id.clone()))
            .collect()
    }

    /// Every key's rest as this replica knows it.
    pub(crate) fn local_rests(&self) -> Vec<LocalRest> {
        let table = self.table.load();
        let mut now = LazyNow::new(&self.signals);
        let now = now.get();
        shared_slots(&table)
            .filter_map(|slot| {
                let shared = slot.shared.as_ref()?;
                let id = shared.id.clone();
                let rest = slot.deadline.read();
                let limit = slot.limit();
                Some(LocalRest {
                    key: id,
                    remaining: match rest {
                        RestWord::Until(until) if until > now => {
                            Some(until.saturating_duration_since(now))
                        }
                        _ => None,
                    },
                    level: slot.level.load(std::sync::atomic::Ordering::Acquire),
                    disabled: rest == RestWord::Disabled,
                    // Learned: below the cap.
                    limit: (limit < slot.cap).then(|| RemoteLimit {
                        limit,
                        generation: shared
                            .limit_generation()
                            .load(std::sync::atomic::Ordering::Acquire),
                        floor: 0,
                        raise_in: std::time::Duration::ZERO,
                    }),
                })
            })
            .collect()
    }

    /// The raise back-off of learned limits: (first wait, longest wait).
    pub(crate) fn raise_waits(&self) -> (std::time::Duration, std::time::Duration) {
        let backoff = &self.signals.backoff;
        (backoff.raise_wait, backoff.max_raise_wait)
    }

    /// Applies another replica's change to the key `id`; `false` if no key here has it.
    pub(crate) fn apply_remote(&self, id: &str, rest: RemoteRest) -> bool {
        let table = self.table.load();
        let mut found = false;
        for slot in shared_slots(&table) {
            if slot.shared.as_ref().is_some_and(|shared| &*shared.id == id) {
                found = true;
                slot.apply_remote(rest);
            }
        }
        found
    }

    /// Applies the key `id`'s shared learned limit (`own`: the store's answer to this
    /// replica's change, taken as is); `true` if the limit here changed.
    pub(crate) fn apply_limit(&self, id: &str, limit: RemoteLimit, own: bool) -> bool {
        let table = self.table.load();
        let mut changed = false;
        for (index, key) in table.slots.iter().enumerate() {
            for slot in std::iter::once(key).chain(key.made_lanes()) {
                if slot.shared.as_ref().is_some_and(|shared| &*shared.id == id)
                    && slot.apply_limit(limit, own)
                {
                    changed = true;
                    tracing::debug!(
                        key = index + 1,
                        "Key {}/{}: concurrency limit now {} (shared by the replicas)",
                        index + 1,
                        table.slots.len(),
                        slot.limit()
                    );
                }
            }
        }
        changed
    }

    /// A lease on the key `id` was released somewhere: it may have room again.
    pub(crate) fn freed(&self, id: &str) {
        let table = self.table.load();
        for slot in shared_slots(&table) {
            if let Some(shared) = slot.shared.as_ref().filter(|shared| &*shared.id == id) {
                shared.freed();
                // A lane's own waiters (its bucket's), or the pool's.
                slot.signals.wake_one();
            }
        }
    }

    /// Another replica's probe of the key `id` was answered.
    pub(crate) fn probe_done(&self, id: &str, back: bool) {
        let table = self.table.load();
        for slot in shared_slots(&table) {
            if let Some(shared) = slot.shared.as_ref().filter(|shared| &*shared.id == id) {
                if back {
                    slot.probe.forgive();
                }
                shared.freed();
                slot.signals.notify.notify_waiters();
            }
        }
        self.signals.notify.notify_waiters();
    }

    /// Forgets every "full", and lets every waiter look again.
    pub(crate) fn refresh(&self) {
        let table = self.table.load();
        for slot in shared_slots(&table) {
            if let Some(shared) = &slot.shared {
                shared.freed();
            }
        }
        // Every bucket's waiters too.
        self.signals.notify_all();
    }
}
