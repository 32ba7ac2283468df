//! The keys in force ([`Table`]) and how [`KeyPool::reload`] replaces them.
//!
//! The table sits behind an `ArcSwap`: selection loads it without locking; a reload builds
//! a new one, reusing the slot (and so the state) of every unchanged key, and swaps it in.
//! A lease holds its key's slot, so a key removed while requests are in flight keeps
//! counting them until they finish, and takes no new ones (its slot is retired).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError};

use super::KeyPool;
use super::affinity::Ring;
use super::slot::Slot;
use crate::key::{KeySet, KeySpec};
use crate::weights::schedule;

/// The keys in force: slots in position order and, for weighted keys, the rotation's
/// schedule.
pub(super) struct Table {
    pub(super) slots: Box<[Arc<Slot>]>,
    /// One period of smooth weighted round-robin (slot indices); `None` if all weights are 1.
    schedule: Option<Box<[u32]>>,
    /// Every key's place in each session's order (affinity).
    pub(super) ring: Ring,
}

impl Table {
    /// The table of these keys; `routed`: in a pool with a router, whose requests may name
    /// a session (the ring then keeps each session group's preferred key).
    pub(super) fn new(slots: Vec<Arc<Slot>>, routed: bool) -> Self {
        let weights: Vec<u32> = slots.iter().map(|s| s.weight).collect();
        Self {
            schedule: schedule(&weights),
            ring: Ring::new(&slots, routed),
            slots: slots.into_boxed_slice(),
        }
    }

    /// Turns in one period of the rotation.
    pub(super) fn turns(&self) -> usize {
        self.schedule.as_ref().map_or(self.slots.len(), |s| s.len())
    }

    /// The slot index whose turn `turn` is.
    #[inline]
    pub(super) fn key_at(&self, turn: usize) -> usize {
        match &self.schedule {
            Some(schedule) => schedule[turn] as usize,
            None => turn,
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

/// How a reload recognises a key: by name when it has one, else by value.
#[derive(PartialEq, Eq, Hash)]
enum Identity<'a> {
    Name(&'a str),
    Value(&'a [u8]),
}

impl<'a> Identity<'a> {
    fn of(spec: &'a KeySpec) -> Self {
        match &spec.name {
            Some(name) => Self::Name(name),
            None => Self::Value(spec.key.expose_secret().as_bytes()),
        }
    }
}

impl KeyPool {
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
        // One pass over the old keys: a reload of many keys stays linear.
        let by_identity: HashMap<Identity<'_>, usize> = old
            .slots
            .iter()
            .enumerate()
            .map(|(j, slot)| (Identity::of(&slot.spec), j))
            .collect();
        let lanes = inner.bucket_states.as_ref().map_or(0, |b| b.capacity());
        for limits in keys.specs().iter().flat_map(|spec| &spec.buckets) {
            inner.buckets.intern(&limits.name);
        }
        let mut summary = ReloadSummary::default();
        let mut kept = vec![false; old.slots.len()];
        let slots: Vec<Arc<Slot>> = keys
            .specs()
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let label = (i + 1, spec.name.clone());
                let found = by_identity.get(&Identity::of(spec)).copied();
                match found {
                    Some(j) if old.slots[j].spec.same_as(spec) => {
                        kept[j] = true;
                        summary.unchanged += 1;
                        old.slots[j].clone()
                    }
                    Some(j) => {
                        kept[j] = true;
                        // The old incarnation finishes what it has in flight, nothing more.
                        old.slots[j].retire();
                        summary.replaced.push(label);
                        Slot::new(
                            spec.clone(),
                            inner.default_cap,
                            inner.default_quota,
                            &inner.signals,
                            lanes,
                        )
                    }
                    None => {
                        summary.added.push(label);
                        Slot::new(
                            spec.clone(),
                            inner.default_cap,
                            inner.default_quota,
                            &inner.signals,
                            lanes,
                        )
                    }
                }
            })
            .collect();
        for (j, slot) in old.slots.iter().enumerate() {
            if !kept[j] {
                slot.retire();
                summary.removed.push((j + 1, slot.spec.name.clone()));
            }
        }
        inner
            .table
            .store(Arc::new(Table::new(slots, inner.router.is_some())));
        tracing::info!(keys = keys.len(), "keys reloaded: {summary}");
        // New keys may be free: let every waiter look again.
        inner.signals.notify_all();
        summary
    }
}
