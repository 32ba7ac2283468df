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
//!   a limit is learned ──── Op::Limit ────────► limit script ──────────────► the lower wins, published
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
//! - **Learned concurrency limits** are one per key for every replica: a replica that
//!   learns one ([`Op::Limit`]) has the store keep it (a lower limit always wins; a raise
//!   only if made on the limit in force), and every replica applies the store's answer
//!   ([`BackendLink::apply_limit`]); the store also admits leases under it. A key with a
//!   learned limit is counted and admitted as a key with a cap is.
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
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

mod key;
mod link;

pub(crate) use key::{Admission, Answer, Shared, SharedKey};
pub use link::BackendLink;

use std::fmt;
use std::sync::Arc;
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
    /// This replica learned a key's concurrency limit: lowered it after a refusal, or
    /// raised it after successes at it (`raise`). The store keeps one limit per key for
    /// every replica: a lower one always wins; a raise wins only if it was made on the
    /// limit in force there (`generation` is the store's, as this replica last heard it).
    /// The store's answer goes to every replica ([`BackendLink::apply_limit`]).
    Limit {
        /// The key's [`StateBackend::key_id`].
        key: Arc<str>,
        /// The key's concurrency limit here now.
        limit: u32,
        /// The generation of the shared limit this replica last applied.
        generation: u64,
        /// A raise (successes at the limit), not a lowering.
        raise: bool,
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

/// A key's learned concurrency limit as the store keeps it for every replica: each change
/// there raises `generation`, so a replica applies a newer one over its own and keeps the
/// lower of two of the same generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteLimit {
    /// Requests the key may have in flight across the replicas (at least 1).
    pub limit: u32,
    /// Raised by the store at every change of the limit.
    pub generation: u64,
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
