//! Sharing keys' state between processes: several replicas of a service (or of the
//! forward proxy) behave like one [`KeyPool`](crate::KeyPool).
//!
//! Without a backend (the default) a pool keeps its state in its own atomics and nothing
//! here runs: the request path pays one untaken branch per key looked at, no atomic
//! read-modify-write and no allocation. With one ([`KeyPoolBuilder::state_backend`]), the
//! pool's state boundary (`pool::slot` and `pool::record`) also tells the backend what
//! changed, and the backend tells the pool what other replicas changed:
//!
//! ```text
//!   pool (this replica)                         backend task                  store
//!   a 429 rests a key ───── Op::Rest ─────────► rest script ──────────────► deadline = max(...)
//!   401/403 disables it ─── Op::Disable ──────►                              publish to replicas
//!   a lease on a capped key ─ Op::Acquire ────► acquire script ─────────────► admitted if the sum of
//!        waits in poll_ready for the answer ◄── Acquire::admit ◄───────────  live replicas' counts fits
//!   a lease ends ────────── Op::Counts ───────► counts script (absolute) ───► publish "freed"
//!   BackendLink::apply / freed / refresh ◄───── pub/sub, periodic sync ◄────
//! ```
//!
//! What is shared, and how:
//!
//! - **Rests, disables, backoff levels** are read locally, never on the request path: a
//!   rest that one replica starts reaches the others by pub/sub and is applied to their
//!   atomics ([`BackendLink::apply`]); a periodic sync covers lost messages. Replicas
//!   exchange *remaining durations*, never instants, so their clocks need not agree.
//! - **The single probe** after a rest: a lease that is a key's probe is admitted only if
//!   no other replica's probe of the key runs; its answer ([`Op::ProbeDone`]) is announced,
//!   and the other replicas then owe none ([`BackendLink::probe_done`]).
//! - **Quotas** are one GCRA state in the store, on its clock: a lease on a key with a
//!   quota is admitted only if the shared quota has a unit (in the same round trip as the
//!   in-flight count); else the key reads busy here until the store says it has one.
//! - **In-flight counts** of keys with a cap: each replica counts its own leases per key in
//!   one word (a version and the count, [`KeyCount`]) and the store keeps the latest
//!   version per replica, with a time to live renewed by a heartbeat. A lease on a capped
//!   key is admitted by the store (one round trip, while `poll_ready` waits) only if the
//!   counts of the live replicas leave room under the cap; its release is written later, in
//!   the background, as an absolute count. A dead replica's counts expire with it; a lost
//!   write heals at the next one.
//! - **While the store is away** ([`DegradedPolicy`]) each replica decides alone, and on
//!   its return both sides are merged (a later deadline wins, a disable is kept, a higher
//!   level wins) before sharing resumes.
//!
//! A backend implements [`StateBackend`]: the Redis one is `shared::redis::RedisBackend`
//! (cargo feature `redis`).

#[cfg(feature = "redis")]
pub mod redis;

use std::collections::HashMap;
use std::fmt;
use std::future::Future as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::key::KeySpec;

#[cfg(doc)]
use crate::KeyPoolBuilder;

/// A store that shares keys' state between the replicas of a pool.
///
/// [`KeyPoolBuilder::state_backend`] names each key with [`key_id`](Self::key_id), then
/// calls [`attach`](Self::attach) once with the pool's end of the link; from then on the
/// backend reads [`Op`]s from the link, carries them to the store, and applies what other
/// replicas did through the link. Everything a backend does happens off the request path,
/// except answering an [`Acquire`] (which a request waits for).
pub trait StateBackend: Send + Sync + fmt::Debug + 'static {
    /// The store's name for a key: the same in every replica for the same key, and never
    /// revealing its value (a keyed hash of it, say).
    fn key_id(&self, spec: &KeySpec) -> String;

    /// Starts sharing the pool's state: read `ops` and apply other replicas' changes
    /// through `link`. Called once, by [`KeyPoolBuilder::build`].
    fn attach(&self, link: BackendLink, ops: mpsc::UnboundedReceiver<Op>);
}

