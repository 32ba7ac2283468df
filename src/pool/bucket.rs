//! Buckets: what a provider meters apart on one key (usually the model).
//!
//! A pool with a router ([`KeyPoolBuilder::router`](super::KeyPoolBuilder)) keeps, for
//! each (key, bucket), a lane: a [`Slot`](super::slot::Slot) of its own, with the in-flight
//! count, rest, probe, backoff level, learned concurrency limit and quota of that bucket on
//! that key. The key's own slot keeps what is account-wide: disabled, an account-wide rest
//! (a spent balance, an account's daily cap) and its probe. A request for bucket `b` takes
//! key `k` when `k`'s slot and `k`'s lane for `b` both allow ([`Slot::try_take_in`]).
//!
//! ```text
//!   key slot (account-wide)          lanes (per bucket)
//!   ┌──────────────────────┐         ┌─────────────┐ ┌─────────────┐
//!   │ disabled / rest word │ ──────► │ gpt-4o      │ │ gpt-4o-mini │  ...
//!   │ probe                │         │ in flight,  │ │ in flight,  │
//!   │ failures, rejected   │         │ rest, probe,│ │ rest, probe,│
//!   └──────────────────────┘         │ limit, quota│ │ limit, quota│
//!                                    └─────────────┘ └─────────────┘
//! ```
//!
//! Buckets are interned: a name becomes a small id once, the first time a request names
//! it, and a known name costs a lookup without allocating. Their number is bounded
//! ([`MAX_BUCKETS`]); names beyond the bound share one overflow bucket, so no caller can
//! grow the pool's state by making names up. Each bucket has its own waiters: a waiter for
//! one bucket is woken by a slot freed or a rest ended in that bucket, never by another's;
//! what concerns every bucket (a key disabled or resting account-wide, a reload) wakes all.
//!
//! Lanes are made on first use, one per (key, bucket) taken, and kept for the key's life.
//!
//! [`Slot::try_take_in`]: super::slot::Slot::try_take_in

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use super::Signals;

/// The most buckets a pool tells apart; names beyond them share the overflow bucket.
pub const MAX_BUCKETS: usize = 64;

/// The name the overflow bucket shows in stats.
pub(super) const OVERFLOW: &str = "(other)";

/// One bucket: its name, its waiters, and what its keys learned.
pub(super) struct Bucket {
    /// 0-based index among the pool's buckets.
    pub(super) index: usize,
    pub(super) name: Box<str>,
    /// The waiters of this bucket, the settings every lane needs, and the lowest
    /// concurrency limit a lane of it learned.
    pub(super) signals: Arc<Signals>,
}

/// The pool's buckets: interned names and their state.
pub(super) struct Buckets {
    /// Index by name (the overflow bucket is not in it).
    names: RwLock<HashMap<Box<str>, usize>>,
    /// Buckets by index; the last is the overflow bucket.
    entries: Box<[OnceLock<Arc<Bucket>>]>,
}

impl Buckets {
    pub(super) fn new() -> Self {
        Self {
            names: RwLock::new(HashMap::new()),
            entries: (0..=MAX_BUCKETS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// How many lanes a key keeps room for: the buckets and the overflow bucket.
    pub(super) fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The bucket at `index`, if made.
    pub(super) fn get(&self, index: usize) -> Option<&Arc<Bucket>> {
        self.entries.get(index)?.get()
    }

    /// Every bucket made so far.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Bucket>> {
        self.entries.iter().filter_map(OnceLock::get)
    }

    /// The bucket named `name`, made on first use (with waiters of its own, from `root`'s
    /// settings); the overflow bucket once [`MAX_BUCKETS`] are in use.
    pub(super) fn intern(&self, name: &str, root: &Signals) -> &Arc<Bucket> {
        let known = self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied();
        let index = match known {
            Some(index) => index,
            None => self.insert(name),
        };
        self.entries[index].get_or_init(|| {
            Arc::new(Bucket {
                index,
                name: if index == MAX_BUCKETS {
                    OVERFLOW.into()
                } else {
                    name.into()
                },
                signals: Arc::new(root.for_bucket()),
            })
        })
    }

    #[cold]
    fn insert(&self, name: &str) -> usize {
        let mut names = self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&index) = names.get(name) {
            return index;
        }
        if names.len() >= MAX_BUCKETS {
            return MAX_BUCKETS;
        }
        let index = names.len();
        names.insert(name.into(), index);
        index
    }
}
