//! One key's shared state on this replica: its count word, its admissions, and what the
//! pool's hooks ask of the backend.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::*;

/// The pool's side of a backend: the link's sender, the health cells, and each key's count.
pub(crate) struct Shared {
    pub(super) ops: mpsc::UnboundedSender<Op>,
    pub(super) policy: DegradedPolicy,
    pub(super) connected: AtomicBool,
    pub(super) degraded: AtomicBool,
    pub(super) replicas: AtomicU32,
    /// An `Op::Counts` is on its way and the backend has not read the counts since.
    pub(super) dirty: AtomicBool,
    /// Each key's count cell by id, kept across reloads (a key removed and added again
    /// continues its versions, so the store never ignores its writes).
    pub(super) cells: Mutex<HashMap<Arc<str>, Arc<Cell>>>,
    pub(crate) backend: Arc<dyn StateBackend>,
}

impl Shared {
    pub(crate) fn new(
        backend: Arc<dyn StateBackend>,
        policy: DegradedPolicy,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Op>) {
        let (ops, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            ops,
            policy,
            connected: AtomicBool::new(false),
            // Until the store first answers (and the pool's state is merged into it).
            degraded: AtomicBool::new(true),
            replicas: AtomicU32::new(1),
            dirty: AtomicBool::new(false),
            cells: Mutex::new(HashMap::new()),
            backend,
        });
        (shared, receiver)
    }

    pub(super) fn send(&self, op: Op) {
        // The backend task ends only with the runtime: nothing to do then.
        let _ = self.ops.send(op);
    }

    pub(crate) fn health(&self) -> BackendHealth {
        BackendHealth {
            connected: self.connected.load(Ordering::Relaxed),
            degraded: self.degraded.load(Ordering::Relaxed),
            replicas: self.replicas.load(Ordering::Relaxed),
            policy: self.policy,
        }
    }

    /// The count cell of the key named `id`, new or kept from an earlier incarnation.
    pub(crate) fn key(
        self: &Arc<Self>,
        id: String,
        cap: u32,
        quota: Option<crate::quota::Gcra>,
    ) -> SharedKey {
        let id: Arc<str> = id.into();
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone();
        SharedKey {
            id,
            cell,
            capped: cap != u32::MAX || quota.is_some(),
            quota: quota.map(|quota| SharedQuota {
                interval: quota.interval(),
                tolerance: quota.tolerance(),
            }),
            shared: self.clone(),
        }
    }
}

/// One key's count in this replica, and what the store last said about room on it.
#[derive(Default)]
pub(crate) struct Cell {
    /// `version << COUNT_BITS | count`: one word, so that a version and its count are read
    /// together.
    pub(super) word: AtomicU64,
    /// Releases announced for this key (by any replica) so far: a lease refused by the
    /// store marks the key full only if none came since it asked (see `SharedKey::refused`).
    pub(super) frees: AtomicU32,
    /// The store refused a lease on this key and no release has been announced since:
    /// the key is busy for this replica.
    pub(super) full: AtomicBool,
    /// The generation of the key's shared learned limit last applied here (0: none yet).
    pub(super) limit_generation: AtomicU64,
}

pub(super) const COUNT_BITS: u32 = 24;
pub(super) const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
pub(super) const ONE: u64 = (1 << COUNT_BITS) + 1;
pub(super) const ONE_LESS: u64 = (1 << COUNT_BITS) - 1;

pub(super) fn decode(word: u64) -> KeyCount {
    KeyCount {
        version: word >> COUNT_BITS,
        count: (word & COUNT_MASK) as u32,
    }
}

/// A slot's part in the shared state: its id in the store and its count cell.
pub(crate) struct SharedKey {
    pub(crate) id: Arc<str>,
    pub(super) cell: Arc<Cell>,
    /// The key has a configured concurrency cap or a quota: its leases are admitted by the
    /// store. (So are those of a key with a learned limit: see [`SharedKey::taken`].)
    pub(super) capped: bool,
    pub(super) quota: Option<SharedQuota>,
    pub(super) shared: Arc<Shared>,
}

/// A lease's pending admission by the store.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(super) answer: oneshot::Receiver<Verdict>,
    /// `Cell::frees` when the lease asked.
    pub(super) frees: u32,
}

impl SharedKey {
    /// The most requests this replica may have in flight on the key now: `limit` (the
    /// configured or learned one), or none while the store says the key is full, or the
    /// degraded policy's share.
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn limit(&self, limit: u32) -> u32 {
        let shared = &*self.shared;
        if shared.degraded.load(Ordering::Relaxed) {
            if !self.capped && limit == u32::MAX {
                return limit;
            }
            // The store's "full" is stale while it is away: the policy's share decides.
            return shared
                .policy
                .share(limit, shared.replicas.load(Ordering::Relaxed))
                .min(limit);
        }
        // Full across the replicas, or another replica's probe of the key is running.
        if self.cell.full.load(Ordering::Acquire) {
            return 0;
        }
        limit
    }