/// What the pool asks of the store. Produced off the request path except for
/// [`Op::Acquire`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Op {
    /// A lease on a key with a cap asks to be admitted (its request waits for the answer).
    Acquire(Acquire),
    /// This replica's in-flight counts changed (a lease ended): write them, as absolute
    /// values, from [`BackendLink::counts`]. Coalesced: sent once until the backend reads
    /// the counts again.
    Counts,
    /// A key rests (it answered 429, or its window or quota is used up) for at least
    /// `remaining` from now; the key's backoff level is `level`.
    Rest {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
        /// How long the key rests from now.
        remaining: Duration,
        /// The key's backoff level (consecutive 429s).
        level: u32,
    },
    /// This replica's probe of a key (its single request after a rest) was answered, or
    /// given up: `back` if the key took it (the other replicas may use the key again at
    /// once); with the rest it started, if any (to be announced before the answer).
    ProbeDone {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
        /// The key answered its probe and is back.
        back: bool,
        /// A rest the answer started or extended: how long from now, and the level.
        rest: Option<(Duration, u32)>,
    },
    /// A key was disabled (401/403).
    Disable {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
    },
    /// A key answered a request sent after its last cool-down began: its backoff level is
    /// back to 0.
    Recovered {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
    },
}

/// A lease's request to be admitted under its key's cap, shared by every replica.
pub struct Acquire {
    /// The key's [`StateBackend::key_id`].
    pub key: Arc<str>,
    /// This replica's leases on the key, this one included: the version and count to
    /// store if admitted.
    pub count: KeyCount,
    /// The key's cap (configured or learned; `u32::MAX`: none).
    pub cap: u32,
    /// The key's request quota, if it has one: shared by every replica.
    pub quota: Option<SharedQuota>,
    /// The lease is the key's single probe after a rest: admit it only if no other
    /// replica's probe of the key is running.
    pub probe: bool,
    reply: oneshot::Sender<Verdict>,
}

/// A request quota as the store applies it (GCRA): one request per `interval`, a burst of
/// `tolerance / interval + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedQuota {
    /// The spacing between requests.
    pub interval: Duration,
    /// How far ahead of the spacing a burst may go.
    pub tolerance: Duration,
}

/// The store's answer to an [`Acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Admitted,
    Full,
    QuotaIn(Duration),
}

impl Acquire {
    /// Answers the lease: `true` lets its request go, `false` sends it back to wait for a
    /// release (announced by [`BackendLink::freed`]).
    pub fn admit(self, admitted: bool) {
        // The lease may be gone (its caller gave up): nobody to tell.
        let _ = self.reply.send(if admitted {
            Verdict::Admitted
        } else {
            Verdict::Full
        });
    }

    /// Answers the lease: not now, the key's shared quota has no unit for `wait`. The key
    /// reads busy here until then.
    pub fn quota_in(self, wait: Duration) {
        let _ = self.reply.send(Verdict::QuotaIn(wait));
    }
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("key", &self.key)
            .field("count", &self.count)
            .field("cap", &self.cap)
            .field("quota", &self.quota)
            .field("probe", &self.probe)
            .finish()
    }
}

/// One replica's leases on one key, as the store keeps them: the latest `version` wins, so
/// writes that arrive out of order cannot undo a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCount {
    /// Increases with every change of this replica's count for the key.
    pub version: u64,
    /// Leases alive on the key in this replica (reserved, in flight or streaming).
    pub count: u32,
}

/// A key's shared rest state, as another replica (or the store) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteRest {
    /// How long the key still rests, from when the store answered; `None` or zero: not
    /// resting.
    pub remaining: Option<Duration>,
    /// The key's backoff level.
    pub level: u32,
    /// The key is disabled.
    pub disabled: bool,
}

/// A key's local rest state, for merging into the store when it comes back.
#[derive(Debug, Clone)]
pub struct LocalRest {
    /// The key's [`StateBackend::key_id`].
    pub key: Arc<str>,
    /// How long the key still rests here.
    pub remaining: Option<Duration>,
    /// The key's backoff level here.
    pub level: u32,
    /// The key is disabled here.
    pub disabled: bool,
}

/// What each replica does alone while the store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DegradedPolicy {
    /// Each key's cap and quota are split across the replicas last seen alive: a replica
    /// takes at most `max(1, cap / replicas)` requests per key at once (so a cap below the
    /// number of replicas may be exceeded by up to `replicas - cap`), and spaces its
    /// requests `replicas` quota intervals apart. Rests and disables stay local until the
    /// store is back. The default.
    #[default]
    Split,
    /// Each replica uses each key's whole cap and quota: nothing stops for the store, at
    /// the risk of `replicas ×` the cap (and 429s, which rest keys as usual).
    Open,
    /// Keys with a cap or a quota take no request until the store is back (requests wait
    /// within their budget); keys with neither go on.
    Closed,
}

