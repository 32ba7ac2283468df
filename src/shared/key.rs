//! One key's shared state on this replica: its count word, its admissions, and what the
//! pool's hooks ask of the backend.

use std::collections::HashMap;
use std::fmt;
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
    /// This replica's rank among the replicas alive at the last heartbeat (by name).
    pub(super) rank: AtomicU32,
    /// The degraded policy's turn (see `DegradedPolicy::Split`).
    pub(super) turn: AtomicU32,
    /// Holds begun so far (see `BackendLink::hold`).
    pub(super) holds: AtomicU64,
    /// A hold is in force: a key seen for the first time takes nothing until it ends
    /// (another replica may hold the store's leases on it).
    pub(super) holding: AtomicBool,
    /// Each key's count cell by id, kept across reloads (a key removed and added again
    /// continues its versions, so the store never ignores its writes).
    pub(super) cells: Mutex<HashMap<Arc<str>, Arc<Cell>>>,
    pub(crate) backend: Arc<dyn StateBackend>,
    /// The pool learns concurrency limits: keys without a cap are counted by the store
    /// for `window` after their first use and after each refusal (see
    /// [`StateBackend::learning_window`]).
    learning: bool,
    window: Duration,
    /// Time zero of each cell's `learning_until`.
    started: tokio::time::Instant,
}