    /// A lease was taken on the key, whose concurrency limit is `limit` (configured or
    /// learned; `u32::MAX`: none). Returns (counted, ask): whether the lease is counted in
    /// this replica's count of the key (a key with a cap, a learned limit or a quota; its
    /// release must say so to [`released`](Self::released)), and whether the store must
    /// admit it before its request goes (a counted lease or the key's probe after a rest;
    /// the store not away): see [`SharedKey::ask`].
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn taken(&self, probe: bool, limit: u32) -> (bool, bool) {
        let counted = self.capped || limit != u32::MAX;
        if counted {
            self.cell.word.fetch_add(ONE, Ordering::AcqRel);
        } else if !probe {
            return (false, false);
        }
        // While degraded, within the policy's share already (`limit`); the store hears
        // of it at the merge.
        (counted, !self.shared.degraded.load(Ordering::Relaxed))
    }

    /// The generation of the key's shared learned limit last applied here.
    pub(crate) fn limit_generation(&self) -> &AtomicU64 {
        &self.cell.limit_generation
    }

    /// Asks the store to admit a lease taken on the key under `cap`. The count sent is this
    /// replica's now, which includes the lease (a later version than its take, which the
    /// store accepts as well).
    #[inline(never)]
    pub(crate) fn ask(&self, cap: u32, probe: bool) -> Admission {
        let frees = self.cell.frees.load(Ordering::Acquire);
        let count = decode(self.cell.word.load(Ordering::Acquire));
        let (reply, answer) = oneshot::channel();
        self.shared.send(Op::Acquire(Acquire {
            key: self.id.clone(),
            count,
            cap,
            quota: self.quota,
            probe,
            reply,
        }));
        Admission { answer, frees }
    }

    /// Units of quota a request takes here: 1, or the number of replicas while the store
    /// is away and the split policy shares the quota out.
    #[inline(never)]
    pub(crate) fn quota_units(&self) -> u64 {
        let shared = &*self.shared;
        if shared.degraded.load(Ordering::Relaxed) && shared.policy == DegradedPolicy::Split {
            u64::from(shared.replicas.load(Ordering::Relaxed).max(1))
        } else {
            1
        }
    }

    /// A lease on the key ended: if it was `counted` (see [`taken`](Self::taken)), count
    /// it, and have the backend write the counts.
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn released(&self, counted: bool) {
        if !counted {
            return;
        }
        self.cell.word.fetch_add(ONE_LESS, Ordering::AcqRel);
        if !self.shared.dirty.swap(true, Ordering::AcqRel) {
            self.shared.send(Op::Counts);
        }
    }

    /// The store refused a lease that asked when `frees` releases had been announced:
    /// the key is full for this replica until the next release announcement, unless one
    /// came in between (then the caller may look again at once).
    pub(super) fn refused(&self, frees: u32) {
        let cell = &*self.cell;
        if cell.frees.load(Ordering::Acquire) == frees {
            cell.full.store(true, Ordering::Release);
            // A release announced while marking: it found the flag clear, so clear it here.
            if cell.frees.load(Ordering::Acquire) != frees {
                cell.full.store(false, Ordering::Release);
            }
        }
    }

    /// Another replica (or this one) released a lease on the key.
    pub(crate) fn freed(&self) {
        self.cell.frees.fetch_add(1, Ordering::AcqRel);
        self.cell.full.store(false, Ordering::Release);
    }

    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn report(&self, op: Op) {
        self.shared.send(op);
    }
}

/// What the store said to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Its request may go.
    Admitted,
    /// The key is full across the replicas (it reads busy here until a release).
    Full,
    /// The key's shared quota has no unit for this long.
    QuotaIn(Duration),
}

impl Admission {
    /// The store's answer. A backend gone without answering admits (the degraded
    /// policy's share was applied to the take).
    pub(crate) fn poll(&mut self, key: &SharedKey, cx: &mut Context<'_>) -> Poll<Answer> {
        let verdict = match std::pin::Pin::new(&mut self.answer).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(verdict) => verdict.unwrap_or(Verdict::Admitted),
        };
        Poll::Ready(match verdict {
            Verdict::Admitted => Answer::Admitted,
            Verdict::Full => {
                key.refused(self.frees);
                Answer::Full
            }
            Verdict::QuotaIn(wait) => Answer::QuotaIn(wait),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn a_count_word_carries_its_version() {
        let word = AtomicU64::new(0);
        word.fetch_add(ONE, Ordering::Relaxed);
        word.fetch_add(ONE, Ordering::Relaxed);
        assert_eq!(
            decode(word.load(Ordering::Relaxed)),
            KeyCount {
                version: 2,
                count: 2
            }
        );
        word.fetch_add(ONE_LESS, Ordering::Relaxed);
        assert_eq!(
            decode(word.load(Ordering::Relaxed)),
            KeyCount {
                version: 3,
                count: 1
            }
        );
    }

    #[test]
    pub(super) fn the_split_policy_gives_each_replica_its_share_and_at_least_one() {
        assert_eq!(DegradedPolicy::Split.share(6, 3), 2);
        assert_eq!(DegradedPolicy::Split.share(2, 3), 1);
        assert_eq!(DegradedPolicy::Split.share(5, 0), 5);
        assert_eq!(DegradedPolicy::Open.share(2, 3), 2);
        assert_eq!(DegradedPolicy::Closed.share(2, 3), 0);
    }
}
