//! The failures this middleware adds of its own.

use std::fmt;
use std::time::Duration;

use crate::human::HumanDuration;

/// Every key of the pool has been disabled (the provider rejected each with 401/403, or
/// as the classifier decided): waiting cannot produce a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllKeysDisabled {
    keys: usize,
}

impl AllKeysDisabled {
    pub(crate) fn new(keys: usize) -> Self {
        Self { keys }
    }

    /// Number of keys in the pool (all disabled).
    pub fn keys(&self) -> usize {
        self.keys
    }
}

impl fmt::Display for AllKeysDisabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "all {} API key(s) are disabled: the provider rejected each of them",
            self.keys
        )
    }
}

impl std::error::Error for AllKeysDisabled {}

/// No key could take the request within its wait budget
/// ([`KeyPoolBuilder::max_wait`](crate::KeyPoolBuilder::max_wait)): every key is resting,
/// busy or out of quota, and the earliest comes back after the budget ends (or the budget
/// ran out while waiting).
///
/// Waiting is pointless when the earliest return is already past the budget, so the
/// request fails at once rather than at the end of the budget. [`retry_after`] says when
/// to try again.
///
/// [`retry_after`]: NoKeyAvailable::retry_after
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoKeyAvailable {
    retry_after: Duration,
    waited: Duration,
}

impl NoKeyAvailable {
    pub(crate) fn new(retry_after: Duration, waited: Duration) -> Self {
        Self {
            retry_after,
            waited,
        }
    }

    /// When the earliest key comes back (a rest ends or quota refills), from the moment of
    /// the error. When every usable key was merely busy (at its cap, or running the probe
    /// after a rest), no time is known and this is one second.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// How long the request waited for a key before giving up.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for NoKeyAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no API key is free within the wait budget (waited {}); the earliest is back in {}",
            HumanDuration(self.waited),
            HumanDuration(self.retry_after)
        )
    }
}

impl std::error::Error for NoKeyAvailable {}

/// A request costs more tokens than any key's whole token window holds
/// ([`TokenQuota`](crate::TokenQuota), configured or learned): no wait can make it fit, so
/// it fails at once.
///
/// # Examples
///
/// ```
/// # use tower_key_rotation::CostTooLarge;
/// fn explain(error: &CostTooLarge) -> String {
///     format!("{} tokens asked, {} at most", error.tokens(), error.window())
/// }
/// # let _ = explain;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostTooLarge {
    tokens: u64,
    window: u64,
    period: Duration,
}

impl CostTooLarge {
    pub(crate) fn new(tokens: u64, window: u64, period: Duration) -> Self {
        Self {
            tokens,
            window,
            period,
        }
    }

    /// The tokens the request was to reserve.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The largest token window of the keys that could take its route.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The period of that window.
    pub fn period(&self) -> Duration {
        self.period
    }
}

impl fmt::Display for CostTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request's {} tokens exceed every API key's whole token window ({} tokens per {}): it can never be sent",
            self.tokens,
            self.window,
            HumanDuration(self.period)
        )
    }
}

impl std::error::Error for CostTooLarge {}
