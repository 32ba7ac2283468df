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
//!   a lease on a capped key ─ Op::Acquire ────► acquire script ─────────────► admitted if the live
//!        waits in poll_ready for the answer ◄── Acquire::admit ◄───────────  replicas' counts fit and
//!                                                                            nobody waits; else queued
//!   an admitted lease ends ─ Op::Release ─────► release script ────────────► each freed slot granted
//!        a queued lease is admitted ◄────────── Acquire::admit ◄── "grant" ─  to the queue's first
//!   a limit is learned ──── Op::Limit ────────► limit script ──────────────► the lower wins, published
//!   BackendLink::apply / refresh ◄───────────── pub/sub, heartbeat ◄────────
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
//! - **Learned concurrency limits** are one per key for every replica: a replica that
//!   learns something of one ([`Op::Limit`], a [`LimitChange`]) has the store keep it,
//!   with the limit known to hold and the raise back-off (a lower limit always wins; a
//!   raise only if made on the limit in force, once that limit holds and the back-off has
//!   passed; a refused raise doubles the back-off), and every replica applies the store's
//!   answer ([`BackendLink::apply_limit`]); the store also admits leases under it, and
//!   only one lease at a time above the limit known to hold (the raise's try). A key with
//!   a learned limit is counted and admitted as a key with a cap is, and a refusal teaches
//!   from the key's count across the replicas when its request was sent (the store's
//!   admission says it: [`Acquire::admit_at`]), not from this replica's.
//! - **While a limit may be learned**, a key without a cap or learned limit is counted by
//!   the store too ([`COUNT_ONLY`]): for [`StateBackend::learning_window`] after its first
//!   use here and after each refusal of it (here, or a rest heard from another replica).
//!   This costs such a key an admission and a release per request in that window, and
//!   nothing after it: a key that is never refused costs the store no call per request.
//!   A refusal outside the window teaches from this replica's count, and opens the window
//!   again for the next.
//! - **In-flight counts** of keys with a cap count requests *sent* (leases admitted),
//!   never leases waiting for admission. A lease on a capped key is admitted by the store
//!   (one round trip, while `poll_ready` waits) if the live replicas' counts leave room
//!   under the cap and nobody waits; else it is queued there, in arrival order across the
//!   replicas, and waits for a slot to be granted to it: a release hands each slot it
//!   frees to the first lease queued, so it wakes at most as many waiters as it freed
//!   slots, and a queued lease changes no count and publishes nothing. Each replica's
//!   count lives as long as the replica renews it (each call, and the heartbeat): a dead
//!   replica's slots are free within the backend's time to live plus one heartbeat.
//! - **While the store is away** ([`DegradedPolicy`]) each replica decides alone, and on
//!   its return both sides are merged (a later deadline wins, a disable is kept, a higher
//!   level wins) before sharing resumes.
//!
//! - **Token quotas** (a lane with a token quota, configured or learned, and requests
//!   with a token cost) are one GCRA state per (key, bucket) in the store, in token
//!   units: a lease with a token cost takes its tokens there too ([`Op::Tokens`], one
//!   round trip while `poll_ready` or the routed request waits) and settles them with the
//!   answer's usage ([`Op::TokenSettle`], off the request path). See [`TokenAsk`] for the
//!   degraded rule.
//!
//! In a pool with buckets, each key's lane for a bucket is shared as a key is, under its
//! own id (`<key id>.<bucket>`): its count, queue, rests, probe and learned limit; the key's
//! own id keeps what is account-wide.
//!
//! A backend implements [`StateBackend`]: the Redis one is `shared::redis::RedisBackend`
//! (cargo feature `redis`).

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

mod key;
mod link;
mod tokens;

pub(crate) use key::{Admission, Answer, Shared, SharedKey};
pub use link::BackendLink;
pub use tokens::{TokenAsk, TokenVerdict};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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

    /// How long a key without a cap or learned limit is counted by the store (its leases
    /// admitted as a capped key's are, under [`COUNT_ONLY`]) after it is first used here,
    /// and after each refusal of it heard here: while a concurrency limit may be learned,
    /// so that a refusal teaches from the key's count across the replicas. Zero (the
    /// default): never.
    fn learning_window(&self) -> Duration {
        Duration::ZERO
    }
}

