//! Per-key statistics: what an admin endpoint or a metrics exporter shows.

use std::fmt;
use std::time::Duration;

/// A snapshot of one key's counters and state, from [`KeyPool::snapshot`](crate::KeyPool::snapshot).
///
/// Keys are named by position only; a snapshot never holds a key value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStats {
    /// 1-based position of the key in the pool.
    pub position: usize,
    /// The key's name, if it has one.
    pub name: Option<String>,
    /// The account the key belongs to, if tagged.
    pub account: Option<String>,
    /// The key's weight.
    pub weight: u32,
    /// Requests sent with this key.
    pub requests: u64,
    /// Responses classified [`Outcome::Success`](crate::classify::Outcome::Success).
    pub successes: u64,
    /// Responses classified as rate limited (429).
    pub rate_limited: u64,
    /// Failures: refused credentials, server errors, and transport errors of requests that
    /// reached the provider (an error before it, such as a failed DNS lookup or connect,
    /// is not the key's: see [`Classifier::unreached_if`](crate::classify::Classifier::unreached_if)).
    pub failures: u64,
    /// Answers that refused the key's credentials (401/403). The key is disabled only when
    /// the same request then succeeded with another key (see
    /// [`RejectedKey`](crate::RejectedKey)).
    pub rejected: u64,
    /// Requests of a session (with an affinity id) this key took as the session's first
    /// choice: its preferred key, or the key it last spilled to.
    pub affinity_hits: u64,
    /// Requests of a session that spilled to this key because their first choice could not
    /// take them in time.
    pub affinity_spills: u64,
    /// Requests reserved or in flight on this key right now: `sent` plus `reserved`.
    pub in_flight: u32,
    /// Of `in_flight`, the requests sent: at the provider, or streaming their answer.
    pub sent: u32,
    /// Of `in_flight`, the reservations not sent yet (held by a ready service).
    pub reserved: u32,
    /// At most this many requests in flight at once: the configured cap, or a lower limit
    /// learned from the provider's refusals
    /// ([`KeyPoolBuilder::learn_concurrency`](crate::KeyPoolBuilder::learn_concurrency)).
    /// `None`: no limit.
    pub concurrency_limit: Option<u32>,
    /// The key's state now.
    pub state: KeyState,
    /// How long until the key may be used again, if it is cooling down (or suspended).
    pub cooling_down_for: Option<Duration>,
    /// How long until the key's quota lets the next request go, if it is used up.
    pub quota_wait: Option<Duration>,
    /// The key is coming back from a rest (a cool-down or a spent quota) and is owed, or
    /// running, its single probe request: until the probe succeeds it takes no other.
    pub probing: bool,
    /// The key was rejected by the provider and takes no more requests.
    pub disabled: bool,
    /// Tokens reserved by the requests sent with a token cost (estimated input plus the
    /// output allowed; see [`TokenReservation`](crate::pool::TokenReservation)).
    pub tokens_reserved: u64,
    /// Tokens the answers to those requests reported using (settled reservations).
    pub tokens_used: u64,
    /// Tokens per window in force, configured ([`KeyPoolBuilder::token_quota_per_key`](crate::KeyPoolBuilder::token_quota_per_key))
    /// or learned from the provider's headers; in a pool with buckets, a key shows its
    /// tightest bucket's. `None`: no token quota.
    pub token_limit: Option<u64>,
    /// How long until the token quota has room again, if it is spent now (in a pool with
    /// buckets, a key shows its soonest bucket's).
    pub token_wait: Option<Duration>,
}

/// A snapshot of one (key, bucket) in a pool with buckets, from
/// [`KeyPool::bucket_snapshot`](crate::KeyPool::bucket_snapshot): the key's statistics in
/// that bucket alone (its in-flight count, rest, probe, learned limit, quota there), with
/// the key's account-wide state (disabled, resting) where it overrides the bucket's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BucketStats {
    /// The bucket's name (a model name is not secret); `(none)` for requests that name no
    /// bucket, `(other)` for the overflow bucket that names beyond
    /// [`KeyPoolBuilder::max_buckets`](crate::KeyPoolBuilder::max_buckets) share.
    pub bucket: String,
    /// The key's statistics in this bucket.
    pub key: KeyStats,
}

/// A key's state, as the pool's state diagram names it (see [`KeyPool`](crate::KeyPool)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyState {
    /// Can take a request now (if it owes a probe after a rest, the next request is it).
    Healthy,
    /// At its concurrency limit, or out of quota until it refills.
    Busy,
    /// Cooling down after a refusal, or suspended for a spent quota: back, with a single
    /// probe request, when the rest ends.
    Resting,
    /// Its probe request after a rest is in flight: takes no other until it answers.
    Probing,
    /// Rejected by the provider: takes no more requests.
    Disabled,
}

impl KeyState {
    /// The state's name in lower case, as the proxy's admin page and metrics show it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Busy => "busy",
            Self::Resting => "resting",
            Self::Probing => "probing",
            Self::Disabled => "disabled",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for KeyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}", self.position)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        write!(
            f,
            ": {} requests, {} ok, {} rate limited, {} failed ({} rejected), {} in flight ({} sent)",
            self.requests,
            self.successes,
            self.rate_limited,
            self.failures,
            self.rejected,
            self.in_flight,
            self.sent
        )?;
        if self.disabled {
            f.write_str(", disabled")
        } else if let Some(wait) = self.cooling_down_for {
            write!(f, ", cooling down for {wait:.1?}")
        } else {
            Ok(())
        }
    }
}
