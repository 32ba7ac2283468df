//! How long a refused key rests.
//!
//! Everything here is pure: [`Backoff`] turns a consecutive-429 level (and the provider's
//! `Retry-After`, read by [`classify::retry_after`](crate::classify::retry_after)) into a
//! wait. The pool applies the result (see `pool`).

use std::time::Duration;

/// How a rate-limited key rests: exponential backoff with full jitter when the provider
/// gives no `Retry-After`, and a cap on any wait.
///
/// The `n`-th consecutive 429 (n ≥ 1) without `Retry-After` rests the key for a random time
/// in `[0, min(max, base · 2^(n-1))]` (full jitter: concurrent clients do not retry in
/// lock-step). An explicit `Retry-After` replaces that computed wait, capped at
/// `max_retry_after`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_key_rotation::Backoff;
///
/// let backoff = Backoff::default()
///     .base(Duration::from_millis(500))
///     .max(Duration::from_secs(30))
///     .jitter(false);
/// assert_eq!(backoff.wait(1, None), Duration::from_millis(500));
/// assert_eq!(backoff.wait(3, None), Duration::from_secs(2));
/// assert_eq!(backoff.wait(20, None), Duration::from_secs(30));
/// // The provider's own wait wins, capped at max_retry_after (5 minutes by default).
/// assert_eq!(backoff.wait(3, Some(Duration::from_secs(7))), Duration::from_secs(7));
/// assert_eq!(backoff.wait(1, Some(Duration::MAX)), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    max_retry_after: Duration,
    jitter: bool,
    pub(crate) quota_wait: Duration,
    pub(crate) max_quota_wait: Duration,
    pub(crate) raise_wait: Duration,
    pub(crate) max_raise_wait: Duration,
}

impl Default for Backoff {
    /// Base 1 s, max 60 s, `Retry-After` capped at 5 minutes, full jitter; a spent quota
    /// rests the key 1 hour when the reset is unknown, at most 24 hours when known; a
    /// learned concurrency limit is first tried higher after 5 minutes, at most an hour
    /// apart after refused tries.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            jitter: true,
            quota_wait: Duration::from_secs(3600),
            max_quota_wait: Duration::from_secs(24 * 3600),
            raise_wait: Duration::from_secs(5 * 60),
            max_raise_wait: Duration::from_secs(3600),
        }
    }
}

impl Backoff {
    /// The wait after the first 429 without `Retry-After` (before jitter).
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// The longest computed wait.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The longest wait a `Retry-After` may impose; also caps a rest until a window's reset
    /// read from rate-limit headers ([`Outcome::SuccessAtLimit`](crate::classify::Outcome)).
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// How long a key whose quota is spent ([`Outcome::QuotaExhausted`](crate::classify::Outcome))
    /// rests when the provider did not say when the quota resets (default 1 hour). Then
    /// one probe request decides whether it is back.
    pub fn quota_wait(mut self, wait: Duration) -> Self {
        self.quota_wait = wait;
        self
    }

    /// The longest rest for a spent quota whose reset the provider did state (default 24
    /// hours).
    pub fn max_quota_wait(mut self, max: Duration) -> Self {
        self.max_quota_wait = max;
        self
    }

    /// How long after a key's concurrency limit is learned (or a raise of it is served) the
    /// first try above it waits (default 5 minutes; see
    /// [`KeyPoolBuilder::learn_concurrency`](crate::KeyPoolBuilder::learn_concurrency)).
    /// With a [state backend](crate::shared) the wait is kept by the store and holds for
    /// every replica.
    pub fn raise_wait(mut self, wait: Duration) -> Self {
        self.raise_wait = wait;
        self
    }

    /// The longest wait between tries above a learned concurrency limit: each refused try
    /// doubles the wait, up to this (default 1 hour).
    pub fn max_raise_wait(mut self, max: Duration) -> Self {
        self.max_raise_wait = max;
        self
    }

    /// Full jitter on (default) or off (exact doubling; useful in tests).
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The wait for the `level`-th consecutive 429 (`level` ≥ 1), given the provider's
    /// `Retry-After`, if any.
    pub fn wait(&self, level: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return self.cap(wait);
        }
        let ceiling = self.ceiling(level);
        if self.jitter {
            let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(fastrand::u64(0..=nanos))
        } else {
            ceiling
        }
    }

    /// A wait the provider asked for (`Retry-After`, or a window's reset read from
    /// rate-limit headers), capped at `max_retry_after`: one cap for every rest for a limit.
    pub(crate) fn cap(&self, wait: Duration) -> Duration {
        wait.min(self.max_retry_after)
    }

    /// `min(max, base · 2^(level-1))`: the upper bound of the jittered wait.
    pub fn ceiling(&self, level: u32) -> Duration {
        let doublings = level.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let factor = u32::try_from(factor).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps_without_overflow() {
        let b = Backoff::default().jitter(false);
        let waits: Vec<u64> = (1..=8).map(|n| b.wait(n, None).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn jittered_wait_stays_under_the_ceiling() {
        let b = Backoff::default();
        for level in 1..10 {
            for _ in 0..100 {
                assert!(b.wait(level, None) <= b.ceiling(level));
            }
        }
    }
}