/// What the pool asks of the store. Produced off the request path except for
/// [`Op::Acquire`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Op {
    /// A lease on a key with a cap asks to be admitted (its request waits for the answer).
    Acquire(Acquire),
    /// A lease the store admitted (or one taken alone while it was away) ended: take it
    /// off this replica's count of the key. Each slot it frees goes to the first lease
    /// waiting for the key, in any replica.
    Release {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
    },
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
    /// This replica learned something of a key's concurrency limit (`change`). The store
    /// keeps one limit per key for every replica, with the limit known to hold and when
    /// the next try above it may start: a lower limit always wins; a raise wins only if
    /// it was made on the limit in force there (`generation` is the store's, as this
    /// replica last heard it), that limit is known to hold (no other try runs), and the
    /// raise back-off has passed. The store's answer goes to every replica
    /// ([`BackendLink::apply_limit`]).
    Limit {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
        /// The key's concurrency limit here now.
        limit: u32,
        /// The generation of the shared limit this replica last applied.
        generation: u64,
        /// What happened.
        change: LimitChange,
    },
    /// A request with a token cost asks for its tokens from the key's shared token quota
    /// (its request waits for the answer; see [`TokenAsk`]).
    Tokens(TokenAsk),
    /// A request's tokens the store took are settled: the answer reported `used` of the
    /// `charged` tokens (0 when the whole reservation comes back: refused, or never sent).
    /// What was not used goes back, never pulling the state before now; what was used
    /// beyond is charged.
    TokenSettle {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
        /// The tokens the store took for the request.
        charged: u64,
        /// The tokens the answer reported using.
        used: u64,
        /// The quota's tokens per period in force here.
        limit: u64,
        /// The quota's period.
        period: Duration,
        /// This replica's own state of the quota after settling, ahead of now (held no
        /// earlier than what its provider's headers said): the store holds its state no
        /// earlier than this.
        floor: Duration,
    },
}

/// What a replica learned of a key's concurrency limit ([`Op::Limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitChange {
    /// A refusal lowered it: the new limit holds, and the first try above it waits the
    /// initial raise back-off.
    Lowered,
    /// Successes at the limit raised it by one: a try above the limit known to hold.
    Raised,
    /// A try above the limit known to hold was refused: back to that limit, and the next
    /// try waits twice as long as the last.
    RaiseRefused,
    /// A try above the limit known to hold was served: once the store has seen as many
    /// served in a row as the raised limit, that limit holds, and the next try waits the
    /// initial raise back-off.
    RaiseServed,
}

/// The cap an [`Acquire`] names for a key without a cap or learned limit that is counted
/// all the same (its concurrency limit is being learned: see
/// [`StateBackend::learning_window`]): its leases count on the key, and the store admits
/// them all.
pub const COUNT_ONLY: u32 = u32::MAX - 1;

/// A lease's request to be admitted under its key's cap, shared by every replica.
///
/// Answer it once, now or later: a lease the store queued waits (its request in
/// `poll_ready`) until a slot is granted to it, then [`admit`](Self::admit) it.
pub struct Acquire {
    /// The key's [`StateBackend::key_id`].
    pub key: Arc<str>,
    /// The key's cap (configured or learned; `u32::MAX`: none, the lease is not counted,
    /// only its quota or probe is asked for; [`COUNT_ONLY`]: none, but counted).
    pub cap: u32,
    /// The key's request quota, if it has one: shared by every replica.
    pub quota: Option<SharedQuota>,
    /// The lease is the key's single probe after a rest: admit it only if no other
    /// replica's probe of the key is running.
    pub probe: bool,
    reply: oneshot::Sender<Verdict>,
    cell: Arc<key::Cell>,
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
    /// With the key's count across the replicas, this lease included (0: unknown).
    Admitted(u32),
    Full,
    QuotaIn(Duration),
}

impl Acquire {
    /// Answers the lease: `true` lets its request go (from then on it counts on the key
    /// here until it ends, [`Op::Release`]); `false` sends it back to look again (another
    /// replica's probe of the key runs: the key reads busy here until its answer,
    /// [`BackendLink::probe_done`]). Returns `false` if the lease was admitted but is gone
    /// (its caller gave up): the slot the store counted for it must then be released.
    pub fn admit(self, admitted: bool) -> bool {
        self.admit_at(admitted, 0)
    }