impl Shared {
    pub(crate) fn new(
        backend: Arc<dyn StateBackend>,
        policy: DegradedPolicy,
        learning: bool,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Op>) {
        let (ops, receiver) = mpsc::unbounded_channel();
        let window = if learning {
            backend.learning_window()
        } else {
            Duration::ZERO
        };
        let shared = Arc::new(Self {
            ops,
            policy,
            connected: AtomicBool::new(false),
            // Until the store first answers (and the pool's state is merged into it).
            degraded: AtomicBool::new(true),
            replicas: AtomicU32::new(1),
            rank: AtomicU32::new(0),
            turn: AtomicU32::new(0),
            holds: AtomicU64::new(0),
            holding: AtomicBool::new(false),
            cells: Mutex::new(HashMap::new()),
            backend,
            learning: learning && !window.is_zero(),
            window,
            started: tokio::time::Instant::now(),
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
            .or_insert_with(|| {
                let cell = Cell::default();
                if self.holding.load(Ordering::Acquire) {
                    cell.hold.store(1, Ordering::Release);
                }
                Arc::new(cell)
            })
            .clone();
        cell.cap.store(cap, Ordering::Relaxed);
        let key = SharedKey {
            id,
            cell,
            capped: cap != u32::MAX || quota.is_some(),
            quota: quota.map(|quota| SharedQuota {
                interval: quota.interval(),
                tolerance: quota.tolerance(),
            }),
            shared: self.clone(),
        };
        // Counted while its limit may be learned: from its first use here.
        key.learning_again();
        key
    }

    /// Milliseconds since `started`.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One key's count in this replica, and what the store last said about room on it.
#[derive(Default)]
pub(crate) struct Cell {
    /// `version << COUNT_BITS | count`: one word, so that a version and its count are read
    /// together. The count is of leases the store admitted (or taken alone while it was
    /// away) and not released yet: requests sent, never requests waiting.
    pub(super) word: AtomicU64,
    /// The key's configured cap (`u32::MAX`: none).
    pub(super) cap: AtomicU32,
    /// Releases on their way to the store (sent to the backend, not answered yet).
    pub(crate) releasing: AtomicU32,
    /// The key's place among the keys in force, by id (for the degraded policy's deal).
    pub(super) position: AtomicU32,
    /// Releases announced for this key (by any replica) so far: a lease refused by the
    /// store marks the key full only if none came since it asked (see `SharedKey::refused`).
    pub(super) frees: AtomicU32,
    /// The store refused a lease on this key and no release has been announced since:
    /// the key is busy for this replica.
    pub(super) full: AtomicBool,
    /// The generation of the key's shared learned limit last applied here (0: none yet).
    pub(super) limit_generation: AtomicU64,
    /// While the store's leases may still run after it went away (see
    /// `BackendLink::hold`): 1 + this replica's count on the key when it went away; 0: no
    /// hold.
    pub(super) hold: AtomicU32,
    /// Until when (ms since `Shared::started`) the key is counted by the store though it
    /// has no cap nor learned limit: its limit may be learned (see
    /// [`StateBackend::learning_window`]).
    pub(super) learning_until: AtomicU64,
}

impl Cell {
    /// Leases counted on the key here (admitted, or taken alone while the store was away).
    #[cfg(feature = "redis")]
    pub(crate) fn count(&self) -> u32 {
        decode(self.word.load(Ordering::SeqCst)).count
    }
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

fn release(id: &Arc<str>, cell: &Cell, shared: &Shared) {
    // On its way before the count drops: the backend, reading the count and then this,
    // never takes a count without this release for one the store has not applied it to.
    cell.releasing.fetch_add(1, Ordering::SeqCst);
    cell.word.fetch_add(ONE_LESS, Ordering::SeqCst);
    shared.send(Op::Release { key: id.clone() });
}

/// A lease's pending admission by the store.
pub(crate) struct Admission {
    pub(super) answer: oneshot::Receiver<Verdict>,
    /// `Cell::frees` when the lease asked.
    pub(super) frees: u32,
    /// The lease counts on the key once admitted (the key has a cap).
    counted: bool,
    /// The answer was read.
    answered: bool,
    id: Arc<str>,
    cell: Arc<Cell>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("key", &self.id)
            .field("answered", &self.answered)
            .finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Admitted, but its lease gave up before reading the answer: the slot the store
        // counted for it goes back.
        if !self.answered
            && self.counted
            && matches!(self.answer.try_recv(), Ok(Verdict::Admitted(_)))
        {
            release(&self.id, &self.cell, &self.shared);
        }
    }
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
            let share = shared
                .policy
                .share(
                    limit,
                    self.cell.position.load(Ordering::Relaxed),
                    shared.rank.load(Ordering::Relaxed),
                    shared.replicas.load(Ordering::Relaxed),
                    shared.turn.load(Ordering::Relaxed),
                )
                .min(limit);
            // Leases the store admitted before it went away may still run, here and in
            // other replicas: no more than this replica held then.
            let hold = self.cell.hold.load(Ordering::Acquire);
            if hold != 0 && limit != u32::MAX && shared.policy == DegradedPolicy::Split {
                return share.min(hold - 1);
            }
            return share;
        }
        // Full across the replicas, or another replica's probe of the key is running.
        if self.cell.full.load(Ordering::Acquire) {
            return 0;
        }
        limit
    }

    /// A lease was taken on the key, whose concurrency limit is `limit` (configured or
    /// learned; `u32::MAX`: none). Returns (counted, ask): whether the lease counts in
    /// this replica's count of the key already (taken alone, within the degraded policy's
    /// share, while the store is away: its release must say so to
    /// [`released`](Self::released)), and whether the store must admit it before its
    /// request goes (a key with a cap, a learned limit or a quota, or the key's probe
    /// after a rest; the store not away): see [`SharedKey::ask`]. A lease the store
    /// admits counts from its admission on ([`Answer::Admitted`]).
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn taken(&self, probe: bool, limit: u32) -> (bool, bool) {
        let counted = limit != u32::MAX;
        // Counted by the store too while its limit may be learned (not taken alone while
        // the store is away: nothing to learn from then).
        let learning = !counted && self.learning();
        if self.shared.degraded.load(Ordering::Relaxed) {
            // Within the policy's share already (`limit`); the store hears of it at the
            // merge.
            if counted {
                self.cell.word.fetch_add(ONE, Ordering::AcqRel);
            }
            return (counted, false);
        }
        (false, counted || learning || self.capped || probe)
    }

    /// Is the key, without a cap or learned limit, counted by the store now (its limit
    /// may be learned: see [`StateBackend::learning_window`])?
    fn learning(&self) -> bool {
        let shared = &*self.shared;
        shared.learning && shared.now_ms() < self.cell.learning_until.load(Ordering::Relaxed)
    }

    /// The key's limit may be learned from now on (first used, or refused here or in
    /// another replica): the store counts it for the learning window.
    #[inline(never)]
    pub(crate) fn learning_again(&self) {
        let shared = &*self.shared;
        if shared.learning {
            let until = shared
                .now_ms()
                .saturating_add(u64::try_from(shared.window.as_millis()).unwrap_or(u64::MAX));
            self.cell.learning_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// The key's lane for the bucket named `bucket` (a pool with buckets), shared under
    /// its own id: `<key id>.<bucket>`, the bucket's name with each byte outside
    /// `[A-Za-z0-9_-]` written `%XX` (so that an id holds no space, dot or brace); `cap`
    /// and `quota` are the lane's.
    pub(crate) fn lane(
        &self,
        bucket: &str,
        cap: u32,
        quota: Option<crate::quota::Gcra>,
    ) -> SharedKey {
        use std::fmt::Write as _;
        let mut id = String::with_capacity(self.id.len() + 1 + bucket.len());
        id.push_str(&self.id);
        id.push('.');
        for byte in bucket.bytes() {
            if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
                id.push(char::from(byte));
            } else {
                let _ = write!(id, "%{byte:02X}");
            }
        }
        self.shared.key(id, cap, quota)
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
        let cap = if cap == u32::MAX && self.learning() {
            COUNT_ONLY
        } else {
            cap
        };
        let frees = self.cell.frees.load(Ordering::Acquire);
        let (reply, answer) = oneshot::channel();
        self.shared.send(Op::Acquire(Acquire {
            key: self.id.clone(),
            cap,
            quota: self.quota,
            probe,
            reply,
            cell: self.cell.clone(),
        }));
        Admission {
            answer,
            frees,
            counted: cap != u32::MAX,
            answered: false,
            id: self.id.clone(),
            cell: self.cell.clone(),
            shared: self.shared.clone(),
        }
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

    /// A lease on the key ended: if it was `counted` (admitted by the store, or taken
    /// alone while it was away), take it off the count, and have the backend release its
    /// slot.
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn released(&self, counted: bool) {
        if counted {
            release(&self.id, &self.cell, &self.shared);
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
    /// Its request may go; `counted`: it counts on the key here until it ends (its
    /// release must say so).
    Admitted {
        /// Counted on the key.
        counted: bool,
        /// The key's count across the replicas with this lease (0: unknown).
        total: u32,
    },
    /// The key is full across the replicas (it reads busy here until a release).
    Full,
    /// The key's shared quota has no unit for this long.
    QuotaIn(Duration),
}

impl Admission {
    /// The store's answer. A backend gone without answering admits, uncounted (the
    /// degraded policy's share was applied to the take).
    pub(crate) fn poll(&mut self, key: &SharedKey, cx: &mut Context<'_>) -> Poll<Answer> {
        let verdict = match std::pin::Pin::new(&mut self.answer).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(verdict) => verdict,
        };
        self.answered = true;
        Poll::Ready(match verdict {
            Ok(Verdict::Admitted(total)) => Answer::Admitted {
                counted: self.counted,
                total,
            },
            Err(_) => Answer::Admitted {
                counted: false,
                total: 0,
            },
            Ok(Verdict::Full) => {
                key.refused(self.frees);
                Answer::Full
            }
            Ok(Verdict::QuotaIn(wait)) => Answer::QuotaIn(wait),
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
    pub(super) fn the_split_policy_deals_each_keys_cap_and_never_exceeds_it() {
        let split = DegradedPolicy::Split;
        // Three keys with a cap of 2, three replicas: two slots each, none over the cap.
        for replicas in 1..=7 {
            for cap in 1..=5 {
                for key in 0..3 {
                    for turn in 0..4 {
                        let shares: Vec<u32> = (0..replicas)
                            .map(|rank| split.share(cap, key, rank, replicas, turn))
                            .collect();
                        assert_eq!(shares.iter().sum::<u32>(), cap, "{shares:?}");
                        let (min, max) = (shares.iter().min(), shares.iter().max());
                        assert!(max.unwrap() - min.unwrap() <= 1, "{shares:?}");
                    }
                }
            }
        }
        let total = |rank| {
            (0..3)
                .map(|key| split.share(2, key, rank, 3, 0))
                .sum::<u32>()
        };
        assert_eq!([total(0), total(1), total(2)], [2, 2, 2]);
        // One key with a cap of 2, three replicas: each replica has turns.
        for rank in 0..3 {
            assert!((0..3).any(|turn| split.share(2, 0, rank, 3, turn) > 0));
        }
        assert_eq!(split.share(5, 0, 0, 0, 0), 5);
        assert_eq!(split.share(u32::MAX, 0, 1, 3, 0), u32::MAX);
        assert_eq!(DegradedPolicy::Open.share(2, 0, 1, 3, 0), 2);
        assert_eq!(DegradedPolicy::Closed.share(2, 0, 1, 3, 0), 0);
    }
}