impl DegradedPolicy {
    /// The names the policies go by: `split`, `open`, `closed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }

    /// How many requests a replica may have in flight on a key with `cap` while degraded,
    /// with `replicas` last seen alive.
    pub fn share(&self, cap: u32, replicas: u32) -> u32 {
        match self {
            Self::Split => (cap / replicas.max(1)).max(1),
            Self::Open => cap,
            Self::Closed => 0,
        }
    }
}

impl std::str::FromStr for DegradedPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "split" => Ok(Self::Split),
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            _ => Err(format!(
                "`{s}` is not a degraded policy (split, open or closed)"
            )),
        }
    }
}

/// The backend's state, as an admin page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendHealth {
    /// The store answered the last call.
    pub connected: bool,
    /// The degraded policy is in force (the store is away, or back but not merged yet).
    pub degraded: bool,
    /// Replicas alive at the last heartbeat, this one included.
    pub replicas: u32,
    /// The policy applied while degraded.
    pub policy: DegradedPolicy,
}

/// The pool's side of a backend: the link's sender, the health cells, and each key's count.
pub(crate) struct Shared {
    ops: mpsc::UnboundedSender<Op>,
    policy: DegradedPolicy,
    connected: AtomicBool,
    degraded: AtomicBool,
    replicas: AtomicU32,
    /// An `Op::Counts` is on its way and the backend has not read the counts since.
    dirty: AtomicBool,
    /// Each key's count cell by id, kept across reloads (a key removed and added again
    /// continues its versions, so the store never ignores its writes).
    cells: Mutex<HashMap<Arc<str>, Arc<Cell>>>,
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

    fn send(&self, op: Op) {
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
                interval: Duration::from_nanos(quota.interval()),
                tolerance: Duration::from_nanos(quota.tolerance()),
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
    word: AtomicU64,
    /// Releases announced for this key (by any replica) so far: a lease refused by the
    /// store marks the key full only if none came since it asked (see `SharedKey::refused`).
    frees: AtomicU32,
    /// The store refused a lease on this key and no release has been announced since:
    /// the key is busy for this replica.
    full: AtomicBool,
}

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const ONE: u64 = (1 << COUNT_BITS) + 1;
const ONE_LESS: u64 = (1 << COUNT_BITS) - 1;

fn decode(word: u64) -> KeyCount {
    KeyCount {
        version: word >> COUNT_BITS,
        count: (word & COUNT_MASK) as u32,
    }
}

/// A slot's part in the shared state: its id in the store and its count cell.
pub(crate) struct SharedKey {
    pub(crate) id: Arc<str>,
    cell: Arc<Cell>,
    /// The key has a concurrency cap or a quota: its leases are admitted by the store.
    capped: bool,
    quota: Option<SharedQuota>,
    shared: Arc<Shared>,
}

/// A lease's pending admission by the store.
#[derive(Debug)]
pub(crate) struct Admission {
    answer: oneshot::Receiver<Verdict>,
    /// `Cell::frees` when the lease asked.
    frees: u32,
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
            if !self.capped {
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

    /// A lease was taken on the key: count it. `true` if the store must admit it before
    /// its request goes (a key with a cap or a quota, or the key's probe after a rest;
    /// the store not away): see [`SharedKey::ask`].
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn taken(&self, probe: bool) -> bool {
        if self.capped {
            self.cell.word.fetch_add(ONE, Ordering::AcqRel);
        } else if !probe {
            return false;
        }
        // While degraded, within the policy's share already (`limit`); the store hears
        // of it at the merge.
        !self.shared.degraded.load(Ordering::Relaxed)
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

    /// A lease on the key ended: count it, and have the backend write the counts.
    // Out of line: the pool without a backend never calls it, and keeps its fast path small.
    #[inline(never)]
    pub(crate) fn released(&self) {
        if !self.capped {
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
    fn refused(&self, frees: u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_word_carries_its_version() {
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
    fn the_split_policy_gives_each_replica_its_share_and_at_least_one() {
        assert_eq!(DegradedPolicy::Split.share(6, 3), 2);
        assert_eq!(DegradedPolicy::Split.share(2, 3), 1);
        assert_eq!(DegradedPolicy::Split.share(5, 0), 5);
        assert_eq!(DegradedPolicy::Open.share(2, 3), 2);
        assert_eq!(DegradedPolicy::Closed.share(2, 3), 0);
    }
}