    /// [`admit`](Self::admit), telling the lease how many requests the key had in flight
    /// across the replicas with it (`total`, 0: unknown): a refusal of its request teaches
    /// the key's limit from that, and a try above the limit known to hold is told by it.
    pub fn admit_at(self, admitted: bool, total: u32) -> bool {
        if !admitted {
            // The lease may be gone (its caller gave up): nobody to tell.
            let _ = self.reply.send(Verdict::Full);
            return true;
        }
        let counted = self.cap != u32::MAX;
        if counted {
            self.cell.word.fetch_add(key::ONE, Ordering::AcqRel);
        }
        if self.reply.send(Verdict::Admitted(total)).is_err() && counted {
            self.cell.word.fetch_add(key::ONE_LESS, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Is the lease still waiting for the answer (its caller has not given up)?
    pub fn is_waiting(&self) -> bool {
        !self.reply.is_closed()
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

/// A key's learned concurrency limit as the store keeps it for every replica: each change
/// there raises `generation`, so a replica applies a newer one over its own and keeps the
/// lower of two of the same generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteLimit {
    /// Requests the key may have in flight across the replicas (at least 1).
    pub limit: u32,
    /// Raised by the store at every change of the limit.
    pub generation: u64,
    /// The highest limit known to hold (0: unknown): requests sent with more in flight
    /// across the replicas try a raise.
    pub floor: u32,
    /// How long from the store's answer until the next try above the limit known to hold
    /// may start.
    pub raise_in: Duration,
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
    /// The key's learned concurrency limit here, if one is in force below its cap, and the
    /// generation of the shared limit this replica last applied.
    pub limit: Option<RemoteLimit>,
}

/// What each replica does alone while the store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DegradedPolicy {
    /// Each key's cap is dealt out slot by slot, so that the replicas together never
    /// exceed it and none is starved: the replicas alive at the last heartbeat are
    /// ranked by name, the keys in force by id, and slot `s` of the `k`-th key goes to
    /// replica `(k × cap + s + turn) mod replicas`. While the keys' caps add up to at
    /// least the number of replicas, `turn` stays 0 and every replica holds at least one
    /// slot (the slots differ by at most one between replicas when every key has the same
    /// cap). Below that (say one key with a cap of 2 and three replicas), the replicas
    /// take turns: `turn` is the wall clock's seconds divided by [`TURN`], so each replica
    /// gets slots for one turn in every `replicas / slots` (rounded up). The cap holds
    /// exactly between replicas that saw the same heartbeat; at a change of turn, a
    /// request still in flight from the last turn overlaps the next (and so do clocks that
    /// disagree by more than a few milliseconds). The requests the store admitted before
    /// it went away run on beside the deal: for the backend's time to live (the Redis
    /// backend's `RedisOptions::ttl`, 5 s by default) after a replica notices the outage,
    /// it takes no more requests on a key than it had in flight then (it replaces its own
    /// as they end, up to its share), so the cap holds across the change; only a request
    /// admitted before the outage and still running after that overlaps the deal. A
    /// replica that held nothing on a key waits that long for its share of it (its
    /// requests wait within their budget). When the store is back, each replica merges
    /// and shares again at its own next heartbeat: for up to one heartbeat, a replica
    /// already sharing does not see the requests another still takes under the deal
    /// (the store, restarted empty, has not heard of them yet), and the two may overlap
    /// by that replica's share. Quotas are split too: each replica
    /// spaces its requests `replicas` quota intervals apart. Rests and disables stay
    /// local until the store is back. The default.
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

    /// How many requests a replica may have in flight on a key with `cap` while degraded:
    /// the key is the `key`-th in force (by id), the replica the `rank`-th of `replicas`
    /// alive at the last heartbeat, in `turn` (see [`Split`](Self::Split)).
    pub fn share(&self, cap: u32, key: u32, rank: u32, replicas: u32, turn: u32) -> u32 {
        match self {
            Self::Split if cap != u32::MAX => {
                let replicas = u64::from(replicas.max(1));
                let cap64 = u64::from(cap);
                let first = (u64::from(key) * cap64 + u64::from(turn)) % replicas;
                // The first of the key's slots that falls to this replica.
                let offset = (u64::from(rank) % replicas + replicas - first) % replicas;
                if offset >= cap64 {
                    0
                } else {
                    u32::try_from(1 + (cap64 - 1 - offset) / replicas).unwrap_or(cap)
                }
            }
            Self::Split | Self::Open => cap,
            Self::Closed => 0,
        }
    }
}

/// How long a turn lasts under [`DegradedPolicy::Split`] when the keys' caps add up to
/// fewer slots than there are replicas.
pub const TURN: Duration = Duration::from_secs(2);

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
